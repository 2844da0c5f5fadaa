"""Only what trains is federated: frozen tensors stay, tied tensors are one,
and a frozen part that differs is caught by its fingerprint."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fedtrain import config
from fedtrain.layout import ParamLayout, federated_state, frozen_fingerprint, parameter_counts
from fedtrain.simulation import simulate


def _frozen_base() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    return model


def test_layout_holds_trainable_parameters_and_their_modules_buffers_only() -> None:
    whole = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert list(federated_state(whole)) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight", "2.bias",
    ]

    model = _frozen_base()
    layout = ParamLayout.of_model(model)

    assert layout.names == ("2.weight", "2.bias")
    assert layout.numel == 10
    assert parameter_counts(model) == (3 * 4 + 4 + 4 + 4 + 4 * 2 + 2, 10)


def test_a_model_with_nothing_to_train_is_refused() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)

    with pytest.raises(ValueError, match="no trainable"):
        ParamLayout.of_model(model)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def test_a_tied_tensor_is_federated_once() -> None:
    model = _Tied()

    layout = ParamLayout.of_model(model)

    assert layout.names == ("embed.weight",)
    assert parameter_counts(model) == (15, 15)


def test_fingerprint_covers_the_frozen_part_and_not_the_trained_one() -> None:
    model = _frozen_base()
    layout = ParamLayout.of_model(model)
    before = frozen_fingerprint(model, layout)

    with torch.no_grad():
        model[2].weight.add_(1.0)
    assert frozen_fingerprint(model, layout) == before

    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    assert frozen_fingerprint(model, layout) != before


def test_fingerprint_of_a_tied_model_has_no_frozen_part() -> None:
    model = _Tied()
    layout = ParamLayout.of_model(model)
    before = frozen_fingerprint(model, layout)

    with torch.no_grad():
        model.embed.weight.add_(1.0)

    assert frozen_fingerprint(model, layout) == before


MODELS = '''
import torch
from torch import nn


def frozen_base(input_shape, num_classes):
    model = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 32), nn.ReLU(), nn.Linear(32, num_classes))
    model[1].requires_grad_(False)
    return model


class Tied(nn.Module):
    """Square: the head reuses the first layer's weight, transposed by use."""

    def __init__(self, width):
        super().__init__()
        self.first = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, width, bias=False)
        self.head.weight = self.first.weight

    def forward(self, x):
        return self.head(torch.relu(self.first(x)))[:, :10]


def tied(input_shape, num_classes):
    return Tied(input_shape[0])
'''


def _run(tmp_path: Path, model: str, *overrides: str) -> tuple[Path, dict[str, torch.Tensor]]:
    (tmp_path / "models.py").write_text(textwrap.dedent(MODELS))
    cfg = config.load(None, [
        f"model.name={tmp_path / 'models.py'}:{model}", "data.num_clients=6", "strategy.clients_per_round=3",
        "run.rounds=3", "client.engine=sequential", *overrides,
    ])
    from fedtrain.models import build_model

    initial = build_model(cfg.model, (64,), 10, cfg.run.seed).state_dict()
    out = tmp_path / "run"
    simulate(cfg, out_dir=out, plot=lambda *a, **k: None)
    return out, initial


def test_user_level_dp_leaves_a_frozen_base_exactly_as_built(tmp_path: Path) -> None:
    out, initial = _run(
        tmp_path, "frozen_base", "privacy.mode=user", "privacy.noise_multiplier=1.0", "privacy.clip=0.5",
        "privacy.secure_noise=false", "strategy.sampling=poisson",
    )

    saved = torch.load(out / "model.pt")
    summary = json.loads((out / "summary.json").read_text())

    assert set(saved) == set(initial)
    assert torch.equal(saved["1.weight"], initial["1.weight"])
    assert torch.equal(saved["1.bias"], initial["1.bias"])
    assert not torch.equal(saved["3.weight"], initial["3.weight"])
    assert summary["num_trainable_parameters"] == 32 * 10 + 10
    assert summary["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10


def test_a_tied_tensor_trains_under_both_names(tmp_path: Path) -> None:
    out, initial = _run(tmp_path, "tied")

    saved = torch.load(out / "model.pt")

    assert torch.equal(saved["first.weight"], saved["head.weight"])
    assert not torch.equal(saved["first.weight"], initial["first.weight"])
    assert json.loads((out / "summary.json").read_text())["num_parameters"] == 64 * 64


@pytest.mark.usefixtures("task_identity")
def test_coordinator_refuses_a_client_whose_frozen_model_differs() -> None:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedtrain.transport.flower import FlowerTransport
    from fedtrain.transport.relay import Hello

    class Grid:
        def get_node_ids(self) -> set[int]:
            return {1, 2}

    def reply(name: str, fingerprint: str) -> Message:
        result = ConfigRecord({"status": "ok", "name": name, "num_records": 10, "device": "cpu",
                               "fingerprint": fingerprint})
        return Message(RecordDict({"result": result}), dst_node_id=1, message_type=MessageType.QUERY)

    transport = FlowerTransport(Grid(), Hello({}, (4,), 2, "a" * 64), 10.0, 0.1)  # type: ignore[arg-type]

    assert transport.admit(1, reply("0", "a" * 64)) is None
    reason = transport.admit(2, reply("1", "b" * 64))
    assert reason is not None and "frozen model differs" in reason and "bbbbbbbbbbbb" in reason
    assert "1" not in transport.clients
    assert "hex" in str(transport.admit(2, reply("1", "B" * 64)))
