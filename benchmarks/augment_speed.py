"""What each training augmentation costs per image on this machine's CPU, as JSON.

For a batch of random uint8 images it times the padded crop with flips, the random-resized crop
(``data.crop_scale``), random erasing on every sample (``data.erase_prob=1``, the worst case) and
DeiT's RandAugment (``rand-m9-mstd0.5-inc1``) and the full ``Augment`` pipeline with Mixup / CutMix, and prints images per second for each. The
script prints and never asserts.

    .venv/bin/python benchmarks/augment_speed.py --size 32 --batch 128
    .venv/bin/python benchmarks/augment_speed.py --size 224 --batch 64 --threads 2
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from vitdistill.data import augment_batch, sample_seeds
from vitdistill.data.augment import erase_batch, resized_crop_batch
from vitdistill.data.mix import Augment
from vitdistill.data.randaugment import parse_spec, rand_augment_batch


def _rate(fn: Callable[[], torch.Tensor], images: int, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return round(images * repeat / (time.perf_counter() - start), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pool = torch.randint(0, 256, (4 * args.batch, 3, args.size, args.size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    idx = torch.arange(args.batch)
    x, seeds = pool[idx], sample_seeds(0, 0, idx)
    deit = parse_spec("rand-m9-mstd0.5-inc1")
    full = Augment(0, pad=4, hflip=True, mix_prob=0.5, crop_scale=0.08, erase_prob=0.25, randaugment=deit)
    cases = {
        "pad_crop_flip": lambda: augment_batch(x, seeds, 4, True),
        "resized_crop_flip": lambda: resized_crop_batch(x, seeds, 0.08, True),
        "erase_every_sample": lambda: erase_batch(x, seeds, 1.0),
        "randaugment_m9_n2": lambda: rand_augment_batch(x, seeds, deit),
        "deit_pipeline": lambda: full.batch(pool, None, idx, 0, 10)[0],  # crop, RandAugment, erase 0.25, mix half
    }
    out = {"size": args.size, "batch": args.batch, "threads": args.threads,
           "images_per_s": {name: _rate(fn, args.batch, args.repeat) for name, fn in cases.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
