"""Summarise a CIFAR-10 recipe directory (benchmarks/cifar10_recipe.sh) as JSON and a markdown table.

Reads each run's summary.json and the `/usr/bin/time -v` record beside it (wall time, CPU time,
peak resident memory). Usage: .venv/bin/python benchmarks/recipe_table.py runs/cifar10 [RUN ...]
(RUN: the run folders to list, default the recipe's four).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RUNS = ["teacher", "student-none", "student-deit-hard", "student-deit-hard-cached"]


def read_time(path: Path) -> dict:
    if not path.is_file():
        return {}
    text = path.read_text()

    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    wall = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
    secs = None
    if wall:
        parts = [float(p) for p in wall.split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    cpu = sum(float(grab(rf"{k} time \(seconds\): (\S+)") or 0) for k in ("User", "System"))
    rss = grab(r"Maximum resident set size \(kbytes\): (\d+)")
    return {"wall_s": secs, "cpu_s": round(cpu, 1), "peak_rss_mb": round(int(rss) / 1024, 1) if rss else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=Path("runs/cifar10"), help="the recipe's folder")
    ap.add_argument("runs", nargs="*", help=f"run folders to list (default: {' '.join(RUNS)})")
    args = ap.parse_args()
    root = args.root
    rows = []
    for name in args.runs or RUNS:
        summary_path = root / name / "summary.json"
        if not summary_path.is_file():
            continue
        s = json.loads(summary_path.read_text())
        rows.append({"run": name, "model": s["student"], "method": s["method"], "epochs": s["epochs"],
                     "top1": round(100 * s["student_top1"], 2),
                     "agreement": round(100 * s["agreement"], 2) if s.get("agreement") is not None else None,
                     "params": s["params"], "flops": s["flops"], "latency_ms_b1": round(s["latency_ms_b1"], 2),
                     **read_time(root / f"{name}.time")})
    cache = read_time(root / "teacher-cache.time")
    print(json.dumps({"runs": rows, "teacher_cache_write": cache}, indent=1))
    head = ["run", "model", "method", "epochs", "top1", "agreement", "params", "flops", "latency_ms_b1", "wall_s",
            "cpu_s", "peak_rss_mb"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join("-" if r.get(h) is None else str(r[h]) for h in head) + " |")


if __name__ == "__main__":
    main()
