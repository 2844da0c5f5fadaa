"""What crosses the wire in a real deployment (issue 17): three registered
clients over TLS with real ``fedtrain server`` / ``fedtrain client``
processes. The coordinator's transport counts the payload bytes of every
message it pushes through Flower's grid and every reply it pulls
(:func:`fedtrain.transport.flower.record_bytes`, logged per round); they
must match 4 × numel × updates per round within 5 % in each direction (and
``metrics.jsonl``'s ``bytes_up`` / ``bytes_down`` where the engine records
them), and the SuperLink process must have read at least the uplink's bytes
from its sockets (``/proc/PID/io``)."""

from __future__ import annotations

import re
from pathlib import Path

from fedtrain.certs import create_certificates
from fedtrain.deploy.addresses import free_port

from deployed import Started, cli, descendants, rows, wait_for

ROUNDS = 2
HIDDEN = 1024

WIRE_LINE = re.compile(
    r"round (\d+) wire: sent (\d+) payload bytes in (\d+) messages, received (\d+) payload bytes in (\d+) replies"
)


def _rchar(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))


def _superlink(root_pid: int) -> int | None:
    for pid in descendants(root_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "superlink" in cmdline and "fedtrain.deploy" in cmdline:
            return pid
    return None


def test_payload_bytes_on_the_wire_match_the_updates(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"], 3)
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    with Started(tmp_path) as started:
        server = started.start("server", cli(
            "server", "--certs", str(certs.root), "--address", address, "--out", str(run_dir), "--quiet",
            "--wait", "180", "--set", f"run.rounds={ROUNDS}", "--set", "data.num_clients=3",
            "--set", "strategy.clients_per_round=3", "--set", "strategy.min_clients=3",
            "--set", f"model.hidden={HIDDEN}", "--set", "client.timeout=120",
        ))
        wait_for(lambda: _superlink(server.pid) or server.poll() is not None, 120, "the SuperLink")
        superlink = _superlink(server.pid)
        assert superlink is not None, started.all_logs()
        for i in range(3):
            started.start(f"client-{i}", cli(
                "client", "--server", address, "--certs", str(certs.root),
                "--key", str(certs.root / f"client-{i + 1}"), "--partition", str(i),
            ))
        wait_for(lambda: started.log("server").count("joined (node") >= 3 or server.poll() is not None, 240,
                 "three clients to join")
        before = _rchar(superlink)
        last = before
        while server.poll() is None:
            now = _rchar(superlink)
            last = now if now is not None else last
            try:
                server.wait(0.1)
            except Exception:  # still running
                pass
        log = started.log("server")
        client_log = started.log("client-0")
    assert server.returncode == 0, started.all_logs()
    numel = int(re.search(r"model of (\d+) parameters", client_log).group(1))  # type: ignore[union-attr]
    assert numel == 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
    metrics = rows(run_dir)
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1))
    wire = {int(m[0]): tuple(int(v) for v in m[1:]) for m in WIRE_LINE.findall(log)}
    assert sorted(wire) == list(range(1, ROUNDS + 1)), log[-3000:]
    uplink_total = 0
    for row in metrics:
        sent, sent_messages, received, replies = wire[row["round"]]
        updates = row["num_clients"]
        assert updates == 3 and sent_messages == 3 and replies == 3
        expected = 4 * numel * updates
        assert abs(received - expected) <= 0.05 * expected, (received, expected)
        assert abs(sent - expected) <= 0.05 * expected, (sent, expected)
        for key, measured in (("bytes_up", received), ("bytes_down", sent)):
            if key in row:
                assert abs(measured - row[key]) <= 0.05 * row[key], (key, measured, row[key])
        uplink_total += received
    assert before is not None and last is not None
    socket_read = last - before
    assert socket_read >= 0.95 * uplink_total, (socket_read, uplink_total)
    print(f"SuperLink read {socket_read} bytes over the rounds; payload up {uplink_total}, "
          f"down {sum(w[0] for w in wire.values())}")
