"""Byzantine clients as a simulation option: FedAvg breaks, robust strategies hold."""

from __future__ import annotations

import pytest
import torch

from fedtrain import ClientUpdate, config
from fedtrain.training.attack import AttackingExecutor, choose_attackers
from fedtrain.config import AttackKind, ConfigError
from fedtrain.types import ClientFailure, RoundOutcome
from fedtrain.simulation import simulate

ATTACK = ["attack.kind=sign_flip", "attack.fraction=0.2", "data.partition=iid", "run.rounds=60"]


def _accuracy(*extra: str) -> float:
    return simulate(config.load(None, ATTACK + list(extra))).summary.final_accuracy


def test_sign_flip_breaks_fedavg_but_not_median_or_krum() -> None:
    fedavg = _accuracy()
    median = _accuracy("strategy.name=fedmedian")
    krum = _accuracy("strategy.name=krum", "strategy.options.num_byzantine=3")

    print(f"20% sign-flip attackers: fedavg {fedavg:.3f}, fedmedian {median:.3f}, krum {krum:.3f}")
    assert fedavg < 0.5
    assert median >= 0.85 and krum >= 0.85


class _Fixed:
    def train_round(self, rnd, clients, task, params):  # noqa: ANN001, ANN201
        return RoundOutcome(
            tuple(ClientUpdate(c, torch.ones(3), 1) for c in clients), (ClientFailure("x", "down"),)
        )


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        (AttackKind.SIGN_FLIP, lambda v: torch.equal(v, torch.full((3,), -2.0))),
        (AttackKind.SCALE, lambda v: torch.equal(v, torch.full((3,), 2.0))),
        (AttackKind.NOISE, lambda v: not torch.equal(v, torch.ones(3))),
    ],
)
def test_only_attackers_updates_change(kind: AttackKind, check) -> None:  # noqa: ANN001
    backend = AttackingExecutor(_Fixed(), frozenset({"b"}), kind, scale=2.0, seed=0)

    outcome = backend.train_round(1, ["a", "b"], None, torch.zeros(3))  # type: ignore[arg-type]

    honest, attacker = outcome.updates
    assert torch.equal(honest.vector, torch.ones(3))
    assert check(attacker.vector)
    assert outcome.failures == (ClientFailure("x", "down"),)


def test_attackers_are_a_seeded_fraction() -> None:
    ids = [str(i) for i in range(50)]

    assert choose_attackers(ids, 0.2, seed=1) == choose_attackers(ids, 0.2, seed=1)
    assert len(choose_attackers(ids, 0.2, seed=1)) == 10


def test_attack_needs_kind_and_fraction_together() -> None:
    with pytest.raises(ConfigError, match="attack.kind = 'sign_flip', attack.fraction = 0.0"):
        config.load(None, ["attack.kind=sign_flip"])
