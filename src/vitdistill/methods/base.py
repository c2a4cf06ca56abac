"""The method interface and the math every logit method shares.

A method never runs the teacher. It declares what it needs (``teacher_outputs``) and receives it,
so a live teacher, a teacher cache or a hand-made tensor in a test are the same to it. The engine
never names a method: everything method-specific reaches the loop through this class.
"""
from __future__ import annotations

import inspect
import math
import traceback
from typing import ClassVar

import torch
import torch.nn.functional as F

from vitdistill.errors import UserError
from vitdistill.models.taps import ModelInfo, Tap
from vitdistill.registry import Registry

Outputs = dict[str, torch.Tensor]


class Method(torch.nn.Module):
    """Base of every distillation method.

    Subclasses set ``name``, ``summary``, ``paper``, ``teacher_outputs`` and implement
    :meth:`forward`, returning ``{"loss": total, <part>: value, ...}``; the engine logs every part.
    Knobs are keyword arguments of ``__init__`` with the paper's defaults; ``label_smoothing`` comes
    from the training config and applies to losses on ground-truth labels.

    ``teacher_outputs`` names the kinds of teacher output the method reads: ``"logits"`` and/or
    ``"features"`` (intermediate outputs, which a teacher cache cannot replay). Methods that read
    intermediate outputs say which in :meth:`setup` by filling ``student_taps`` and
    ``teacher_taps`` (see :mod:`vitdistill.models.taps`); they then receive them keyed
    ``"block.i"``, ``"attn.i"`` or ``"qkv.i"`` beside ``"logits"``. With several teachers, teacher
    i's outputs also arrive as ``"t{i}.<key>"``.

    The engine calls, in order: :meth:`adapt_student` (once, on the fresh student), :meth:`check_student`,
    :meth:`setup` (once, before the optimizer exists, so projectors it creates are trained and
    checkpointed), then per epoch :meth:`on_epoch_start` and per step :meth:`forward`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    teacher_outputs: ClassVar[tuple[str, ...]] = ()
    needs_dist_token: ClassVar[bool] = False
    teachers_needed: ClassVar[int] = 1  # the least number of teachers the method works with
    teachers_most: ClassVar[int | None] = 1  # the most it learns from (None: any number)
    batch_least: ClassVar[int] = 1  # the fewest samples a (micro-)batch needs: 2 for a loss over the batch

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.student_taps: tuple[Tap, ...] = ()
        self.teacher_taps: tuple[Tap, ...] = ()

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_outputs)

    def adapt_student(self, student: torch.nn.Module, student_name: str) -> torch.nn.Module:
        """Return the student this method trains; methods that reshape the student (extra tokens,
        shared weights) override this. The default trains the student as created."""
        return student

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        """Learn the models' shapes, create projectors and set ``student_taps`` / ``teacher_taps``."""

    def check_student(self, student: torch.nn.Module, student_name: str) -> None:
        """Raise a :class:`UserError` when the student cannot serve this method."""
        from vitdistill.models.wrappers import has_dist_token

        if self.needs_dist_token and not has_dist_token(student):
            raise UserError(
                f"method '{self.name}' needs a student with a distillation token, and '{student_name}' has "
                "none; use deit_femto_distilled_patch4_16, deit_pico_distilled_patch4_32 or a timm "
                "deit_*_distilled_* model"
            )

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for methods with stages; ``epoch`` counts from 0."""

    def ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        raise NotImplementedError


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, normalize: str = "batchmean"
) -> torch.Tensor:
    """tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), the softened KD term of Hinton et al. 2015.

    ``normalize="batchmean"`` divides the summed KL by the batch size (the true KL per sample);
    ``normalize="elements"`` divides by batch * classes, as DeiT's reference loss does, which makes
    the term C times smaller for C classes. The tau^2 factor keeps gradient scale independent of tau.
    The teacher's distribution is a fixed target: no gradient reaches ``teacher_logits``.
    """
    # a live teacher already runs under no_grad, but a method fed by anything else (a caller's
    # tensors, a teacher being trained alongside) must not pull the target towards the student
    teacher_logits = teacher_logits.detach()
    # at least float32 (half-precision softmax loses the tail), but keep float64 when given
    dt = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dt) / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(dt) / tau, dim=-1)
    # p_t log(p_t / p_s) by hand: kl_div makes 0 * (-inf - x) a NaN where a teacher masks a class (-inf)
    kl = torch.where(log_p_t == float("-inf"), 0.0, log_p_t.exp() * (log_p_t - log_p_s)).sum()
    if normalize == "batchmean":
        denom = student_logits.shape[0]
    elif normalize == "elements":
        denom = student_logits.numel()
    else:
        raise ValueError(f"normalize must be 'batchmean' or 'elements', not {normalize!r}")
    return kl * (tau * tau) / denom


def check_weights(alpha: float, tau: float | None = None, alpha_name: str = "alpha") -> None:
    """The knobs every weighted KD loss shares: a mixing weight in [0, 1] (the knob ``alpha_name``),
    a positive temperature."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{alpha_name} must lie in [0, 1], not {alpha}")
    if tau is not None and tau <= 0:
        raise ValueError(f"tau must be positive, not {tau}")


def heads(student: Outputs) -> list[torch.Tensor]:
    """The student's classifier outputs: the class head, plus the distillation head if it has one."""
    return [student[k] for k in ("logits", "dist_logits") if k in student]


METHODS: Registry[type[Method]] = Registry("method", "vitdistill methods")


def build_method(options: dict, label_smoothing: float = 0.0) -> Method:
    """Instantiate a registered method from its config section, checking the knobs by name."""
    options = dict(options)
    cls = METHODS.get(options.pop("name"))
    params = inspect.signature(cls.__init__).parameters
    knobs = [p for p in params if p not in ("self", "label_smoothing")]
    for key in options:
        if key not in knobs:
            listed = ", ".join(knobs) or "none"
            raise UserError(f"method '{cls.name}' has no knob '{key}'; its knobs are: {listed}")
        default = params[key].default
        number = isinstance(default, (int, float)) and not isinstance(default, bool)
        value = options[key]
        # NaN passes every `< 0` check and inf every `> 0` one; either trains a NaN student with exit 0
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"method.{key} of '{cls.name}' must be a finite number, got {value!r}")
        if number and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise UserError(f"method.{key} of '{cls.name}' expects a number, got {value!r}")
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"method.{key} of '{cls.name}' expects true or false, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise UserError(f"method.{key} of '{cls.name}' expects a word, got {value!r}")
    try:
        return cls(label_smoothing=label_smoothing, **options)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad knob for method '{cls.name}': {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a plugin's own code; a built-in method's failure is a bug to show
        if cls.__module__.startswith("vitdistill."):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        first = (str(exc).splitlines() or [""])[0]
        raise UserError(f"method '{cls.name}' failed to start: {type(exc).__name__}: {first} "
                        f"(at {where.filename}:{where.lineno}); fix the plugin") from None


def method_knobs(cls: type[Method]) -> dict[str, object]:
    """The knobs of a method with their defaults, for listings and docs."""
    return {
        n: p.default
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n not in ("self", "label_smoothing")
    }
