"""Involution's two ways to sum on CPU: shifted windows against ``F.unfold``, with and without autograd.

``Involution.forward`` takes ``unfold_sum`` when autograd is on and ``shifted_sum`` when it is off (a
teacher's forward, evaluation). This script times ``rednet_micro_inv``'s no-grad forward and its
training step (forward, cross-entropy, backward) with each sum forced, alternating the order over
``--passes``, and prints one JSON object (seconds per batch, medians over passes). It never asserts.

    .venv/bin/python benchmarks/involution.py                 # batch 128, 32 px, 1 thread
    .venv/bin/python benchmarks/involution.py --threads 2 --passes 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vitdistill.models import create_model, involution


def _timed(step: Callable[[], object], iters: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = create_model("rednet_micro_inv", 10, args.img_size)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    sums = {"shifted": involution.shifted_sum, "unfold": involution.unfold_sum}

    def forced(name: str) -> Callable[..., torch.Tensor]:
        def forward(self: involution.Involution, inp: torch.Tensor) -> torch.Tensor:
            kernel = self.span(self.reduce(self.pool(inp)))
            return sums[name](inp, kernel, self.kernel_size, self.groups, self.stride)
        return forward

    def no_grad_forward() -> None:
        with torch.no_grad():
            model.eval()(x)

    def train_step() -> None:
        model.train().zero_grad()
        F.cross_entropy(model(x), y).backward()

    original = involution.Involution.forward
    times: dict[str, list[float]] = {}
    try:
        for p in range(args.passes):
            for name in sorted(sums, reverse=p % 2 == 1):
                involution.Involution.forward = forced(name)
                times.setdefault(f"nograd_fwd_{name}_s", []).append(_timed(no_grad_forward, args.iters))
                times.setdefault(f"train_step_{name}_s", []).append(_timed(train_step, args.iters))
    finally:
        involution.Involution.forward = original
    out: dict[str, object] = {"model": "rednet_micro_inv", "batch": args.batch, "img_size": args.img_size,
                              "threads": args.threads, "passes": args.passes, "torch": torch.__version__}
    med = {k: statistics.median(v) for k, v in times.items()}
    out.update({k: round(v, 4) for k, v in med.items()})
    out["nograd_fwd_unfold_over_shifted"] = round(med["nograd_fwd_unfold_s"] / med["nograd_fwd_shifted_s"], 2)
    out["train_step_shifted_over_unfold"] = round(med["train_step_shifted_s"] / med["train_step_unfold_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
