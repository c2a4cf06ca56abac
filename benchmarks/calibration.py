"""Calibration of finished students: the expected calibration error (15 bins, Guo et al. 2017) and
the test NLL of every run of a compare grid, scored again from its saved weights on its own test
split. For grids trained before runs reported calibration themselves (newer runs carry
``student_ece`` in summary.json). One JSON line per cell, then one per teacher run found.

Usage: .venv/bin/python benchmarks/calibration.py OUT [OUT ...] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from vitdistill.engine.evaluate import accuracy, calibration, predict
from vitdistill.evaluation import load_student
from vitdistill.models import InputPrep


def score(run: Path) -> dict:
    _, cfg, data, model = load_student(str(run), None, None, "benchmark")
    prep = InputPrep.for_model(model)
    logits = predict(lambda x: model(prep(x)), data.test, 500, torch.device("cpu"))
    return {**accuracy(logits, data.test.labels), **calibration(logits, data.test.labels), "n": len(data.test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for out in map(Path, args.out):
        grid = json.loads((out / "compare.json").read_text())
        for cell in grid["cells"]:
            runs = [out / "cells" / cell / f"seed{s}" for s in grid["seeds"]]
            got = [score(r) for r in runs if (r / "summary.json").exists()]
            saved = [json.loads((r / "summary.json").read_text())["student_top1"] for r in runs
                     if (r / "summary.json").exists()]
            if not got:
                continue
            assert all(abs(g["top1"] - s) < 1e-6 for g, s in zip(got, saved)), (cell, got, saved)
            ece = [g["ece"] for g in got]
            print(json.dumps({"grid": str(out), "cell": cell, "seeds": len(got), "test_images": got[0]["n"],
                              "top1_mean": round(statistics.fmean(g["top1"] for g in got), 4),
                              "ece_mean": round(statistics.fmean(ece), 4),
                              "ece_sd": round(statistics.stdev(ece), 4) if len(ece) > 1 else 0.0,
                              "nll_mean": round(statistics.fmean(g["nll"] for g in got), 4)}), flush=True)
        for teacher in sorted(p.parent for p in out.glob("teacher*/summary.json")) + \
                sorted(p.parent for p in out.glob("teachers/*/summary.json")):
            g = score(teacher)
            print(json.dumps({"grid": str(out), "teacher": teacher.name, "test_images": g["n"],
                              "top1": round(g["top1"], 4), "ece": round(g["ece"], 4), "nll": round(g["nll"], 4)}),
                  flush=True)


if __name__ == "__main__":
    main()
