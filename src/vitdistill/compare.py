"""``vitdistill compare``: a grid of (method, student) cells over seeds, ending in one leaderboard.

The config is a normal run config plus a ``compare:`` section (docs/compare.md). Every (cell, seed)
is one ordinary run directory under ``OUT/cells/<label>/seed<k>``, so a grid is resumable for free:
a run with ``summary.json`` is finished and skipped, one with only ``checkpoint.pt`` is resumed.
A teacher named in ``compare.teacher`` is trained once into ``OUT/teacher``; logit-only methods can
replay one teacher cache per seed (``OUT/caches``) instead of running the teacher in every run.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from vitdistill.config import Config, build_config, load_yaml, parse_override
from vitdistill.engine import distributed as dist
from vitdistill.engine import io
from vitdistill.errors import UserError, did_you_mean

COMPARE_KEYS = ("seeds", "teacher", "teacher_cache", "cells")
CELL_KEYS = ("method", "student", "knobs", "label", "teacher", "teacher_weights", "teacher_cache", "set")
TEACHER_KEYS = ("model", "weights", "kwargs", "epochs", "lr", "set")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
POLL_S = 30.0  # how often a shard looks again for a teacher or cache that another shard writes


def _check_keys(where: str, value: Any, known: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"'{where}' must be a mapping with keys {', '.join(known)}")
    for key in value:
        if key not in known:
            raise UserError(f"unknown key '{where}.{key}'{did_you_mean(str(key), known)}; known keys under "
                            f"'{where}': {', '.join(known)}")
    return value


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def _nest(dotted: str, value: Any) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _overrides(where: str, value: Any) -> dict:
    """A ``set:`` entry as one config layer: a list of ``key=value`` strings or a mapping of dotted keys."""
    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [parse_override(v) for v in value]
    elif isinstance(value, dict):
        items = [_nest(str(k), v) for k, v in value.items()]
    else:
        raise UserError(f"'{where}' must be a mapping of dotted keys (train.lr: 0.002) or a list of 'key=value'")
    layer: dict = {}
    for item in items:
        layer = _merge(layer, item)
    return layer


@dataclasses.dataclass
class Cell:
    label: str
    method: str
    student: str
    knobs: dict = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_cache: bool | None = None
    overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Spec:
    seeds: list[int]
    cells: list[Cell]
    teacher: dict | None = None
    teacher_cache: bool = False


def parse_spec(raw: Any, default_student: str) -> Spec:
    """Validate the ``compare:`` section; every mistake is a one-line :class:`UserError`."""
    if raw is None:
        raise UserError("the config has no 'compare:' section; add one with seeds and cells (docs/compare.md)")
    raw = _check_keys("compare", raw, COMPARE_KEYS)
    seeds = raw.get("seeds", [0, 1, 2])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise UserError(f"'compare.seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    teacher = raw.get("teacher")
    if isinstance(teacher, str):
        teacher = {"model": teacher}
    if teacher is not None:
        teacher = dict(_check_keys("compare.teacher", teacher, TEACHER_KEYS))
        if not isinstance(teacher.get("model"), str):
            raise UserError("'compare.teacher.model' must name the teacher model, e.g. resnet_micro_cnn")
        teacher["set"] = _overrides("compare.teacher.set", teacher.get("set"))
    use_cache = raw.get("teacher_cache", False)
    if not isinstance(use_cache, bool):
        raise UserError(f"'compare.teacher_cache' must be true or false, got {use_cache!r}")
    cells_raw = raw.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        what = "is empty" if not cells_raw else f"must be a list of cells, not a {type(cells_raw).__name__}"
        raise UserError(f"'compare.cells' {what}; list at least one cell, e.g. - {{method: none, student: "
                        "vit_femto_patch4_16}")
    cells = []
    for i, c in enumerate(cells_raw):
        where = f"compare.cells[{i}]"
        c = _check_keys(where, c, CELL_KEYS)
        if not isinstance(c.get("method"), str):
            raise UserError(f"'{where}.method' must name a method; `vitdistill methods` lists them")
        knobs = c.get("knobs") or {}
        if not isinstance(knobs, dict):
            raise UserError(f"'{where}.knobs' must be a mapping of the method's knobs, e.g. {{tau: 2.0}}")
        if "name" in knobs:  # it would replace the cell's method behind its label
            raise UserError(f"'{where}.knobs' may not hold 'name'; the cell's method is its 'method' key")
        if c.get("teacher_cache") is not None and not isinstance(c["teacher_cache"], bool):
            raise UserError(f"'{where}.teacher_cache' must be true or false")
        cells.append(Cell(label=str(c.get("label") or ""), method=c["method"],
                          student=str(c.get("student") or default_student), knobs=dict(knobs),
                          teacher=c.get("teacher"), teacher_weights=c.get("teacher_weights"),
                          teacher_cache=c.get("teacher_cache"), overrides=_overrides(f"{where}.set", c.get("set"))))
    methods = [c.method for c in cells if not c.label]
    for c in cells:
        if not c.label:
            c.label = c.method if methods.count(c.method) == 1 else f"{c.method}-{c.student}"
        if not _LABEL.match(c.label):
            raise UserError(f"cell label '{c.label}' must be letters, digits, '.', '_', '+' or '-' (it names a folder)")
    labels = [c.label for c in cells]
    for label in labels:
        if labels.count(label) > 1:
            raise UserError(f"two cells share the label '{label}'; give each a distinct 'label:'")
    return Spec(seeds=seeds, cells=cells, teacher=teacher, teacher_cache=use_cache)


@dataclasses.dataclass
class Job:
    label: str
    seed: int
    out: Path
    cfg: Config
    mode: str = "train"
    caches: tuple[Path, ...] = ()  # the caches this run replays, one per teacher
    needs_teacher_run: bool = False  # waits for OUT/teacher to finish
    waits_for: frozenset[Path] = frozenset()  # of ``caches``, those another shard writes (this one waits)
    moved: dict[str, str] = dataclasses.field(default_factory=dict)  # a copied grid: former place -> here


def _status(run_dir: Path) -> str:
    done, started = (run_dir / "summary.json").exists(), (run_dir / "checkpoint.pt").exists()
    return "done" if done else "resume" if started else "new"


def _cache_done(cache_dir: Path, epochs: int) -> bool:
    """Whether the cache holds ``epochs`` epochs of shards that pass their checksums (a damaged
    one is rewritten by cache-teacher, not found by the run at its epoch)."""
    from vitdistill import teacher_cache as tc

    try:
        header = tc.read_header(cache_dir)
    except UserError:
        return False
    digest = tc.header_digest(header)
    return (header["epochs"] >= epochs and (cache_dir / "test.safetensors").exists()
            and all(tc.verified(tc.read_shard, tc.shard_path(cache_dir, e), digest, e) for e in range(epochs)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:40]


def plan(spec: Spec, base: list[dict], out: Path) -> tuple[Job | None, list[Job], list[Job]]:
    """(teacher job, cache jobs, run jobs in order: seed-major, cells in config order)."""
    from vitdistill.engine.run import relocate_paths
    from vitdistill.engine.setup import teacher_names
    from vitdistill.methods import METHODS, build_method

    out = out.resolve()
    # a grid copied or moved since it ran: its runs name the teacher and the caches by the old place,
    # and cache folders keep the names hashed there (the first place), so the copy reuses them
    former = _former_places(out)
    moved = {p: str(out) for p in former}
    home_of = {str(out): former[-1]} if former else {}  # paths here named as where the grid first ran
    teacher_job, teacher_ref = None, {}
    if spec.teacher:
        t = spec.teacher
        train = {"seed": spec.seeds[0], **{k: t[k] for k in ("epochs", "lr") if k in t}}
        layer = {"model": {"student": t["model"], "student_weights": t.get("weights"),
                           "student_kwargs": t.get("kwargs") or {}, "teacher": None, "teacher_weights": None},
                 "method": {"name": "none"}, "train": train, "cache": {"dir": None}}
        cfg = build_config([*base, layer, t["set"], {"out": str(out / "teacher"), "train": {"seed": spec.seeds[0]}}])
        dist.check_batch_size(cfg.train.batch_size, "train.batch_size of the compare teacher")
        teacher_job = Job("teacher", spec.seeds[0], out / "teacher", cfg)
        teacher_ref = {"teacher": t["model"], "teacher_weights": str(out / "teacher"),
                       "teacher_kwargs": t.get("kwargs") or {}}
    classes = {c.label: METHODS.get(c.method) for c in spec.cells}
    caches: dict[Path, Job] = {}
    runs: list[Job] = []
    for seed in spec.seeds:
        for cell in spec.cells:
            cls = classes[cell.label]
            model: dict = {"student": cell.student}
            if not cls.teacher_outputs:
                model.update(teacher=None, teacher_weights=None)
            elif cell.teacher:
                model.update(teacher=cell.teacher, teacher_weights=cell.teacher_weights)
            else:
                model.update(teacher_ref)
            run_dir = out / "cells" / cell.label / f"seed{seed}"
            layers = [*base, {"model": model, "method": {"name": cell.method, **cell.knobs}}, cell.overrides,
                      {"train": {"seed": seed}, "out": str(run_dir)}]
            cfg = build_config(layers)
            build_method(cfg.method, cfg.train.label_smoothing)  # knob errors now, not after an hour
            dist.check_batch_size(cfg.train.batch_size, f"train.batch_size of cell '{cell.label}'")
            job = Job(cell.label, seed, run_dir, cfg, "distill" if cls.teacher_outputs else "train")
            if not cls.teacher_outputs:
                cfg.cache.dir = None
            elif not cfg.model.teacher and not cfg.cache.dir:
                raise UserError(f"cell '{cell.label}' (method {cell.method}) needs a teacher; give compare.teacher, "
                                "model.teacher with model.teacher_weights, or the cell's teacher")
            # a cell may name the grid's own teacher run among its teachers (co-advise: it and another)
            weights = [w.strip() for w in (cfg.model.teacher_weights or "").split(",") if w.strip()]
            own = Path(teacher_ref["teacher_weights"]).resolve() if teacher_ref else None
            job.needs_teacher_run = own is not None and any(Path(w).resolve() == own for w in weights)
            use = spec.teacher_cache if cell.teacher_cache is None else cell.teacher_cache
            if use and cls.teacher_outputs == ("logits",) and cfg.model.teacher:
                # one cache per teacher, shared by every cell of the seed that has the same teacher
                m = cfg.model
                job_caches = []
                for name, path in teacher_names(cfg):
                    same = relocate_paths(str(Path(path).resolve()), home_of) if path else path  # however spelt
                    key = json.dumps([name, same, m.teacher_kwargs, m.pretrained, dataclasses.asdict(cfg.data),
                                      cfg.cache.topk, cfg.cache.value_dtype], sort_keys=True, default=str)
                    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
                    where = out / "caches" / f"{_slug(name)}-{digest}" / f"seed{seed}"
                    if where not in caches:
                        ccfg = copy.deepcopy(cfg)
                        ccfg.model.teacher, ccfg.model.teacher_weights, ccfg.cache.dir = name, path, str(where)
                        mine = own is not None and path is not None and Path(path).resolve() == own
                        caches[where] = Job(where.parent.name, seed, where, ccfg, needs_teacher_run=mine)
                    caches[where].cfg.train.epochs = max(caches[where].cfg.train.epochs, cfg.train.epochs)
                    job_caches.append(where)
                job.caches = tuple(job_caches)
                cfg.cache.dir = ",".join(map(str, job_caches))
            runs.append(job)
    for job in [*([teacher_job] if teacher_job else []), *caches.values(), *runs]:
        job.moved = moved
    _check_jobs(teacher_job, list(caches.values()), runs, spec.seeds[0])
    return teacher_job, list(caches.values()), runs


def _check_jobs(teacher: Job | None, caches: list[Job], runs: list[Job], seed: int) -> None:
    """Every cell checked as its run would check it (on its first seed: the others differ only in
    the seed), so that a cell that cannot run stops the grid before any run trains."""
    from vitdistill.engine.preflight import check_run

    memo: dict = {}
    unwritten = frozenset([teacher.out.resolve()] if teacher else []) | {c.out.resolve() for c in caches}
    for job, where in ([(teacher, "the compare teacher")] if teacher else []) + [
            (j, f"cell '{j.label}'") for j in runs if j.seed == seed]:
        try:
            check_run(job.cfg, job.mode, memo, unwritten)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``K/N`` (1 <= K <= N) of ``--shard``, or None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise UserError(f"--shard takes K/N with 1 <= K <= N, e.g. --shard 1/2; got '{text}'")
    return int(m[1]), int(m[2])


def take_shard(runs: list[Job], shard: tuple[int, int] | None) -> list[Job]:
    """Shard K of N takes runs K, K+N, K+2N... of the plan; a teacher cache is written by the shard
    that owns the first run replaying it, and the others wait for it."""
    if shard is None:
        return runs
    k, n = shard
    owner: dict[Path, int] = {}
    for i, job in enumerate(runs):
        for cache in job.caches:
            owner.setdefault(cache, i % n)
    mine = [job for i, job in enumerate(runs) if i % n == k - 1]
    for job in mine:
        job.waits_for = frozenset(c for c in job.caches if owner[c] != k - 1)
    return mine


def _wait_for(ready: Any, what: str) -> None:
    """Block until ``ready()`` holds on rank 0: another shard is writing ``what``."""
    if dist.on_main(ready):
        return
    print(f"waiting for {what}, which another shard writes (looking every {POLL_S:g} s)", flush=True)
    while not dist.on_main(ready):
        time.sleep(POLL_S)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


class Progress:
    """k/N lines with an ETA from finished runs' seconds per epoch (the cell's own rate when known)."""

    def __init__(self, runs: list[Job]) -> None:
        self.runs, self.started = runs, time.perf_counter()
        self.rate: dict[str, list[float]] = {}  # label -> [seconds, epochs]

    def record(self, label: str, seconds: float, epochs: int) -> None:
        if epochs > 0:
            old = self.rate.get(label, [0.0, 0])
            self.rate[label] = [old[0] + seconds, old[1] + epochs]

    def eta(self) -> str:
        total = [sum(v[0] for v in self.rate.values()), sum(v[1] for v in self.rate.values())]
        if not total[1]:
            return "eta ?"
        left = 0.0
        for job in self.runs:
            if not (job.out / "summary.json").exists():
                s, e = self.rate.get(job.label, total)
                left += (s / e) * max(0, job.cfg.train.epochs - _epochs_done(job.out))
        return f"eta {_clock(left)}"

    def line(self, k: int, text: str) -> None:
        if not dist.is_main():
            return
        elapsed = _clock(time.perf_counter() - self.started)
        print(f"[{k}/{len(self.runs)}] {text}  (elapsed {elapsed}, {self.eta()})", flush=True)


def _changed(job: Job) -> str:
    """The first difference between a finished run's saved config and the grid's ("" if none)."""
    from vitdistill.engine.run import _comparable, _first_difference, relocate_paths

    try:
        saved = yaml.safe_load((job.out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ""
    return _first_difference(_comparable(job.cfg.to_dict()), _comparable(relocate_paths(saved or {}, job.moved)))


_TEACHER_CHANGED = ("  note: the teacher '{out}' finished under another config ({diff}), and the runs that distilled "
                    "from it learnt from that one; delete it and those runs to rerun with this config")


def _warn_if_changed(job: Job, teacher: bool = False) -> None:
    diff = _changed(job)
    if diff:
        print(_TEACHER_CHANGED.format(out=job.out, diff=diff) if teacher else
              f"  note: '{job.out}' finished under another config ({diff}); delete it to rerun", flush=True)


def execute(teacher: Job | None, caches: list[Job], runs: list[Job], trains_teacher: bool = True) -> int:
    """Run what is missing; returns the number of runs left unfinished (stopped or waiting).

    ``trains_teacher`` False (shards 2..N): the teacher run is shard 1's; runs that need it wait."""
    from vitdistill.engine.run import run
    from vitdistill.engine.setup import cache_teacher
    from vitdistill.report.leaderboard import read_summary

    progress = Progress(runs)
    for job in runs:
        summary = read_summary(job.out) if dist.is_main() else None
        if summary is not None:
            progress.record(job.label, float(summary.get("wall_s") or 0), int(summary.get("epochs") or 0))
    teacher_ready = True
    if teacher is not None and not trains_teacher:
        teacher_ready = False  # waited for below, by the first run that needs it
    elif teacher is not None:
        status = dist.on_main(lambda: _status(teacher.out))
        if status == "done":
            print(f"teacher: skip {teacher.cfg.model.student} ({teacher.out}, finished)", flush=True)
            if dist.is_main():
                _warn_if_changed(teacher, teacher=True)
        else:
            print(f"teacher: train {teacher.cfg.model.student} for {teacher.cfg.train.epochs} epochs -> "
                  f"{teacher.out} ({status})", flush=True)
            summary = run(teacher.cfg, "train", resume=status == "resume", relocated=teacher.moved)
            teacher_ready = "stopped_after_epoch" not in summary
            took = _clock(time.perf_counter() - progress.started)
            print(f"teacher: done, top-1 {100 * summary['student_top1']:.2f} in {took}" if teacher_ready else
                  f"teacher: stopped after epoch {summary['stopped_after_epoch']} in {took}; rerun to continue",
                  flush=True)
    written: set[Path] = set()
    left = 0
    for k, job in enumerate(runs, 1):
        what = f"{job.label} seed {job.seed}"
        status = dist.on_main(lambda: _status(job.out))  # rank 0's view decides for every process
        if status == "done":
            progress.line(k, f"skip {what} (finished)")
            if dist.is_main():
                _warn_if_changed(job)
            continue
        if job.needs_teacher_run and not teacher_ready and not trains_teacher:
            assert teacher is not None
            _wait_for(lambda: _status(teacher.out) == "done", f"the teacher run {teacher.out} (shard 1 trains it)")
            teacher_ready = True
        if job.needs_teacher_run and not teacher_ready:
            progress.line(k, f"wait {what}: the teacher is unfinished; rerun to continue")
            left += 1
            continue
        for cache in (next(c for c in caches if c.out == path) for path in job.caches if path not in written):
            if cache.out in job.waits_for:
                _wait_for(lambda c=cache: _cache_done(c.out, c.cfg.train.epochs), f"the teacher cache {cache.out}")
            if dist.on_main(lambda c=cache: _cache_done(c.out, c.cfg.train.epochs)):
                print(f"cache: skip {cache.out} (complete)", flush=True)
            else:
                print(f"cache: write {cache.cfg.train.epochs} epochs of teacher outputs -> {cache.out}", flush=True)
                cache_teacher(cache.cfg, str(cache.out))
            written.add(cache.out)
        progress.line(k, f"start {what}: {job.mode} {job.cfg.model.student} ({status})")
        before, t0 = (_epochs_done(job.out) if dist.is_main() else 0), time.perf_counter()
        summary = run(job.cfg, job.mode, resume=status == "resume", relocated=job.moved)
        seconds = time.perf_counter() - t0
        if dist.is_main():
            progress.record(job.label, seconds, _epochs_done(job.out) - before)
        if "stopped_after_epoch" in summary:
            left += 1
            progress.line(k, f"stopped {what} after epoch {summary['stopped_after_epoch']} in {seconds:.1f} s")
        else:
            progress.line(k, f"done {what}: top-1 {100 * summary['student_top1']:.2f} in {seconds:.1f} s")
    return left


def _former_places(out: Path) -> list[str]:
    """Where the grid in ``out`` was run before, when the folder was copied or moved since: its
    runs name the grid's teacher by those paths, and the leaderboard maps them to ``out``."""
    from vitdistill.report.leaderboard import _grid

    try:
        grid = _grid(out)
    except UserError:  # damaged: the rerun writes it again, knowing only where it is now
        return []
    here = str(out.resolve())
    return list(dict.fromkeys(p for p in (grid[2] if grid else []) if p != here))


def print_plan(teacher: Job | None, caches: list[Job], runs: list[Job], spec: Spec, out: Path,
               shard: tuple[int, int] | None = None) -> None:
    n = len(spec.cells) * len(spec.seeds)
    part = f"; shard {shard[0]}/{shard[1]} takes {len(runs)} of them" if shard else ""
    print(f"compare: {len(spec.cells)} cells x {len(spec.seeds)} seed(s) = {n} runs in {out}{part}")
    if shard:  # the caches this shard writes; it waits for the others
        caches = [c for c in caches if any(c.out in j.caches and c.out not in j.waits_for for j in runs)]
    if teacher is not None and not (shard and shard[0] != 1):
        state = _status(teacher.out)
        print(f"teacher  train {teacher.cfg.model.student}, {teacher.cfg.train.epochs} epochs, seed {teacher.seed} "
              f"-> {teacher.out} [{state}]")
        if state == "done":
            _warn_if_changed(teacher, teacher=True)
    for c in caches:
        state = "complete" if _cache_done(c.out, c.cfg.train.epochs) else "to write"
        print(f"cache    {c.cfg.model.teacher}, {c.cfg.train.epochs} epochs, seed {c.seed} -> {c.out} [{state}]")
    for k, job in enumerate(runs, 1):
        m = job.cfg.method
        knobs = ", ".join(f"{a}={b}" for a, b in m.items() if a != "name")
        via = f" via cache {', '.join(c.parent.name for c in job.caches)}" if job.caches else ""
        teach = f" <- {job.cfg.model.teacher}{via}" if job.mode == "distill" else ""
        print(f"run {k}/{len(runs)}  {job.label} seed {job.seed}: {job.mode} {m['name']}"
              f"{' (' + knobs + ')' if knobs else ''} {job.cfg.model.student}{teach}, {job.cfg.train.epochs} epochs "
              f"-> {job.out} [{_status(job.out)}]")
        if _status(job.out) == "done":
            _warn_if_changed(job)


def compare_cli(args: Any) -> int:
    """``vitdistill compare``: plan, run what is missing, write the leaderboard."""
    from vitdistill.report.leaderboard import left_out, write_leaderboard

    raw: dict = {}
    sets: list[dict] = []
    section = None
    if args.config:
        raw = load_yaml(args.config)
        sets = [parse_override(s) for s in args.set or []]
        section = raw.pop("compare", None)
        for layer in sets:
            if "compare" in layer:
                extra = layer.pop("compare")
                section = _merge(section or {}, extra) if isinstance(extra, dict) else extra
    elif not (args.report_only and args.out):
        raise UserError("compare needs --config FILE, a run config with a 'compare:' section (docs/compare.md)")
    if args.out is not None and not str(args.out).strip():
        raise UserError("--out is empty; name the grid's folder, or leave --out out for runs/compare-<config>")
    out_key = [layer.pop("out", None) for layer in [raw, *sets]]
    for value in out_key:  # taken out before the config's own type check, so checked here
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UserError(f"'out' must name the grid's folder (a path), not {value!r}; fix it in the config or --set")
    given = args.out or next((o for o in reversed(out_key) if o), None)
    out = Path(given).expanduser() if given else Path(f"runs/compare-{Path(args.config).stem}")
    if args.report_only:
        if dist.env_world()[0] == 0:  # under torchrun only rank 0 writes
            rows = write_leaderboard(out)
            print(f"leaderboard of {len(rows)} rows in {out}/leaderboard.html (.md, .csv)")
            gone = left_out(out)
            if gone:
                print(f"left out, not in the grid of {out / 'compare.json'}: {', '.join(gone)}")
        return 0
    base = [raw, *sets] + ([{"train": {"progress": False}}] if args.no_progress else []) + \
        ([{"plugins": args.plugin}] if getattr(args, "plugin", None) else [])
    spec = parse_spec(section, build_config(base).model.student)
    shard = parse_shard(getattr(args, "shard", None))
    io.check_folder(out)
    io.refuse_foreign_folder(out, "--out", "grid", "the grid")
    teacher, caches, every_run = plan(spec, base, out)
    runs = take_shard(every_run, shard)
    if args.dry_run:
        print_plan(teacher, caches, runs, spec, out.resolve(), shard)
        return 0
    # under torchrun every run of the grid uses the one process group; rank 0 prints and writes
    with dist.session():
        if dist.is_main():
            io.make_folder(out)
            io.write_json(out / "compare.json", {"cells": [c.label for c in spec.cells], "seeds": spec.seeds,
                                                 "teacher": "teacher" if teacher else None,
                                                 "out": str(out.resolve()), "was": _former_places(out)})
        try:
            left = execute(teacher, caches, runs, trains_teacher=shard is None or shard[0] == 1)
        except KeyboardInterrupt:
            print("interrupted; finished epochs are saved, rerun the same command to continue", file=sys.stderr)
            return 130
        if not dist.is_main():
            return 0
        if not any((j.out / "summary.json").exists() for j in every_run):
            print(f"no run finished yet; rerun the same command to continue ({left} unfinished)")
            return 0
        write_leaderboard(out)
        print((out / "leaderboard.md").read_text())
        gone = left_out(out)
        if gone:
            print(f"left out of the leaderboard, not in this grid: {', '.join(gone)}")
        tail = f"; {left} runs unfinished, rerun the same command to continue" if left else ""
        others = sum(not (j.out / "summary.json").exists() for j in every_run) - left
        if shard is not None and others > 0:
            tail += f"; {others} runs of other shards unfinished, the last shard to end writes the whole board"
        print(f"leaderboard in {out}/leaderboard.html (.md, .csv, and the PNGs){tail}")
        return 0
