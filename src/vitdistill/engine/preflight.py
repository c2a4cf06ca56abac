"""A run's config checked without training: what :func:`vitdistill.engine.run.run` would refuse.

``vitdistill compare`` checks every cell of a grid this way before its first run starts (and in
``--dry-run``), so a cell that cannot run is a one-line error at once, not after the cells before
it have trained. The check builds what the run builds (data, method, student, teachers, the
method's projectors) on the CPU and stops before the optimizer; it writes nothing but the data's
decode cache, which the run would write anyway.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vitdistill import teacher_cache as tc
from vitdistill.config import Config
from vitdistill.data import Dataset
from vitdistill.engine import speed
from vitdistill.engine.ema import check_ema
from vitdistill.engine.runtime import pick_device
from vitdistill.engine.setup import (TeacherSide, augment_for, build_teachers, check_cache_dirs, check_teacher_count,
                                     load_run_data, method_and_student, setup_method, split_dirs)
from vitdistill.engine.trainer import check_accum


def check_run(cfg: Config, mode: str, data_memo: dict[str, Dataset] | None = None,
              unwritten: frozenset[Path] = frozenset()) -> None:
    """Raise the :class:`UserError` the run of ``cfg`` would raise before its first epoch.

    ``data_memo`` shares decoded data between calls with the same ``data`` section.
    ``unwritten``: resolved teacher weights paths and cache folders that are written before the run
    starts (a grid's own teacher and caches); such a teacher is checked with random weights and such
    a cache is not read."""
    memo = {} if data_memo is None else data_memo
    key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True, default=str)
    if key not in memo:
        memo[key] = load_run_data(cfg)
    data = memo[key]
    pick_device(cfg.train.device)
    speed.check_compile(cfg.train)
    check_ema(cfg.train)
    check_accum(cfg.train)
    augment_for(cfg, data)
    method, student, _ = method_and_student(cfg, mode, data)
    m = cfg.model
    side = None
    if method.needs_teacher:
        teachers = []
        if m.teacher or not cfg.cache.dir:
            teachers, _ = build_teachers(cfg, data, f"method '{method.name}'", unwritten)
            check_teacher_count(method, len(teachers))
        names: list[str] = []
        if cfg.cache.dir:
            dirs = split_dirs(cfg.cache.dir)
            check_cache_dirs(method, len(teachers), dirs)
            names = [d.name if d.resolve() in unwritten else tc.read_header(d)["teacher"] for d in map(Path, dirs)]
        side = TeacherSide(None, None, teachers[0] if teachers else None, None,  # type: ignore[arg-type]
                           teachers, [], [] if teachers else names)
    setup_method(method, student, m.student, side, data)
