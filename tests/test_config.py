"""Config loading, overrides and validation: every error names key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtrain import config
from fedtrain.config import ConfigError, Partition


def test_defaults_are_the_embedded_digits_run() -> None:
    cfg = config.load()

    assert (cfg.data.dataset, cfg.data.num_clients, cfg.data.partition, cfg.data.alpha) == (
        "digits", 20, Partition.DIRICHLET, 0.5,
    )
    assert (cfg.strategy.name, cfg.strategy.clients_per_round) == ("fedavg", 10)


def test_toml_file_and_overrides_combine(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[data]\npartition = "shards"\n[client]\nlr = 0.1\n')

    cfg = config.load(path, ["client.lr=0.2", "data.partition=iid", "strategy.options.mu=0.5"])

    assert cfg.client.lr == 0.2
    assert cfg.data.partition is Partition.IID
    assert cfg.strategy.options == {"mu": 0.5}


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = config.load(None, ["data.partition=hash", "strategy.options.beta=0.2", "run.seed=7"])
    path = tmp_path / "resolved.toml"
    path.write_text(config.dumps(cfg))

    assert config.load(path) == cfg


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("client.lr=-1", ["client.lr", "-1", "> 0"]),
        ("client.lr=fast", ["client.lr", "'fast'", "number"]),
        ("run.rounds=0", ["run.rounds", "0", ">= 1"]),
        ("run.rounds=2.5", ["run.rounds", "2.5", "integer"]),
        ("data.partition=random", ["data.partition", "'random'", "'iid'", "'dirichlet'"]),
        ("data.alpha=0", ["data.alpha", "0", "> 0"]),
        ("data.test_fraction=1", ["data.test_fraction", "< 1"]),
        ("client.momentum=1", ["client.momentum", "< 1"]),
        ("client.device=gpu", ["client.device", "'gpu'", "'cuda:N'"]),
        ("data.allow_empty=1", ["data.allow_empty", "true or false"]),
        ("strategy.clients_per_round=21", ["strategy.clients_per_round", "21", "data.num_clients = 20"]),
        ("strategy.min_clients=11", ["strategy.min_clients", "11", "clients_per_round = 10"]),
        ("data.dataset=imagenet", ["data.dataset", "'imagenet'", "'digits'"]),
        ("data.dataset=mnist", ["data.root", "mnist"]),
        ("model.name=resnet", ["model.name", "'resnet'", "'mlp'"]),
        ("data.colour=1", ["data.colour", "unknown key", "allowed keys", "num_clients"]),
        ("colour.x=1", ["colour", "unknown key", "top level"]),
        ("data=3", ["data", "expected a table"]),
    ],
)
def test_bad_value_names_key_value_and_allowed(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, [override])

    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("override", ["nokey", "=3", "a..b=1"])
def test_malformed_override_is_rejected(override: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, [override])


def test_missing_and_invalid_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")

    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_every_simulation_config_is_valid() -> None:
    files = sorted(Path(__file__).parent.parent.joinpath("simulations").glob("*.toml"))

    assert len(files) >= 6
    for path in files:
        config.load(path)


def test_readme_documents_every_key() -> None:
    readme = Path(__file__).parent.parent.joinpath("README.md").read_text()
    table = config.to_dict(config.load())

    def keys(node: dict, prefix: str) -> list[str]:
        return [k for name, v in node.items()
                for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict) and v and name != "options"
                          else [f"{prefix}{name}"])]

    missing = [k for k in keys(table, "") if f"`{k}`" not in readme]
    assert missing == []
