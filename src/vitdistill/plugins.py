"""Plugins: your own methods (and timm models) beside the built-in ones, with no fork.

A plugin is a Python module that registers things when it is imported: a method with
``@METHODS.register("name")`` on a :class:`vitdistill.methods.Method` subclass, a model with
timm's ``@register_model``. vitdistill imports

- every module named in the config's ``plugins:`` list (or by ``--plugin``), either a module on
  the Python path (``mylab.kd``) or a ``.py`` file (``kd/my_method.py``), kept in the saved
  ``config.yaml`` as an absolute path so that ``--resume``, ``eval`` and ``compare`` find it again;
- every entry point of the group ``vitdistill.plugins`` of an installed package, e.g. in its
  pyproject: ``[project.entry-points."vitdistill.plugins"] mykd = "mylab.kd"``.

Importing a module runs its code, as ``python -m`` would: name only modules you trust. A config
names files and modules; it carries no code itself.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from vitdistill.errors import UserError

GROUP = "vitdistill.plugins"
_loaded: dict[str, ModuleType] = {}  # plugin spec (module name or absolute file path) -> module
_entry_points_done = False


def is_file(spec: str) -> bool:
    """A plugin named by a file path rather than a module name."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def normalise(specs: list[str]) -> list[str]:
    """The plugin list as saved: files as absolute paths, each named once, in the order given."""
    out = [str(Path(s).expanduser().resolve()) if is_file(s) else s.strip() for s in specs]
    return list(dict.fromkeys(out))


def load_plugins(specs: list[str]) -> list[ModuleType]:
    """Import the installed entry points (once) and each plugin of ``specs`` (once each)."""
    load_entry_points()
    return [_load(spec) for spec in specs]


def load_entry_points() -> None:
    global _entry_points_done
    if _entry_points_done:
        return
    _entry_points_done = True
    for ep in entry_points(group=GROUP):
        where = f"the entry point '{ep.name} = {ep.value}' of group {GROUP}"
        if ep.value in _loaded:
            continue
        _loaded[ep.value] = _guard(where, ep.load, f"fix or uninstall the package that provides {ep.name}")


def _load(spec: str) -> ModuleType:
    if spec in _loaded:
        return _loaded[spec]
    if not spec:
        raise UserError("a plugin name is empty; give a module name (mylab.kd) or a .py file")
    folder = ("the .py file in it that registers your method, or put the folder above it on PYTHONPATH and give "
              "the module name (mylab.kd)")
    if is_file(spec) and Path(spec).expanduser().is_dir():  # a folder is no file to import
        raise UserError(f"plugin '{spec}' is a folder; name {folder}")
    if is_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"plugin file '{spec}' does not exist; check the path in plugins: or --plugin")
        # a name of its own per file, so two plugins both called method.py do not collide
        name = f"vitdistill_plugin_{path.stem}_{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
        module = _guard(f"plugin '{spec}'", lambda: _import_file(name, path), "fix the file")
    else:
        # a package folder here may still import (its parent on PYTHONPATH): import first, explain on failure
        fix = (f"'{spec}' is a folder here: name {folder}" if Path(spec).is_dir()
               else "install it, or put its folder on PYTHONPATH, or name its .py file")
        module = _guard(f"plugin '{spec}'", lambda: importlib.import_module(spec), fix)
    _loaded[spec] = module
    return module


def _import_file(name: str, path: Path) -> ModuleType:
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling-free helpers look themselves up here
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _guard(where: str, load, fix: str) -> ModuleType:
    """Run ``load`` with every failure of the plugin's own code as one line that names it."""
    try:
        return load()
    except UserError:
        raise
    except ModuleNotFoundError as exc:
        raise UserError(f"{where} cannot be imported ({exc}); {fix}") from None
    except SystemExit as exc:  # a plugin that exits on import would end the command with no word
        raise UserError(f"{where} called sys.exit({exc.code!r}) on import; a plugin must not exit; {fix}") from None
    except Exception as exc:  # the plugin's code: its own error, in one line
        first = (str(exc).splitlines() or [""])[0]
        raise UserError(f"{where} failed on import: {type(exc).__name__}: {first}; {fix}") from None
