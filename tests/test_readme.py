"""The README's custom-strategy example runs exactly as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedtrain import config
from fedtrain.simulation import simulate

README = Path(__file__).parent.parent / "README.md"


def _example(name: str) -> str:
    match = re.search(
        r"<!-- example: " + re.escape(name) + r" -->\n```\w+\n(.*?)```", README.read_text(), re.S
    )
    if match is None:
        raise LookupError(f"README has no example {name}")
    return match.group(1)


def test_readme_opens_with_install_and_test_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    ci = (README.parent / ".ci" / "run").read_text()

    assert "fedtrain simulate" in blocks[0] and "pip install" in blocks[0]
    assert "pytest" in blocks[1]
    assert blocks[1].strip() in ci


def test_custom_strategy_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _example("my_strategy.py")
    (tmp_path / "my_strategy.py").write_text(source)
    (tmp_path / "my_config.toml").write_text(_example("my_config.toml"))
    monkeypatch.chdir(tmp_path)
    cfg = config.load("my_config.toml", ["run.rounds=15"])

    result = simulate(cfg)

    assert len(source.strip().splitlines()) < 30
    assert cfg.strategy.options == {"max_norm": 2.0}
    assert result.summary.final_accuracy >= 0.85
