"""ONNX Runtime latency of exported students side by side, as JSON.

`vitdistill export` times each file right after writing it, so an fp32 file and its int8 twin
are timed minutes apart, each beside whatever else the machine did then. This script loads the
given files into ONNX Runtime at a fixed thread count and times them in alternating order over
several passes, on real test images of the data set: the median of the batch-1 runs and the
throughput at a larger batch for each file. It prints and never asserts.

    .venv/bin/python benchmarks/onnx_latency.py --data cifar10:../shared/datasets/cifar10-jpeg \\
        runs/cifar10/export/student-deit-hard.onnx runs/cifar10/export/student-deit-hard.int8.onnx \\
        runs/cifar10/export-static/student-deit-hard.int8.onnx
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import onnxruntime as ort

from vitdistill.data import load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="ONNX files written by vitdistill export")
    ap.add_argument("--data", default="digits", help="data source whose test images feed the files")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=4, help="alternating passes over the files")
    ap.add_argument("--runs", type=int, default=50, help="batch-1 runs per file and pass")
    ap.add_argument("--batch", type=int, default=64, help="batch of the throughput runs")
    args = ap.parse_args()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sessions = {f: ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"]) for f in args.files}
    images = load_data(args.data).test.images
    one, many = {"images": images[:1].numpy()}, {"images": images[:args.batch].numpy()}
    b1: dict[str, list[float]] = {f: [] for f in args.files}
    rate: dict[str, list[float]] = {f: [] for f in args.files}
    for p in range(args.passes):
        order = args.files if p % 2 == 0 else args.files[::-1]  # the first-timed file runs slower
        for f in order:
            s = sessions[f]
            for _ in range(5):
                s.run(None, one)
            for _ in range(args.runs):
                start = time.perf_counter()
                s.run(None, one)
                b1[f].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            for _ in range(5):
                s.run(None, many)
            rate[f].append(5 * args.batch / (time.perf_counter() - start))
    out = {"data": args.data, "threads": args.threads, "passes": args.passes, "batch": args.batch,
           "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(),
           "files": [{"onnx": f, "bytes": os.path.getsize(f), "latency_ms_b1": round(statistics.median(b1[f]), 4),
                      f"img_s_b{args.batch}": round(statistics.median(rate[f]), 1)} for f in args.files]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
