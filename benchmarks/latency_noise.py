"""How steady is batch-1 latency? The spread of a median of 10 forwards against a median of 50.

``profile`` reports ``latency_ms_b1`` as the median of ``latency_iters`` (50) timed forwards. This
script repeats that measurement ``--trials`` times for one model, each trial timing ``--iters``
forwards after ``--warmup`` untimed ones, and prints one JSON object: per trial the median of the
first 10 and of all timings, and their ranges over the trials. It prints and never asserts.

    .venv/bin/python benchmarks/latency_noise.py                       # vit_pico_patch4_32, 1 thread
    .venv/bin/python benchmarks/latency_noise.py --model deit_pico_distilled_patch4_32 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vitdistill.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_pico_patch4_32")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--iters", type=int, default=55)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = create_model(args.model, args.classes, args.img_size)
    model.eval()
    one = torch.randn(1, 3, args.img_size, args.img_size)
    trials = []
    with torch.inference_mode():
        for _ in range(args.trials):
            for _ in range(args.warmup):
                model(one)
            ms = []
            for _ in range(args.iters):
                start = time.perf_counter()
                model(one)
                ms.append(1000 * (time.perf_counter() - start))
            trials.append({"median_of_10": statistics.median(ms[:10]), f"median_of_{args.iters}": statistics.median(ms),
                           "min": min(ms)})
    out = {"model": args.model, "threads": args.threads, "trials": trials}
    for key in trials[0]:
        values = [t[key] for t in trials]
        out[f"{key}_range_ms"] = [round(min(values), 3), round(max(values), 3)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
