"""The one Flower app a fedtrain deployment runs, and the check that makes
a fedtrain client refuse any other.

``fedtrain server`` writes the app's ``pyproject.toml`` (:data:`APP_PYPROJECT`)
and submits it (:mod:`fedtrain.deploy.control`); the bundle (FAB) Flower builds from it
holds no code, only the names of the components, which are the fedtrain
installed on each machine: the ``ServerApp`` of :mod:`fedtrain.deploy.server`
and the light ``ClientApp`` relay of :mod:`fedtrain.transport.flower_client_app`.

Whoever reaches the coordinator's Control API can submit an app, and every
client's SuperNode would run its code. So a client judges each bundle before
Flower installs it (:func:`fab_refusal`, enforced by
:func:`fedtrain.deploy.flower.guard_apps`): a bundle with any file of its own
(which ``flwr-clientapp`` would import ahead of the installed packages, e.g.
one shadowing ``fedtrain/transport/flower_client_app.py``), other components
or dependencies to install is refused. What a run may ask of a client is then
decided by the client's fedtrain, whoever submitted the run.
"""

from __future__ import annotations

import io
import zipfile

from fedtrain.deploy.flower import FAB_FILES

APP_COMPONENTS = {
    "serverapp": "fedtrain.deploy.server:server_app",
    "clientapp": "fedtrain.transport.flower_client_app:client_app",
}
"""The components of the one Flower app a fedtrain client runs (:data:`APP_PYPROJECT`)."""

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedtrain-run"
version = "{version}"
description = "One fedtrain run, written by fedtrain server"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtrain"

[tool.flwr.app.components]
serverapp = "fedtrain.deploy.server:server_app"
clientapp = "fedtrain.transport.flower_client_app:client_app"

[tool.flwr.app.config]
run-dir = {run_dir}
"""
"""The app's ``pyproject.toml``; ``version`` is fedtrain's, ``run_dir`` the
run folder as a TOML string (where the ServerApp finds its request)."""


def fab_refusal(content: bytes) -> str | None:
    """Why a fedtrain client refuses the Flower app bundle (FAB) ``content``,
    or None when it is fedtrain's own run: a bundle of :data:`FAB_FILES`
    only (no code of its own, which ``flwr-clientapp`` would import ahead of
    the installed packages), whose components are :data:`APP_COMPONENTS`
    (the code is the fedtrain installed on the client) and which asks to
    install nothing."""
    import tomllib

    try:
        bundle = zipfile.ZipFile(io.BytesIO(content))
        names = set(bundle.namelist())
        extra = sorted(names - FAB_FILES)
        if extra or "pyproject.toml" not in names:
            shown = ", ".join(extra[:5]) + (" …" if len(extra) > 5 else "")
            return f"the app bundle holds {shown or 'no pyproject.toml'}; fedtrain's run holds {sorted(FAB_FILES)} only"
        project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, OSError) as exc:
        return f"the app bundle does not read as a Flower app ({type(exc).__name__}: {exc})"
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components")
    if components != APP_COMPONENTS:
        return f"the app's components are {components!r}; fedtrain's run has {APP_COMPONENTS!r}"
    dependencies = project.get("project", {}).get("dependencies", [])
    if dependencies:
        return f"the app asks to install {dependencies!r}; fedtrain's run installs nothing"
    return None
