"""Loading user code by name: ``package.module:attr`` or ``path/to/file.py:attr``.

Strategies, models and datasets are all plugged in this way, so a user's class
or function is named in the config file and needs no registration.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from fedtrain.errors import UserError


class PluginError(UserError, ValueError):
    """A plug-in name (strategy, model, dataset) or its options cannot be used."""


def _raised(exc: BaseException, path: str | None) -> str:
    """``ZeroDivisionError: division by zero (line 3)``: an exception raised
    by a plug-in's own code, with the line of ``path`` (the plug-in's file)
    it came from, when there is one."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if path is None or f.filename == path]
    where = f" (line {lines[-1]})" if lines and lines[-1] is not None else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _defined_here(module: ModuleType, kind: type | None) -> list[str]:
    """The public names that ``module`` itself defines (not those it
    imports, e.g. ``torch``): the subclasses of ``kind`` when given."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if kind is not None and not (inspect.isclass(value) and issubclass(value, kind) and value is not kind):
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            names.append(name)
    return sorted(names)


def _check_call(obj: Any, spec: str, what: str, key: str, call_with: Sequence[str]) -> None:
    """Refuse ``obj`` when it cannot be called with the positional arguments
    ``call_with`` (their names, for the message)."""
    if not callable(obj):
        raise PluginError(f"{key} = {spec!r}: {obj!r} is not a {what}; expected one called as "
                          f"({', '.join(call_with)})")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    try:
        signature.bind(*call_with)
    except TypeError as exc:
        name = getattr(obj, "__name__", spec)
        raise PluginError(
            f"{key} = {spec!r}: {name}{signature} cannot be called as {name}({', '.join(call_with)}) ({exc})"
        ) from None


def load_object(
    spec: str, what: str, key: str, kind: type | None = None, call_with: Sequence[str] | None = None
) -> Any:
    """The object named by ``module.path:attr`` or ``path/to/file.py:attr``.

    ``what`` and ``key`` name the thing and its config key in error messages;
    a misspelled name lists what the module itself defines (the subclasses of
    ``kind``, when given). ``call_with`` names the positional arguments the
    object will be called with: an object that cannot take them is refused
    here, naming ``key``, instead of failing inside the run. A module that
    raises while it is imported is reported as one line naming ``key``.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise PluginError(
            f"{key} = {spec!r}: expected 'package.module:Name' or 'path/to/file.py:Name'"
        )
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"{key} = {spec!r}: file {path} does not exist")
        unique = f"_fedtrain_user_{abs(hash(str(path))):x}_{path.stem}"
        module = sys.modules.get(unique)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(unique, path)
            if file_spec is None or file_spec.loader is None:
                raise PluginError(f"{key} = {spec!r}: cannot load {path} as Python")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[unique] = module
            try:
                file_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[unique]
                raise PluginError(f"{key} = {spec!r}: importing {path} raised {_raised(exc, str(path))}") from exc
            except BaseException:
                del sys.modules[unique]
                raise
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(
                f"{key} = {spec!r}: cannot import module {module_name!r} ({exc})"
            ) from exc
        except Exception as exc:
            raise PluginError(f"{key} = {spec!r}: importing module {module_name!r} raised {_raised(exc, None)}") from exc
    try:
        found = getattr(module, attr)
    except AttributeError as exc:
        defined = _defined_here(module, kind)
        kinds = f"{kind.__name__} subclasses" if kind is not None else "names"
        raise PluginError(
            f"{key} = {spec!r}: module {module_name!r} has no {what} {attr!r}; "
            f"the {kinds} it defines: {', '.join(defined) if defined else 'none'}"
        ) from exc
    if call_with is not None:
        _check_call(found, spec, what, key, call_with)
    return found
