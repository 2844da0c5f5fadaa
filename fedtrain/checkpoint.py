"""Atomic, authenticated checkpoints of the whole coordinator state, and the
journal of privacy releases that outlives them.

A checkpoint is one file ``checkpoint-RRRRRR.pt`` holding the round number,
the global model, the strategy's and the privacy policy's state (the privacy
ledger), the run's random streams and the metrics so far. It is written to a
temporary file, fsynced and renamed, so a crash leaves either the old or the
new file, never half of one.

A checkpoint carries data, never code. Its payload is ``torch.save`` of
tensors, dicts, lists, tuples, strings, bytes, numbers, booleans and None
only (:func:`save` refuses anything else) and is read back with
``torch.load(weights_only=True)``, whose unpickler builds nothing else: a
file that names any other Python object is refused, so a crafted checkpoint
cannot run code on ``--resume``. The layout::

    MAGIC | SHA-256(payload) | HMAC-SHA256(key, MAGIC ‖ payload) | payload

The SHA-256 tells a truncated or corrupt file (loading then falls back to
the previous checkpoint with a warning); the HMAC (RFC 2104) under the run's
secret key ``RUN_DIR/checkpoint.key`` (32 bytes from :mod:`secrets`, mode
0600, created with the run) tells a checkpoint this run wrote from one
written, or rewritten, by anyone else: an unkeyed digest is recomputed by
whoever changes the file. Both are checked before any byte is deserialised.
``trust=True`` (``--trust-checkpoint``) accepts a checkpoint whose HMAC does
not verify, e.g. a run folder from another machine; it is still loaded as
data only. Format 1 (``FEDTRAIN-CKPT-1``) was unpickled with
``weights_only=False`` and is refused.

The privacy ledger is in the checkpoint, so a checkpoint that is lost (the
newest one is corrupt and the run resumes from the previous one) would lose
the cost of rounds whose model and metrics were already written. The ledger
journal ``RUN_DIR/ledger.jsonl`` closes that gap: one JSON line per release,
holding the privacy events the round composed, appended and fsynced by the
engine right after the round's cost is composed and before anything about the
round is published (:class:`LedgerJournal`). Each checkpoint records how many
journal entries its ledger holds; on resume every later entry is returned to
be composed again, so a round that is re-run costs twice, as both of its
releases were seen. Each line carries an HMAC under the run key, so a journal
that was altered, reordered or cut short of what a checkpoint accounts for is
refused, never silently under-counted.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fedtrain.errors import UserError
from fedtrain.types import RoundRecord

log = logging.getLogger(__name__)

MAGIC = b"FEDTRAIN-CKPT-2\n"
LEGACY_MAGIC = b"FEDTRAIN-CKPT-1\n"
"""Format 1: a pickle that ``torch.load(weights_only=False)`` read, i.e. code."""
PATTERN = "checkpoint-*.pt"
KEY_FILE = "checkpoint.key"
JOURNAL_FILE = "ledger.jsonl"
KEY_BYTES = 32
_DIGEST_BYTES = 32
_HEADER = len(MAGIC) + 2 * _DIGEST_BYTES
_JOURNAL_DOMAIN = b"fedtrain ledger journal 1\n"
_PAYLOAD_KEYS = frozenset({"round", "params", "engine", "records_jsonl", "config", "journal_entries"})
_SCALARS = (str, bytes, int, float, bool, type(None))
_TRUST_HINT = "--trust-checkpoint accepts it if you trust where the run folder came from (still loaded as data only)"


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint, or one that does not fit the run."""


@dataclass(frozen=True)
class Checkpoint:
    """The coordinator's state after round ``round``."""

    round: int
    params: torch.Tensor
    engine: Mapping[str, Any]
    records_jsonl: bytes
    """The metrics of every round so far, one JSON object per line as in
    ``metrics.jsonl``. Stored encoded because the :class:`Checkpointer`
    encodes each round's record once: pickling the growing list of records
    anew every round cost O(rounds) per round (4.4 ms at round 300 of
    ``simulations/many_clients.toml``, twice its batched training)."""
    config: Mapping[str, Any]
    journal_entries: int = 0
    """How many lines of the ledger journal the ledger in ``engine`` holds."""

    @property
    def records(self) -> tuple[dict[str, Any], ...]:
        return tuple(json.loads(line) for line in self.records_jsonl.splitlines())


def _path(run_dir: Path, rnd: int) -> Path:
    return run_dir / f"checkpoint-{rnd:06d}.pt"


# ---------------------------------------------------------------- run key


def create_key_(run_dir: str | Path) -> bytes:
    """A fresh secret run key, written atomically to ``RUN_DIR/checkpoint.key``
    with mode 0600. It replaces the key of an earlier run in the same folder,
    whose checkpoints and journal then no longer verify: a new run is a new
    history."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    _write_atomic(run_dir / KEY_FILE, key)
    return key


def run_key(run_dir: str | Path) -> bytes | None:
    """The key of ``run_dir``, or None when it has none.

    Raises :class:`CheckpointError` when the file is a link, is not owned by
    this user, may be read or written by others, or is not 32 bytes: whoever
    can read or replace the key can forge checkpoints.
    """
    path = Path(run_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot open the run key ({exc}); it must be a regular file, not a link"
        ) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file; the run key is a 32-byte file of mode 0600")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise CheckpointError(
                f"{path}: owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); "
                f"a run key must be this user's own. {_TRUST_HINT}"
            )
        if info.st_mode & 0o077:
            raise CheckpointError(
                f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets other users read or change the run key; "
                f"allowed: 0600 (chmod 600 {path})"
            )
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise CheckpointError(f"{path}: {len(key)} bytes; a run key is exactly {KEY_BYTES} bytes")
    return key


def _required_key(run_dir: Path) -> bytes:
    key = run_key(run_dir)
    if key is None:
        raise CheckpointError(
            f"{run_dir / KEY_FILE}: missing, so the checkpoints of {run_dir} cannot be verified (a folder written "
            f"before checkpoints were authenticated, or copied without its key). {_TRUST_HINT}"
        )
    return key


def _trusted_key(run_dir: Path) -> bytes | None:
    """The run key when it is usable, else None (with a warning): under
    ``--trust-checkpoint`` a missing or unusable key is replaced after loading."""
    try:
        key = run_key(run_dir)
    except CheckpointError as exc:
        log.warning("%s; --trust-checkpoint: a new run key replaces it", exc)
        return None
    if key is None:
        log.warning("%s: missing; --trust-checkpoint: a new run key is created", run_dir / KEY_FILE)
    return key


def _checkpoint_mac(key: bytes, payload: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) of a checkpoint's format and payload."""
    return hmac.new(key, MAGIC + payload, hashlib.sha256).digest()


# ---------------------------------------------------------------- checkpoints


def save(run_dir: str | Path, checkpoint: Checkpoint, keep: int, key: bytes) -> Path:
    """Write ``checkpoint`` atomically, authenticated under ``key``, and keep
    only the newest ``keep`` files.

    Raises :class:`CheckpointError`, naming the entry, when the state holds
    anything but plain data (see the module docstring): such a value could
    only be read back by unpickling code.
    """
    if len(key) != KEY_BYTES:
        raise CheckpointError(f"key: {len(key)} bytes; a run key is exactly {KEY_BYTES} bytes")
    run_dir = Path(run_dir)
    state = {
        "round": checkpoint.round,
        "params": checkpoint.params.detach().cpu(),
        "engine": _plain(dict(checkpoint.engine), "engine"),
        "records_jsonl": _plain(checkpoint.records_jsonl, "records_jsonl"),
        "config": _plain(dict(checkpoint.config), "config"),
        "journal_entries": checkpoint.journal_entries,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path = _path(run_dir, checkpoint.round)
    _write_atomic(path, MAGIC + hashlib.sha256(payload).digest() + _checkpoint_mac(key, payload) + payload)
    for old in sorted(run_dir.glob(PATTERN))[:-keep]:
        old.unlink()
    return path


def _plain(value: Any, where: str) -> Any:
    """``value`` as the plain data that ``weights_only`` loading rebuilds
    exactly; numpy scalars become the Python numbers they equal."""
    kind = type(value)
    if kind is bytes and not value:
        raise CheckpointError(
            f"checkpoint value {where}: empty bytes; pickle protocol 2 stores them as a call to bytes(), which "
            "weights_only loading refuses; allowed: non-empty bytes, or None"
        )
    if kind in _SCALARS:
        return value
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if kind in (dict, OrderedDict):
        out = kind()
        for k, v in value.items():
            if type(k) not in (str, int):
                raise CheckpointError(
                    f"checkpoint value {where}: key {k!r} of type {type(k).__name__}; allowed keys: str, int"
                )
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if kind in (list, tuple):
        return kind(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise CheckpointError(
        f"checkpoint value {where}: {kind.__module__}.{kind.__qualname__} is not plain data; allowed: "
        "torch.Tensor, dict, list, tuple, str, bytes, int, float, bool, None (a checkpoint carries no code, "
        "so a strategy's or policy's state_dict may hold only these)"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or its old content, never part of either, even
    after a crash; a new file is created with mode 0600."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str | Path, key: bytes | None = None, trust: bool = False) -> Checkpoint:
    """One checkpoint file, verified before any of it is deserialised.

    ``key`` defaults to the key beside ``path``. Raises :class:`CheckpointError`
    when the file is truncated or corrupt (SHA-256), not written under the key
    (HMAC; accepted with a warning when ``trust``), in format 1, or holds
    anything but plain data.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(LEGACY_MAGIC):
        raise CheckpointError(
            f"{path}: checkpoint format 1 ({LEGACY_MAGIC.decode().strip()}) stores pickled Python objects, and "
            "reading it could run any code, so fedtrain no longer loads it; start the run again without --resume "
            "(or, if you trust the file, finish the run with the fedtrain version that wrote it)"
        )
    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a fedtrain checkpoint (or truncated header)")
    digest = data[len(MAGIC) : len(MAGIC) + _DIGEST_BYTES]
    mac, payload = data[len(MAGIC) + _DIGEST_BYTES : _HEADER], data[_HEADER:]
    if not hmac.compare_digest(hashlib.sha256(payload).digest(), digest):
        raise CheckpointError(f"{path}: SHA-256 mismatch, the file is truncated or corrupt")
    if key is None and not trust:
        key = _required_key(path.parent)
    if key is None or not hmac.compare_digest(_checkpoint_mac(key, payload), mac):
        if not trust:
            raise CheckpointError(
                f"{path}: HMAC-SHA256 does not verify under {path.parent / KEY_FILE}: the checkpoint was not written "
                f"by this run, or was altered; refused unread. {_TRUST_HINT}"
            )
        log.warning("%s: HMAC does not verify under the run key; accepted (--trust-checkpoint) as data only", path)
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: the payload is not plain data (tensors, dicts, lists, numbers, strings) and is refused: "
            f"{_load_failure(exc)}"
        ) from None
    return _checkpoint(path, state)


def _load_failure(exc: Exception) -> str:
    """The line of torch's weights_only error that names what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". Please use")[0]
    return lines[0] if lines else type(exc).__name__


def _checkpoint(path: Path, state: Any) -> Checkpoint:
    if not isinstance(state, dict) or set(state) != _PAYLOAD_KEYS:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: payload keys {keys}; expected {sorted(_PAYLOAD_KEYS)}")
    expected: dict[str, type | tuple[type, ...]] = {
        "round": int, "params": torch.Tensor, "engine": dict, "records_jsonl": bytes, "config": dict,
        "journal_entries": int,
    }
    for name, kind in expected.items():
        if not isinstance(state[name], kind) or isinstance(state[name], bool):
            raise CheckpointError(f"{path}: payload {name} is a {type(state[name]).__name__}; expected {kind}")
    if state["round"] < 1 or state["journal_entries"] < 0:
        raise CheckpointError(
            f"{path}: payload round = {state['round']}, journal_entries = {state['journal_entries']}; "
            "allowed: round >= 1, journal_entries >= 0"
        )
    return Checkpoint(
        round=state["round"],
        params=state["params"],
        engine=state["engine"],
        records_jsonl=state["records_jsonl"],
        config=state["config"],
        journal_entries=state["journal_entries"],
    )


def encode_records(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Round records as :attr:`Checkpoint.records_jsonl`."""
    return b"".join(json.dumps(dict(r)).encode() + b"\n" for r in records)


def latest(run_dir: str | Path, trust: bool = False) -> Checkpoint:
    """The newest valid checkpoint of ``run_dir``; a bad one is skipped with a
    warning. Without ``trust`` a checkpoint must verify under the run key."""
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob(PATTERN), reverse=True)
    if not paths:
        raise CheckpointError(f"{run_dir}: no valid checkpoint to resume from (no {PATTERN})")
    key = _trusted_key(run_dir) if trust else run_key(run_dir)
    reasons: list[str] = []
    for path in paths:
        try:
            return read(path, key, trust)
        except (CheckpointError, OSError) as exc:
            log.warning("skipping checkpoint %s: %s", path.name, exc)
            reasons.append(str(exc))
    raise CheckpointError(
        f"{run_dir}: no valid checkpoint to resume from (looked for {PATTERN}): {reasons[0]}"
        + (f" (and {len(reasons) - 1} older ones refused)" if len(reasons) > 1 else "")
    )


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: saved → current`` for every config value that differs."""
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} → {b!r}")
    return out


# ---------------------------------------------------------------- ledger journal


@dataclass(frozen=True)
class JournalEntry:
    """One release in the ledger journal: the privacy events round ``round``
    composed, by ledger (as :meth:`GaussianEvent.to_json` writes them)."""

    seq: int
    round: int
    events: Mapping[str, tuple[Mapping[str, Any], ...]]


@dataclass(frozen=True)
class _Line:
    seq: int
    round: int
    events: Mapping[str, tuple[Mapping[str, Any], ...]] | None
    void: int | None
    verified: bool


class LedgerJournal:
    """The append-only journal of a run's privacy releases, ``RUN_DIR/ledger.jsonl``.

    A line is ``{"seq": n, "round": r, "events": {ledger: [event, ...]}, "mac": hex}``
    for a release, or ``{"seq": n, "round": r, "void": k, "mac": hex}`` when a
    resume finds that release ``k`` was never published (see :meth:`resume_`).
    ``mac`` is HMAC-SHA256 (RFC 2104) under the run key of the line's other
    fields as canonical JSON; ``seq`` numbers the lines from 0, so a line
    removed, repeated or moved does not verify either.
    """

    def __init__(self, run_dir: str | Path, key: bytes, entries: int) -> None:
        if len(key) != KEY_BYTES:
            raise CheckpointError(f"key: {len(key)} bytes; a run key is exactly {KEY_BYTES} bytes")
        self.run_dir = Path(run_dir)
        self.key = key
        self._entries = entries

    @property
    def path(self) -> Path:
        return self.run_dir / JOURNAL_FILE

    @property
    def entries(self) -> int:
        """Lines in the journal; a checkpoint written now holds all of them."""
        return self._entries

    @classmethod
    def create_(cls, run_dir: str | Path) -> LedgerJournal:
        """Start a run: a new run key and an empty journal in ``run_dir``."""
        key = create_key_(run_dir)
        _write_atomic(Path(run_dir) / JOURNAL_FILE, b"")
        return cls(run_dir, key, 0)

    def append_(self, rnd: int, events: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Record that round ``rnd`` composed ``events``, durably (fsynced)
        before returning: the engine calls it before the round is published."""
        body = {
            "seq": self._entries,
            "round": rnd,
            "events": {str(ledger): [dict(e) for e in evs] for ledger, evs in events.items()},
        }
        self._write_line_(body)

    def _write_line_(self, body: Mapping[str, Any]) -> None:
        line = _canonical({**body, "mac": _journal_mac(self.key, body)}) + b"\n"
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._entries += 1

    @classmethod
    def resume_(
        cls, run_dir: str | Path, saved: Checkpoint, trust: bool = False
    ) -> tuple[LedgerJournal, tuple[JournalEntry, ...]]:
        """The journal of a run resumed from ``saved``, and the releases its
        ledger does not hold: every entry written after ``saved`` (e.g. of a
        round whose newer checkpoint is corrupt). The caller composes them into
        the ledger, so each release ever published is counted.

        The journal's last entry is left out only when it cannot have been
        published: its round is due a checkpoint (``run.checkpoint_every`` of
        ``saved``'s config, :func:`checkpoint_due`) and has no checkpoint
        file at all (the checkpointer, the first to publish a round, never
        finished); a ``void`` line records that, so that later resumes agree.
        A round between checkpoints is published without one, so its entry
        is always counted (a run's last round checkpointed off the period and
        lost before its checkpoint is counted too: more ε, never less). Raises
        :class:`CheckpointError` when the journal is missing, unreadable, does
        not verify under the run key or holds fewer entries than ``saved``
        accounts for; with ``trust`` the last two are warnings and the
        journal is sealed anew under the run key.
        """
        run_dir = Path(run_dir)
        path = run_dir / JOURNAL_FILE
        key = _trusted_key(run_dir) if trust else _required_key(run_dir)
        lines = _read_journal(path, key, trust)
        if lines is None:
            if not trust:
                raise CheckpointError(
                    f"{path}: missing, so releases after round {saved.round} cannot be accounted; resume refused "
                    f"rather than under-count ε. {_TRUST_HINT}"
                )
            log.warning("%s: missing; --trust-checkpoint: only the checkpoint's ledger is counted", path)
            lines = []
        if len(lines) < saved.journal_entries:
            message = (
                f"{path}: {len(lines)} entries, but the checkpoint of round {saved.round} accounts for "
                f"{saved.journal_entries}: the journal was cut short or replaced"
            )
            if not trust:
                raise CheckpointError(f"{message}; resume refused rather than under-count ε. {_TRUST_HINT}")
            log.warning("%s; --trust-checkpoint: counting the entries that are there", message)
        voided = {line.void for line in lines if line.void is not None}
        pending = [
            line for line in lines[saved.journal_entries :]
            if line.events is not None and line.seq not in voided
        ]
        unpublished: _Line | None = None
        last = lines[-1] if lines else None
        every = checkpoint_every(saved.config)
        if (
            pending and pending[-1] is last and checkpoint_due(last.round, every)
            and not _path(run_dir, last.round).exists()
        ):
            unpublished = pending.pop()
        if key is None:
            key = create_key_(run_dir)
        journal = cls(run_dir, key, len(lines))
        if not all(line.verified for line in lines):
            journal._seal_(lines)
        if unpublished is not None:
            log.warning(
                "%s: the release of round %d (entry %d) was never published (no %s), so it is not counted",
                path, unpublished.round, unpublished.seq, _path(run_dir, unpublished.round).name,
            )
            journal._write_line_({"seq": journal.entries, "round": unpublished.round, "void": unpublished.seq})
        entries = tuple(JournalEntry(line.seq, line.round, line.events or {}) for line in pending)
        return journal, entries

    def _seal_(self, lines: Sequence[_Line]) -> None:
        """Rewrite the journal, atomically, with every line's HMAC under this key."""
        out = bytearray()
        for line in lines:
            body: dict[str, Any] = {"seq": line.seq, "round": line.round}
            if line.events is not None:
                body["events"] = {k: [dict(e) for e in v] for k, v in line.events.items()}
            else:
                body["void"] = line.void
            out += _canonical({**body, "mac": _journal_mac(self.key, body)}) + b"\n"
        _write_atomic(self.path, bytes(out))
        self._entries = len(lines)


def _canonical(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _journal_mac(key: bytes, body: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (RFC 2104) of one journal line's fields."""
    return hmac.new(key, _JOURNAL_DOMAIN + _canonical(body), hashlib.sha256).hexdigest()


def _read_journal(path: Path, key: bytes | None, trust: bool) -> list[_Line] | None:
    """The verified lines of ``path`` (None when it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if data and not data.endswith(b"\n"):
        complete = data.rfind(b"\n") + 1
        log.warning(
            "%s: an incomplete last line (%d bytes) is dropped: it was never fsynced, so its round was never "
            "published", path, len(data) - complete,
        )
        data = data[:complete]
        _write_atomic(path, data)
    lines: list[_Line] = []
    unverified = 0
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path} line {number}"
        try:
            item = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError:
            raise CheckpointError(f"{where}: not JSON; resume refused rather than drop a release") from None
        line, mac = _journal_line(item, where, len(lines))
        verified = key is not None and hmac.compare_digest(
            _journal_mac(key, {k: v for k, v in item.items() if k != "mac"}), mac
        )
        if not verified:
            if not trust:
                raise CheckpointError(
                    f"{where}: HMAC-SHA256 does not verify under {path.parent / KEY_FILE}: the journal was altered "
                    f"or belongs to another run; resume refused rather than under-count ε. {_TRUST_HINT}"
                )
            unverified += 1
        lines.append(_Line(line.seq, line.round, line.events, line.void, verified))
    if unverified:
        log.warning("%s: %d line(s) do not verify under the run key; counted anyway (--trust-checkpoint)",
                    path, unverified)
    return lines


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number the journal writes")


def _journal_line(item: Any, where: str, seq: int) -> tuple[_Line, str]:
    """One parsed line, checked for shape; raises :class:`CheckpointError`."""
    release, void = {"seq", "round", "events", "mac"}, {"seq", "round", "void", "mac"}
    if not isinstance(item, dict) or set(item) not in (release, void):
        keys = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise CheckpointError(f"{where}: keys {keys}; expected {sorted(release)} or {sorted(void)}")
    if not isinstance(item["mac"], str):
        raise CheckpointError(f"{where}: mac = {item['mac']!r}; expected a hex string")
    if item["seq"] != seq or isinstance(item["seq"], bool):
        raise CheckpointError(f"{where}: seq = {item['seq']!r}; expected {seq} (lines are numbered from 0)")
    rnd = item["round"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
        raise CheckpointError(f"{where}: round = {rnd!r}; expected an integer >= 1")
    if "void" in item:
        k = item["void"]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < seq:
            raise CheckpointError(f"{where}: void = {k!r}; expected the seq of an earlier line (0 to {seq - 1})")
        return _Line(seq, rnd, None, k, False), item["mac"]
    events = item["events"]
    if not isinstance(events, dict) or not all(
        isinstance(evs, list) and all(isinstance(e, dict) for e in evs) for evs in events.values()
    ):
        raise CheckpointError(f"{where}: events = {events!r}; expected {{ledger: [event, ...]}}")
    return _Line(seq, rnd, {k: tuple(v) for k, v in events.items()}, None, False), item["mac"]


class Checkpointer:
    """An engine observer that checkpoints every ``every`` rounds
    (``run.checkpoint_every``) and after the run's last round, whether the
    run ends there or stops early (:meth:`on_run_end`).

    Put it before the observers that publish a round (the metrics file): a
    round that is due a checkpoint (``round % every == 0``) but whose
    checkpoint file does not exist counts as unpublished when a resume reads
    the ledger journal (see :meth:`LedgerJournal.resume_`). A round between
    checkpoints is published without one; a resume re-runs it and counts
    its privacy cost again.
    """

    def __init__(
        self,
        run_dir: str | Path,
        engine_state: Callable[[], Mapping[str, Any]],
        config: Mapping[str, Any],
        keep: int,
        records: Sequence[Mapping[str, Any]] = (),
        *,
        journal: LedgerJournal,
        every: int = 1,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"run.checkpoint_every = {every!r}: must be an integer >= 1")
        self.run_dir = Path(run_dir)
        self.engine_state = engine_state
        self.config = config
        self.keep = keep
        self.journal = journal
        self.every = every
        self._records = bytearray(encode_records(records))
        self._unsaved: int | None = None

    def on_round(self, record: RoundRecord, params: torch.Tensor) -> None:
        self._records += encode_records([record.as_json()])
        if checkpoint_due(record.round, self.every):
            self._save(record.round, params)
        else:
            self._unsaved = record.round

    def on_run_end(self, record: RoundRecord | None, params: torch.Tensor) -> None:
        """Checkpoint the run's last round (``record``) when it has none yet."""
        if record is not None and self._unsaved == record.round:
            self._save(record.round, params)

    def _save(self, rnd: int, params: torch.Tensor) -> None:
        save(
            self.run_dir,
            Checkpoint(rnd, params, self.engine_state(), bytes(self._records), self.config, self.journal.entries),
            self.keep,
            self.journal.key,
        )
        self._unsaved = None


def checkpoint_due(rnd: int, every: int) -> bool:
    """Whether round ``rnd`` is checkpointed as it ends (``run.checkpoint_every = every``)."""
    return rnd % every == 0


def checkpoint_every(config: Mapping[str, Any]) -> int:
    """``run.checkpoint_every`` of a checkpoint's config (1 for a config that
    predates the key)."""
    run = config.get("run", {})
    every = run.get("checkpoint_every", 1) if isinstance(run, Mapping) else 1
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise CheckpointError(f"checkpoint config run.checkpoint_every = {every!r}: expected an integer >= 1")
    return every
