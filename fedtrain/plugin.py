"""Loading user code by name: ``package.module:attr`` or ``path/to/file.py:attr``.

Strategies, models and datasets are all plugged in this way, so a user's class
or function is named in the config file and needs no registration.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from fedtrain.errors import UserError


class PluginError(UserError, ValueError):
    """A plug-in name (strategy, model, dataset) or its options cannot be used."""


def load_object(spec: str, what: str, key: str) -> Any:
    """The object named by ``module.path:attr`` or ``path/to/file.py:attr``.

    ``what`` and ``key`` name the thing and its config key in error messages.
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
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise PluginError(
            f"{key} = {spec!r}: module {module_name!r} has no {what} {attr!r}; "
            f"it defines {public}"
        ) from exc
