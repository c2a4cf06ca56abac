"""Speed-ups of one machine that leave the results of a run unchanged: the optimizer's kernel,
``torch.compile`` of student and teacher, channels-last memory for CNN teachers.

Each is chosen by a key of ``train`` (docs/usage.md, "Speed"). Compilation comes after the method
has attached its feature taps, because a model whose intermediate outputs are tapped by forward
hooks stays eager: hooks added and removed around every step would make the compiled graph
recompile or break each time.
"""
from __future__ import annotations

import inspect
import logging

import torch

from vitdistill.config import TrainConfig
from vitdistill.errors import UserError
from vitdistill.models.taps import FeatureTaps

OPTIMIZERS = ("auto", "fused", "foreach", "for-loop")


def fused_supported(device: torch.device) -> bool:
    # AdamW's fused kernel exists for CUDA, and for CPU from torch 2.4; older torch rejects fused=True there
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def optimizer_kernel(cfg: TrainConfig, device: torch.device) -> str:
    """``fused``, ``foreach`` or ``for-loop``: ``auto`` takes ``fused`` where this torch has it for the
    device (CUDA; CPU from torch 2.4), else ``foreach``.

    On this project's 2-core CPU the fused kernel made the tiny student's whole train step 1.07x
    faster than foreach (benchmarks/speedups.py, docs/results.md); on GPUs it is the faster kernel
    too. The kernels compute the same update and differ only in float rounding.
    """
    kind = cfg.optimizer
    if kind not in OPTIMIZERS:
        raise UserError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, not '{kind}'")
    if kind == "fused" and not fused_supported(device):
        raise UserError(f"this torch has no fused AdamW for device '{device}'; use --set train.optimizer=foreach")
    if kind == "auto":
        return "fused" if fused_supported(device) else "foreach"
    return kind


def make_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the kernel of ``train.optimizer``."""
    kind = optimizer_kernel(cfg, device)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(groups, lr=cfg.lr, **flags)


def is_convnet(model: torch.nn.Module) -> bool:
    """True for models built of convolutions: more than one 2-d convolution (a ViT has only its
    patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def wants_channels_last(setting: bool | None, model: torch.nn.Module, device: torch.device) -> bool:
    """``train.channels_last`` for one teacher: ``null`` (auto) is on for CNN teachers on CUDA, where
    cuDNN's NHWC kernels are faster, and off on CPU, where it measured no faster for the small CNN
    teachers (0.99x, docs/results.md); ``true`` converts every CNN teacher; ViTs are never converted."""
    if setting is False or not is_convnet(model):
        return False
    return setting is True or device.type == "cuda"


def channels_last_teachers(cfg: TrainConfig, teachers: list, device: torch.device) -> list[str]:
    """Put the CNN teachers that ``train.channels_last`` selects in channels-last memory; one note each."""
    notes = []
    for i, teacher in enumerate(teachers):
        if wants_channels_last(cfg.channels_last, teacher.model, device):
            teacher.to_channels_last()
            notes.append(f"teacher {i}: channels-last")
    return notes


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(cfg: TrainConfig) -> None:
    """One-line errors for the compile keys, before anything trains."""
    if cfg.compile_mode not in COMPILE_MODES:
        raise UserError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, not '{cfg.compile_mode}'")
    if cfg.compile:
        import torch._dynamo

        known = set(torch._dynamo.list_backends(exclude_tags=()))
        if cfg.compile_backend not in known:
            raise UserError(f"unknown train.compile_backend '{cfg.compile_backend}'; "
                            f"torch knows {', '.join(sorted(known))}")


def _compile_kwargs(cfg: TrainConfig) -> dict:
    kwargs: dict = {"backend": cfg.compile_backend}
    if cfg.compile_mode != "default":
        kwargs["mode"] = cfg.compile_mode
    return kwargs


def compile_teachers(cfg: TrainConfig, teachers: list) -> list[str]:
    """``train.compile`` for the live teachers (:class:`~vitdistill.models.wrappers.Teacher`), each
    unless a method taps its features; one note per teacher (none when compile is off)."""
    check_compile(cfg)
    if not cfg.compile:
        return []
    if not torch.cuda.is_available():
        quiet_cpu_compile()
    notes = []
    for i, teacher in enumerate(teachers):
        if teacher.taps is None:
            teacher.compile(**_compile_kwargs(cfg))
            notes.append(f"teacher {i}: torch.compile")
        else:
            notes.append(f"teacher {i}: eager (its features are tapped)")
    return notes


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning, which inductor's CPU
    code generation triggers on a machine with a CUDA toolkit and no GPU: nothing is wrong there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_cpu_compile() -> None:
    """Keep the CUDA_HOME note out of a CPU run's output (once per process)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())


def compile_models(cfg: TrainConfig, student: torch.nn.Module, taps: FeatureTaps | None,
                   teachers: list) -> tuple[torch.nn.Module, list[str]]:
    """``train.compile``: the student's compiled forward, and the teachers as :func:`compile_teachers`.

    Returns the module the loop should call for the student (``student`` itself when not compiled)
    and one note per model. The compiled student shares its parameters with ``student``, which stays
    the eager module that checkpoints, ``student.safetensors`` and the profile use.
    """
    check_compile(cfg)
    if not cfg.compile:
        return student, []
    if not torch.cuda.is_available():
        quiet_cpu_compile()
    if taps is None or not taps.taps:
        run, notes = torch.compile(student, **_compile_kwargs(cfg)), ["student: torch.compile"]
    else:
        run, notes = student, ["student: eager (its features are tapped)"]
    return run, notes + compile_teachers(cfg, teachers)
