"""Run configuration: plain dataclasses, safe YAML, dotted overrides, unknown keys are errors.

Every CLI option is also a key here, so a run is fully described by the ``config.yaml`` saved in
its run directory and can be re-run with ``--config runs/NAME/config.yaml``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitdistill import plugins
from vitdistill.errors import UserError, did_you_mean


@dataclass
class DataConfig:
    source: str = "digits"  # digits | mnist5k | cifar10:DIR | cifar100:DIR | imagefolder:PATH | synthetic:DIR[,DIR]
    cache_dir: str | None = None  # decoded uint8 cache; default $VITDISTILL_CACHE or ~/.cache/vitdistill
    img_size: int | None = None  # resize once at decode; None keeps the native size
    val_fraction: float = 0.1  # held-out share when the source has no test split
    pad: int | None = None  # random-crop padding; None takes the source's default
    hflip: bool | None = None  # horizontal flips; None takes the source's default
    mix_prob: float = 0.0  # share of training samples mixed with a partner (Mixup or CutMix)
    cutmix_share: float = 0.5  # of the mixed samples, the share that get CutMix instead of Mixup
    crop_scale: float | None = None  # RandomResizedCrop's smallest area share (DeiT: 0.08); None: padded crop
    erase_prob: float = 0.0  # share of training samples given a random-erasing box (DeiT: 0.25)
    randaugment: str | None = None  # timm's RandAugment string (DeiT: rand-m9-mstd0.5-inc1); None: off
    train_limit: int | None = None  # use a fixed random subset of the training split
    test_limit: int | None = None  # use a fixed random subset of the test split


@dataclass
class ModelConfig:
    student: str = "vit_femto_patch4_16"  # a tiny registered config or any timm model name
    student_weights: str | None = None  # safetensors / torch checkpoint / run directory
    student_kwargs: dict = field(default_factory=dict)  # timm overrides: depth, embed_dim, patch_size...
    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False  # timm's hub weights for names that have them (needs the network)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    accum_steps: int = 1  # split each batch into this many micro-batches whose gradients add up (less memory)
    lr: float = 1e-3
    min_lr: float = 1e-5  # left unset with lr below it, it becomes lr / 100 (the cosine never climbs)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA only) | bf16 | off
    optimizer: str = "auto"  # AdamW kernel: auto (fused where available, else foreach) | fused | foreach | for-loop
    compile: bool = False  # torch.compile the student and the live teachers (tapped models stay eager)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for checks)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: bool | None = None  # CNN teachers in channels-last memory; null: on CUDA only
    teacher_stream: bool = False  # CUDA: run the live teacher on a side stream, beside the student's forward
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 256
    progress: bool = True
    stop_after: int | None = None  # end this invocation after N epochs; --resume continues the run
    ema_decay: float | None = None  # model EMA of the student (e.g. DeiT's 0.99996); it is evaluated and saved
    ema_warmup: bool = True  # timm's EMA warm-up: decay min(ema_decay, 1 - t^(-2/3)) at update t


@dataclass
class CacheConfig:
    dir: str | None = None  # a teacher cache to replay instead of running the teacher (TinyViT)
    topk: int = 10  # logits kept per sample and epoch (clipped to the class count)
    value_dtype: str = "float16"  # float16 (TinyViT's size) | float32 (bit-exact targets)


@dataclass
class SynthConfig:
    """``vitdistill synthesize``: DeepInversion's knobs (src/vitdistill/datafree.py has the equation)."""

    images: int = 2560  # images to make, the classes in turn
    batch_size: int = 256  # optimised together; BatchNorm statistics are matched per batch
    iters: int = 300  # Adam steps per batch (the paper: 2,000 at 224 px)
    lr: float = 0.1  # Adam on pixels in [0, 1], cosine decay to 0
    bn_weight: float = 0.05  # alpha_f, on R_feature
    first_bn_scale: float = 10.0  # the first BatchNorm layer's term counts this many times
    tv_weight: float = 3e-3  # alpha_tv, on R_tv
    l2_weight: float = 1e-5  # alpha_l2, on R_l2
    jitter: int = 2  # random shift (pixels) of the batch at each step
    grey: bool = False  # one free channel shown as RGB, for grey data sets (digits, mnist5k)
    base_size: int | None = None  # optimise pixels at this side and upsample bilinearly (smooth images)
    init_std: float = 0.2  # the starting noise around mid-grey
    # Adaptive DeepInversion: weight of 1 - JS(teacher, student) (the paper: 0.2); needs a trained student
    competition_weight: float = 0.0
    competition_tau: float = 3.0  # softmax temperature of the two distributions (the authors' code: 3)


@dataclass
class Config:
    # modules or .py files that register methods or models (src/vitdistill/plugins.py), imported first
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # name plus the method's own knobs; the knobs are checked against the method's signature
    method: dict = field(default_factory=lambda: {"name": "none"})
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    out: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is dict and isinstance(value, dict):
        return value
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise UserError(f"config key '{key}' expects {name}, got {value!r}; fix it in the config or --set")


def _fill(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str):
            raise UserError(f"config key '{dotted}' is not a name; keys are words such as {', '.join(names[:3])}")
        if key not in names:
            raise UserError(
                f"unknown config key '{dotted}'{did_you_mean(key, names)}; known keys under "
                f"'{prefix.rstrip('.') or 'top level'}': {', '.join(names)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{dotted}' is a section; give it a mapping of keys")
            _fill(current, value, dotted + ".")
        elif key == "plugins" and prefix == "":
            given = [value] if isinstance(value, str) else value
            if not isinstance(given, list) or not all(isinstance(v, str) for v in given):
                raise UserError(f"config key 'plugins' expects a list of module names or .py files, got {value!r}")
            obj.plugins = [*obj.plugins, *given]  # every layer adds its own
        elif key == "method" and prefix == "":
            if isinstance(value, str):
                value = {"name": value}
            if not isinstance(value, dict):
                raise UserError("config key 'method' must be a mapping with a 'name' (or just a name)")
            # a new name drops the knobs of the method named before, but not knobs given with no name
            # yet (a file's `method: {tau: 4}` beside `--method logit-kd`)
            named = getattr(obj, "_method_named", False)
            same = value.get("name", current.get("name")) == current.get("name")
            merged = dict(current) if same or not named else {}
            merged.update(value)
            setattr(obj, key, merged)
            if "name" in value:
                object.__setattr__(obj, "_method_named", True)
        elif hints[key] is dict or typing.get_origin(hints[key]) is dict:
            if not isinstance(value, dict):
                raise UserError(f"config key '{dotted}' expects a mapping, got {value!r}")
            setattr(obj, key, {**current, **value})
        else:
            setattr(obj, key, _check_type(dotted, value, hints[key]))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``; people write both),
    and refuses a key given twice in one mapping (YAML keeps the last silently, so a second
    ``train:`` section would drop the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:  # `? [a, b]`: a list as key
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name, not a {type(key).__name__} (line {line})", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _safe_load(text: str) -> object:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config with ``safe_load`` (no tags that execute code)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config '{path}': {exc.strerror}; check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"config '{path}' is not UTF-8 text; give a YAML file") from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"config '{path}' is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if data is None:  # an empty file (or only comments) sets nothing; `[]`, `0` or `false` is a mistake
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config '{path}' must be a mapping of sections (data, model, method, train, out)")
    return data


def parse_override(text: str) -> dict:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}``; the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key.path=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    if re.search(r"(^|\s)#", raw):
        value: Any = raw  # YAML would drop the rest as a comment (out=#3 meant null); a flag holds none
    else:
        try:
            value = _safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
    nested: dict = {}
    cur = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return nested


def _at_least(low: float) -> tuple:
    return (lambda v: math.isfinite(v) and v >= low), f"a number >= {low:g}"


def _above(low: float) -> tuple:
    return (lambda v: math.isfinite(v) and v > low), f"a number > {low:g}"


_FLOAT32_MAX = 3.4028234663852886e38


def _rate() -> tuple:
    """A learning rate: optimizers keep it as a float32 step (a larger one overflows in the first step)."""
    return (lambda v: math.isfinite(v) and 0 < v < _FLOAT32_MAX), "a number > 0 and below 3.4e38 (float32's largest)"


MAX_THREADS = 1024  # train.threads, and the --threads of the commands that take no config

# Ranges of the plain numeric keys (None passes where a key allows it), checked when the config
# is built: before a run folder exists, and in words rather than as an error from deep in torch.
_RANGES: dict[tuple[str, str], tuple] = {
    ("train", "epochs"): _at_least(1), ("train", "batch_size"): _at_least(1),
    ("train", "accum_steps"): _at_least(1), ("train", "lr"): _rate(),
    ("train", "min_lr"): _at_least(0), ("train", "weight_decay"): _at_least(0),
    ("train", "warmup_epochs"): _at_least(0), ("train", "clip_grad"): _above(0),
    ("train", "label_smoothing"): ((lambda v: 0 <= v < 1), "a number in [0, 1)"),
    ("train", "eval_batch_size"): _at_least(1),
    ("train", "threads"): ((lambda v: 1 <= v <= MAX_THREADS), f"a number from 1 to {MAX_THREADS}"),
    ("train", "seed"): ((lambda v: 0 <= v < 2**63), "a whole number from 0 to 2**63 - 1"),
    ("train", "stop_after"): _at_least(1), ("data", "pad"): _at_least(0), ("data", "train_limit"): _at_least(1),
    ("data", "test_limit"): _at_least(1),
    # synthesize: finite numbers (a NaN weight or rate passed `< 0` checks and made black images)
    ("synth", "images"): _at_least(1), ("synth", "batch_size"): _at_least(2), ("synth", "iters"): _at_least(1),
    ("synth", "lr"): _rate(), ("synth", "bn_weight"): _at_least(0), ("synth", "first_bn_scale"): _at_least(0),
    ("synth", "tv_weight"): _at_least(0), ("synth", "l2_weight"): _at_least(0), ("synth", "jitter"): _at_least(0),
    ("synth", "init_std"): _at_least(0), ("synth", "base_size"): _at_least(1),
    ("synth", "competition_weight"): _at_least(0), ("synth", "competition_tau"): _above(0),
}  # data.img_size is checked where the data is loaded (data/sources.py)
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "amp"): ("auto", "bf16", "off"),  # train.optimizer has its own check (engine/speed.py)
}


def check_ranges(cfg: Config) -> None:
    """One-line errors for numeric keys out of range and for choices that are not among the known."""
    for (section, key), (ok, what) in _RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if value is not None and not ok(value):
            raise UserError(f"config key '{section}.{key}' must be {what}, got {value!r}; fix it in the config or --set")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**31 and key != "seed":
            # counts and sizes reach torch and numpy as C ints, which overflow in a traceback
            raise UserError(f"config key '{section}.{key}' must be below 2**31, got {value}; fix it in the config "
                            "or --set")
    if cfg.train.min_lr > cfg.train.lr:  # the cosine would climb from lr up to min_lr
        raise UserError(f"train.min_lr {cfg.train.min_lr:g} is above train.lr {cfg.train.lr:g}; the schedule decays "
                        "from lr down to min_lr, so set min_lr at most lr (e.g. --set train.min_lr=0)")
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise UserError(f"{section}.{key} must be one of {', '.join(choices)}, not {value!r}"
                            f"{did_you_mean(str(value), list(choices))}")


def build_config(layers: list[dict]) -> Config:
    """Apply config layers in order (file, then CLI flags, then --set overrides) onto the defaults."""
    cfg = Config()
    for layer in layers:
        _fill(cfg, layer, "")
    cfg.plugins = plugins.normalise(cfg.plugins)
    plugins.load_plugins(cfg.plugins)  # before anything looks up a method or a model by name
    if cfg.train.min_lr > cfg.train.lr and not any("min_lr" in (layer.get("train") or {}) for layer in layers
                                                   if isinstance(layer.get("train"), dict)):
        cfg.train.min_lr = cfg.train.lr / 100  # a small --lr alone should not trip over the default floor
    if not isinstance(cfg.method.get("name"), str):
        raise UserError("config key 'method.name' must be a method name; `vitdistill methods` lists them")
    check_ranges(cfg)
    return cfg
