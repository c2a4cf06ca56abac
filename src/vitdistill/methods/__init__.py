"""Distillation methods. Importing this package registers every method in ``METHODS``."""
from vitdistill.methods import deit, logit_kd, none  # noqa: F401  (registration side effect)
from vitdistill.methods.base import METHODS, Method, build_method, method_knobs, soft_kl

__all__ = ["METHODS", "Method", "build_method", "method_knobs", "soft_kl"]
