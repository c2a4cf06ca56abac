"""How far a top-k teacher cache moves the softened targets: KD and DKD terms on a live teacher's
logits against the same logits rebuilt from their top k (TinyViT's even tail), per temperature.

    .venv/bin/python benchmarks/cache_topk_tail.py [--classes 100] [--topk 10 100]

Synthetic logits (seed 0): a teacher whose confidence in the label grows from mild to very high
over the batch, and a random student. Prints one JSON object; docs/teacher_cache.md quotes it.
"""
from __future__ import annotations

import argparse
import json

import torch

from vitdistill.methods import soft_kl
from vitdistill.methods.dkd import dkd_terms
from vitdistill.teacher_cache import rebuild_log_probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--topk", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    b, c = args.batch, args.classes
    y = torch.arange(b) % c
    teacher = torch.randn(b, c) * 2
    teacher[torch.arange(b), y] += torch.linspace(4, 16, b)
    student = torch.randn(b, c)
    logp = torch.log_softmax(teacher, 1)
    rows = []
    for k in args.topk:
        top = logp.topk(min(k, c), dim=1)
        cached = rebuild_log_probs(top.values.half(), top.indices, c)  # float16, the cache's default
        for tau in (1.0, 4.0):
            live_t, live_n = dkd_terms(student, teacher, y, tau)
            cache_t, cache_n = dkd_terms(student, cached, y, tau)
            live_kd, cache_kd = soft_kl(student, teacher, tau), soft_kl(student, cached, tau)
            rows.append({"topk": k, "tau": tau, "kd_live": round(float(live_kd), 4), "kd_cache": round(float(cache_kd), 4),
                         "kd_change_pct": round(100 * float(cache_kd / live_kd - 1), 1),
                         "tckd_change_pct": round(100 * float(cache_t / live_t - 1), 1),
                         "nckd_change_pct": round(100 * float(cache_n / live_n - 1), 1)})
    print(json.dumps({"classes": c, "batch": b, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
