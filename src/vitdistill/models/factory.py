"""Create any timm model by name, plus a few tiny registered configs sized for small images on a CPU.

A tiny config is only a timm architecture name and keyword overrides, so a student trained from one
is rebuilt by ``timm.create_model(spec["name"], **spec["kwargs"])`` with no vitdistill import.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file

from vitdistill.errors import UserError, did_you_mean
from vitdistill.models import involution  # noqa: F401  registers rednet_micro_inv with timm
from vitdistill.registry import Registry


@dataclass(frozen=True)
class TinyConfig:
    """A registered small model: a timm architecture, overrides, and an optional CNN stem change."""

    arch: str
    kwargs: dict
    summary: str
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool, for small (8-32 px) inputs


TINY_MODELS: Registry[TinyConfig] = Registry("model", "vitdistill models")

_VIT_FEMTO = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=2)
_VIT_PICO = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3)
# timm's DeiT configs carry ImageNet's mean and std, its ViT configs 0.5 / 0.5. A distillation-token
# twin must see the very input its plain ViT sees, or a no-KD vs deit-* comparison measures the
# input scaling too (on mnist5k, 30 epochs, one seed, ImageNet's statistics cost either ViT 1.2 to
# 1.9 points of test top-1; docs/results.md); the overlay travels in the timm kwargs, so timm
# alone rebuilds the same pretrained_cfg.
_VIT_STATS = dict(pretrained_cfg_overlay=dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
for _name, _cfg in {
    "vit_femto_patch4_16": TinyConfig("vit_tiny_patch16_224", _VIT_FEMTO, "ViT, 16 px, 16 patches, width 64, depth 4"),
    "deit_femto_distilled_patch4_16": TinyConfig(
        "deit_tiny_distilled_patch16_224", {**_VIT_FEMTO, **_VIT_STATS}, "vit_femto_patch4_16 with DeiT's distillation token"
    ),
    "vit_pico_patch4_32": TinyConfig("vit_tiny_patch16_224", _VIT_PICO, "ViT, 32 px, 64 patches, width 96, depth 6"),
    "deit_pico_distilled_patch4_32": TinyConfig(
        "deit_tiny_distilled_patch16_224", {**_VIT_PICO, **_VIT_STATS}, "vit_pico_patch4_32 with DeiT's distillation token"
    ),
    "resnet_small_cnn": TinyConfig(
        "resnet18",
        dict(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32),
        "ResNet, 4 basic blocks, widths 32-256, 3x3 stem for 16-32 px",
        small_stem=True,
    ),
    "resnet_micro_cnn": TinyConfig(
        "resnet18",
        dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
        "ResNet, 4 basic blocks, widths 16-128, 3x3 stem for 8-32 px",
        small_stem=True,
    ),
}.items():
    TINY_MODELS.register(_name)(_cfg)


def _apply_small_stem(model: torch.nn.Module) -> None:
    # timm's ResNet stem (7x7/2 conv then max-pool) leaves 1x1 maps at 32 px; a 3x3/1 stem keeps detail.
    old = model.conv1
    model.conv1 = torch.nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()


def model_spec(name: str, overrides: dict | None = None) -> dict:
    """The timm name and keyword arguments that rebuild ``name`` (tiny configs resolved)."""
    overrides = dict(overrides or {})
    if name in TINY_MODELS:
        tiny = TINY_MODELS.get(name)
        return {"name": tiny.arch, "kwargs": {**tiny.kwargs, **overrides}, "small_stem": tiny.small_stem}
    return {"name": name, "kwargs": overrides, "small_stem": False}


def known_model(name: str) -> bool:
    return name in TINY_MODELS or name in timm.list_models(pretrained=False)


def create_model(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    overrides: dict | None = None,
    pretrained: bool = False,
    weights: str | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Build a model and return it with its spec (what rebuilds it with timm alone).

    ``img_size`` is passed only to architectures that take one (ViTs); CNNs accept any size.
    """
    if not known_model(name):
        choices = list(TINY_MODELS) + timm.list_models(pretrained=False)
        raise UserError(f"unknown model '{name}'{did_you_mean(name, choices)}; `vitdistill models` lists them")
    _check_overrides(name, num_classes, overrides or {})
    spec = model_spec(name, overrides)
    kwargs: dict[str, Any] = {"num_classes": num_classes, **spec["kwargs"]}
    if img_size is not None and "img_size" not in (overrides or {}):
        kwargs["img_size"] = img_size
    if kwargs.get("img_size") is not None:
        kwargs["pretrained_cfg_overlay"] = _resolution_overlay(kwargs)
    try:
        model = _timm_create(name, spec["name"], pretrained, kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub and network failures come in many types
        if pretrained:
            raise UserError(
                f"cannot fetch pretrained weights for '{name}' ({type(exc).__name__}); "
                "pass a local weights file instead (--weights, --teacher-weights or --student-weights)"
            ) from None
        # timm's own checks of the sizes (a negative depth, a patch that does not divide the image)
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, MemoryError) or "can't allocate memory" in why:  # the size, not the kwargs
            raise UserError(f"not enough memory to build '{name}' for {kwargs.get('img_size')}-px images and "
                            f"{num_classes} classes (a ViT's position embedding grows with the image, the head "
                            "with the classes); use smaller images (data.img_size, or profile's --img-size) or "
                            "fewer classes") from None
        raise UserError(f"cannot build '{name}' with {overrides or {}}: {why}; fix model.*_kwargs") from None
    _check_patch_fits(model, name, kwargs.get("img_size"))
    if spec["small_stem"]:
        _apply_small_stem(model)
    spec = {"name": spec["name"], "kwargs": kwargs, "small_stem": spec["small_stem"], "registered": name}
    if weights:
        load_weights(model, weights, name)
    return model, spec


def _check_overrides(name: str, num_classes: int, overrides: dict) -> None:
    """What timm would take and fail on only later, deep in training: a head of another size than the
    data's classes (the loss indexes past it), and drop rates outside [0, 1] (timm spreads a stochastic
    depth rate over the blocks and the first forward raises)."""
    empty = sorted(k for k, v in overrides.items() if v is None)
    if empty:  # timm.create_model drops None kwargs, so a misspelt key set to null would pass unseen
        raise UserError(f"'{name}' is given {', '.join(f'{k}=null' for k in empty)} in model.*_kwargs, which timm "
                        "ignores; give a value or drop the key to keep the model's default")
    given = overrides.get("num_classes")
    if given is not None and given != num_classes:
        raise UserError(f"'{name}' is given num_classes={given!r} in model.*_kwargs but the data has {num_classes} "
                        "classes; drop num_classes there (vitdistill sizes the head from the data)")
    for key, value in overrides.items():
        if "drop" in key and key.endswith("_rate") and value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1):
            raise UserError(f"'{name}' is given {key}={value!r} in model.*_kwargs; a drop rate is a number in "
                            "[0, 1] (DeiT-Tiny's drop_path_rate is 0.1)")


def _check_patch_fits(model: torch.nn.Module, name: str, img_size: int | None) -> None:
    """A ViT whose patch is larger than the image fails deep inside its first convolution; say it here."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is None or patch is None:
        return
    side = max(patch) if isinstance(patch, (tuple, list)) else int(patch)
    if img_size < side:
        raise UserError(f"'{name}' cuts {side}-px patches but the images are {img_size} px; use images of at "
                        f"least {side} px (data.img_size; for profile, --img-size), or a model with smaller patches")
    rest = img_size % side
    if rest and (name, img_size, side) not in _NOTED_CROPS:  # once per process: a run builds its model often
        _NOTED_CROPS.add((name, img_size, side))
        print(f"note: '{name}' cuts {img_size}-px images into {side}-px patches, so the last {rest} px of each row "
              f"and column are never seen; a patch size that divides {img_size} uses the whole image",
              file=sys.stderr, flush=True)


_NOTED_CROPS: set[tuple[str, int, int]] = set()


def _resolution_overlay(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's ``pretrained_cfg_overlay`` with the resolution it is built for.

    timm's configs say 224 px and crop 0.875-0.9 whatever ``img_size`` the model is built with, so
    ``timm.data.resolve_data_config`` on a 16 px student rebuilt by timm alone would resize to 224
    and centre-crop; the overlay makes timm's eval transform the plain full image vitdistill
    trains and scores on. Keys the caller set in the overlay win.
    """
    size = kwargs["img_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    own = dict(kwargs.get("pretrained_cfg_overlay") or {})
    return {"input_size": (kwargs.get("in_chans", 3), h, w), "crop_pct": 1.0, **own}


def _timm_create(name: str, arch: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    """timm.create_model, dropping ``img_size`` for architectures that take any size (CNNs)."""
    if pretrained:  # the hub's retry chatter would bury the one-line error an offline fetch ends in
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        if "img_size" not in kwargs or "img_size" not in str(exc):
            raise UserError(f"model '{name}' does not take these overrides ({exc}); fix model.*_kwargs") from None
        kwargs.pop("img_size")
        return timm.create_model(arch, pretrained=pretrained, **kwargs)


def resolve_weights_path(path: str) -> Path:
    """A weights file, or a run directory holding ``student.safetensors`` or ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        for candidate in ("student.safetensors", "model.safetensors"):
            if (p / candidate).is_file():
                return p / candidate
        raise UserError(f"run directory '{path}' holds no student.safetensors or model.safetensors; "
                        "is its run unfinished? finish it (--resume) or name a weights file")
    if not p.is_file():
        raise UserError(f"weights file '{path}' does not exist; check the path")
    return p


def _looks_like_safetensors(p: Path) -> bool:
    """A safetensors file under another name (student.bin): an 8-byte little-endian header length,
    then the JSON header. A torch file starts with a zip or pickle signature instead."""
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= p.stat().st_size


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read weights without executing pickled code (safetensors, or torch with weights_only=True)."""
    p = resolve_weights_path(path)
    if not os.access(p, os.R_OK):  # safetensors reports a file it may not open as not found
        raise UserError(f"cannot read weights '{p}': permission denied; check the file's permissions")
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(p):
            return load_file(str(p))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user-facing problem
        raise UserError(f"cannot read weights '{p}' ({type(exc).__name__}); is it a safetensors or torch file?") from None
    for key in ("student", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights '{p}' hold no state dict of tensors")
    return obj


def load_weights(model: torch.nn.Module, path: str, name: str) -> None:
    """Load a state dict strictly; a mismatch is one line that says what does not fit."""
    state = read_state_dict(path)
    check_fits(model, state, f"weights '{path}'", name)
    model.load_state_dict(state)


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    n_cls = getattr(model, "num_classes", None)
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    for k in shapes:
        if k.rsplit(".", 1)[0] in heads and state[k].shape[0] != n_cls:
            raise UserError(
                f"{what} do not fit model '{name}': they have {state[k].shape[0]} classes ({k}) but the data "
                f"has {n_cls}; use a teacher and student trained for this data's classes"
            )
    # load_state_dict would cast bool, int or complex weights to float without a word; a float
    # counter (num_batches_tracked from a blanket .half()) only rounds back, so it passes
    kinds = [k for k in own if k in state and k not in shapes and _kind(state[k]) != _kind(own[k])
             and (_kind(own[k]) == "float" or _kind(state[k]) == "complex")]
    if kinds:
        k = kinds[0]
        raise UserError(f"{what} do not fit model '{name}': {k} holds {str(state[k].dtype).removeprefix('torch.')} "
                        f"values where the model has {str(own[k].dtype).removeprefix('torch.')}; use weights "
                        "trained for this model")
    if missing or unexpected or shapes:
        detail = []
        if shapes:
            k = shapes[0]
            detail.append(f"{k} is {list(state[k].shape)} but the model has {list(own[k].shape)}")
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(
            f"{what} do not fit model '{name}': {'; '.join(detail)}; "
            "use weights trained for this model and class count"
        )


def _kind(t: torch.Tensor) -> str:
    """A tensor's kind of number: any float width serves a float tensor (fp16 and bf16 weights load)."""
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "bool" if t.dtype == torch.bool else "int"


def expected_input_size(model: torch.nn.Module) -> int | None:
    """The square input size a model is fixed to (ViT patch embedding), or None when any size works."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "dynamic_img_size", False) or getattr(pe, "img_size", None) is None:
        return None
    return int(pe.img_size[0])


def normalization(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))
