"""One run, from a resolved config to a run directory.

The run directory is the contract people script against: config.yaml, metrics.jsonl,
summary.json, the model's safetensors (student.safetensors for distill, model.safetensors for
train), checkpoint.pt (resume state, tensors only) and report.md with report.png.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vitdistill.config import Config
from vitdistill.data import DataSplit
from vitdistill.engine import distributed as dist
from vitdistill.engine import io, speed
from vitdistill.engine.ema import check_ema, make_ema
from vitdistill.engine.evaluate import accuracy, calibration
from vitdistill.engine.runtime import pick_device, seed_everything, set_threads
from vitdistill.engine.setup import (augment_for, load_run_data, method_and_student, setup_method, teacher_names,
                                     teacher_side)
from vitdistill.engine.trainer import check_accum, param_groups, train_epoch, warmup_cosine
from vitdistill.errors import UserError
from vitdistill.methods import METHODS
from vitdistill.methods.base import method_knobs
from vitdistill.models import InputPrep
from vitdistill.models.factory import check_fits, expected_input_size
from vitdistill.report.profile import profile_model
from vitdistill.report.run_report import write_run_report

# Keys that may change between a run and its resume without changing what it computes (a plugin's
# method or model is named in method.name / model.*, which must not change). Two of them change
# the floating-point rounding: train.threads (torch's CPU kernels sum in another order, about 1e-8
# apart) and train.accum_steps (a run out of memory resumes with more micro-batches, which also
# change BatchNorm statistics and batch-relating losses; docs/usage.md). The rest leave it bit-exact.
_RESUME_FREE = {("train", "progress"), ("train", "threads"), ("train", "device"), ("train", "stop_after"), ("out",),
                ("synth",), ("train", "accum_steps"), ("plugins",)}


def _method_resolved(section: object) -> object:
    """The method section with every knob it left out filled with the method's default.

    A config names only the knobs that were given, so without this a knob set on ``--resume``
    that the first invocation left at its default would look like a key added since, and pass."""
    if not isinstance(section, dict) or section.get("name") not in METHODS:
        return section
    defaults = {}
    for knob, value in method_knobs(METHODS.get(section["name"])).items():
        try:  # as the saved JSON holds it: tuples become lists
            defaults[knob] = json.loads(json.dumps(value))
        except TypeError:
            continue
    return {**defaults, **section}


def _comparable(cfg: dict) -> dict:
    out = {s: ({k: v for k, v in sec.items() if (s, k) not in _RESUME_FREE} if isinstance(sec, dict) else sec)
           for s, sec in cfg.items() if (s,) not in _RESUME_FREE}
    if "method" in out:
        out["method"] = _method_resolved(out["method"])
    return out


def relocate_paths(value: Any, moves: Mapping[str, str]) -> Any:
    """A saved config with each path under a folder of ``moves`` (old -> new) named under the new
    one, in comma-separated lists too (several teachers, several caches)."""
    if isinstance(value, dict):
        return {k: relocate_paths(v, moves) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate_paths(v, moves) for v in value]
    if not isinstance(value, str) or not moves:
        return value
    return ",".join(_relocate_one(part, moves) for part in value.split(","))


def _relocate_one(part: str, moves: Mapping[str, str]) -> str:
    path = part.strip()
    for old, new in moves.items():
        if path == old or path.startswith(old.rstrip("/") + "/"):
            return part.replace(path, new.rstrip("/") + path[len(old.rstrip("/")):], 1)
    return part


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The first key where the current config ``a`` and the saved one ``b`` differ ("" if none).

    A key of ``a`` missing from ``b`` was added to vitdistill after the run began (the speed keys of
    ``train``, or a whole section such as ``synth``); it cannot have been chosen then, so it does not
    block the resume."""
    # a changed method or model is named by its name, not by the first knob that differs with it
    for key in sorted(set(a) | set(b), key=lambda k: (k not in ("name", "student", "teacher"), k)):
        if key in a and key not in b:
            continue
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if found:
                return found
        elif a.get(key) != b.get(key):
            return f"{prefix}{key}: {b.get(key)!r} then, {a.get(key)!r} now"
    return ""


_CHECKPOINT_KEYS = ("student", "method", "optimizer", "scheduler", "epoch", "metrics", "wall_s", "config")


def _read_checkpoint(path: Path) -> dict:
    """The resume state, or a one-line error when the file is not one this engine wrote."""
    if not os.access(path, os.R_OK):  # a file that is fine but not ours to read must not be called damaged
        raise UserError(f"cannot resume: '{path}' is not readable (permission denied); check its permissions")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and all(k in state for k in _CHECKPOINT_KEYS):
            json.loads(state["config"])
            return state
    except Exception:  # torch's unpickling errors run to many lines; what the user needs is below
        pass
    raise UserError(f"cannot resume: '{path}' is damaged or not a vitdistill checkpoint; remove it to start "
                    "over, or choose another --out")


def run(cfg: Config, mode: str, resume: bool = False, relocated: Mapping[str, str] | None = None) -> dict:
    """Train (``mode="train"``) or distill (``mode="distill"``) and fill the run directory.

    Under torchrun every process calls this with the same config (docs/distributed.md): each trains
    on its slice of every global batch inside one ``DistributedDataParallel``, only rank 0 writes
    the run directory, and every process returns the same summary.

    ``relocated`` maps folders the run's paths were under when it began to where they are now (a
    copied compare grid), so that ``--resume`` matches the saved config through the move.
    """
    dist.check_batch_size(cfg.train.batch_size)
    with dist.session():
        return _run(cfg, mode, resume, relocated or {})


def _run(cfg: Config, mode: str, resume: bool, relocated: Mapping[str, str]) -> dict:
    if cfg.out is not None and not str(cfg.out).strip():
        raise UserError("--out is empty; name the run folder, or leave --out out for runs/<mode>-<method>-<model>")
    out = Path(cfg.out or f"runs/{mode}-{cfg.method['name']}-{cfg.model.student}").expanduser()
    io.check_folder(out)
    ckpt_path = out / "checkpoint.pt"
    # rank 0's view decides, so no rank goes its own way
    exists, finished = dist.broadcast((ckpt_path.exists(), (out / "summary.json").exists()))
    foreign = dist.broadcast(io.foreign_folder(out, "run"))  # a cache, synthetic set, grid or demo
    if foreign:
        raise UserError(f"--out '{out}' holds {foreign}; pass --out to a new folder for the run")
    if finished and not exists:  # its checkpoint deleted to save space: nothing to resume, much to lose
        raise UserError(f"'{out}' holds a finished run (summary.json) without its checkpoint.pt, which neither "
                        "a new run nor --resume may overwrite; choose another --out or delete the folder")
    if exists and not resume:
        raise UserError(f"'{out}' already holds a run; pass --resume to continue it or choose another --out")
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    speed.check_compile(cfg.train)
    check_ema(cfg.train)
    check_accum(cfg.train, dist.world_size())
    speed.optimizer_kernel(cfg.train, device)
    with dist.local_main_first():  # one decode per node; the node's other processes read its cache
        data = load_run_data(cfg)
    world = dist.world_size()
    if len(data.train) < world:
        raise UserError(f"{len(data.train)} training samples cannot feed {world} processes; use fewer processes")

    augment = augment_for(cfg, data)  # checks the augmentation knobs before anything is written
    method, student, spec = method_and_student(cfg, mode, data)
    if not method.needs_teacher and (cfg.model.teacher or cfg.cache.dir) and dist.is_main():
        print(f"note: method '{method.name}' learns from the labels only; the teacher given is not used",
              file=sys.stderr, flush=True)
    side = teacher_side(cfg, data, method, device) if method.needs_teacher else None
    taps = setup_method(method, student, cfg.model.student, side, data)

    student.to(device)
    method.to(device)
    prep = InputPrep.for_model(student).to(device)
    optimizer = speed.make_optimizer(param_groups([student, method], cfg.train.weight_decay), cfg.train, device)
    n_train = len(data.train)
    steps_per_epoch = max(1, n_train // cfg.train.batch_size) if n_train > cfg.train.batch_size else 1
    total = steps_per_epoch * cfg.train.epochs
    # a warm-up past the run is allowed (the lr never peaks); the clamp only keeps round() finite
    warmup = max(1, round(min(cfg.train.warmup_epochs * steps_per_epoch, 2.0 ** 62)))
    schedule = warmup_cosine(total, warmup, cfg.train.lr, cfg.train.min_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    resolved = cfg.to_dict()
    metrics: list[dict] = []
    start_epoch, wall_before = 0, 0.0
    if resume and exists:  # every rank loads the checkpoint (the run directory is shared)
        state = _read_checkpoint(ckpt_path)
        if state.get("mode", mode) != mode:  # checkpoints from before the mode was kept carry none
            other = "model.safetensors" if state["mode"] == "train" else "student.safetensors"
            raise UserError(f"cannot resume '{out}' with `{mode}`: it is a `{state['mode']}` run (it writes {other}); "
                            f"resume it with `vitdistill {state['mode']} --resume`, or choose a new --out")
        saved = relocate_paths(json.loads(state["config"]), relocated)
        diff = _first_difference(_comparable(resolved), _comparable(saved))
        if diff:
            raise UserError(f"cannot resume '{out}': its config differs ({diff}); use the same config or a new --out")
        check_fits(student, state["student"], f"checkpoint '{ckpt_path}'", cfg.model.student)
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, metrics, wall_before = state["epoch"], list(state["metrics"]), state["wall_s"]
        if finished and start_epoch >= cfg.train.epochs:  # nothing to train: leave its files as they are
            try:
                done = json.loads((out / "summary.json").read_text())
            except (OSError, ValueError):
                raise UserError(f"'{out / 'summary.json'}' is damaged; delete '{out}' to train the run again") from None
            if dist.is_main():
                print(f"'{out}' is finished (summary.json); nothing to resume", flush=True)
            return done
    ema = make_ema(student, cfg.train)
    if ema is not None and resume and exists:
        if "ema" not in state:
            raise UserError(f"cannot resume '{out}' with train.ema_decay: its checkpoint holds no averaged weights; "
                            "resume without it or choose a new --out")
        ema.load_state_dict(state["ema"])

    created: list[Path] = []
    if dist.is_main():
        created = io.make_folder(out)
        io.write_text(out / "config.yaml", cfg.to_yaml())
    try:
        run_student, notes = speed.compile_models(cfg.train, student, taps, side.teachers if side else [])
        if notes and dist.is_main():
            print("speed: " + "; ".join(notes), flush=True)
        # one DistributedDataParallel around student and method under torchrun; the plain step otherwise
        source = side.source if side is not None else None
        step_module = dist.wrap_ddp(dist.TrainStep(run_student, prep, method, taps, source), device)
        data_dev = DataSplit(data.train.images.to(device), data.train.labels.to(device))

        def student_eval(images: torch.Tensor) -> torch.Tensor:
            return run_student(prep(images))

        def ema_eval(images: torch.Tensor) -> torch.Tensor:
            return ema.module(prep(images))

        teacher_pred, teacher_acc = None, None
        if side is not None and side.test_logits is not None:
            teacher_pred, teacher_acc = side.test_logits.argmax(1), accuracy(side.test_logits, data.test.labels)

        started = time.perf_counter()
        for epoch in range(start_epoch, cfg.train.epochs):
            row = {"epoch": epoch + 1}
            row.update(train_epoch(student=student, prep=prep, method=method, teacher=source, split=data_dev,
                                   augment=augment, taps=taps, optimizer=optimizer, scheduler=scheduler, cfg=cfg.train,
                                   epoch=epoch, device=device, num_classes=data.num_classes,
                                   desc=f"{mode} {epoch + 1}/{cfg.train.epochs}", step_module=step_module, ema=ema))
            if not math.isfinite(row["train_loss"]):  # the same sum on every rank: all stop together
                raise UserError(f"the training loss became {row['train_loss']} in epoch {epoch + 1}; nothing of that epoch "
                                "was saved. Lower train.lr, keep train.clip_grad on, or check the method's knobs, then run "
                                "again into a new --out")
            student.eval()
            # each rank evaluates its block of test batches; the logits are gathered on every rank
            logits = dist.predict(ema_eval if ema is not None else student_eval, data.test, cfg.train.eval_batch_size,
                                  device)
            acc = {**accuracy(logits, data.test.labels, teacher_pred), **calibration(logits, data.test.labels)}
            row.update({f"test_{k}": v for k, v in acc.items()})
            if ema is not None:  # the averaged student is the one scored and saved; the live one beside it
                live = accuracy(dist.predict(student_eval, data.test, cfg.train.eval_batch_size, device), data.test.labels)
                row["test_live_top1"] = live["top1"]
            metrics.append(row)
            wall = wall_before + time.perf_counter() - started
            if dist.is_main():  # the state dicts are the plain student's and method's, never DDP's
                print(_epoch_line(row), flush=True)
                io.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics))
                io.write_torch(ckpt_path, {
                    "student": student.state_dict(), "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "metrics": metrics, "wall_s": wall,
                    "config": json.dumps(resolved), "mode": mode, **({"ema": ema.state_dict()} if ema is not None else {}),
                })
            if cfg.train.stop_after and epoch + 1 - start_epoch >= cfg.train.stop_after and epoch + 1 < cfg.train.epochs:
                if dist.is_main():
                    print(f"stopped after epoch {epoch + 1} of {cfg.train.epochs} (train.stop_after); --resume continues",
                          flush=True)
                dist.barrier()  # the checkpoint is on disk before any process returns
                return {"stopped_after_epoch": epoch + 1, "epochs": cfg.train.epochs, "out": str(out)}
        wall = wall_before + time.perf_counter() - started
        if dist.is_main():
            final = ema.module if ema is not None else student
            summary = _finish(cfg, mode, out, final, method, side, spec, data, metrics, teacher_acc, wall, device)
        else:
            summary = None
        return dist.broadcast(summary)  # waits for rank 0's files; every process returns the same summary
    except BaseException:  # an interrupt or error before the first checkpoint leaves no half-made run
        if dist.is_main() and not ckpt_path.exists():
            _forget_run(out, created)
        raise


def _forget_run(out: Path, created: list[Path]) -> None:
    """Take away the files a run wrote before its first checkpoint, and the folders it made for them."""
    for name in ("config.yaml", "metrics.jsonl"):
        (out / name).unlink(missing_ok=True)
    io.remove_folders(created)


def _finish(cfg: Config, mode: str, out: Path, student: torch.nn.Module, method, side, spec: dict, data,
            metrics: list[dict], teacher_acc: dict | None, wall: float, device: torch.device) -> dict:
    """Rank 0's end of a run: the weights, the profile, summary.json and the report."""
    weights_name = "student.safetensors" if mode == "distill" else "model.safetensors"
    io.write_safetensors(out / weights_name, student.state_dict(),
                         {"timm_name": spec["name"], "timm_kwargs": json.dumps(spec["kwargs"]),
                          "small_stem": json.dumps(spec["small_stem"]), "vitdistill_model": cfg.model.student,
                          # what it was trained to score: a teacher used on other classes is named (setup)
                          "classes": json.dumps(data.classes), "data": str(cfg.data.source)})
    final = metrics[-1] if metrics else {}
    summary = {
        "mode": mode, "method": method.name, "data": cfg.data.source, "student": cfg.model.student,
        # a replayed cache names its teacher in its header; several caches, comma-joined like --teacher
        "teacher": (cfg.model.teacher or ",".join(side.cache_teachers) or None) if side else None,
        "teacher_cache": cfg.cache.dir if side else None,
        "student_top1": final.get("test_top1"), "student_top5": final.get("test_top5"),
        "student_nll": final.get("test_nll"), "student_ece": final.get("test_ece"),
        "agreement": final.get("test_agreement"), "test_images": len(data.test.labels),
        "teacher_top1": teacher_acc["top1"] if teacher_acc else None,
        "epochs": cfg.train.epochs, "wall_s": round(wall, 2), "img_size": data.img_size, "timm_spec": spec,
    }
    if cfg.train.ema_decay is not None:  # the figures above are the average's; the live weights' beside them
        summary.update(ema_decay=cfg.train.ema_decay, live_top1=final.get("test_live_top1"))
    s_size = expected_input_size(student) or data.img_size  # a model_kwargs img_size: its own, not the data's
    prof = profile_model(student, (data.in_chans, s_size, s_size), device=str(device))
    summary.update({k: prof[k] for k in ("params", "flops", "latency_ms_b1", "throughput_img_s", "peak_mem_mb")})

    def teacher_cost(t) -> dict:
        t_size = t.prep.size or data.img_size
        tprof = profile_model(t.model, (data.in_chans, t_size, t_size), device=str(device))
        return {k: tprof[k] for k in ("params", "flops", "latency_ms_b1")}

    if side is not None and side.model is not None:
        first = teacher_cost(side.model)
        summary.update({f"teacher_{k}": v for k, v in first.items()})
        summary["teacher_spec"] = side.spec
        if side.each_test_logits:  # several teachers, named (side.model is the first): each one's own figures
            costs = [first] + [teacher_cost(t) for t in side.teachers[1:]]
            summary["teachers"] = [
                {"model": name, "weights": weights, "top1": accuracy(logits, data.test.labels)["top1"], **c}
                for (name, weights), logits, c in zip(teacher_names(cfg), side.each_test_logits, costs)]
    elif side is not None and side.each_test_logits:  # several caches and no teacher named: names from headers
        summary["teachers"] = [{"model": c.header["teacher"], "weights": None,
                                "top1": accuracy(logits, data.test.labels)["top1"]}
                               for c, logits in zip(side.source.caches, side.each_test_logits)]
    io.write_json(out / "summary.json", summary)
    write_run_report(out, metrics, summary)
    return summary


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}", f"train_top1 {row['train_top1']:.4f}",
             f"test_top1 {row['test_top1']:.4f}"]
    if "test_live_top1" in row:  # with train.ema_decay test_top1 is the average's
        parts.append(f"live_top1 {row['test_live_top1']:.4f}")
    if "test_agreement" in row:
        parts.append(f"agreement {row['test_agreement']:.4f}")
    parts.append(f"{row['img_s']:.0f} img/s")
    return "  ".join(parts)
