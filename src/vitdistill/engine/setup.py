"""Building a run's parts from its config: data, augmentation, and the teacher source.

The teacher source is where the two teacher kinds meet: a live frozen teacher, or a TinyViT-style
cache replayed without running the teacher. The loop and the methods see the same call either way.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitdistill.config import CacheConfig, Config
from vitdistill.data import DataSplit, Dataset, load_data
from vitdistill.engine import distributed as dist
from vitdistill.engine.runtime import pick_device, seed_everything, set_threads
from vitdistill.engine.speed import channels_last_teachers, compile_teachers
from vitdistill.data.mix import Augment
from vitdistill.data.randaugment import parse_spec
from vitdistill.engine.trainer import LiveTeacher, TeacherSource, check_micro_batch
from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.methods.base import Method
from vitdistill.models import Teacher, create_model, prepare_student
from vitdistill.models.factory import expected_input_size
from vitdistill.models.taps import FeatureTaps, ModelInfo, describe
from vitdistill.models.wrappers import TeacherEnsemble
from vitdistill import teacher_cache as tc


def _subset(split: DataSplit, limit: int | None) -> DataSplit:
    if not limit or limit >= len(split):
        return split
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(split), generator=g)[:limit].sort().values
    return DataSplit(split.images[keep], split.labels[keep])


def load_run_data(cfg: Config) -> Dataset:
    d = cfg.data
    data = load_data(d.source, cache_dir=d.cache_dir, img_size=d.img_size, val_fraction=d.val_fraction)
    data.train = _subset(data.train, d.train_limit)
    data.test = _subset(data.test, d.test_limit)
    return data


def augment_for(cfg: Config, data: Dataset) -> Augment:
    pad = data.pad if cfg.data.pad is None else cfg.data.pad
    if pad > data.img_size:  # a crop that pads past the image is mostly zeros, and its batch copy huge
        where = "data.pad" if cfg.data.pad is not None else f"the default of {data.name}"
        raise UserError(f"the crop padding ({where}) is {pad} pixels, larger than the {data.img_size}-px images; "
                        "set data.pad to a few pixels (4 on CIFAR) or 0")
    hflip = data.hflip if cfg.data.hflip is None else cfg.data.hflip
    d = cfg.data
    if not 0.0 <= d.mix_prob <= 1.0 or not 0.0 <= d.cutmix_share <= 1.0 or not 0.0 <= d.erase_prob <= 1.0:
        raise UserError("data.mix_prob, data.cutmix_share and data.erase_prob must lie in [0, 1]")
    if d.crop_scale is not None and not 0.0 < d.crop_scale <= 1.0:
        raise UserError(f"data.crop_scale is the smallest share of the image a random-resized crop keeps; it must "
                        f"lie in (0, 1] (DeiT uses 0.08), or be null for the padded crop, not {d.crop_scale}")
    try:
        randaug = parse_spec(d.randaugment) if d.randaugment else None
    except ValueError as exc:
        raise UserError(f"data.randaugment: {exc}") from None
    return Augment(cfg.train.seed, pad, hflip, d.mix_prob, d.cutmix_share, d.crop_scale, d.erase_prob, randaug)


def method_and_student(cfg: Config, mode: str, data: Dataset) -> tuple[Method, torch.nn.Module, dict]:
    """The run's method and the student it trains (reshaped by the method, checked by it, and with
    its spec), as a run builds them and as compare's check of a cell builds them."""
    method = build_method(cfg.method, cfg.train.label_smoothing)
    if mode == "train" and method.needs_teacher:
        raise UserError(f"`train` fits a model on labels; method '{method.name}' needs a teacher, use `distill`")
    check_micro_batch(method, cfg.train, len(data.train), dist.world_size())
    m = cfg.model
    student, spec = create_model(m.student, data.num_classes, data.img_size, m.student_kwargs, m.pretrained,
                                 m.student_weights)
    student = method.adapt_student(student, m.student)
    method.check_student(student, m.student)
    prepare_student(student)
    return method, student, spec


def teacher_names(cfg: Config) -> list[tuple[str, str | None]]:
    """(name, weights) of each teacher; several are given comma-separated: ``--teacher a,b``."""
    names = _split_list(cfg.model.teacher, "--teacher (model.teacher)")
    weights = [w.strip() or None for w in cfg.model.teacher_weights.split(",")] if cfg.model.teacher_weights else []
    if weights and not names:
        raise UserError("--teacher-weights (model.teacher_weights) is given with no teacher model; name the "
                        "weights' architecture with --teacher NAME")
    if (len(names) > 1 and weights and len(weights) != len(names)) or (len(names) == 1 and len(weights) > 1):
        raise UserError(f"{len(names)} teacher{'s' * (len(names) != 1)} but {len(weights)} weights files; give one "
                        "weights file per teacher, comma-separated, in the same order")
    # no weights for several teachers: each is named, and build_teachers says each needs weights
    return [(n, weights[i] if i < len(weights) else None) for i, n in enumerate(names)]


def build_teacher(cfg: Config, data: Dataset, why: str) -> tuple[Teacher, dict]:
    """The first (or only) teacher; :func:`build_teachers` builds them all."""
    teachers, specs = build_teachers(cfg, data, why)
    return teachers[0], specs[0]


def build_teachers(cfg: Config, data: Dataset, why: str,
                   unwritten: frozenset[Path] = frozenset()) -> tuple[list[Teacher], list[dict]]:
    """Every teacher of ``cfg``, frozen. A teacher whose weights path is in ``unwritten`` (resolved:
    a compare grid's own teacher, not trained yet) is built with random weights, for a shape check."""
    m = cfg.model
    named = teacher_names(cfg)
    if not named:
        raise UserError(f"{why} needs a teacher; pass --teacher NAME --teacher-weights FILE")
    img_size = None if m.pretrained else data.img_size
    teachers, specs = [], []
    for name, weights in named:
        if weights is None and not m.pretrained:
            raise UserError(f"teacher '{name}' has no weights, and a random teacher teaches nothing; pass "
                            "--teacher-weights FILE (or --set model.pretrained=true for timm's hub weights)")
        later = weights is not None and Path(weights).resolve() in unwritten
        model, spec = create_model(name, data.num_classes, img_size, m.teacher_kwargs, m.pretrained and not later,
                                   None if later else weights)
        if weights is not None and not later:
            note_other_classes(name, weights, data)
        teachers.append(Teacher(model))
        specs.append(spec)
    return teachers, specs


_NOTED: set[tuple[str, str]] = set()


def note_other_classes(name: str, weights: str, data: Dataset) -> None:
    """A note (once per weights and data) when teacher weights written by a vitdistill run were
    trained on other classes than this data's: with the same class count they load without a
    complaint and teach every class as another. A note, not an error: the same classes may be
    spelt otherwise (a copy of the data with renamed folders)."""
    from safetensors import safe_open

    from vitdistill.models.factory import resolve_weights_path

    path = resolve_weights_path(weights)
    if path.suffix != ".safetensors" or (str(path), data.fingerprint) in _NOTED:
        return
    _NOTED.add((str(path), data.fingerprint))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        trained = json.loads(meta["classes"])
    except (KeyError, ValueError, OSError):  # weights from elsewhere (timm, a hub) say nothing of it
        return
    if trained != list(data.classes) and dist.is_main():
        def show(c: list) -> str:
            return ", ".join(map(str, c[:4])) + (", ..." if len(c) > 4 else "")

        print(f"note: teacher '{name}' ({path}) was trained on {meta.get('data', 'other data')} with classes "
              f"[{show(trained)}], this data's are [{show(list(data.classes))}]; a teacher must score the same "
              "classes in the same order", file=sys.stderr, flush=True)


def cache_header(cfg: Config, data: Dataset, teacher_name: str, teacher_hash: str, teacher_input: dict) -> dict:
    """What a teacher cache for this run must have been made for; ``teacher_input`` is the
    teacher's :class:`InputPrep` spec (mean, std, resolution)."""
    aug = augment_for(cfg, data)
    return tc.make_header(
        teacher=teacher_name, teacher_hash=teacher_hash, teacher_input=teacher_input, data_fingerprint=data.fingerprint,
        train_limit=cfg.data.train_limit, num_samples=len(data.train), num_classes=data.num_classes,
        pad=aug.pad, hflip=aug.hflip, mix_prob=aug.mix_prob, cutmix_share=aug.cutmix_share,
        crop_scale=aug.crop_scale, erase_prob=aug.erase_prob, randaugment=cfg.data.randaugment or None,
        seed=cfg.train.seed, epochs=cfg.train.epochs, data_source=str(cfg.data.source),
        topk=min(cfg.cache.topk, data.num_classes), value_dtype=cfg.cache.value_dtype)


@dataclass
class TeacherSide:
    source: TeacherSource
    test_logits: torch.Tensor | None
    model: Teacher | None  # the first teacher; None when a cache stands in and no teacher was named
    spec: dict | None
    teachers: list[Teacher] = field(default_factory=list)
    # every live teacher's test logits, when there are several (Co-advise): the report's row per teacher
    each_test_logits: list[torch.Tensor] = field(default_factory=list)
    cache_teachers: list[str] = field(default_factory=list)  # replayed caches: each one's teacher name


def check_teacher_count(method: Method, n: int, caches: bool = False) -> None:
    """A one-line error when ``method`` cannot learn from ``n`` teachers (or teacher caches)."""
    what = f"{n} teacher cache{'s' * (n != 1)}" if caches else f"{n} teacher{'s' * (n != 1)}"
    if n < method.teachers_needed:
        how = ("give one cache per teacher, comma-separated: --teacher-cache DA,DB" if caches else
               "pass them comma-separated: --teacher A,B --teacher-weights WA,WB")
        raise UserError(f"method '{method.name}' needs {method.teachers_needed} teachers and got {what}; {how}")
    if method.teachers_most is not None and n > method.teachers_most:
        # the rest would be run (or replayed) and never read
        raise UserError(f"method '{method.name}' learns from {method.teachers_most} teacher and got {what}; give one "
                        "(co-advise is the method that learns from several)")


def check_cache_dirs(method: Method, n_teachers: int, dirs: list[str]) -> None:
    """One-line errors for caches that cannot stand in for the named teachers (none named: 0)."""
    if n_teachers and len(dirs) != n_teachers:
        raise UserError(f"{n_teachers} teachers but {len(dirs)} teacher cache{'s' * (len(dirs) != 1)}; give one "
                        "cache per teacher, comma-separated, in the same order: --teacher-cache DA,DB")
    check_teacher_count(method, len(dirs), caches=True)
    missing = set(method.teacher_outputs) - set(tc.CachedTeacher.provides)
    if missing:
        raise UserError(f"method '{method.name}' needs teacher outputs {sorted(missing)} that a teacher cache does "
                        "not hold; drop --teacher-cache to run the teacher live")


def teacher_side(cfg: Config, data: Dataset, method: Method, device: torch.device) -> TeacherSide:
    """The live teacher(s), or the cache in ``cache.dir``; plus the first teacher's test logits."""
    teacher, spec = (None, None)
    teachers: list[Teacher] = []
    if cfg.model.teacher or not cfg.cache.dir:
        teachers, specs = build_teachers(cfg, data, f"method '{method.name}'")
        check_teacher_count(method, len(teachers))
        for t in teachers:
            t.to(device)
        channels_last_teachers(cfg.train, teachers, device)
        teacher, spec = teachers[0], specs[0]
    if not cfg.cache.dir:
        assert teacher is not None
        live = teacher if len(teachers) == 1 else TeacherEnsemble(teachers)
        logits = dist.predict(lambda x: teacher(x)["logits"], data.test, cfg.train.eval_batch_size, device)
        stream = torch.cuda.Stream(device) if cfg.train.teacher_stream and device.type == "cuda" else None
        each = [logits] + [dist.predict(lambda x, t=t: t(x)["logits"], data.test, cfg.train.eval_batch_size, device)
                           for t in teachers[1:]] if len(teachers) > 1 else []
        return TeacherSide(LiveTeacher(live, stream), logits, teacher, spec, teachers, each)
    dirs = split_dirs(cfg.cache.dir)
    check_cache_dirs(method, len(teachers), dirs)
    named = teacher_names(cfg)
    caches = []
    for i, cache_dir in enumerate(map(Path, dirs)):
        found = tc.read_header(cache_dir)
        name = named[i][0] if teachers else found["teacher"]
        thash = tc.state_hash(teachers[i].model) if teachers else found["teacher_hash"]
        prep = teachers[i].prep.spec if teachers else found.get("teacher_input")
        caches.append(tc.CachedTeacher(cache_dir, cache_header(cfg, data, name, thash, prep), device))
    tau = getattr(method, "tau", None)  # the logit methods' shared knob; a method without one is not warned
    short = [c for c in caches if c.header["topk"] < c.header["num_classes"]]
    if short and isinstance(tau, (int, float)) and tau > 1 and dist.is_main():
        c = short[0]
        print(f"note: the cache '{c.dir}' keeps the top {c.header['topk']} of "
              f"{c.header['num_classes']} classes and spreads the rest evenly; at tau {tau:g} the softened target "
              "leans on that tail (DKD's non-target term most), so write the cache with --topk "
              f"{c.header['num_classes']} for the live teacher's target", file=sys.stderr, flush=True)
    source = caches[0] if len(caches) == 1 else tc.CachedTeachers(caches)
    # made for another test subset: no teacher figures rather than wrong ones
    tests = [c.test_logits() for c in caches]
    tests = [x if x is not None and len(x) == len(data.test) else None for x in tests]
    if teachers:  # the teachers were named beside their caches: score the split live where a cache cannot
        tests = [x if x is not None else dist.predict(lambda b, t=t: t(b)["logits"], data.test,
                                                        cfg.train.eval_batch_size, device)
                 for x, t in zip(tests, teachers)]
    if tests[0] is None and dist.is_main():
        print(f"note: the cache '{caches[0].dir}' holds no teacher logits for this test split (test.safetensors is "
              "missing, or was made for another data.test_limit), so summary.json gives no teacher top-1 or "
              "agreement; write the cache again with cache-teacher to have them", file=sys.stderr, flush=True)
    each = tests if len(tests) > 1 and all(x is not None for x in tests) else []
    return TeacherSide(source, tests[0], teacher, spec, teachers, each,  # type: ignore[arg-type]
                       [c.header["teacher"] for c in caches])


def split_dirs(text: str | None) -> list[str]:
    """Teacher caches given comma-separated, one per teacher in the teachers' order."""
    return _split_list(text, "--teacher-cache (cache.dir)")


def _split_list(text: str | None, flag: str) -> list[str]:
    """The comma-separated entries of ``text``; an empty one (``a,,b``, a trailing comma) is an error,
    since dropping it would pair the rest with the wrong teachers."""
    if not text or not str(text).strip():
        return []
    parts = [p.strip() for p in str(text).split(",")]
    if not all(parts):
        raise UserError(f"{flag} '{text}' has an empty entry; separate the entries with single commas")
    return parts


def setup_method(method: Method, student: torch.nn.Module, student_name: str, side: TeacherSide | None,
                 data: Dataset) -> FeatureTaps | None:
    """Show the method the models' shapes, let it create its parts, and attach the taps it asked for.

    Returns the student's taps (``None`` when it asked for none); teacher taps live in the teachers.
    """
    s_size = expected_input_size(student) or data.img_size  # what its InputPrep resizes the images to
    s_info = describe(student, student_name, (data.in_chans, s_size, s_size), data.num_classes)
    t_infos = []
    for t in side.teachers if side is not None else []:
        t_size = t.prep.size or data.img_size
        t_infos.append(describe(t.model, type(t.model).__name__, (data.in_chans, t_size, t_size), data.num_classes))
    if side is not None and not side.teachers:  # caches stand in: the method still learns how many teachers
        t_infos = [ModelInfo(name, "cache", [], num_classes=data.num_classes) for name in side.cache_teachers]
    method.setup(s_info, t_infos)
    if method.teacher_taps:
        if side is None or not side.teachers:
            raise UserError(f"method '{method.name}' reads the teacher's intermediate outputs, which a teacher cache "
                            "does not hold; drop --teacher-cache to run the teacher live")
        for t in side.teachers:
            t.tap(method.teacher_taps)
    return FeatureTaps(student, method.student_taps) if method.student_taps else None


def cache_teacher(cfg: Config, cache_dir: str) -> dict:
    """``vitdistill cache-teacher``: run the teacher once over every planned epoch and store it.

    Under torchrun the processes split every epoch's batches and rank 0 writes the shards.
    """
    with dist.session():
        return _cache_teacher(cfg, cache_dir)


def _cache_teacher(cfg: Config, cache_dir: str) -> dict:
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    with dist.local_main_first():  # one decode per node; the node's other processes read its cache
        data = load_run_data(cfg)
    teachers, _ = build_teachers(cfg, data, "cache-teacher")
    if cfg.cache.topk > data.num_classes and cfg.cache.topk != CacheConfig.topk and dist.is_main():
        print(f"note: --topk {cfg.cache.topk} is more than the {data.num_classes} classes; the cache keeps all "
              f"{data.num_classes} logits of each sample", file=sys.stderr, flush=True)
    dirs = split_dirs(cache_dir)
    if len(dirs) != len(teachers):
        raise UserError(f"{len(teachers)} teachers but {len(dirs)} cache folders; give one folder per teacher, "
                        "comma-separated, in the same order: --cache DA,DB")
    written = []
    for (name, _), teacher, where in zip(teacher_names(cfg), teachers, dirs):
        teacher.to(device)
        channels_last_teachers(cfg.train, [teacher], device)
        compile_teachers(cfg.train, [teacher])
        header = cache_header(cfg, data, name, tc.state_hash(teacher.model), teacher.prep.spec)
        written.append(tc.write_cache(Path(where), header, teacher, DataSplit(data.train.images.to(device),
                                      data.train.labels), augment_for(cfg, data), cfg.train.eval_batch_size, device,
                                      progress=cfg.train.progress, test=data.test))
    return written[0] if len(written) == 1 else {"caches": written}
