"""Models: timm by name, tiny registered configs, the frozen teacher and the student adapter.

The names below load on first use (PEP 562), so that importing ``vitdistill.models.taps`` (what
every method needs) does not import timm: ``vitdistill methods`` then lists the methods without
the seconds that timm's import costs on a small CPU.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "TINY_MODELS": "factory", "create_model": "factory", "load_weights": "factory", "model_spec": "factory",
    "read_state_dict": "factory",
    "InputPrep": "wrappers", "Teacher": "wrappers", "has_dist_token": "wrappers", "prepare_student": "wrappers",
    "student_outputs": "wrappers",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
