"""Teacher-cache benchmark: what replaying stored teacher outputs saves, measured in one process.

Prints one JSON object per teacher (a CNN and a ViT), with the same student, batch and threads:
student-only step, online KD step, cached KD step (seconds per training step of the real loop,
augmentation included), their ratios, the cache's bytes per sample and epoch, and the cache
writer's throughput against the bare teacher forward on in-memory tensors.

    .venv/bin/python benchmarks/teacher_cache.py --data cifar10:../shared/datasets/cifar10-jpeg
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitdistill import teacher_cache as tc
from vitdistill.config import build_config
from vitdistill.data import DataSplit
from vitdistill.engine.setup import augment_for, cache_header, load_run_data
from vitdistill.engine.trainer import LiveTeacher, param_groups, train_epoch, warmup_cosine
from vitdistill.methods import build_method
from vitdistill.models import InputPrep, Teacher, create_model, prepare_student

TEACHERS = {
    "cnn": ("resnet_small_cnn", {}),
    "vit": ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 6}),  # 192 wide, 64 patches at 32 px
}


def step_time(cfg, data, method_name: str, source, epochs: int = 2) -> float:
    """Seconds per step of the real training loop, from the last of ``epochs`` epochs."""
    student, _ = create_model(cfg.model.student, data.num_classes, data.img_size)
    prepare_student(student)
    method = build_method({"name": method_name})
    opt = torch.optim.AdamW(param_groups([student, method], 0.05), lr=1e-3, foreach=True)
    steps = len(data.train) // cfg.train.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps * epochs, 1, 1e-3, 1e-5))
    row = {}
    for epoch in range(epochs):
        row = train_epoch(student=student, prep=InputPrep.for_model(student), method=method, teacher=source,
                          split=data.train, augment=augment_for(cfg, data), optimizer=opt, scheduler=sched,
                          cfg=cfg.train, epoch=epoch, device=torch.device("cpu"),
                          num_classes=data.num_classes)
    return row["epoch_s"] / steps


def teacher_forward_img_s(teacher: Teacher, split: DataSplit, batch: int) -> float:
    teacher(split.images[:batch])
    start = time.perf_counter()
    for s in range(0, len(split), batch):
        teacher(split.images[s:s + batch])
    return len(split) / (time.perf_counter() - start)


def bench(kind: str, args: argparse.Namespace) -> dict:
    name, kwargs = TEACHERS[kind]
    cfg = build_config([{"data": {"source": args.data, "train_limit": args.samples, "test_limit": 256},
                         "model": {"student": args.student, "teacher": name, "teacher_kwargs": kwargs},
                         "train": {"batch_size": args.batch, "epochs": 2, "threads": args.threads,
                                   "progress": False, "eval_batch_size": args.batch},
                         "cache": {"topk": args.topk}}])
    torch.set_num_threads(args.threads)
    data = load_run_data(cfg)
    model, _ = create_model(name, data.num_classes, data.img_size, kwargs)  # untrained: speed does not care
    teacher = Teacher(model)
    fwd = teacher_forward_img_s(teacher, data.train, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        header = cache_header(cfg, data, name, tc.state_hash(model), teacher.prep.spec)
        start = time.perf_counter()
        info = tc.write_cache(Path(tmp), header, teacher, data.train, augment_for(cfg, data), args.batch,
                              torch.device("cpu"), progress=False)
        write_img_s = len(data.train) * header["epochs"] / (time.perf_counter() - start)
        cached = tc.CachedTeacher(Path(tmp), header, torch.device("cpu"))
        student_only = step_time(cfg, data, "none", None)
        online = step_time(cfg, data, "deit-hard", LiveTeacher(teacher))
        cached_s = step_time(cfg, data, "deit-hard", cached)
        size = tc.cache_size_bytes(Path(tmp)) / (len(data.train) * header["epochs"])
    return {
        "teacher": f"{kind}:{name}", "teacher_params": sum(p.numel() for p in model.parameters()),
        "student": args.student, "batch": args.batch, "threads": args.threads, "samples": len(data.train),
        "topk": header["topk"], "num_classes": data.num_classes,
        "student_only_step_s": round(student_only, 5), "online_kd_step_s": round(online, 5),
        "cached_kd_step_s": round(cached_s, 5),
        "cached_over_student_only": round(cached_s / student_only, 3),
        "online_over_student_only": round(online / student_only, 3),
        "cache_bytes_per_sample_epoch": info["bytes_per_sample_epoch"],
        "cache_file_bytes_per_sample_epoch": round(size, 2),
        "tinyvit_bytes_per_sample_epoch": 4 * header["topk"] + 4,
        "teacher_forward_img_s": round(fwd, 1), "cache_write_img_s": round(write_img_s, 1),
        "cache_write_over_teacher_forward": round(write_img_s / fwd, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="cifar10:../shared/datasets/cifar10-jpeg")
    p.add_argument("--student", default="deit_pico_distilled_patch4_32")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--teachers", default="cnn,vit")
    args = p.parse_args()
    for kind in args.teachers.split(","):
        print(json.dumps(bench(kind, args)), flush=True)


if __name__ == "__main__":
    main()
