"""Throughput benchmark: vitdistill's distillation epoch against timm's own KD task and the hardware's limit.

Prints one JSON object per configuration (teacher kind), every figure measured in this one process
with the same student, teacher, method, batch, thread count and device (docs/benchmarks.md):

- ``vitdistill_img_s``: images/s of vitdistill's real ``train_epoch`` loop (seeded uint8 augmentation,
  live frozen teacher, student step), over the decoded uint8 cache of the data set;
- ``vitdistill_cached_img_s``: the same epoch replaying a teacher cache written beforehand (outside
  the timing) by vitdistill's cache writer;
- ``vitdistill_synthetic_img_s``: the online epoch over random uint8 images of the same shape held
  in memory, so ``data_path_cost = 1 - vitdistill_img_s / vitdistill_synthetic_img_s``;
- ``timm_img_s``: the same models and method driven by ``timm.task.TokenDistillationTask`` and fed by
  a ``torch.utils.data.DataLoader`` over a torchvision ``ImageFolder`` of the extracted JPEGs with
  timm's train transforms (``create_transform``) in worker processes;
- ``student_step_img_s`` and ``teacher_fwd_img_s``: a student-only train step and a teacher forward
  on tensors already in memory; ``online_limit_img_s = 1 / (1/student + 1/teacher)``;
- the ratios ``online_over_limit``, ``online_over_timm``, ``cached_over_timm``,
  ``cached_over_student_only`` and whether each goal of the issue is met (printed, never asserted).

Every rate is one epoch of ``--steps`` steps after a warm-up epoch of ``--warmup`` steps (``--full-epoch``:
the whole training split), timed from the epoch's start to its last optimizer step.

    .venv/bin/python benchmarks/throughput.py                        # CIFAR-10, CNN and ViT teachers
    .venv/bin/python benchmarks/throughput.py --scaling --teachers cnn  # torchrun on 1 and 2 processes
    bash benchmarks/gpu_throughput.sh                                 # DeiT-Tiny at 224 px on a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_common import log, median, n_params, optimizer_and_schedule, ratio, rnd, sync, timed
from throughput_timm import extracted_train_folder, timm_img_s
from vitdistill import teacher_cache as tc
from vitdistill.config import build_config
from vitdistill.data import DataSplit, Dataset
from vitdistill.data.sources import resize_uint8
from vitdistill.engine.runtime import autocast
from vitdistill.engine.setup import augment_for, cache_header, load_run_data
from vitdistill.engine.trainer import LiveTeacher, train_epoch
from vitdistill.methods import build_method
from vitdistill.models import InputPrep, Teacher, create_model, prepare_student
from vitdistill.models.wrappers import name_heads

# Defaults sized to the issue: a ~0.55M-parameter ViT student and a ~1.6M-parameter CNN teacher at 32x32.
STUDENT, STUDENT_KWARGS = "deit_pico_distilled_patch4_32", {"depth": 5}  # 0.57M (the registered depth 6: 0.68M)
CNN_TEACHER, CNN_KWARGS = "resnet_small_cnn", {"layers": [1, 1, 2, 1]}  # 1.54M (the registered (1,1,1,1): 1.24M)
VIT_TEACHER, VIT_KWARGS = "vit_tiny_patch16_224", {"patch_size": 4, "depth": 6}  # 2.69M, as benchmarks/teacher_cache.py
GOALS = {"online_over_limit": (">=", 0.95), "online_over_timm": (">=", 1.15), "cached_over_timm": (">=", 1.7),
         "data_path_cost": ("<=", 0.10)}


# ----------------------------------------------------------------------------- models and config

class Setup:
    """One configuration: the config vitdistill would run with, plus the benchmark's knobs."""

    def __init__(self, args: argparse.Namespace, kind: str) -> None:
        self.args, self.kind = args, kind
        self.teacher_name, self.teacher_kwargs = ((args.cnn_teacher, args.cnn_teacher_kwargs) if kind == "cnn"
                                                  else (args.vit_teacher, args.vit_teacher_kwargs))
        self.device = torch.device(args.device)
        self.method_opts = {"name": args.method}
        self.steps = args.steps
        self.cfg = build_config([{
            "data": {"source": args.data, "train_limit": None if args.full_epoch else args.steps * args.batch,
                     "test_limit": 256, "pad": args.pad},
            "model": {"student": args.student, "student_kwargs": args.student_kwargs, "teacher": self.teacher_name,
                      "teacher_kwargs": self.teacher_kwargs},
            "method": self.method_opts,
            "train": {"batch_size": args.batch, "epochs": 1 + args.repeats, "threads": args.threads, "progress": False,
                      "eval_batch_size": args.batch, "device": args.device, "amp": args.amp, "seed": 0},
            "cache": {"topk": args.topk},
        }])

    def student(self, data: Dataset) -> torch.nn.Module:
        torch.manual_seed(0)
        model, _ = create_model(self.args.student, data.num_classes, data.img_size, self.args.student_kwargs)
        return model

    def teacher_model(self, data: Dataset) -> torch.nn.Module:
        torch.manual_seed(1)  # untrained: speed does not care about the weights
        model, _ = create_model(self.teacher_name, data.num_classes, data.img_size, self.teacher_kwargs)
        return model.eval()


# ----------------------------------------------------------------------------- data

def real_data(args: argparse.Namespace, cfg) -> tuple[Dataset, int]:
    """The decoded uint8 cache (``load_data``), subset to the measured epoch, resized when asked.

    Returns the data set and its native side (before any ``--img-size`` resize).
    """
    data = load_run_data(cfg)  # decodes once into the uint8 cache, then takes a fixed random subset
    native = data.img_size
    if args.img_size and args.img_size != native:
        log(f"resizing {len(data.train)} training images once from {native} to {args.img_size} px (outside timing)")
        data = Dataset(name=data.name, classes=data.classes,
                       train=DataSplit(resize_uint8(data.train.images, args.img_size), data.train.labels),
                       test=DataSplit(resize_uint8(data.test.images[:8], args.img_size), data.test.labels[:8]),
                       fingerprint=f"{data.fingerprint}-{args.img_size}px", pad=data.pad, hflip=data.hflip)
    return data, native


def synthetic_data(n: int, side: int, classes: int, pad: int, seed: int = 0) -> Dataset:
    """Random uint8 images held in memory, the shape of the real ones."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    test = DataSplit(images[:8].clone(), labels[:8].clone())
    return Dataset(name="synthetic", classes=[str(i) for i in range(classes)], train=DataSplit(images, labels),
                   test=test, fingerprint=f"synthetic-{n}-{side}-{classes}-{seed}", pad=pad, hflip=True)


def on_device(split: DataSplit, device: torch.device) -> DataSplit:
    return DataSplit(split.images.to(device), split.labels.to(device))



# ----------------------------------------------------------------------------- vitdistill's loop

def vitdistill_epoch(s: Setup, data: Dataset, source, warmup: int) -> float:
    """Images/s of an epoch of the real loop over ``data.train`` after a warm-up epoch of ``warmup`` steps
    (the median of ``--repeats`` epochs)."""
    cfg, device = s.cfg, s.device
    student = s.student(data)
    method = build_method(dict(cfg.method), cfg.train.label_smoothing)
    method.check_student(student, cfg.model.student)
    prepare_student(student)
    student.to(device)
    method.to(device)
    prep = InputPrep.for_model(student).to(device)
    split = on_device(data.train, device)
    batch = cfg.train.batch_size
    steps = len(split) // batch
    opt, sched = optimizer_and_schedule(cfg, [student, method], steps * s.args.repeats + warmup)
    augment = augment_for(cfg, data)
    common = dict(student=student, prep=prep, method=method, teacher=source, augment=augment, optimizer=opt,
                  scheduler=sched, cfg=cfg.train, device=device, num_classes=data.num_classes)
    if warmup:  # epoch 0 on the first warm-up batches; a cache holds epoch 0 for every sample
        k = min(len(split), warmup * batch)
        train_epoch(split=DataSplit(split.images[:k], split.labels[:k]), epoch=0, **common)
    rates = []
    for epoch in range(1, 1 + s.args.repeats):
        sync(device)
        start = time.perf_counter()
        train_epoch(split=split, epoch=epoch, **common)
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return median(rates)


def augment_img_s(s: Setup, data: Dataset) -> float:
    """The augmentation alone (crop, flip; from uint8 in memory) over the same epoch's batches."""
    from vitdistill.data import epoch_batches

    split = on_device(data.train, s.device)
    augment = augment_for(s.cfg, data)
    batches = epoch_batches(len(split), s.cfg.train.batch_size, 1, s.cfg.train.seed, drop_last=True)
    augment.batch(split.images, split.labels, batches[0], 1, data.num_classes)
    sync(s.device)
    start = time.perf_counter()
    for idx in batches:
        augment.batch(split.images, split.labels, idx, 1, data.num_classes)
    sync(s.device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def write_cache(s: Setup, data: Dataset, teacher: Teacher, cache_dir: Path) -> tuple[tc.CachedTeacher, float]:
    """vitdistill's cache writer over every epoch the benchmark runs (0: warm-up, 1..repeats: measured)."""
    header = cache_header(s.cfg, data, s.teacher_name, tc.state_hash(teacher.model), teacher.prep.spec)
    start = time.perf_counter()
    tc.write_cache(cache_dir, header, teacher, on_device(data.train, s.device), augment_for(s.cfg, data),
                   s.cfg.train.eval_batch_size, s.device, progress=False)
    sync(s.device)
    rate = len(data.train) * header["epochs"] / (time.perf_counter() - start)
    return tc.CachedTeacher(cache_dir, header, s.device), rate


# ----------------------------------------------------------------------------- physical limits

def student_step_img_s(s: Setup, data: Dataset, steps: int, warmup: int) -> float:
    """Forward, loss (the method's, on fixed teacher logits), backward, clipping and AdamW step of the
    student alone, on a normalized float batch already on the device."""
    cfg, device, batch = s.cfg, s.device, s.cfg.train.batch_size
    student = s.student(data)
    prepare_student(student)
    method = build_method(dict(cfg.method), cfg.train.label_smoothing)
    student.to(device).train()
    method.to(device).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, data.img_size, data.img_size, generator=g).to(device)
    y = torch.randint(0, data.num_classes, (batch,), generator=g).to(device)
    t_out = {"logits": torch.randn(batch, data.num_classes, generator=g).to(device)}
    opt, sched = optimizer_and_schedule(cfg, [student, method], steps + warmup)
    params = [p for grp in opt.param_groups for p in grp["params"]]

    def step() -> None:
        with autocast(device, cfg.train.amp):
            parts = method(name_heads(student(x)), t_out, y)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if cfg.train.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad, foreach=True)
        opt.step()
        sched.step()

    return timed(step, steps, warmup, batch, device, s.args.repeats)


def teacher_fwd_img_s(s: Setup, model: torch.nn.Module, data: Dataset, steps: int, warmup: int) -> float:
    """The teacher's forward alone (eval, no grad) on a normalized float batch already on the device."""
    batch = s.cfg.train.batch_size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, data.img_size, data.img_size, generator=g).to(s.device)

    @torch.no_grad()
    def step() -> None:
        with autocast(s.device, s.cfg.train.amp):
            model(x)

    return timed(step, steps, warmup, batch, s.device, s.args.repeats)


# ----------------------------------------------------------------------------- one configuration

def bench(args: argparse.Namespace, kind: str) -> dict:
    s = Setup(args, kind)
    device, batch = s.device, args.batch
    if args.synthetic_only:
        side = args.img_size or 32
        pad = args.pad if args.pad is not None else round(4 * side / 32)
        data = synthetic_data(args.steps * batch, side, args.synthetic_classes, pad)
        native, native_pad, source_name = side, pad, f"synthetic:{args.synthetic_classes}"
        s.cfg.data.pad = pad
    else:
        data, native = real_data(args, s.cfg)
        native_pad = data.pad if args.pad is None else args.pad
        if data.img_size != native and args.pad is None:  # the same shift, in pixels of the resized image
            s.cfg.data.pad = round(data.pad * data.img_size / native)
        source_name = args.data
    if len(data.train) < batch * 2:
        raise SystemExit(f"need at least two batches of training images, have {len(data.train)}")
    s.steps = len(data.train) // batch
    warm = args.warmup
    teacher_model = s.teacher_model(data).to(device)
    teacher = Teacher(teacher_model).to(device)
    if args.channels_last:  # vitdistill's train.channels_last; timm's path then gets the converted model too
        teacher.to_channels_last()
    stream = torch.cuda.Stream(device) if args.teacher_stream and device.type == "cuda" else None
    row: dict = {
        "teacher": f"{kind}:{s.teacher_name}", "teacher_kwargs": s.teacher_kwargs,
        "teacher_params": n_params(teacher_model), "student": args.student, "student_kwargs": args.student_kwargs,
        "student_params": n_params(s.student(data)), "method": args.method, "data": source_name,
        "img_size": data.img_size, "num_classes": data.num_classes, "pad": augment_for(s.cfg, data).pad,
        "batch": batch, "threads": args.threads, "device": str(device), "amp": args.amp, "steps": s.steps,
        "warmup_steps": warm, "repeats": args.repeats, "samples": s.steps * batch, "torch": torch.__version__,
        "teacher_channels_last": args.channels_last, "teacher_stream": stream is not None,
    }
    try:
        import timm

        row["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(device)
        row["cudnn_benchmark"] = torch.backends.cudnn.benchmark

    skip = set(args.skip)
    if "limits" not in skip:
        log(f"{kind}: physical limits (student step, teacher forward) on in-memory tensors")
        row["student_step_img_s"] = rnd(student_step_img_s(s, data, s.steps, warm))
        row["teacher_fwd_img_s"] = rnd(teacher_fwd_img_s(s, teacher_model, data, s.steps, warm))
        row["online_limit_img_s"] = rnd(1 / (1 / row["student_step_img_s"] + 1 / row["teacher_fwd_img_s"]))
    if "augment" not in skip:
        row["augment_img_s"] = rnd(augment_img_s(s, data))
    log(f"{kind}: vitdistill online epoch ({s.steps} steps, {source_name})")
    row["vitdistill_img_s"] = rnd(vitdistill_epoch(s, data, LiveTeacher(teacher, stream), warm))
    if "synthetic" not in skip and not args.synthetic_only:
        log(f"{kind}: vitdistill online epoch on synthetic in-memory uint8 images")
        syn = synthetic_data(len(data.train), data.img_size, data.num_classes, data.pad)
        row["vitdistill_synthetic_img_s"] = rnd(vitdistill_epoch(s, syn, LiveTeacher(teacher, stream), warm))
        row["data_path_cost"] = round(1 - row["vitdistill_img_s"] / row["vitdistill_synthetic_img_s"], 3)
    if "cached" not in skip:
        with tempfile.TemporaryDirectory(prefix="vitdistill-bench-cache-") as tmp:
            log(f"{kind}: writing the teacher cache ({1 + args.repeats} epochs, outside timing)")
            source, write_rate = write_cache(s, data, teacher, Path(tmp))
            row["cache_write_img_s"] = rnd(write_rate)
            log(f"{kind}: vitdistill cached epoch")
            row["vitdistill_cached_img_s"] = rnd(vitdistill_epoch(s, data, source, warm))
    if "timm" not in skip:
        log(f"{kind}: timm TokenDistillationTask epoch")
        try:
            folder = None if args.synthetic_only else extracted_train_folder(args.data, args.extract_dir)
            rate, info = timm_img_s(s, data, teacher_model, "synthetic" if args.synthetic_only else "imagefolder",
                                    native, native_pad, warm, folder)
            row["timm_img_s"] = rnd(rate)
            row.update(info)
            gc.collect()  # the loader's persistent workers are gone before the next configuration
        except (ImportError, FileNotFoundError, ValueError) as exc:
            row["timm_error"] = f"{type(exc).__name__}: {exc}"

    online, cached = row.get("vitdistill_img_s"), row.get("vitdistill_cached_img_s")
    row["online_over_limit"] = ratio(online, row.get("online_limit_img_s"))
    row["online_over_timm"] = ratio(online, row.get("timm_img_s"))
    row["cached_over_timm"] = ratio(cached, row.get("timm_img_s"))
    row["cached_over_student_only"] = ratio(cached, row.get("student_step_img_s"))
    if online and row.get("augment_img_s"):  # share of the online epoch spent augmenting (measured alone)
        row["augment_share"] = round(online / row["augment_img_s"], 4)
    met = {}
    for key, (op, goal) in GOALS.items():
        value = row.get(key)
        if value is not None:
            met[f"{key} {op} {goal}"] = value >= goal if op == ">=" else value <= goal
    row["goals_met"] = met
    return row


# ----------------------------------------------------------------------------- torchrun scaling

def vitdistill_has_ddp() -> bool:
    import vitdistill

    root = Path(vitdistill.__file__).parent
    return any("init_process_group" in p.read_text(errors="ignore") for p in root.rglob("*.py"))


def scaling(args: argparse.Namespace, kind: str) -> dict:
    """vitdistill's online epoch under torchrun on 1 and 2 processes, the machine's cores split between them."""
    s = Setup(args, kind)
    cores = args.cores or os.cpu_count() or 1
    if args.full_epoch:
        n = len(load_run_data(s.cfg).train)  # the decoded cache; the whole training split
        limit, samples = None, n // args.batch * args.batch  # the global batches of an epoch (drop_last)
    else:
        samples = args.steps * args.batch
        samples += samples % (2 * args.batch)  # an even number of steps, so two ranks split them evenly
        limit = samples
    row: dict = {"mode": "scaling", "teacher": f"{kind}:{s.teacher_name}", "student": args.student,
                 "method": args.method, "data": args.data, "batch": args.batch, "cores": cores, "samples": samples}
    if not vitdistill_has_ddp():
        row["error"] = ("vitdistill has no distributed (DDP) support yet: no init_process_group in the package; "
                        "`torchrun -m vitdistill distill` would run independent copies")
        return row
    runs = []
    with tempfile.TemporaryDirectory(prefix="vitdistill-bench-scaling-") as tmp:
        for nproc in (1, 2):
            threads = max(1, cores // nproc)
            out = Path(tmp) / f"n{nproc}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "vitdistill", "distill", "--data", args.data, "--student", args.student,
                   "--teacher", s.teacher_name, "--method", args.method, "--epochs", str(1 + args.repeats),
                   "--batch-size", str(args.batch), "--threads", str(threads), "--device", args.device,
                   "--no-progress", "--out", str(out),
                   "--set", f"model.student_kwargs={json.dumps(args.student_kwargs)}",
                   "--set", f"model.teacher_kwargs={json.dumps(s.teacher_kwargs)}",
                   "--set", f"data.train_limit={'null' if limit is None else limit}", "--set", "data.test_limit=256",
                   "--set", f"train.amp={args.amp}"]
            if args.pad is not None:
                cmd += ["--set", f"data.pad={args.pad}"]
            log(f"scaling {kind}: torchrun on {nproc} process(es), {threads} thread(s) each")
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.scaling_timeout)
            except subprocess.TimeoutExpired:
                row["error"] = f"torchrun with {nproc} processes ran past {args.scaling_timeout} s"
                return row
            wall = time.perf_counter() - start
            metrics = out / "metrics.jsonl"
            if proc.returncode != 0 or not metrics.is_file():
                lines = (proc.stderr + "\n" + proc.stdout).strip().splitlines()
                why = [ln.strip() for ln in lines if ("error" in ln.lower() and "error_file" not in ln
                                                     and "elastic/errors" not in ln)][:2] or lines[-3:]
                row["error"] = f"torchrun with {nproc} process(es) failed (rc {proc.returncode}): {' | '.join(why)}"
                return row
            # the first epoch warms up; the rest are measured
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()][1:]
            epoch_s = median([r["epoch_s"] for r in rows])
            runs.append({"nproc": nproc, "threads_per_proc": threads, "epoch_s": round(epoch_s, 3),
                         "img_s": round(samples / epoch_s, 1),
                         "rank0_reported_img_s": round(median([r.get("img_s", float("nan")) for r in rows]), 1),
                         "wall_s": round(wall, 1)})
    row["runs"] = runs
    row["one_proc_img_s"], row["two_proc_img_s"] = runs[0]["img_s"], runs[1]["img_s"]
    row["two_over_one"] = ratio(runs[1]["img_s"], runs[0]["img_s"])
    return row


# ----------------------------------------------------------------------------- entry point

def json_arg(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"depth\": 5}'")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10:../shared/datasets/cifar10-jpeg")
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--student-kwargs", type=json_arg, default=STUDENT_KWARGS, help="JSON timm overrides")
    p.add_argument("--cnn-teacher", default=CNN_TEACHER)
    p.add_argument("--cnn-teacher-kwargs", type=json_arg, default=CNN_KWARGS)
    p.add_argument("--vit-teacher", default=VIT_TEACHER)
    p.add_argument("--vit-teacher-kwargs", type=json_arg, default=VIT_KWARGS)
    p.add_argument("--teachers", default="cnn,vit", help="comma-separated: cnn, vit")
    p.add_argument("--method", default="deit-hard", choices=["deit-hard", "deit-soft"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    p.add_argument("--workers", type=int, help="DataLoader workers of timm's path (default: --threads)")
    p.add_argument("--steps", type=int, default=40, help="measured steps per epoch")
    p.add_argument("--warmup", type=int, default=5, help="steps of the warm-up epoch before each measured one")
    p.add_argument("--repeats", type=int, default=1, help="measured epochs per figure; the median is reported")
    p.add_argument("--full-epoch", action="store_true", help="measure a whole epoch of the training split")
    p.add_argument("--topk", type=int, default=10, help="teacher-cache top-k")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="autocast as vitdistill's train.amp (auto: bf16 on CUDA), for every path")
    p.add_argument("--img-size", type=int, help="resize the data once to this side (e.g. 224), or the "
                                                "synthetic side; default the data's own")
    p.add_argument("--pad", type=int, help="crop padding (default: the source's 4 px at its native size)")
    p.add_argument("--synthetic-only", action="store_true", help="random in-memory images only, no data set")
    p.add_argument("--synthetic-classes", type=int, default=10)
    p.add_argument("--timm-prefetcher", default="auto", choices=["auto", "on", "off"],
                   help="timm's PrefetchLoader (uint8 batches, normalized on the device); auto: on CUDA only")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark for every path on CUDA (timm's train.py sets it)")
    p.add_argument("--extract-dir", help="where the JPEG archive is extracted for ImageFolder "
                                         "(default $VITDISTILL_CACHE/bench or ~/.cache/vitdistill/bench)")
    p.add_argument("--channels-last", action="store_true", help="the teacher in channels-last memory "
                                                                   "(vitdistill's train.channels_last)")
    p.add_argument("--teacher-stream", action="store_true", help="CUDA: vitdistill's live teacher on a side "
                                                                 "stream (train.teacher_stream)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: limits, augment, synthetic, "
                                              "cached, timm")
    p.add_argument("--scaling", action="store_true", help="only the torchrun scaling measurement (1 and 2 processes)")
    p.add_argument("--cores", type=int, help="cores split between the torchrun processes (default: all)")
    p.add_argument("--scaling-timeout", type=int, default=3600)
    args = p.parse_args(argv)
    args.skip = [x.strip() for x in args.skip.split(",") if x.strip()]
    unknown = set(args.skip) - {"limits", "augment", "synthetic", "cached", "timm"}
    if unknown:
        p.error(f"unknown --skip parts: {', '.join(sorted(unknown))}")
    kinds = [k.strip() for k in args.teachers.split(",") if k.strip()]
    if not kinds or set(kinds) - {"cnn", "vit"}:
        p.error("--teachers takes cnn, vit or cnn,vit")
    if args.steps < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps must be at least 2, --repeats at least 1, --warmup at least 0")
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    for kind in kinds:
        row = scaling(args, kind) if args.scaling else bench(args, kind)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
