"""Teacher cache: TinyViT's stored teacher outputs, for every method that needs only logits.

Wu et al., *TinyViT: Fast Pretraining Distillation for Small Vision Transformers*, ECCV 2022.
The teacher runs once per (sample, epoch) on exactly the augmented image training will see; its
top-k log-probabilities are stored, and training rebuilds the teacher's distribution from them
instead of running the teacher:

    p_i = exp(v_i)                         for the k stored classes
    p_j = (1 - sum_i p_i) / (C - k)        for every other class (spread evenly, as TinyViT does)

and hands ``log p`` to the method as the teacher's ``logits``. Softmax is invariant to the constant
that separates log-probabilities from logits, so with k = C every temperature-softened target is
the live teacher's, up to the rounding of the stored values.

Layout of a cache directory (readable without vitdistill, see docs/teacher_cache.md):

    header.json                 what the cache is valid for; checked field by field before use
    epoch_0000.safetensors      "values" [N, k] float16 log-probs, "indices" [N, k] uint8/int16/int32
    ...                         metadata: epoch, header digest, sha256 of the two arrays
    test.safetensors            "logits" [N_test, C] float32 of the teacher on the plain test split

No augmentation seed is stored: the data layer's seeds are a pure function of (run seed, epoch,
sample index), so the header records the run seed and a digest of the seed function's output,
and a changed seed function is caught, not silently replayed. That is 4 bytes per sample and
epoch fewer than TinyViT.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vitdistill.data import DataSplit, sample_seeds
from vitdistill.data.mix import Augment
from vitdistill.engine import distributed as dist
from vitdistill.engine import io
from vitdistill.errors import UserError

FORMAT_VERSION = 2  # 2: the header records the teacher's input preparation
# Fields that must match between a cache and the run that uses it (epochs is checked as >=).
MATCH_FIELDS = ("format", "teacher", "teacher_hash", "teacher_input", "data", "train_limit", "num_samples", "num_classes",
                "pad", "hflip", "mix_prob", "cutmix_share", "seed", "seed_digest", "topk", "value_dtype",
                "crop_scale", "erase_prob", "randaugment")
# Written only when they are on, so a cache made before they existed keeps its digest and still fits.
_OPTIONAL = {"crop_scale": None, "erase_prob": 0.0, "randaugment": None}
# What a run that replays the cache must share with it; top-k and value type are the cache's own.
REPLAY_FIELDS = tuple(f for f in MATCH_FIELDS if f not in ("topk", "value_dtype"))
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type that holds every class index."""
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 32768 else torch.int32


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, shapes, bytes): which teacher a cache belongs to."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def seed_digest(run_seed: int, num_samples: int) -> str:
    """Digest of the augmentation seeds of epochs 0 and 1, to catch a changed seed function."""
    idx = torch.arange(num_samples)
    h = hashlib.sha256()
    for epoch in (0, 1):
        h.update(sample_seeds(run_seed, epoch, idx).numpy().tobytes())
    return h.hexdigest()[:32]


def make_header(*, teacher: str, teacher_hash: str, teacher_input: dict, data_fingerprint: str, train_limit: int | None,
                num_samples: int, num_classes: int, pad: int, hflip: bool, mix_prob: float, cutmix_share: float,
                seed: int, epochs: int, topk: int, value_dtype: str, crop_scale: float | None = None,
                erase_prob: float = 0.0, randaugment: str | None = None, data_source: str | None = None) -> dict:
    if value_dtype not in _DTYPES:
        raise UserError(f"cache value dtype must be float16 or float32, not '{value_dtype}'")
    if not 1 <= topk <= num_classes:
        raise UserError(f"cache top-k must lie in 1..{num_classes} (the class count), not {topk}")
    optional = {k: v for k, v in (("crop_scale", crop_scale), ("erase_prob", erase_prob), ("randaugment", randaugment))
                if v != _OPTIONAL[k]}
    return {**optional, "format": FORMAT_VERSION, "teacher": teacher, "teacher_hash": teacher_hash, "teacher_input": teacher_input,
            "data": data_fingerprint, **({"data_source": data_source} if data_source else {}),  # for messages only
            "train_limit": train_limit, "num_samples": num_samples, "num_classes": num_classes, "pad": pad,
            "hflip": hflip, "mix_prob": mix_prob, "cutmix_share": cutmix_share, "seed": seed, "seed_digest": seed_digest(seed, num_samples), "topk": topk,
            "value_dtype": value_dtype, "epochs": epochs}


def _core(header: dict) -> dict:
    return {k: header.get(k, _OPTIONAL.get(k)) for k in MATCH_FIELDS}


def header_digest(header: dict) -> str:
    core = {k: header[k] for k in MATCH_FIELDS if k in header}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:32]


_WRITING = "write this config's cache into a new --cache folder (or delete this one)"
_REPLAYING = "write a cache for this config with `vitdistill cache-teacher` into a new folder, or use a matching config"


def check_header(found: dict, wanted: dict, where: Path, fields: tuple[str, ...] = MATCH_FIELDS,
                 fix: str = _REPLAYING) -> None:
    """A cache built for another teacher, data, augmentation or seed is an error naming the field;
    ``fix`` says what to do (a run replaying the cache and cache-teacher writing it differ)."""
    have, want = _core(found), _core(wanted)
    for key in fields:
        if key == "data" and have[key] != want[key]:  # fingerprints say nothing to a reader: name the sources
            then = found.get("data_source")
            said = f"'{then}'" if then else "another data set"
            raise UserError(f"teacher cache '{where}' was made for {said} or other data settings (img_size, "
                            f"val_fraction), this run reads '{wanted.get('data_source')}'; {fix}")
        if have[key] != want[key]:
            raise UserError(f"teacher cache '{where}' was made for {key}={have[key]!r}, this run has {want[key]!r}; {fix}")
    if found["epochs"] < wanted["epochs"]:
        raise UserError(f"teacher cache '{where}' holds {found['epochs']} epochs, this run needs {wanted['epochs']}; "
                        "rebuild it with --epochs at least that")


def _digest(*tensors: torch.Tensor) -> str:
    """sha256 over the tensors' raw bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shard_path(cache_dir: Path, epoch: int) -> Path:
    return cache_dir / f"epoch_{epoch:04d}.safetensors"


def read_shard(path: Path, digest: str, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Open one epoch's shard (memory-mapped by safetensors) and verify it; corruption names the file."""
    if path.exists() and not os.access(path, os.R_OK):  # safetensors would call it missing
        raise UserError(f"cannot read teacher cache shard '{path}': permission denied; check its permissions")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            values, indices = f.get_tensor("values"), f.get_tensor("indices")
    except FileNotFoundError:
        raise UserError(f"teacher cache shard '{path}' is missing; rerun `vitdistill cache-teacher` to write it") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise UserError(f"teacher cache shard '{path}' is corrupt ({type(exc).__name__}); delete it and rerun "
                        "`vitdistill cache-teacher` to rewrite it") from None
    if meta.get("header") != digest or meta.get("epoch") != str(epoch):
        raise UserError(f"teacher cache shard '{path}' belongs to another cache; delete it and rerun cache-teacher")
    if meta.get("sha256") != _digest(values, indices):
        raise UserError(f"teacher cache shard '{path}' is corrupt (checksum mismatch); delete it and rerun "
                        "`vitdistill cache-teacher` to rewrite it")
    return values, indices


def read_test_logits(path: Path, digest: str, num_classes: int) -> torch.Tensor:
    """The teacher's stored test-split logits, verified like a shard: the teacher's top-1 and
    agreement in summary.json come from them, so a damaged file must not score silently."""
    redo = "delete it and rerun `vitdistill cache-teacher` to rewrite it"
    if not os.access(path, os.R_OK):  # safetensors reports a file it may not open as not found
        raise UserError(f"cannot read teacher cache file '{path}': permission denied; check its permissions")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            logits = f.get_tensor("logits")
    except Exception as exc:  # noqa: BLE001 - any parse failure (truncated, no 'logits') means the same thing
        raise UserError(f"teacher cache file '{path}' is corrupt ({type(exc).__name__}); {redo}") from None
    if meta.get("header") != digest:
        raise UserError(f"teacher cache file '{path}' belongs to another cache; {redo}")
    if logits.dim() != 2 or logits.shape[1] != num_classes or not logits.is_floating_point():
        raise UserError(f"teacher cache file '{path}' holds {str(logits.dtype).removeprefix('torch.')} logits of "
                        f"shape {list(logits.shape)}, not float [N, {num_classes}]; {redo}")
    if "sha256" in meta and meta["sha256"] != _digest(logits):  # caches before the checksum have none
        raise UserError(f"teacher cache file '{path}' is corrupt (checksum mismatch); {redo}")
    return logits.clone()  # small, and no longer tied to a file that cache-teacher may rewrite in place


def verified(read: Callable[..., object], *args: object) -> bool:
    """Whether ``read(*args)`` (:func:`read_shard`, :func:`read_test_logits`) passes its checks."""
    try:
        read(*args)
        return True
    except UserError:
        return False


def rebuild_log_probs(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The teacher's log-distribution from its top-k log-probs, the rest spread evenly (TinyViT)."""
    v = values.float()
    k = v.shape[1]
    out = torch.empty(v.shape[0], num_classes, device=v.device)
    if k < num_classes:
        rest = (1.0 - v.exp().sum(dim=1, keepdim=True)).clamp_min(1e-12) / (num_classes - k)
        out.copy_(rest.log().expand(-1, num_classes))
    return out.scatter_(1, indices.long(), v)


def write_cache(cache_dir: Path, header: dict, teacher: torch.nn.Module, split: DataSplit, augment: Augment,
                batch_size: int, device: torch.device, progress: bool = True,
                test: DataSplit | None = None) -> dict:
    """Write (or resume) a cache: every epoch whose shard is missing or invalid is (re)computed.

    Under torchrun the processes deal each epoch's batches out as contiguous blocks (the very
    batches one process runs, so the stored numbers do not depend on the process count); rank 0
    gathers them and alone reads and writes the files.
    """
    def prepare() -> tuple[dict, list[int]]:
        nonlocal header
        io.check_folder(cache_dir, "--cache")
        io.refuse_foreign_folder(cache_dir, "--cache", "cache", "the teacher cache")
        io.make_folder(cache_dir, "--cache")
        head = cache_dir / "header.json"
        asked = header["epochs"]
        if head.exists():
            old = read_header(cache_dir)
            if _core(old) != _core(header):
                check_header(old, header, cache_dir, fix=_WRITING)  # raises, naming the first field that differs
            # the header keeps the most epochs ever asked for; this call writes the ones it is asked for
            header = {**header, "epochs": max(asked, old["epochs"])}
        io.write_json(head, header)
        d = header_digest(header)
        return header, [e for e in range(asked) if not verified(read_shard, shard_path(cache_dir, e), d, e)]

    header, todo = dist.on_main(prepare)
    digest = header_digest(header)
    k, n, vdtype = header["topk"], header["num_samples"], _DTYPES[header["value_dtype"]]
    idtype = index_dtype(header["num_classes"])
    world, main = dist.world_size(), dist.is_main()
    blocks = dist.batch_ranges(n, batch_size)
    counts = [sum(b - a for a, b in block) for block in blocks]
    mine = blocks[dist.rank()]
    written = 0
    bar = tqdm(total=len(todo) * n, desc="cache-teacher", unit="img", disable=not (progress and main),
               dynamic_ncols=True)
    for epoch in todo:
        values = torch.empty(counts[dist.rank()], k, dtype=vdtype)
        indices = torch.empty(counts[dist.rank()], k, dtype=idtype)
        at = 0
        for start, stop in mine:
            idx = torch.arange(start, stop)
            images = augment.images(split.images, idx, epoch)
            logp = torch.log_softmax(teacher(images)["logits"].float(), dim=1)
            top = logp.topk(k, dim=1)
            values[at:at + len(idx)] = top.values.to(vdtype).cpu()
            indices[at:at + len(idx)] = top.indices.to(idtype).cpu()
            at += len(idx)
            bar.update(len(idx) * world)
        values, indices = dist.gather_rows(values, counts), dist.gather_rows(indices, counts)
        if main:
            meta = {"epoch": str(epoch), "header": digest, "sha256": _digest(values, indices)}
            io.atomic_write(shard_path(cache_dir, epoch),
                            lambda tmp, v=values, i=indices, m=meta: save_file({"values": v, "indices": i}, tmp, m))
        written += 1
    bar.close()
    test_path = cache_dir / "test.safetensors"
    if test is not None and dist.on_main(lambda: not verified(read_test_logits, test_path, digest, header["num_classes"])):
        logits = dist.predict(lambda x: teacher(x)["logits"], test, batch_size, device)
        if main:
            io.atomic_write(test_path, lambda tmp: save_file(
                {"logits": logits}, tmp, {"header": digest, "sha256": _digest(logits)}))
    dist.barrier()  # the files are on disk before any process goes on (compare replays them next)
    return {"dir": str(cache_dir), "epochs": header["epochs"], "written": written,
            "bytes_per_sample_epoch": k * (torch.finfo(vdtype).bits // 8 + torch.iinfo(idtype).bits // 8)}


def read_header(cache_dir: Path) -> dict:
    head = cache_dir / "header.json"
    if cache_dir.is_file():
        raise UserError(f"'{cache_dir}' is a file; give the teacher cache's folder (--teacher-cache "
                        f"{cache_dir.parent}), the one `vitdistill cache-teacher --cache DIR` wrote")
    if not head.is_file():
        raise UserError(f"'{cache_dir}' is not a teacher cache (no header.json); write one with `vitdistill cache-teacher`")
    try:
        header = json.loads(head.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"teacher cache header '{head}' is corrupt; remove the folder and rerun `vitdistill cache-teacher`")
    wrong = next((k for k, kind in _HEADER_TYPES.items() if k not in header or not _is(header[k], kind)), None)
    if wrong is None and header["value_dtype"] not in _DTYPES:
        wrong = "value_dtype"
    if wrong is not None:  # parsed, but not a header cache-teacher wrote: KeyErrors deep in the run otherwise
        what = "lacks" if wrong not in header else f"has a wrong {type(header[wrong]).__name__}"
        raise UserError(f"teacher cache header '{head}' is corrupt: it {what} '{wrong}'; remove the folder and rerun "
                        "`vitdistill cache-teacher`")
    return header


# the fields a run reads from a header by name (the rest are only compared)
_HEADER_TYPES = {"format": int, "teacher": str, "teacher_hash": str, "num_samples": int, "num_classes": int,
                 "topk": int, "value_dtype": str, "epochs": int, "seed": int}


def _is(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and (kind is not int or value >= 0)


class CachedTeacher:
    """A teacher source that replays a cache: the teacher never runs during training."""

    provides = ("logits",)

    def __init__(self, cache_dir: Path, wanted: dict, device: torch.device) -> None:
        self.dir = Path(cache_dir)
        self.header = read_header(self.dir)
        check_header(self.header, wanted, self.dir, REPLAY_FIELDS)
        self.digest = header_digest(self.header)
        # the shards this run will read (a cache may hold more) are verified now, checksums included,
        # so a broken one is named before the first step and not at its epoch: a shard is N * k * 3
        # bytes (1.5 MB for CIFAR-10 at k = 10), far less to hash than the run has to train
        for epoch in range(min(wanted.get("epochs", self.header["epochs"]), self.header["epochs"])):
            read_shard(shard_path(self.dir, epoch), self.digest, epoch)
        self.device = device
        self.num_classes = self.header["num_classes"]
        self._epoch: int | None = None

    def _load(self, epoch: int) -> None:
        values, indices = read_shard(shard_path(self.dir, epoch), self.digest, epoch)
        self._values, self._indices = values.to(self.device), indices.to(self.device)
        self._epoch = epoch

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        if epoch != self._epoch:
            self._load(epoch)
        idx = indices.to(self.device)
        return {"logits": rebuild_log_probs(self._values[idx], self._indices[idx], self.num_classes)}

    def test_logits(self) -> torch.Tensor | None:
        path = self.dir / "test.safetensors"
        if not path.is_file():
            return None
        return read_test_logits(path, self.digest, self.num_classes)


class CachedTeachers:
    """Several caches replayed together, one per teacher (Co-advise's teachers of different biases).

    Outputs are named as a live ``TeacherEnsemble`` names them: the first teacher's as ``logits``,
    teacher i's also as ``t{i}.logits``; so a method cannot tell the two sources apart.
    """

    provides = CachedTeacher.provides

    def __init__(self, caches: list[CachedTeacher]) -> None:
        self.caches = caches
        self.header = caches[0].header

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, cache in enumerate(self.caches):
            got = cache(images, indices, epoch)
            if i == 0:
                out.update(got)
            out.update({f"t{i}.{k}": v for k, v in got.items()})
        return out


def cache_size_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(cache_dir).glob("epoch_*.safetensors"))


__all__ = ["CachedTeacher", "CachedTeachers", "write_cache", "make_header", "rebuild_log_probs", "index_dtype", "state_hash",
           "read_shard", "read_header", "check_header", "cache_size_bytes"]
