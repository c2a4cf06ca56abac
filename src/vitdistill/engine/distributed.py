"""Several processes with ``torchrun`` and ``torch.distributed``: the few verbs the engine needs.

``torchrun --nproc_per_node N -m vitdistill distill ...`` starts N processes and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`session` joins them with
``init_process_group(init_method="env://")`` (gloo for CPU tensors, NCCL for CUDA ones, each
process on ``cuda:LOCAL_RANK``) and destroys the group at exit. Without those variables, or with
WORLD_SIZE 1, every helper here is the identity and nothing is initialised.

The rules the engine keeps under several processes (docs/distributed.md):

- the sampler: :func:`epoch_batches` draws the same GLOBAL batches as one process does; each rank
  takes its contiguous slice of each (:func:`local_slice`), so N processes see exactly the batches
  one process sees, and the per-sample seeded augmentation makes the images identical too;
- gradients: the student and the method are wrapped together in one ``DistributedDataParallel``
  (:func:`wrap_ddp`), whose averaged gradient is the one-process gradient for losses that are means
  of per-sample terms;
- metrics are sums and counts, summed over the ranks (:func:`all_reduce_sums`);
- inference over a split is sharded by whole batches and gathered (:func:`predict`), so every
  batch is the one a single process computes, bit for bit;
- only rank 0 writes files; the others wait at :func:`barrier` or :func:`broadcast` where they
  must see what rank 0 wrote or decided.

Every collective here runs on CPU tensors, so it goes through gloo; only DDP's gradient buckets use
NCCL on CUDA.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from vitdistill.data import DataSplit
from vitdistill.errors import UserError


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them; (0, 1, 0) in a plain process."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start several processes with "
                        "torchrun") from None


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def check_batch_size(batch_size: int, what: str = "train.batch_size") -> None:
    """The global batch must split evenly over the processes (read from WORLD_SIZE, no group needed)."""
    world = env_world()[1]
    if world > 1 and batch_size % world:
        raise UserError(f"{what} {batch_size} is not divisible by the {world} processes (WORLD_SIZE); each process "
                        f"takes batch_size / {world} samples of every global batch, so choose a multiple of {world}")


@contextlib.contextmanager
def session(timeout_min: float = 60.0) -> Iterator[None]:
    """Join the processes torchrun started, for the duration of the block; a no-op in one process
    or when a group already exists (the outermost session owns the group and destroys it)."""
    _, world, local = env_world()
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=timeout_min))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Let each node's LOCAL_RANK 0 run the block first (decoding a data set into the shared decode
    cache, say) and the node's other processes after it, when they find the work done."""
    if not active():
        yield
        return
    first = env_world()[2] == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def pick_device_name(name: str) -> str:
    """Under several processes, ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``; ``cuda:N`` is an error."""
    _, world, local = env_world()
    if world <= 1:
        return name
    if name == "auto":
        return f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return f"cuda:{local}"
    if name.startswith("cuda:"):
        raise UserError(f"device '{name}' under torchrun: every process uses cuda:LOCAL_RANK; pass --device cuda "
                        "(or auto)")
    return name


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value): for decisions that must agree."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (it reads or writes shared files) and hand its result to every
    rank; a :class:`UserError` there is raised on every rank, so no process waits for the others."""
    if not active():
        return fn()
    if is_main():
        try:
            result = fn()
        except UserError as exc:
            broadcast(("user", str(exc)))
            raise
        except BaseException as exc:
            broadcast(("crash", f"{type(exc).__name__}: {exc}"))
            raise
        return broadcast(("ok", result))[1]
    kind, value = broadcast(None)
    if kind == "user":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def all_reduce_sums(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Sum each value over the ranks (one collective), as float64."""
    keys = sorted(values)
    if not keys:
        return {}
    flat = torch.stack([torch.as_tensor(values[k]).detach().double().cpu().reshape(()) for k in keys])
    if active():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return dict(zip(keys, flat.tolist()))


def all_reduce_max(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def local_slice(indices: torch.Tensor, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (equal slices when the batch divides evenly)."""
    world = world_size() if world is None else world
    if world == 1:
        return indices
    rank_ = rank() if rank_ is None else rank_
    return torch.tensor_split(indices, world)[rank_]


def batch_ranges(n: int, batch_size: int, world: int | None = None) -> list[list[tuple[int, int]]]:
    """The batches ``[start, stop)`` of ``range(n)`` one process would run, dealt to the ranks as
    contiguous blocks of whole batches: rank r computes exactly the batches a single process computes."""
    world = world_size() if world is None else world
    starts = list(range(0, n, batch_size))
    batches = [(s, min(n, s + batch_size)) for s in starts]
    per, extra = divmod(len(batches), world)
    out, at = [], 0
    for r in range(world):
        take = per + (1 if r < extra else 0)
        out.append(batches[at:at + take])
        at += take
    return out


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (rank order) on every rank; ``counts`` are the row
    counts of all ranks, known everywhere. Runs on CPU through gloo; returns a CPU tensor."""
    local = local.detach().cpu().contiguous()
    if not active():
        return local
    biggest = max(counts)
    if biggest == 0:
        return local
    shape = (biggest, *local.shape[1:])
    padded = torch.zeros(shape, dtype=local.dtype)
    padded[: len(local)] = local
    # gloo moves bytes: gather as uint8 so every dtype (float16, int16, ...) travels unchanged
    raw = padded.view(torch.uint8) if padded.dtype != torch.uint8 and padded.numel() else padded
    parts = [torch.empty_like(raw) for _ in counts]
    dist.all_gather(parts, raw)
    parts = [p.view(local.dtype)[:c] for p, c in zip(parts, counts)]
    return torch.cat(parts)


@torch.inference_mode()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], split: DataSplit, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Logits for a whole split on every rank: each rank runs its block of whole batches (the ones a
    single process runs, so the numbers are the same bit for bit) and the blocks are gathered."""
    from vitdistill.engine.evaluate import predict as predict_one

    if not active():
        return predict_one(forward, split, batch_size, device)
    mine = batch_ranges(len(split), batch_size)
    counts = [sum(b - a for a, b in blocks) for blocks in mine]
    blocks = mine[rank()]
    outs = []
    for a, b in blocks:
        images = split.images[a:b].to(device, non_blocking=True)
        outs.append(forward(images).float().cpu())
    local = torch.cat(outs) if outs else None
    if min(counts) == 0:  # fewer batches than ranks: the idle ranks learn the row shape from rank 0
        if not sum(counts):
            return torch.empty(0)
        shape = broadcast(tuple(local.shape[1:]) if local is not None and rank() == 0 else None)
        local = local if local is not None else torch.empty((0, *shape))
    return gather_rows(local, counts)


class TrainStep(torch.nn.Module):
    """The student and the method as one module, so one ``DistributedDataParallel`` wraps both.

    DDP finds the parameters that take part in a step by walking the autograd graph back from what
    ``forward`` returns. Returning only the loss with a gradient (every other part, and the logits
    used for train accuracy, detached) makes that walk start from the loss: a student head the
    method does not read, or a projector idle in one of the method's stages, is then known unused
    instead of awaited forever. Feature taps are forward hooks on the student's own modules, which
    run unchanged inside this module.
    """

    def __init__(self, student: torch.nn.Module, prep: torch.nn.Module, method: torch.nn.Module, taps: Any,
                 teacher: Any = None) -> None:
        super().__init__()
        self.student, self.prep, self.method = student, prep, method
        self.taps = taps
        # the teacher source, when it can hand its outputs over late (LiveTeacher.consume): after the
        # student's forward is queued, so a teacher on a side CUDA stream runs beside it
        self.consume = getattr(teacher, "consume", None)
        # Never used, in no optimizer and no checkpoint: with it DDP always finds an unused parameter,
        # so it does not warn on every process that looking for them was unnecessary this time.
        param = next(student.parameters(), None)
        self.unused_anchor = torch.nn.Parameter(torch.zeros(1, device=param.device if param is not None else None))

    def forward(self, images: torch.Tensor, teacher_out: Any, target: torch.Tensor) -> dict[str, torch.Tensor]:
        from vitdistill.models.wrappers import student_outputs

        s_out = student_outputs(self.student, self.prep(images), self.taps)
        if self.consume is not None and teacher_out is not None:
            self.consume(teacher_out)
        parts = self.method(s_out, teacher_out, target)
        out = {k: (v if k == "loss" else v.detach()) for k, v in parts.items()}
        out["_logits"] = s_out["logits"].detach()
        return out


def wrap_ddp(step: TrainStep, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around the train step under several processes; the step itself
    otherwise. The teacher is never inside: it is frozen and only moved to the device."""
    trained = [p for m in (step.student, step.method) for p in m.parameters() if p.requires_grad]
    if not active() or not trained:
        return step
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)


__all__ = ["session", "env_world", "active", "rank", "world_size", "is_main", "check_batch_size", "barrier",
           "broadcast", "on_main", "local_main_first", "all_reduce_sums", "all_reduce_max", "local_slice",
           "batch_ranges", "gather_rows", "predict", "TrainStep", "wrap_ddp", "pick_device_name"]
