"""What a model costs: parameters, FLOPs, latency, throughput and peak memory.

These are the "what was saved" half of a distillation report, so they must be comparable between a
teacher and a student of any family (timm ViT, CNN, DeiT with a distillation token). FLOPs are
counted by PyTorch's own ``FlopCounterMode`` on the real forward rather than by hand formulas, so an
architecture nobody wrote a formula for is still counted.
"""
from __future__ import annotations

import statistics
import time
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

_UNITS = ("", "K", "M", "G", "T", "P")


def format_count(n: float) -> str:
    """Render a count with three significant digits and a unit: ``1.23M``, ``45.6K``, ``2.10G``.

    Parameter and FLOP counts span nine orders of magnitude; a fixed three digits keeps a column of
    them readable and comparable at a glance.
    """
    value = float(n)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    for i, unit in enumerate(_UNITS):
        scaled = value / 1000**i
        # Round first, so 999_999 becomes "1.00M" rather than "1000K".
        rounded = float(f"{scaled:.3g}")
        if abs(rounded) < 1000 or i == len(_UNITS) - 1:
            break
    if unit == "":
        return str(int(value)) if value.is_integer() else f"{value:.3g}"
    decimals = max(0, 2 - len(str(int(abs(rounded)))) + 1)
    return f"{rounded:.{decimals}f}{unit}"


class _TensorMemoryTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created while the mode is active.

    Each new output storage is counted once (keyed by its data pointer, so views are free) and
    uncounted by a ``weakref.finalize`` when the storage is released. PyTorch keeps one Python
    object per storage alive as long as the storage itself, so the finalizer fires at the true free.
    Storages that exist before the forward (weights, the input) are passed as ``static`` and never
    counted here, since a view of a weight allocates nothing.
    """

    def __init__(self, static_ptrs: set[int]) -> None:
        super().__init__()
        self.static = static_ptrs
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self.static or ptr in self.live:
                continue
            self.live[ptr] = nbytes
            self.current += nbytes
            weakref.finalize(storage, self._release, ptr)
        self.peak = max(self.peak, self.current)
        return out


def _state_bytes(model: torch.nn.Module) -> tuple[int, set[int]]:
    """Bytes of parameters and buffers (shared storages once), and their data pointers."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values()), set(storages)


def _peak_mem_mb(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Peak memory (MiB) of one inference forward on ``x``; see ``profile_model`` for the method."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        model(x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) / 2**20
    state_bytes, static = _state_bytes(model)
    input_bytes = x.untyped_storage().nbytes()
    tracker = _TensorMemoryTracker(static | {x.untyped_storage().data_ptr()})
    with tracker:
        out = model(x)
    del out
    return (state_bytes + input_bytes + tracker.peak) / 2**20


def _median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn``: the median ignores scheduler hiccups a mean would absorb."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _home_device(model: torch.nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def profile_model(
    model: torch.nn.Module,
    input_size: tuple[int, int, int],
    device: str = "cpu",
    batch: int = 64,
    warmup: int = 2,
    iters: int = 10,
    measure_time: bool = True,
) -> dict:
    """Measure what a model costs at inference, the figures a compression report compares.

    Everything runs in eval mode under ``torch.inference_mode``: the deployment setting, and the
    only one in which DeiT's distilled model returns a single output. Every submodule's train/eval
    mode and the model's device are restored afterwards, so profiling mid-run changes nothing.

    Returns a dict with:

    - ``params``: all parameters (trainable or not; a frozen weight still ships).
    - ``flops``: forward FLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode`` on
      a batch of 1. It counts a multiply-add as 2 FLOPs (a ``Linear(16, 8)`` is 256), the convention
      of most recent papers; halve it to compare with "MACs" tables. Only operations the counter
      knows (matmuls, convolutions, attention) are counted; elementwise ops are not.
    - ``latency_ms_b1``: median of ``iters`` timed forwards at batch 1, after ``warmup`` untimed.
    - ``throughput_img_s``: images per second at batch ``batch`` (from the median batch time).
    - ``peak_mem_mb``: peak memory (MiB) of one forward at batch ``batch``. On CUDA this is
      ``torch.cuda.max_memory_allocated``. On CPU it is an estimate of tensor memory, not process
      RSS: parameter, buffer and input bytes plus the peak of live tensor bytes created during the
      forward, tracked op by op. Scratch space a kernel allocates internally is not seen.
    - ``batch``: the batch used for throughput and memory.

    With ``measure_time=False`` the two timings are ``None`` (fast enough for tests and CI).
    """
    # Per module: a model may hold parts deliberately left in eval (a frozen teacher, frozen BN).
    modes = {m: m.training for m in model.modules()}
    home = _home_device(model)
    dev = torch.device(device)
    dtype = _input_dtype(model)
    # Moved outside inference_mode: weights copied inside it would become inference tensors that
    # can no longer be trained once the model goes home.
    model.eval().to(dev)
    try:
        with torch.inference_mode():
            one = torch.randn(1, *input_size, device=dev, dtype=dtype)
            many = torch.randn(batch, *input_size, device=dev, dtype=dtype)

            counter = FlopCounterMode(display=False)
            with counter:
                model(one)
            flops = int(counter.get_total_flops())

            peak_mem_mb = _peak_mem_mb(model, many)

            latency_ms = throughput = None
            if measure_time:
                latency_ms = 1000 * _median_seconds(lambda: model(one), dev, warmup, iters)
                throughput = batch / _median_seconds(lambda: model(many), dev, warmup, iters)
    finally:
        for module, training in modes.items():
            module.training = training
        if home is not None and home != dev:
            model.to(home)

    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "latency_ms_b1": latency_ms,
        "throughput_img_s": throughput,
        "peak_mem_mb": peak_mem_mb,
        "batch": batch,
    }
