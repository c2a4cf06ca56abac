"""What each speed switch of ``train`` buys on this machine: one JSON object per line.

- ``optimizer``: the student's full train step (forward, deit-hard loss on fixed teacher logits,
  backward, clipping, AdamW) with each AdamW kernel of ``train.optimizer`` (foreach, fused, for-loop);
- ``channels_last``: the CNN teacher's forward (vitdistill's ``Teacher``, input preparation
  included) with the model and input in NCHW and in channels-last memory;
- ``compile``: the student step and the teacher forward eager and under ``torch.compile``
  (``--backend``, default inductor), compile time excluded (it is reported apart).

Every rate is the median of ``--repeats`` timings of ``--steps`` steps on in-memory tensors after
warm-up steps; the optimizer and channels-last variants are averaged over ``--passes`` passes
that alternate their order (the first variant timed in a process runs slower), the compile part
runs once, eager first; ``*_over_*`` keys are the speed-ups. The script prints and never asserts.

    .venv/bin/python benchmarks/speedups.py                     # CPU, the benchmark models of throughput.py
    .venv/bin/python benchmarks/speedups.py --device cuda --amp bf16 --batch 256
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench_common import sync, timed
from vitdistill.config import TrainConfig
from vitdistill.engine.runtime import autocast
from vitdistill.engine.speed import fused_supported, make_optimizer
from vitdistill.engine.trainer import param_groups
from vitdistill.methods import build_method
from vitdistill.models import Teacher, create_model, prepare_student
from vitdistill.models.wrappers import name_heads


def student_step(args, device: torch.device, optimizer: str, compiled: bool) -> tuple[float, float]:
    """Images/s of the student's train step and the seconds its first (compiling) steps took."""
    torch.manual_seed(0)
    student, _ = create_model(args.student, 10, args.img_size, json.loads(args.student_kwargs))
    prepare_student(student)
    student.to(device).train()
    method = build_method({"name": "deit-hard"}, 0.1).to(device)
    cfg = TrainConfig(optimizer=optimizer)
    opt = make_optimizer(param_groups([student, method], cfg.weight_decay), cfg, device)
    run = torch.compile(student, backend=args.backend) if compiled else student
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    t_out = {"logits": torch.randn(args.batch, 10, generator=g).to(device)}
    params = [p for grp in opt.param_groups for p in grp["params"]]

    def step() -> None:
        with autocast(device, args.amp):
            loss = method(name_heads(run(x)), t_out, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    return round(timed(step, args.steps, args.warmup, args.batch, device, args.repeats), 1), round(first, 2)


def teacher_fwd(args, device: torch.device, channels_last: bool, compiled: bool) -> tuple[float, float]:
    torch.manual_seed(1)
    model, _ = create_model(args.teacher, 10, args.img_size, json.loads(args.teacher_kwargs))
    teacher = Teacher(model).to(device)
    if channels_last:
        teacher.to_channels_last()
    if compiled:
        teacher.compile(backend=args.backend)
    images = torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8).to(device)

    def step() -> None:
        with autocast(device, args.amp):
            teacher(images)

    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    return round(timed(step, args.steps, args.warmup, args.batch, device, args.repeats), 1), round(first, 2)


def passes(variants: list, rate, n: int) -> dict:
    """The mean rate of each variant over ``n`` passes, every other pass in reverse order, so that
    a drift over the run (warming caches, allocator, clocks) favours no variant."""
    got: dict = {v: [] for v in variants}
    for i in range(n):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            got[v].append(rate(v))
    return {v: round(sum(r) / len(r), 1) for v, r in got.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="deit_pico_distilled_patch4_32")
    p.add_argument("--student-kwargs", default='{"depth": 5}')
    p.add_argument("--teacher", default="resnet_small_cnn")
    p.add_argument("--teacher-kwargs", default='{"layers": [1, 1, 2, 1]}')
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--passes", type=int, default=2, help="passes over the variants of a part, alternating order")
    p.add_argument("--parts", default="optimizer,channels_last,compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    common = {"device": str(device), "threads": args.threads, "batch": args.batch, "amp": args.amp,
              "student": args.student, "teacher": args.teacher, "torch": torch.__version__}
    if "optimizer" in parts:
        row = {"part": "optimizer", **common}
        kinds = [k for k in ("foreach", "fused", "for-loop") if k != "fused" or fused_supported(device)]
        rates = passes(kinds, lambda kind: student_step(args, device, kind, False)[0], args.passes)
        for kind in kinds:
            row[f"student_step_{kind.replace('-', '_')}_img_s"] = rates[kind]
        if "student_step_fused_img_s" in row:
            row["fused_over_foreach"] = round(row["student_step_fused_img_s"] / row["student_step_foreach_img_s"], 3)
        print(json.dumps(row), flush=True)
    if "channels_last" in parts:
        row = {"part": "channels_last", **common}
        rates = passes([False, True], lambda cl: teacher_fwd(args, device, cl, False)[0], args.passes)
        row["teacher_fwd_nchw_img_s"], row["teacher_fwd_channels_last_img_s"] = rates[False], rates[True]
        row["channels_last_over_nchw"] = round(row["teacher_fwd_channels_last_img_s"] / row["teacher_fwd_nchw_img_s"], 3)
        print(json.dumps(row), flush=True)
    if "compile" in parts:
        row = {"part": "compile", "backend": args.backend, **common}
        row["student_step_eager_img_s"] = student_step(args, device, "foreach", False)[0]
        row["student_step_compiled_img_s"], row["student_compile_s"] = student_step(args, device, "foreach", True)
        row["teacher_fwd_eager_img_s"] = teacher_fwd(args, device, False, False)[0]
        row["teacher_fwd_compiled_img_s"], row["teacher_compile_s"] = teacher_fwd(args, device, False, True)
        row["student_compiled_over_eager"] = round(row["student_step_compiled_img_s"] / row["student_step_eager_img_s"], 3)
        row["teacher_compiled_over_eager"] = round(row["teacher_fwd_compiled_img_s"] / row["teacher_fwd_eager_img_s"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
