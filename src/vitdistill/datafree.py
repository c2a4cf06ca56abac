"""Data-free distillation: DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill: Data-free
Knowledge Transfer via DeepInversion", arXiv:1912.08795).

When the training images cannot be shared, the teacher still holds what they looked like: the
running mean and variance of every BatchNorm layer. DeepInversion starts from noise and optimises a
batch of images x_hat for chosen classes y until the teacher classifies them as y *and* the
statistics of the batch at every BatchNorm input match the stored ones (paper eq. 2 to 5):

    min_x_hat  CE(T(x_hat), y) + alpha_tv * R_tv(x_hat) + alpha_l2 * R_l2(x_hat) + alpha_f * R_feature(x_hat)

    R_feature(x_hat) = sum_l  || mu_l(x_hat) - E[mu_l | X] ||_2 + || sigma2_l(x_hat) - E[sigma2_l | X] ||_2

with mu_l, sigma2_l the per-channel mean and (biased) variance of the batch at BatchNorm layer l's
input, E[. | X] that layer's running_mean and running_var, R_tv the mean squared difference of
horizontally and vertically neighbouring pixels, and R_l2 the mean over images of ||x_hat_i||_2, all
on the teacher's normalised input. Each step sees the batch randomly shifted by up to ``jitter``
pixels (and mirrored, where the data allows flips), as the paper does. The authors' code weights
the first BatchNorm layer more (``first_bn_scale``).

Adaptive DeepInversion (the paper's section 3.3, eq. 8) adds a competition with a student already
distilled (from a first round of images, say): images on which the two agree teach it nothing new,
so the loss gains

    alpha_c * R_compete(x_hat),   R_compete = 1 - JS(p_T(x_hat), p_S(x_hat))
    JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),   m = (p + q) / 2

with p_T, p_S the softmax of the teacher's and the (frozen) student's logits at temperature
``competition_tau`` (3 in the authors' code). Minimising it drives the images to where the student
still disagrees with the teacher, while the CE term keeps them the teacher's class.

The images are written as a data set (``images.safetensors`` in the output folder) that
``--data synthetic:DIR`` trains any student on with any method; its test split is the named real
data set's, so the student is scored on real images it never saw in any form. Synthesis reads the
real data set's class names, image size and channel count and its *test* split (to report how the
teacher scores there); it uses no training image (the loader decodes them; nothing here reads
them). This file follows the two rules of the design: it is not a method and the training loop
never sees it; it only makes data.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from vitdistill.config import Config, SynthConfig
from vitdistill.data import DataSplit
from vitdistill.data.sources import absolute_source
from vitdistill.data.synthetic import FORMAT, IMAGES
from vitdistill.engine import io
from vitdistill.engine.evaluate import accuracy, predict
from vitdistill.engine.runtime import pick_device, set_threads
from vitdistill.errors import UserError
from vitdistill.models.wrappers import Teacher


class BatchNormStatistics:
    """Forward hooks that record, at every BatchNorm2d input, the distance of the batch's channel
    mean and biased variance from the layer's running statistics (one term of R_feature each)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.terms: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: torch.nn.BatchNorm2d, inputs: tuple, _output: torch.Tensor) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                          + torch.linalg.vector_norm(var - module.running_var))

    def pop(self) -> list[torch.Tensor]:
        terms, self.terms = self.terms, []
        return terms

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """R_tv: mean squared difference of horizontal plus vertical neighbours."""
    return (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean() + (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()


def competition(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """R_compete = 1 - JS(softmax(z_T / tau), softmax(z_S / tau)), JS in nats and averaged over the
    batch (Adaptive DeepInversion, eq. 8); gradients flow through both distributions' inputs."""
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=1)
    log_q = F.log_softmax(student_logits.float() / tau, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return 1.0 - (0.5 * (kl_pm + kl_qm)).mean()


def deepinversion_loss(logits: torch.Tensor, target: torch.Tensor, teacher_input: torch.Tensor,
                       bn_terms: list[torch.Tensor], s: SynthConfig,
                       student_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The objective of the module docstring, with its parts named for the log; ``student_logits``
    (Adaptive DeepInversion) add the competition term."""
    if not bn_terms:
        raise ValueError("no BatchNorm statistics were recorded")
    ce = F.cross_entropy(logits, target)
    tv = total_variation(teacher_input)
    l2 = torch.linalg.vector_norm(teacher_input.flatten(1), dim=1).mean()
    feature = s.first_bn_scale * bn_terms[0] + sum(bn_terms[1:], torch.zeros(()))
    loss = ce + s.tv_weight * tv + s.l2_weight * l2 + s.bn_weight * feature
    parts = {"ce": ce.detach(), "tv": tv.detach(), "l2": l2.detach(), "feature": feature.detach()}
    if student_logits is not None:
        compete = competition(logits, student_logits, s.competition_tau)
        loss = loss + s.competition_weight * compete
        parts["compete"] = compete.detach()
    return {"loss": loss, **parts}


def _upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    # pixels optimised at synth.base_size stand for a smooth image: bilinear, as the data layer resizes
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _jitter(x: torch.Tensor, s: SynthConfig, hflip: bool, g: torch.Generator) -> torch.Tensor:
    dx, dy = (torch.randint(-s.jitter, s.jitter + 1, (2,), generator=g).tolist() if s.jitter else (0, 0))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if hflip and bool(torch.randint(0, 2, (1,), generator=g)):
        x = x.flip(3)
    return x


def synthesize_batch(teacher: Teacher, stats: BatchNormStatistics, labels: torch.Tensor, size: int, chans: int,
                     s: SynthConfig, hflip: bool, seed: int, device: torch.device,
                     bar: tqdm | None = None,
                     student: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Optimise one batch of images for ``labels``; returns them as uint8 ``[B, chans, size, size]``
    and the last step's loss parts. ``student`` (images in 0..255 to logits, frozen) adds Adaptive
    DeepInversion's competition."""
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    # grey images are one free channel shown to the teacher as RGB, as the grey data sets are stored
    free = 1 if s.grey else chans
    base = s.base_size or size
    x = (0.5 + s.init_std * torch.randn(n, free, base, base, generator=g)).clamp_(0, 1).to(device)
    x.requires_grad_(True)
    labels = labels.to(device)
    opt = torch.optim.Adam([x], lr=s.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.iters)
    parts: dict[str, torch.Tensor] = {}
    for _ in range(s.iters):
        view = _jitter(_upsample(x, size), s, hflip, g).expand(-1, chans, -1, -1)
        teacher_input = teacher.prep(view * 255.0)
        stats.pop()
        logits = teacher._logits(teacher.model(teacher_input))  # the Teacher's own head rule, with gradients
        bn_terms = stats.pop()
        parts = deepinversion_loss(logits, labels, teacher_input, bn_terms, s,
                                   student(view * 255.0) if student is not None else None)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{parts['ce']:.3f}", feature=f"{parts['feature']:.3f}", refresh=False)
    images = (_upsample(x.detach(), size) * 255.0).round_().to(torch.uint8).expand(-1, chans, -1, -1)
    images = images.contiguous().cpu()
    return images, {k: round(float(v.detach()), 5) for k, v in parts.items()}


def settings_hash(cfg: Config, teacher_hash: str, hflip: bool, student_hash: str | None = None) -> str:
    """What a batch file was made with: a part made under other settings is never mixed in.
    ``hflip`` is the resolved flip setting, which mirrors the batch in the optimisation;
    ``student_hash`` the competing student's weights (Adaptive DeepInversion)."""
    synth = {k: v for k, v in asdict(cfg.synth).items() if k != "images"}
    if not cfg.synth.competition_weight:  # parts made before the competition existed keep their hash
        synth = {k: v for k, v in synth.items() if not k.startswith("competition_")}
    blob = json.dumps({"synth": synth, "data": cfg.data.source, "img_size": cfg.data.img_size,
                       "teacher": cfg.model.teacher, "teacher_hash": teacher_hash, "seed": cfg.train.seed,
                       "hflip": hflip, **({"student_hash": student_hash} if student_hash else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_part(path: Path, expect: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(images, labels, seconds it took to make) of a finished batch, or None to make it again."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("settings") != expect:
                return None
            return f.get_tensor("images").clone(), f.get_tensor("labels").clone(), float(meta.get("seconds", 0))
    except Exception:  # noqa: BLE001 - an unreadable part is made again
        return None


def _check_settings(s: SynthConfig, num_classes: int, chans: int, size: int) -> None:
    if s.images < num_classes:
        raise UserError(f"synth.images is {s.images}; make at least one image per class ({num_classes})")
    if s.batch_size < 2 or s.iters < 1:
        raise UserError("synth.batch_size must be at least 2 (batch statistics) and synth.iters at least 1")
    if s.jitter >= size:
        raise UserError(f"synth.jitter shifts the batch by up to that many pixels; keep it below the image size "
                        f"({size}), got {s.jitter}")
    if s.base_size is not None and not 1 <= s.base_size <= size:
        raise UserError(f"synth.base_size must lie between 1 and the image size ({size}), got {s.base_size}")
    if s.grey and chans not in (1, 3):
        raise UserError(f"synth.grey needs a data set of 1 or 3 channels, this one has {chans}")


def synthesize(cfg: Config, out: str | Path) -> dict:
    """Make ``cfg.synth.images`` DeepInversion images from the configured teacher into folder ``out``.

    Each finished batch is kept under ``out/parts`` (written atomically), so an interrupted run
    called again with the same settings continues where it stopped.
    """
    from vitdistill.engine.setup import augment_for, build_teacher, load_run_data
    from vitdistill.teacher_cache import state_hash

    out = Path(out).expanduser()
    io.check_folder(out)
    io.refuse_foreign_folder(out, "--out", "synthetic", "the synthetic data set")
    if cfg.data.source.partition(":")[0].strip().lower() == "synthetic":
        raise UserError("synthesize --data names the real data set the images stand for (its classes, size "
                        "and test split), not a synthetic one; e.g. --data digits or --data cifar10:DIR")
    if (out / IMAGES).exists():
        raise UserError(f"'{out}' already holds a synthetic data set; remove it or pass --out to a new folder")
    if "," in (cfg.model.teacher or ""):
        raise UserError("synthesize inverts one teacher; give a single --teacher (and its --teacher-weights)")
    set_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    s = cfg.synth
    data = load_run_data(cfg)  # classes, size, channels and the test split; the training split is unused
    _check_settings(s, data.num_classes, data.in_chans, data.img_size)
    teacher, spec = build_teacher(cfg, data, "synthesize")
    stats = BatchNormStatistics(teacher.model)
    if not stats.layers:
        raise UserError(f"teacher '{cfg.model.teacher}' has no BatchNorm2d layer, and DeepInversion matches their "
                        "statistics; use a CNN teacher with batch norm (e.g. resnet_micro_cnn or any timm ResNet)")
    teacher.to(device)
    aug = augment_for(cfg, data)  # the pad and flips the config resolves to, as a training run would
    hflip = aug.hflip
    student, student_hash = _competing_student(cfg, device) if s.competition_weight else (None, None)
    settings = settings_hash(cfg, state_hash(teacher.model), hflip, student_hash)
    labels = torch.arange(s.images) % data.num_classes  # every batch holds every class about equally
    batches = list(labels.split(s.batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:  # one image has no batch statistics: it joins the one before
        batches[-2:] = [torch.cat(batches[-2:])]
    seconds = 0.0  # the optimisation's, summed over the calls that made the parts
    images, last = [], {}
    bar = tqdm(total=len(batches) * s.iters, desc="synthesize", unit="step", disable=not cfg.train.progress,
               dynamic_ncols=True)
    for b, y in enumerate(batches):
        part = out / "parts" / f"batch-{b:05d}.safetensors"
        got = _read_part(part, settings) if part.is_file() else None
        if got is None or not torch.equal(got[1], y):
            t0 = time.perf_counter()
            img, last = synthesize_batch(teacher, stats, y, data.img_size, data.in_chans, s, hflip,
                                         seed=cfg.train.seed * 1_000_003 + b, device=device, bar=bar,
                                         student=student)
            took = time.perf_counter() - t0
            bad = [k for k, v in last.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:  # the pixels went NaN and clamp to black: an image set of nothing, said in one line
                raise UserError(f"the synthesis loss ({', '.join(bad)}) became {last[bad[0]]} in batch {b + 1}; "
                                "lower synth.lr or the regularizer weights (synth.tv_weight, synth.l2_weight, "
                                "synth.bn_weight); that batch was not saved")
            io.write_safetensors(part, {"images": img, "labels": y}, {"settings": settings, "seconds": f"{took:.3f}"})
            got = (img, y, took)
        else:
            bar.update(s.iters)
        images.append(got[0])
        seconds += got[2]
    bar.close()
    stats.remove()
    x, y = torch.cat(images), labels
    agree, real = (accuracy(predict(lambda im: teacher(im)["logits"], split, cfg.train.eval_batch_size, device),
                            split.labels)["top1"] for split in (DataSplit(x, y), data.test))
    if student is not None:  # how far the images got from what the student already knows
        with torch.no_grad():
            s_logits = predict(lambda im: student(im.float()), DataSplit(x, y), cfg.train.eval_batch_size, device)
        student_top1 = accuracy(s_logits, y)["top1"]
    real_spec = absolute_source(cfg.data.source)  # read again from later runs' working directories
    meta = {"format": FORMAT, "test_data": real_spec, "img_size": str(cfg.data.img_size or ""),
            "classes": json.dumps(data.classes), "teacher": cfg.model.teacher or "", "settings": settings,
            "pad": str(aug.pad), "hflip": "true" if hflip else "false"}
    summary = {"images": int(len(y)), "classes": data.num_classes, "img_size": data.img_size,
               "teacher": cfg.model.teacher, "teacher_spec": spec, "test_data": real_spec,
               "teacher_top1_on_synthetic": round(agree, 4), "teacher_top1_on_real_test": round(real, 4),
               **({"student": cfg.model.student, "student_top1_on_synthetic": round(student_top1, 4)}
                  if student is not None else {}),
               "last_batch_loss": last, "wall_s": round(seconds, 1),
               "settings": asdict(s), "seed": cfg.train.seed}
    io.write_text(out / "config.yaml", cfg.to_yaml())
    io.write_json(out / "synth.json", summary)
    _preview(out / "preview.png", x, y, data.classes)
    io.write_safetensors(out / IMAGES, {"images": x, "labels": y}, meta)  # last: its presence means done
    return summary


def _competing_student(cfg: Config, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The frozen student of Adaptive DeepInversion, as images (0..255) to logits, and its weights'
    hash: ``--student RUN`` (a finished distill or train run) or ``--student NAME --student-weights W``."""
    from vitdistill.evaluation import load_student
    from vitdistill.models import InputPrep
    from vitdistill.teacher_cache import state_hash

    name, weights = cfg.model.student, cfg.model.student_weights
    # a path that is not a run goes on to load_student, which names the missing folder
    if not Path(name).is_dir() and not weights and "/" not in name:
        raise UserError("synth.competition_weight > 0 competes with a trained student; give --student RUN (a run "
                        "directory) or --student NAME --student-weights FILE")
    _, _, _, model = load_student(name, weights, cfg.data.source, "synthesize", "--student-weights")
    model.to(device).eval().requires_grad_(False)
    prep = InputPrep.for_model(model).to(device)
    return (lambda images: model(prep(images))), state_hash(model)


def _preview(path: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str], per_class: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = classes[:20]
    fig, axes = plt.subplots(len(shown), per_class, figsize=(per_class * 0.9, len(shown) * 0.9), squeeze=False)
    for c, row in enumerate(axes):
        idx = (labels == c).nonzero().flatten()[:per_class]
        for j, ax in enumerate(row):
            ax.axis("off")
            if j < len(idx):
                ax.imshow(images[idx[j]].permute(1, 2, 0).numpy(), interpolation="nearest")
        row[0].set_title(shown[c], fontsize=7, loc="left")
    fig.tight_layout()
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
