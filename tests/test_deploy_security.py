"""Who can do what to a deployment, end to end: real ``fedtrain server`` /
``fedtrain client`` processes on 127.0.0.1 with Flower's SuperLink and
SuperNodes and real TLS.

Both deployments start in the background as the session begins
(:func:`deployed.in_background`).

One deployment (module fixture) is started by the absolute path of the
``fedtrain`` script with ``PATH=/usr/bin:/bin``; its model is a plug-in.
Client 0 (allowed the plug-in) joins, client 1 without ``--allow-plugin``
refuses the run. While the coordinator waits for client 1, the test plays
the attacker on the clients' address (Control API over HTTP and gRPC,
``flwr supernode register``), lists the coordinator's listening sockets,
starts a second client with client 0's key, and submits a foreign Flower
app on the coordinator's loopback Control API, whose ClientApp must never
run. Then client 1 is stopped with SIGTERM, comes back with the plug-in
allowed, and the run completes.

A second, short test starts a coordinator whose certificate names only
``coordinator.example.org`` and ``10.0.0.5`` and dials it with a client that
trusts another CA, a plain-text client and a client dialling 127.0.0.1,
which the certificate lacks: the coordinator starts, waits, and logs each
refusal with its reason.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from fedtrain.certs import CertificateSet, add_client_key, create_certificates
from fedtrain.config import from_dict, to_dict
from fedtrain.config import load as load_config
from fedtrain.deploy.addresses import LOOPBACK, free_port
from fedtrain.deploy.app import APP_PYPROJECT, fab_refusal
from fedtrain.deploy.flower import FLEET_PREFIX, flower_env
from fedtrain.deploy.server import refusal_reason
from fedtrain.deploy.worker import plugin_refusal

from fedtrain.deploy.processes import alive

from deployed import (
    Started,
    background_result,
    descendants,
    fedtrain_script,
    in_background,
    listening,
    rows,
    wait_for,
)

ROUNDS = 3
BARE_PATH = "/usr/bin:/bin"

PLUGIN = """\
from fedtrain.models import mlp


def net(input_shape, num_classes):
    return mlp(input_shape, num_classes, 32)
"""

FOREIGN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreign-app"
version = "1.0.0"
description = "Not fedtrain's run"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "someone-else"

[tool.flwr.app.components]
serverapp = "foreign_app:server"
clientapp = "foreign_app:client"
"""

FOREIGN_APP = """\
import json
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def ran(message, context):
    Path({marker!r}).write_text("the foreign ClientApp ran on a client")
    return Message(RecordDict(), reply_to=message)


@server.main()
def main(grid, context):
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({{"q": ConfigRecord({{"x": 1}})}})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY, ttl=60) for n in nodes]
    replies = grid.send_and_receive(messages, timeout=60)
    answers = [r.error.reason if r.has_error() else "answered" for r in replies]
    Path({result!r}).write_text(json.dumps({{"nodes": len(nodes), "answers": answers}}))
"""


@dataclass(frozen=True)
class Deployment:
    port: int
    run_dir: Path
    server_rc: int
    server_log: str
    client0_log: str
    refuser_log: str
    refuser_alive_after_refusal: bool
    refuser_rc: int
    refuser_tmp_left: list[str]
    http_status: dict[str, int]
    grpc_errors: dict[str, str]
    register: subprocess.CompletedProcess[str]
    listeners: dict[tuple[str, int], int]
    duplicate_rc: int
    duplicate_log: str
    duplicate_seconds: float
    foreign: dict[str, object]
    foreign_marker: bool
    leftovers: list[int]


def _attacker_register(root: Path, address: str, ca: Path, key: Path) -> subprocess.CompletedProcess[str]:
    """``flwr supernode register KEY`` against the clients' address, as anyone holding ``ca.pem`` could."""
    home = root / "attacker"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{address}"\n'
        f"root-certificates = {json.dumps(str(ca))}\n"
    )
    flwr = Path(sys.executable).with_name("flwr")
    return subprocess.run([str(flwr), "supernode", "register", str(key), "x", "--format", "json"],
                          env=flower_env(home), capture_output=True, text=True, timeout=120)


def _probe_http(address: str, ca: Path) -> dict[str, int]:
    """The status of an unauthenticated request to each non-Fleet API path on ``address``."""
    status = {}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10) as http:
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run",
                     "/v1/control/register-node", "/v1/runtime/get-nodes", "/health", "/docs"):
            response = http.post(f"https://{address}{path}", content=b"",
                                 headers={"content-type": "application/protobuf"})
            status[path] = response.status_code
    return status


def _probe_grpc(address: str, ca: Path) -> dict[str, str]:
    """The error of each unauthenticated gRPC Control call on ``address`` ('' where one answered)."""
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    errors = {}
    with grpc.secure_channel(address, credentials) as channel:
        for method in ("ListRuns", "StartRun", "StopRun"):
            try:
                channel.unary_unary(f"/flwr.proto.Control/{method}")(b"", timeout=10)
                errors[method] = ""
            except grpc.RpcError as exc:
                errors[method] = f"{exc.code()}: {exc.details()}"
    return errors


@in_background("test_deploy_security", 75)
def deploy(root: Path) -> Deployment:
    """The module's deployment (see the module's docstring), started in the
    background as the session begins."""
    certs = create_certificates(root / "certs", ["127.0.0.1", "localhost"], 2)
    (root / "stranger").mkdir()
    stranger = add_client_key(CertificateSet(root / "stranger"), "client-9")
    (root / "plugin_model.py").write_text(PLUGIN)
    plugin = f"{root / 'plugin_model.py'}:net"
    port = free_port()
    address = f"127.0.0.1:{port}"
    run_dir = root / "run"
    fedtrain = str(fedtrain_script())
    bare = {"PATH": BARE_PATH}
    refuser_tmp = root / "refuser-tmp"
    refuser_tmp.mkdir()

    def client(name: str, key: str, partition: int, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return started.start(name, [
            fedtrain, "client", "--server", address, "--certs", str(certs.root), "--key", str(certs.root / key),
            "--partition", str(partition), *extra,
        ], env={**bare, **(env or {})})

    with Started(root) as started:
        server = started.start("server", [
            fedtrain, "server", "--certs", str(certs.root), "--address", address, "--out", str(run_dir),
            "--quiet", "--wait", "240", "--set", f"run.rounds={ROUNDS}", "--set", "data.num_clients=2",
            "--set", "strategy.clients_per_round=2", "--set", "strategy.min_clients=2",
            "--set", "client.timeout=60", "--set", f"model.name={plugin}",
        ], env=bare)
        client("client-0", "client-1", 0, "--allow-plugin", plugin)
        refuser = client("refuser", "client-2", 1, env={"TMPDIR": str(refuser_tmp)})
        wait_for(lambda: "client 0 joined" in started.log("server") or server.poll() is not None, 180,
                 "client 0 to join")
        wait_for(lambda: "--allow-plugin" in started.log("server") or server.poll() is not None, 120,
                 "the coordinator to record client 1's refusal")
        refuser_alive = refuser.poll() is None

        http_status = _probe_http(address, certs.ca)
        grpc_errors = _probe_grpc(address, certs.ca)
        register = _attacker_register(root, address, certs.ca, stranger.with_name("client-9.pub"))
        listeners = listening([p for p in descendants(server.pid) if p != os.getpid()])

        began = time.monotonic()
        duplicate = client("duplicate", "client-1", 0, "--allow-plugin", plugin, "--connect-timeout", "60")
        duplicate.wait(120)
        duplicate_seconds = time.monotonic() - began

        foreign_dir = root / "foreign"
        foreign_dir.mkdir()
        marker, result = root / "foreign-ran", root / "foreign-result.json"
        (foreign_dir / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
        (foreign_dir / "foreign_app.py").write_text(FOREIGN_APP.format(marker=str(marker), result=str(result)))
        submitted = subprocess.run(
            [str(Path(sys.executable).with_name("flwr")), "run", str(foreign_dir), "fedtrain", "--format", "json"],
            env=flower_env(run_dir / "flower" / "home"), capture_output=True, text=True, timeout=120,
        )
        assert json.loads(submitted.stdout).get("success"), submitted.stdout + submitted.stderr
        wait_for(result.exists, 150, "the foreign app's ServerApp to hear back from the clients")
        foreign = json.loads(result.read_text())

        os.killpg(refuser.pid, signal.SIGTERM)
        refuser.wait(60)
        client("client-1", "client-2", 1, "--allow-plugin", plugin)
        server.wait(400)
        server_rc = server.returncode
    time.sleep(1.0)
    return Deployment(
        port=port,
        run_dir=run_dir,
        server_rc=server_rc,
        server_log=started.log("server"),
        client0_log=started.log("client-0"),
        refuser_log=started.log("refuser"),
        refuser_alive_after_refusal=refuser_alive,
        refuser_rc=refuser.returncode,
        refuser_tmp_left=sorted(p.name for p in refuser_tmp.iterdir()),
        http_status=http_status,
        grpc_errors=grpc_errors,
        register=register,
        listeners=listeners,
        duplicate_rc=duplicate.returncode,
        duplicate_log=started.log("duplicate"),
        duplicate_seconds=duplicate_seconds,
        foreign=foreign,
        foreign_marker=marker.exists(),
        leftovers=[p for p in descendants(server.pid) if alive(p)],
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return background_result("test_deploy_security", tmp_path_factory.mktemp)


def test_run_started_by_absolute_path_without_path_completes(deployment: Deployment) -> None:
    assert deployment.server_rc == 0, deployment.server_log
    metrics = rows(deployment.run_dir)
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1))
    assert all(r["num_clients"] == 2 and r["num_failed"] == 0 for r in metrics), metrics
    assert deployment.leftovers == []


def test_control_and_runtime_apis_are_not_on_the_clients_address(deployment: Deployment) -> None:
    assert all(code == 404 for code in deployment.http_status.values()), deployment.http_status
    assert all(deployment.grpc_errors.values()), deployment.grpc_errors


def test_registering_a_key_on_the_clients_address_is_refused(deployment: Deployment) -> None:
    register = deployment.register
    answer = json.loads(register.stdout) if register.stdout.strip().startswith("{") else {}
    assert not answer.get("success", False), register.stdout + register.stderr


def test_only_the_clients_address_listens_off_loopback(deployment: Deployment) -> None:
    public = (LOOPBACK, deployment.port)
    assert public in deployment.listeners, deployment.listeners
    others = [addr for addr in deployment.listeners if addr != public]
    assert others, "the Control API should listen on a loopback port of its own"
    assert all(ip == LOOPBACK for ip, _ in others), deployment.listeners


def test_second_client_with_one_key_is_refused_at_once_on_both_sides(deployment: Deployment) -> None:
    assert deployment.duplicate_rc != 0
    assert "another client with this key" in deployment.duplicate_log, deployment.duplicate_log
    assert deployment.duplicate_seconds < 50, deployment.duplicate_seconds
    assert "a second client with client-1.pub" in deployment.server_log, deployment.server_log


def test_clients_refuse_a_foreign_flower_app(deployment: Deployment) -> None:
    assert not deployment.foreign_marker, "the foreign ClientApp ran on a client"
    answers = deployment.foreign["answers"]
    assert answers and all("fedtrain client refused this app" in str(a) for a in answers), deployment.foreign
    assert "refused a Flower app that is not fedtrain's run" in deployment.client0_log


def test_client_refuses_an_unallowed_plugin_and_the_coordinator_records_why(deployment: Deployment) -> None:
    assert "is a plug-in; this client imports only built-in ones" in deployment.refuser_log
    assert deployment.refuser_alive_after_refusal
    assert "--allow-plugin" in deployment.server_log and "left out" in deployment.server_log


def test_sigterm_stops_a_client_cleanly(deployment: Deployment) -> None:
    assert deployment.refuser_rc in (0, 143, -signal.SIGTERM), deployment.refuser_log
    assert "Traceback" not in deployment.refuser_log, deployment.refuser_log
    assert deployment.refuser_tmp_left == []


@dataclass(frozen=True)
class Refusals:
    alive_while_waiting: bool
    alive_after_refusals: bool
    client_rcs: list[int | None]
    log: str
    wrong_name_log: str


CERTIFICATE_TEST = "test_deploy_security::test_coordinator_starts_with_a_certificate_for_other_names_and_logs_each_refusal"


@in_background(CERTIFICATE_TEST, 25)
def deploy_other_names(root: Path) -> Refusals:
    """A coordinator whose certificate names only other hosts, dialled by
    three clients it must refuse (see the module's docstring)."""
    certs = create_certificates(root / "certs", ["coordinator.example.org", "10.0.0.5"], 1)
    other = create_certificates(root / "other", ["127.0.0.1"], 0)
    address = f"127.0.0.1:{free_port()}"
    with Started(root) as started:
        server = started.start("server", [
            sys.executable, "-m", "fedtrain.cli", "server", "--certs", str(certs.root), "--address", address,
            "--out", str(root / "run"), "--quiet", "--wait", "120",
        ])
        wait_for(lambda: "waiting for" in started.log("server") or server.poll() is not None, 120,
                 "the coordinator to wait for clients")
        alive_while_waiting = server.poll() is None
        base = [sys.executable, "-m", "fedtrain.cli", "client", "--server", address, "--partition", "0",
                "--connect-timeout", "3"]
        clients = []
        if alive_while_waiting:
            clients = [
                started.start("wrong-name", [*base, "--certs", str(certs.root), "--key", str(certs.root / "client-1")]),
                started.start("other-ca", [*base, "--certs", str(other.root), "--key", str(certs.root / "client-1")]),
                started.start("plain", [*base, "--insecure"]),
            ]
            for proc in clients:
                proc.wait(120)
            wait_for(lambda: started.log("server").count("refused") >= 3, 30, "the coordinator to log the refusals")
        log = started.log("server")
        alive_after = server.poll() is None
    return Refusals(alive_while_waiting, alive_after, [proc.returncode for proc in clients], log,
                    started.log("wrong-name") if clients else "")


def test_coordinator_starts_with_a_certificate_for_other_names_and_logs_each_refusal(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    refusals = background_result(CERTIFICATE_TEST, tmp_path_factory.mktemp)
    log = refusals.log

    assert refusals.alive_while_waiting, log
    assert refusals.alive_after_refusals, log
    assert len(refusals.client_rcs) == 3 and all(rc not in (0, None) for rc in refusals.client_rcs)
    assert "host name the certificate does not carry" in log, log
    assert "its ca.pem is not the CA that signed" in log, log
    assert "spoke plain text to this TLS address" in log, log
    assert "does not carry the name 127.0.0.1" in refusals.wrong_name_log


# ----------------------------------------------------- without processes


class _Grid:
    """The one question the backend asks Flower's grid when admitting a client."""

    def __init__(self, live: set[int]) -> None:
        self.live = live

    def get_node_ids(self) -> set[int]:
        return set(self.live)


def _hello_reply(name: str):  # type: ignore[no-untyped-def]
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    result = ConfigRecord({"status": "ok", "name": name, "num_records": 10, "device": "cpu", "fingerprint": "0" * 64})
    return Message(RecordDict({"result": result}), dst_node_id=1, message_type=MessageType.QUERY)


@pytest.mark.usefixtures("task_identity")
def test_a_client_id_stays_with_the_key_that_claimed_it() -> None:
    from fedtrain.transport.flower import FlowerTransport
    from fedtrain.transport.relay import Hello

    grid = _Grid({1, 2})
    keyed = FlowerTransport(grid, Hello({}, (4,), 2), 10.0, 0.1)  # type: ignore[arg-type]
    keyed.ids_follow_keys = True
    assert keyed.admit(1, _hello_reply("0")) is None
    grid.live = {2}
    assert "another key" in str(keyed.admit(2, _hello_reply("0")))
    grid.live = {1, 2}
    assert keyed.admit(1, _hello_reply("0")) is None

    keyless = FlowerTransport(grid, Hello({}, (4,), 2), 10.0, 0.1)  # type: ignore[arg-type]
    assert keyless.admit(1, _hello_reply("0")) is None
    grid.live = {2}
    assert keyless.admit(2, _hello_reply("0")) is None


def _fab(files: dict[str, str]) -> bytes:
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({name: text.encode() for name, text in files.items()})[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fedtrains_own_app_bundle_is_accepted() -> None:
    pyproject = APP_PYPROJECT.format(version="0.1.0", run_dir=json.dumps("/tmp/run"))
    assert fab_refusal(_fab({"pyproject.toml": pyproject})) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("change, expected", [
    (lambda files: {**files, "fedtrain/transport/flower_client_app.py": "print('shadow')"},
     "holds fedtrain/transport/flower_client_app.py"),
    (lambda files: {**files, "fedtrain/deploy/server.py": "print('shadow')"}, "holds fedtrain/deploy/server.py"),
    (lambda files: {"pyproject.toml": files["pyproject.toml"].replace(
        "fedtrain.transport.flower_client_app:client_app", "mine:client_app"), "mine.py": ""}, "holds mine.py"),
    (lambda files: {"pyproject.toml": files["pyproject.toml"].replace(
        "fedtrain.transport.flower_client_app:client_app", "os:system")}, "components"),
    (lambda files: {"pyproject.toml": files["pyproject.toml"].replace(
        "fedtrain.deploy.server:server_app", "fedtrain.transport.flower:server_app")}, "components"),
    (lambda files: {"pyproject.toml": files["pyproject.toml"].replace(
        "dependencies = []", 'dependencies = ["evil"]')}, "asks to install"),
])
def test_any_other_app_bundle_is_refused(change, expected: str) -> None:  # type: ignore[no-untyped-def]
    files = {"pyproject.toml": APP_PYPROJECT.format(version="0.1.0", run_dir=json.dumps("/tmp/run"))}
    reason = fab_refusal(_fab(change(files)))
    assert reason is not None and expected in reason, reason
    assert fab_refusal(b"not a zip") is not None


def test_plugin_names_need_the_clients_permission() -> None:
    config = from_dict({**to_dict(load_config()), "model": {"name": "evil.models:net", "hidden": 8}})
    assert "model.name = 'evil.models:net' is a plug-in" in str(plugin_refusal(config, False, ()))
    assert plugin_refusal(config, False, ("evil.models:net",)) is None
    data = from_dict({**to_dict(load_config()), "data": {**to_dict(load_config())["data"], "dataset": "x.py:load"}})
    assert "data.dataset" in str(plugin_refusal(data, False, ()))
    assert plugin_refusal(data, True, ()) is None


def test_superlink_log_lines_become_refusal_reasons(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path / "certs", ["127.0.0.1"], 1)
    names = certs.client_key_pems()
    pem = next(iter(names)).replace("\n", "\\n")
    in_use = (f"ERROR : [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public key: "
              f"b'{pem}\\n', exception: SuperNode with node ID 42 could not be activated.")
    unknown = in_use.replace("SuperNode with node ID 42 could not be activated", "No SuperNode found with the "
                             "given public key.")
    assert "a second client with client-1.pub" in str(refusal_reason(in_use, names))
    assert "key is not registered" in str(refusal_reason(unknown, names))
    assert refusal_reason("INFO : [Fleet.ActivateNode] Activated node_id=42", names) is None
    assert FLEET_PREFIX == "/v1/fleet/"


def test_the_run_end_line_matches_what_the_tested_flower_logs() -> None:
    import inspect

    from flwr.superlink.servicer.runtime import runtime_handlers

    from fedtrain.deploy.flower import TASK_FINISHED

    assert '"Finished task %d of run %d"' in inspect.getsource(runtime_handlers)
    found = TASK_FINISHED.search("INFO :      Finished task %d of run %d" % (3, 1668192528871366730))
    assert found is not None and found["run"] == "1668192528871366730"
    assert TASK_FINISHED.search("Finished task 3 of run ") is None
