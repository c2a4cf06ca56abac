"""Summarise benchmarks/datafree.sh as JSON: the synthesis, then each student kind over seeds.

Usage: .venv/bin/python benchmarks/datafree_table.py runs/datafree-digits (or runs/datafree-cifar10)
"""
from __future__ import annotations

import json
import re
import argparse
import statistics
from pathlib import Path

from recipe_table import read_time

KINDS = {"real-none": "no-KD, real images", "real-kd": "logit-kd, real images",
         "synth-none": "labels only, synthetic images", "synth-kd": "logit-kd, synthetic images (data-free)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=Path("runs/datafree-digits"),
                    help="the folder of benchmarks/datafree.sh")
    root = ap.parse_args().root
    out: dict = {}
    teacher = root / "teacher" / "summary.json"
    if teacher.is_file():
        out["teacher_top1"] = json.loads(teacher.read_text())["student_top1"]
    synth = root / "synthetic" / "synth.json"
    if synth.is_file():
        s = json.loads(synth.read_text())
        out["synthesis"] = {k: s[k] for k in ("images", "teacher_top1_on_synthetic", "wall_s")}
        out["synthesis"].update(read_time(root / "synthetic.time"))
    for kind, label in KINDS.items():
        runs = sorted(p for p in root.glob(f"{kind}-s*") if (p / "summary.json").is_file())
        by_seed = {int(re.sub(r"\D", "", p.name.rsplit("-s", 1)[1])): json.loads((p / "summary.json").read_text())
                   for p in runs}
        if not by_seed:
            continue
        top1 = [round(100 * v["student_top1"], 2) for _, v in sorted(by_seed.items())]
        out[kind] = {"what": label, "seeds": sorted(by_seed), "top1": top1,
                     "mean": round(statistics.mean(top1), 2),
                     "sd": round(statistics.stdev(top1), 2) if len(top1) > 1 else None}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
