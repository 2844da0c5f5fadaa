"""The rough edges a new user meets, one test each; TensorBoard; the plot's title."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedtrain import __version__, config
from fedtrain.cli import EVERY_CLIENT_FAILED, main
from fedtrain.config import ConfigError
from fedtrain.curves import CurvesProcess, PlotTitle, curves_figure
from fedtrain.plugin import PluginError, load_object
from fedtrain.strategy import Strategy

SHORT = ["--quiet", "--set", "run.rounds=2", "--set", "data.partition=iid", "--set", "data.num_clients=6",
         "--set", "strategy.clients_per_round=3"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])

    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedtrain {__version__}"


def test_plain_fedtrain_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0

    captured = capsys.readouterr()
    assert captured.out.startswith("usage: fedtrain")
    assert "simulate" in captured.out and "compare" in captured.out
    assert captured.err == ""


def test_privacy_help_names_the_either_or_and_the_default_accountant(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per paragraph: no wrapping inside a flag's name
    with pytest.raises(SystemExit):
        main(["privacy", "--help"])

    text = capsys.readouterr().out
    assert "Give exactly one of --noise-multiplier and --target-epsilon" in text
    assert "the accountant is rdp" in text


def test_simulate_help_points_to_the_config_reference(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "'Config reference' section of README.md" in text
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "## Config reference" in readme


STRATEGY_FILE = '''
import torch
from fedtrain import Strategy


class MyAvg(Strategy):
    needs_individual_updates = False

    def aggregate(self, rnd, params, updates):
        return params + updates[0].delta


class Helper:
    pass
'''


def test_a_misspelled_class_lists_what_the_file_defines_not_its_imports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / "mine.py"
    plugin.write_text(STRATEGY_FILE)

    code = main(["simulate", *SHORT, "--out", str(tmp_path / "run"), "--set", f"strategy.name='{plugin}:MyAvgg'"])

    assert code == 2
    err = capsys.readouterr().err
    assert "no strategy class 'MyAvgg'" in err and "MyAvg" in err
    assert "torch" not in err.split("defines")[1] and "Strategy," not in err
    with pytest.raises(PluginError) as info:
        load_object(f"{plugin}:MyAvgg", "strategy class", "strategy.name", kind=Strategy)
    assert str(info.value).endswith("the Strategy subclasses it defines: MyAvg")


def test_a_strategy_file_that_raises_on_import_is_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text("import torch\n\nraise RuntimeError('no GPU here')\n")

    code = main(["simulate", *SHORT, "--out", str(tmp_path / "run"), "--set", f"strategy.name='{plugin}:X'"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"strategy.name = '{plugin}:X': importing {plugin} raised RuntimeError: no GPU here (line 3)" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_model_factory_with_the_wrong_signature_is_refused_naming_the_key(tmp_path: Path) -> None:
    plugin = tmp_path / "models_mine.py"
    plugin.write_text("import torch\n\ndef wrong(num_classes):\n    return torch.nn.Linear(64, num_classes)\n")

    with pytest.raises(PluginError) as info:
        load_object(f"{plugin}:wrong", "model function", "model.name", call_with=("input_shape", "num_classes"))

    assert str(info.value).startswith(f"model.name = '{plugin}:wrong': wrong(num_classes) cannot be called as "
                                      "wrong(input_shape, num_classes)")
    assert load_object(f"{plugin}:wrong", "model function", "model.name", call_with=("num_classes",))


def test_a_model_whose_output_does_not_fit_the_data_is_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "narrow.py"
    plugin.write_text("import torch\n\ndef model(input_shape, num_classes):\n    return torch.nn.Linear(10, 10)\n")

    code = main(["simulate", *SHORT, "--out", str(tmp_path / "run"), "--set", f"model.name='{plugin}:model'"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model cannot run on the data's inputs" in err


@pytest.mark.parametrize("seed", [2**63, 10**20])
def test_a_seed_beyond_63_bits_is_refused_by_fedtrain(seed: int, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", *SHORT, "--out", str(tmp_path / "run"), "--set", f"run.seed={seed}",
                 "--set", "data.dataset=synthetic"])

    assert code == 2
    assert f"run.seed = {seed}: must be <= {2**63 - 1}" in capsys.readouterr().err


def test_a_seed_the_digits_split_cannot_take_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"run.seed = 4294967296 with data.dataset = 'digits': must be < 2\*\*32"):
        config.load(None, ["run.seed=4294967296"])
    assert config.load(None, [f"run.seed={2**63 - 1}", "data.dataset=synthetic"]).run.seed == 2**63 - 1
    assert config.load(None, [f"run.seed={2**32 - 1}"]).run.seed == 2**32 - 1


def test_delta_of_one_over_n_or_more_is_refused() -> None:
    from fedtrain.privacy.setting import check_delta

    user = config.load(None, ["privacy.mode=user", "privacy.noise_multiplier=1.0", "privacy.delta=0.05"])
    with pytest.raises(ConfigError, match=r"privacy.delta = 0.05 .* must be < 1/N = 0.05, N = 20 clients"):
        check_delta(user, {str(i): 100 for i in range(20)})
    check_delta(config.replace(user, ["privacy.delta=0.049"]), {str(i): 100 for i in range(20)})

    sample = config.load(None, ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.delta=0.025"])
    sizes = {"0": 10, "1": 40, "2": 400}  # client 0 has fewer than privacy.min_records = 16: it does not train
    with pytest.raises(ConfigError, match=r"N = 40 records of the smallest client that trains"):
        check_delta(sample, sizes)
    check_delta(config.replace(sample, ["privacy.delta=0.02"]), sizes)
    check_delta(config.load(None), sizes)


def test_a_run_in_which_every_client_failed_every_round_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"

    code = main(["simulate", *SHORT, "--out", str(out), "--set", "client.timeout=0.000001"])

    assert code == EVERY_CLIENT_FAILED == 3
    err = capsys.readouterr().err
    assert "fedtrain: error: every client failed in every round (2 rounds, 6 client updates lost)" in err
    assert "most often: took longer than client.timeout" in err
    assert (out / "summary.json").exists()


def test_a_run_with_some_failures_exits_zero(tmp_path: Path) -> None:
    from fedtrain.cli import _every_client_failed

    rows = [{"num_clients": 0, "num_failed": 3, "failures": {}}, {"num_clients": 1, "num_failed": 2, "failures": {}}]
    assert _every_client_failed(rows) is None
    assert _every_client_failed(rows[:1]) is not None
    assert _every_client_failed([]) is None


def test_tensorboard_writes_each_rounds_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["simulate", *SHORT, "--out", str(out), "--set", "run.tensorboard=true"]) == 0

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("test/accuracy", "accuracy"), ("test/loss", "loss"), ("clients/aggregated", "num_clients"),
                     ("clients/failed", "num_failed"), ("time/round_seconds", "seconds"), ("train/loss", "train_loss")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert "privacy/epsilon" not in events.Tags()["scalars"]


def test_tensorboard_with_privacy_writes_epsilon(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["simulate", *SHORT, "--out", str(out), "--set", "run.tensorboard=true", "--set", "privacy.mode=user",
                 "--set", "privacy.noise_multiplier=0.5", "--set", "strategy.sampling=poisson"]) == 0

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    eps = [json.loads(line)["epsilon"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s.value for s in events.Scalars("privacy/epsilon")] == pytest.approx(eps, rel=1e-6)


def test_tensorboard_missing_is_one_line_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what import sees when the package is not installed
    out = tmp_path / "run"

    code = main(["simulate", *SHORT, "--out", str(out), "--set", "run.tensorboard=true"])

    assert code == 2
    err = capsys.readouterr().err
    assert "run.tensorboard = true: needs the tensorboard package" in err
    assert "pip install 'fedtrain[tensorboard]'" in err
    assert not out.exists()


def test_the_plot_title_names_the_config_and_the_headline(tmp_path: Path) -> None:
    from fedtrain.simulation import simulate

    drawn = []
    cfg = config.load(None, ["run.rounds=2", "data.partition=iid", "strategy.name=fedadam"])
    result = simulate(cfg, tmp_path / "digits_iid-20261201-101500", plot=lambda *a: drawn.append(a))

    title = drawn[0][3]
    final = result.summary.final_metrics["accuracy"]
    assert title == PlotTitle("digits_iid", f"FedAdam, {final:.3f}")
    assert title.text() == f"digits_iid — FedAdam, {final:.3f}"
    with CurvesProcess("noniid [run.seed=1]") as renamed:
        assert renamed.title_for(title) == PlotTitle("noniid [run.seed=1]", f"FedAdam, {final:.3f}")
    figure = curves_figure(drawn[0][0], drawn[0][2], title)
    assert figure._suptitle.get_text() == f"digits_iid — FedAdam, {final:.3f}"


def test_a_model_factory_with_the_wrong_signature_is_one_line_from_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "models_mine.py"
    plugin.write_text("import torch\n\ndef wrong(num_classes):\n    return torch.nn.Linear(64, num_classes)\n")

    code = main(["simulate", *SHORT, "--out", str(tmp_path / "run"), "--set", f"model.name='{plugin}:wrong'"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.name" in err and "cannot be called as" in err


def test_a_model_with_fewer_logits_than_classes_is_refused_before_round_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "narrow.py"
    plugin.write_text("import torch\n\ndef model(input_shape, num_classes):\n    return torch.nn.Linear(64, 3)\n")

    code = main(["simulate", *SHORT, "--out", str(tmp_path / "run"), "--set", f"model.name='{plugin}:model'"])

    err = capsys.readouterr().err
    assert code == 2 and "3 logits per record" in err and "num_classes = 10" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_checkpoint_config_from_before_a_new_key_is_no_difference(tmp_path: Path) -> None:
    from fedtrain.checkpoint import config_differences, latest
    from fedtrain.run import _with_defaults
    from fedtrain.simulation import simulate

    run = tmp_path / "run"
    simulate(config.load(None, ["run.rounds=2", "strategy.clients_per_round=3"]), out_dir=run,
             plot=lambda *a, **k: None)
    saved = latest(run, True).config
    older = {t: {k: v for k, v in keys.items() if (t, k) != ("run", "tensorboard")} for t, keys in saved.items()}

    assert config_differences(older, saved) == ["run.tensorboard: None → False"]
    assert config_differences(_with_defaults(older), saved) == []
    assert config_differences(_with_defaults({**older, "run": {**older["run"], "seed": 5}}), saved) == [
        "run.seed: 5 → 0"]
