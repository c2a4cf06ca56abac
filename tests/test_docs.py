"""The method pages' example commands stay true to the CLI: each parses, names a registered method
with knobs it has and models that exist, and reads a teacher folder that docs/methods/README.md
(or the page itself) says how to train."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vitdistill.cli import _COMMON, _DISTILL, build_parser, resolve_config
from vitdistill.methods import build_method
from vitdistill.models import create_model

METHODS_DIR = Path(__file__).resolve().parents[1] / "docs" / "methods"
PAGES = sorted(p for p in METHODS_DIR.glob("*.md") if p.name != "README.md")


def commands(text: str, verb: str) -> list[str]:
    """The ``vitdistill VERB`` commands of a page: inline code (which may wrap lines) and code
    blocks (indented or fenced, with backslash continuations), with an example's ``...`` dropped."""
    found = [m.group(1) for m in re.finditer(rf"`(vitdistill {verb}\b[^`]*)`", text)]
    joined = re.sub(r"\\\n", " ", text)
    found += [m.group(1) for m in re.finditer(rf"^\s*(vitdistill {verb}\b.*)$", joined, re.M) if "`" not in m.group(1)]
    return [" ".join(c.replace("...", " ").split()) for c in found]


def _flag(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_every_page_has_an_example_and_the_index_lists_it() -> None:
    index = (METHODS_DIR / "README.md").read_text()
    for page in PAGES:
        assert f"]({page.name})" in index, f"docs/methods/README.md does not list {page.name}"
        if page.stem not in ("none", "deit"):  # the README's own commands are those pages' examples
            assert commands(page.read_text(), "distill"), f"{page.name} has no `vitdistill distill` example"


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_method_page_examples_run_as_written(page: Path) -> None:
    text = page.read_text()
    trained = set(_flag(sum((shlex.split(c) for c in commands((METHODS_DIR / "README.md").read_text(), "train")), []),
                        "--out"))
    assert {"runs/teacher", "runs/vit-teacher", "runs/inv"} <= trained
    # a page may train its own teacher first (deepinversion.md does)
    trained |= set(_flag(sum((shlex.split(c) for c in commands(text, "train")), []), "--out"))
    for line in commands(text, "distill"):
        argv = shlex.split(line)[1:]
        args = build_parser().parse_args(argv)
        cfg = resolve_config(args, {**_COMMON, **_DISTILL})
        build_method(cfg.method)  # an unknown method or knob raises here
        for name in [cfg.model.student, *str(cfg.model.teacher or "").split(",")]:
            if name:
                create_model(name, num_classes=10)
        for folder in ",".join(_flag(argv, "--teacher-weights")).split(","):
            if folder:
                assert folder in trained, f"{page.name}: `{line}` reads {folder}, which no documented command trains"
