"""The language models (``gpt``, ``lstm``): token ids ``(B, T)`` to logits
``(B, T, V)``, causal, seeded, and fit for DP-SGD (Opacus' per-sample
gradients in every mode) and for the batched engine (``torch.func.vmap`` over
stacked parameters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from fedtrain import config
from fedtrain.config import ConfigError, ModelConfig
from fedtrain.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

T, V = 8, 11
SMALL = {
    "gpt": ModelConfig(name="gpt", layers=2, heads=2, embedding=16),
    "lstm": ModelConfig(name="lstm", layers=2, lstm_embedding=8, lstm_hidden=16),
}
NAMES = sorted(SMALL)
MODES = ["hooks", "ew", "functorch"]


def _model(name: str, seed: int = 0, shape: tuple[int, ...] = (T,), vocab: int = V) -> nn.Module:
    return build_model(SMALL[name], shape, vocab, seed=seed)


def _tokens(batch: int, seed: int, length: int = T) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _record_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each record's mean next-token loss over its positions, shape (B,)."""
    b, t = y.shape
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(b, t).mean(1)


@pytest.mark.parametrize("name", NAMES)
def test_maps_token_ids_to_logits_at_every_position(name: str) -> None:
    model = _model(name)

    logits = model(_tokens(3, seed=1))

    assert logits.shape == (3, T, V)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_logits_before_a_changed_token_are_bitwise_unchanged(name: str) -> None:
    model = _model(name).eval()
    x = _tokens(2, seed=2)
    with torch.no_grad():
        base = model(x)
        for t in range(T):
            changed = x.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = model(changed)

            assert torch.equal(out[:, :t], base[:, :t])
            assert not torch.equal(out[:, t], base[:, t])


@pytest.mark.parametrize("name", NAMES)
def test_initialisation_is_seeded_and_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(5)
    before = torch.random.get_rng_state()

    a, b, c = _model(name, seed=3), _model(name, seed=3), _model(name, seed=4)

    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert torch.equal(torch.random.get_rng_state(), before)


def _gpt_parameters(v: int, t: int, layers: int, c: int) -> int:
    """Token and position embeddings, per block two LayerNorms (2c each),
    q/k/v/out projections (c² + c each) and the 4×-wide MLP (8c² + 5c), the
    final LayerNorm and the bias-free head."""
    return v * c + t * c + layers * (12 * c * c + 13 * c) + 2 * c + c * v


@pytest.mark.parametrize(("t", "v", "layers", "heads", "embedding"), [(80, 80, 2, 4, 128), (8, 11, 3, 2, 16)])
def test_gpt_parameter_count(t: int, v: int, layers: int, heads: int, embedding: int) -> None:
    cfg = ModelConfig(name="gpt", layers=layers, heads=heads, embedding=embedding)

    model = build_model(cfg, (t,), v, seed=0)

    assert sum(p.numel() for p in model.parameters()) == _gpt_parameters(v, t, layers, embedding)


def test_defaults_are_nanogpt_scale_gpt_and_leaf_lstm() -> None:
    gpt = build_model(ModelConfig(name="gpt"), (80,), 80, seed=0)
    lstm = build_model(ModelConfig(name="lstm"), (80,), 80, seed=0)
    # LEAF: embedding 8, two LSTM layers of 256 units (4 gates, two biases each), a head.
    lstm_expected = 80 * 8 + (4 * 256 * (8 + 256) + 8 * 256) + (4 * 256 * 512 + 8 * 256) + 256 * 80 + 80

    assert sum(p.numel() for p in gpt.parameters()) == _gpt_parameters(80, 80, 2, 128) == 427_520
    assert sum(p.numel() for p in lstm.parameters()) == lstm_expected == 819_920


def test_gpt_initialisation_follows_gpt2() -> None:
    model = build_model(ModelConfig(name="gpt", layers=8, embedding=256), (64,), 64, seed=0).requires_grad_(False)

    assert 0.018 < float(model.wte.weight.std()) < 0.022
    assert 0.018 < float(model.blocks[0].attn.query.weight.std()) < 0.022
    scaled = 0.02 / 4.0  # 1/sqrt(2 · 8 layers)
    assert 0.9 * scaled < float(model.blocks[0].attn.proj.weight.std()) < 1.1 * scaled
    assert 0.9 * scaled < float(model.blocks[0].mlp[2].weight.std()) < 1.1 * scaled
    assert not model.blocks[0].attn.query.bias.any()
    assert model.head.weight.data_ptr() != model.wte.weight.data_ptr()


def test_the_causal_mask_is_not_federated_state() -> None:
    model = _model("gpt")

    assert all("mask" not in key for key in model.state_dict())


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["model.name=gpt", "model.embedding=100", "model.heads=3"], ["model.embedding = 100", "model.heads = 3"]),
        (["model.name=lstm", "model.layers=1", "model.dropout=0.2"], ["model.dropout = 0.2", "model.layers = 1"]),
        (["model.name=gpt", "model.dropout=1"], ["model.dropout", "< 1"]),
        (["model.name=gpt", "model.heads=0"], ["model.heads", ">= 1"]),
    ],
)
def test_bad_sizes_are_config_errors_naming_keys_and_values(overrides: list[str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, overrides)

    for fragment in fragments:
        assert fragment in str(info.value)


def test_builders_check_sizes_and_shapes_themselves() -> None:
    with pytest.raises(ConfigError, match=r"model.embedding = 100, model.heads = 3"):
        build_model(ModelConfig(name="gpt", embedding=100, heads=3), (T,), V, seed=0)
    for name in NAMES:
        with pytest.raises(ConfigError, match=rf"model.name = '{name}' needs token sequences"):
            build_model(SMALL[name], (1, 28, 28), V, seed=0)
    with pytest.raises(ValueError, match="at most 8"):
        _model("gpt")(_tokens(1, seed=0, length=T + 1))


@pytest.mark.parametrize("name", NAMES)
def test_builtin_names_load(name: str) -> None:
    cfg = config.load(None, [f"model.name={name}"])

    assert cfg.model.name == name


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    """The model in Opacus' per-sample gradient module of ``mode``, as
    fedtrain's DP-SGD wraps it (batch first, summed loss)."""
    from opacus import GradSampleModule
    from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights

    if mode == "ew":
        return GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="sum")
    return GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:In CPU autocast")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_opacus_per_sample_gradients_match_one_record_at_a_time(name: str, mode: str) -> None:
    x, y = _tokens(3, seed=6), _tokens(3, seed=7)
    reference = _model(name)
    expected = []
    for i in range(len(x)):
        reference.zero_grad()
        _record_losses(reference(x[i : i + 1]), y[i : i + 1]).sum().backward()
        expected.append([p.grad.clone() for p in reference.parameters()])

    model = _model(name)
    wrapped = _wrap(model, mode)
    _record_losses(wrapped(x), y).sum().backward()

    for j, p in enumerate(model.parameters()):
        assert p.grad_sample is not None and p.grad_sample.shape == (len(x), *p.shape)
        for i in range(len(x)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_stacked_copies_matches_each_copy_alone(name: str) -> None:
    copies = [_model(name, seed=s) for s in range(4)]
    params, buffers = stack_module_state(copies)
    x, y = torch.stack([_tokens(2, seed=10 + s) for s in range(4)]), _tokens(2, seed=20)

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xs: torch.Tensor) -> torch.Tensor:
        return _record_losses(functional_call(copies[0], (p, b), (xs,)), y).sum()

    logits = vmap(lambda p, b, xs: functional_call(copies[0], (p, b), (xs,)))(params, buffers, x)
    grads = vmap(grad(loss))(params, buffers, x)

    for s, copy in enumerate(copies):
        torch.testing.assert_close(logits[s], copy(x[s]), rtol=1e-5, atol=1e-6)
        copy.zero_grad()
        _record_losses(copy(x[s]), y).sum().backward()
        for key, p in copy.named_parameters():
            torch.testing.assert_close(grads[key][s], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("cfg", "optimizer"),
    [
        (ModelConfig(name="gpt", layers=1, heads=2, embedding=32), "adam"),
        (ModelConfig(name="lstm", layers=1, lstm_embedding=8, lstm_hidden=32), "adam"),
        (ModelConfig(name="gpt", layers=1, heads=2, embedding=32), "sgd"),
    ],
    ids=["gpt-adam", "lstm-adam", "gpt-sgd"],
)
def test_training_on_repetitive_text_lowers_the_loss(cfg: ModelConfig, optimizer: str) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 20
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(ch) for ch in text])
    length, batch = 16, 16
    model = build_model(cfg, (length,), len(vocab), seed=0)
    opt = (
        torch.optim.Adam(model.parameters(), lr=1e-2)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        start = torch.randint(0, len(ids) - length - 1, (batch,), generator=gen)
        window = torch.stack([ids[s : s + length + 1] for s in start.tolist()])
        loss = _record_losses(model(window[:, :-1]), window[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    assert losses[0] > 0.9 * torch.log(torch.tensor(float(len(vocab)))).item()
    assert sum(losses[-10:]) / 10 < 0.3 * losses[0]
