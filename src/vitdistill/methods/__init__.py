"""Distillation methods. Importing this package registers every method in ``METHODS``.

A method is one module of this package: importing each module here is what registers it, so a new
method needs no edit anywhere else.
"""
import importlib
import pkgutil

from vitdistill.methods.base import METHODS, Method, build_method, method_knobs, soft_kl

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Method", "build_method", "method_knobs", "soft_kl"]
