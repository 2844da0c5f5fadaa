"""Flat parameter vectors and the stacked-buffer fast path of aggregation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtrain import ClientUpdate, ParamLayout, example_weights, stack, weighted_mean


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_flatten_unflatten_round_trip_keeps_float_state_only() -> None:
    state = _model().state_dict()
    layout = ParamLayout.of(state)

    restored = layout.unflatten(layout.flatten(state))

    assert "1.num_batches_tracked" not in layout.names
    assert layout.numel == 3 * 4 + 4 + 4 + 4 + 4 + 4 + 4 * 2 + 2
    for name, tensor in restored.items():
        assert torch.equal(tensor, state[name])


def test_unflatten_rejects_wrong_length() -> None:
    layout = ParamLayout.of(_model().state_dict())

    with pytest.raises(ValueError, match=f"\\({layout.numel},\\)"):
        layout.unflatten(torch.zeros(layout.numel + 1))


def _update(cid: str, vector: torch.Tensor, n: int) -> ClientUpdate:
    return ClientUpdate(client_id=cid, vector=vector, num_examples=n)


def test_views_of_a_matrix_are_each_rows_parameters_in_place() -> None:
    state = _model().state_dict()
    layout = ParamLayout.of(state)
    rows = torch.stack([layout.flatten(state), -layout.flatten(state)])

    views = layout.views(rows)
    views["0.weight"][1].zero_()

    assert views["0.weight"].shape == (2, 4, 3)
    assert torch.equal(views["2.bias"][0], state["2.bias"]) and torch.equal(views["2.bias"][1], -state["2.bias"])
    assert not layout.unflatten(rows[1])["0.weight"].any()
    assert torch.equal(layout.unflatten(rows[0])["0.weight"], state["0.weight"])


def test_stack_returns_a_view_for_rows_of_one_buffer() -> None:
    buffer = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    updates = [_update(str(i), buffer[i], 1) for i in range(3)]

    stacked = stack(updates)

    assert stacked.data_ptr() == buffer.data_ptr()
    assert torch.equal(stacked, buffer[:3])


def test_stack_copies_when_rows_are_not_consecutive() -> None:
    buffer = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    updates = [_update("a", buffer[2], 1), _update("b", buffer[0], 1)]

    stacked = stack(updates)

    assert stacked.data_ptr() != buffer.data_ptr()
    assert torch.equal(stacked, torch.stack([buffer[2], buffer[0]]))


def test_weighted_mean_weights_by_examples_or_equally() -> None:
    updates = [_update("a", torch.tensor([1.0, 0.0]), 1), _update("b", torch.tensor([0.0, 1.0]), 3)]

    assert torch.allclose(weighted_mean(updates), torch.tensor([0.25, 0.75]))
    assert torch.allclose(weighted_mean(updates, weighted=False), torch.tensor([0.5, 0.5]))
    assert torch.allclose(example_weights(updates).sum(), torch.tensor(1.0))


def test_empty_updates_are_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        stack([])
