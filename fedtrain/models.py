"""Small reference models, and any ``torch.nn.Module`` factory by name.

A model factory takes ``(input_shape, num_classes)`` and returns a module that
maps a batch of shape ``(B, *input_shape)`` to ``(B, num_classes)`` logits.
The language models (``gpt``, ``lstm``) take ``input_shape = (T,)`` and the
vocabulary size ``V`` as ``num_classes``: they map int64 token ids ``(B, T)``
to next-token logits ``(B, T, V)`` at every position. Hugging Face models
(``hf:PATH``) and LoRA come from :mod:`fedtrain.huggingface`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fedtrain.config import ConfigError, ModelConfig
from fedtrain.huggingface import adapt_model, is_hf, load_hf_model
from fedtrain.plugin import load_object

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """Two-layer perceptron on the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) == 3:
        c, h, w = input_shape
        return c, h, w
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        return 1, side, side
    raise ConfigError(
        f"model.name = 'cnn' needs images (C, H, W) or square flat inputs; got input shape {input_shape}"
    )


def cnn(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """Two 3×3 conv blocks and a linear head. GroupNorm rather than BatchNorm, so
    the model works with per-sample DP-SGD and needs no federated running stats."""
    c, h, w = _image_shape(input_shape)
    return nn.Sequential(
        nn.Unflatten(1, (c, h, w)) if len(input_shape) == 1 else nn.Identity(),
        nn.Conv2d(c, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.MaxPool2d(2) if min(h, w) >= 4 else nn.Identity(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _sequence_length(name: str, input_shape: tuple[int, ...], num_classes: int) -> int:
    if len(input_shape) != 1 or input_shape[0] < 1:
        raise ConfigError(
            f"model.name = {name!r} needs token sequences: input shape (T,) with T >= 1; got {input_shape}"
        )
    if num_classes < 1:
        raise ConfigError(f"model.name = {name!r} needs a vocabulary of >= 1 tokens; got {num_classes}")
    return input_shape[0]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as in GPT-2 (nanoGPT's
    ``CausalSelfAttention``), written out from four ``nn.Linear`` layers with an
    explicit mask and softmax rather than ``F.scaled_dot_product_attention``:
    Opacus computes per-sample gradients of ``nn.Linear`` in every mode, and
    ``torch.func.vmap`` has batching rules for each op, so both the DP-SGD
    engine and the batched (vmapped) client engine can take the model."""

    def __init__(self, embedding: int, heads: int, block_size: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(embedding, embedding)
        self.key = nn.Linear(embedding, embedding)
        self.value = nn.Linear(embedding, embedding)
        self.proj = nn.Linear(embedding, embedding)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        # Not persistent: a constant, so no part of the federated state.
        mask = torch.ones(block_size, block_size, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            layer(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for layer in (self.query, self.key, self.value)
        )
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (self.attn_dropout(att) @ v).transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """A pre-norm transformer block (GPT-2): ``x + attn(ln(x))``, then
    ``x + mlp(ln(x))`` with a 4× wide GELU MLP."""

    def __init__(self, embedding: int, heads: int, block_size: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(embedding)
        self.attn = CausalSelfAttention(embedding, heads, block_size, dropout)
        self.ln_2 = nn.LayerNorm(embedding)
        self.mlp = nn.Sequential(
            nn.Linear(embedding, 4 * embedding),
            nn.GELU(),
            nn.Linear(4 * embedding, embedding),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A small causal transformer language model, GPT-2's architecture at
    nanoGPT's scale (Radford et al. 2019; Karpathy's nanoGPT): token and
    position embeddings, ``layers`` pre-norm blocks, a final LayerNorm and a
    linear head over the vocabulary.

    The head is not tied to the token embedding: the batched engine stacks
    and vmaps each parameter on its own, which a shared tensor would break.
    Dropout > 0 is random, so vmap needs ``randomness="different"`` then.
    """

    def __init__(
        self, vocab_size: int, block_size: int, layers: int, heads: int, embedding: int, dropout: float
    ) -> None:
        super().__init__()
        if embedding % heads:
            raise ConfigError(
                f"model.embedding = {embedding}, model.heads = {heads}: "
                "the embedding must split evenly into the heads"
            )
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, embedding)
        self.wpe = nn.Embedding(block_size, embedding)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embedding, heads, block_size, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(embedding)
        self.head = nn.Linear(embedding, vocab_size, bias=False)
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the
        # projections that write into the residual stream scaled down by
        # 1/sqrt(2·layers), so its variance stays put as blocks are added.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for residual in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(residual.weight, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence of length {t}: the model was built for at most {self.block_size}")
        # Positions per record (B, T), not one (T,) row: Opacus' per-sample
        # gradient of an embedding needs the batch dimension in its input.
        positions = torch.arange(t, device=idx.device).expand(b, t)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(
    input_shape: tuple[int, ...],
    num_classes: int,
    layers: int = 2,
    heads: int = 4,
    embedding: int = 128,
    dropout: float = 0.0,
) -> GPT:
    """:class:`GPT` over sequences of ``input_shape = (T,)`` tokens (its block
    size) from a vocabulary of ``num_classes`` tokens."""
    block_size = _sequence_length("gpt", input_shape, num_classes)
    return GPT(num_classes, block_size, layers, heads, embedding, dropout)


class LSTMLanguageModel(nn.Module):
    """LEAF's reference next-character model for Shakespeare (Caldas et al.
    2018, "LEAF: A Benchmark for Federated Settings"): an 8-dimensional
    embedding, two LSTM layers of 256 units and a linear head over the
    vocabulary, here at every position.

    The LSTM is Opacus' ``DPLSTM``: ``nn.LSTM`` runs as one fused op that
    Opacus' validator rejects for DP-SGD and whose per-sample gradients only
    the ``ew`` mode computes (slowly, by vmap's fallback); ``DPLSTM`` is the
    same recurrence from ``nn.Linear`` cells, which every Opacus mode and
    ``torch.func.vmap`` take. Its parameter names match ``nn.LSTM``'s.
    Opacus is imported here, when the model is built, not with this module.
    """

    def __init__(self, vocab_size: int, embedding: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        from opacus.layers import DPLSTM

        self.embed = nn.Embedding(vocab_size, embedding)
        self.lstm = DPLSTM(embedding, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)


def lstm(
    input_shape: tuple[int, ...],
    num_classes: int,
    embedding: int = 8,
    hidden: int = 256,
    layers: int = 2,
    dropout: float = 0.0,
) -> LSTMLanguageModel:
    """:class:`LSTMLanguageModel` over token sequences ``input_shape = (T,)``
    from a vocabulary of ``num_classes`` tokens (any T works: no block size)."""
    _sequence_length("lstm", input_shape, num_classes)
    if dropout and layers == 1:
        raise ConfigError(
            f"model.dropout = {dropout} with model.layers = 1: the LSTM drops out only between layers"
        )
    return LSTMLanguageModel(num_classes, embedding, hidden, layers, dropout)


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    task: str = "classification",
    grad_checkpointing: bool = False,
) -> nn.Module:
    """The configured model, initialised from ``seed`` without touching the
    global torch RNG of the caller. ``task`` (``task.name``) picks a Hugging
    Face model's head; LoRA (``model.lora``) and ``grad_checkpointing``
    (``client.grad_checkpointing``) are applied by :mod:`fedtrain.huggingface`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_hf(cfg.name):
            model = load_hf_model(cfg.name, task, num_classes)
        elif cfg.name == "mlp":
            model = mlp(input_shape, num_classes, cfg.hidden)
        elif cfg.name == "cnn":
            model = cnn(input_shape, num_classes, cfg.hidden)
        elif cfg.name == "gpt":
            model = gpt(input_shape, num_classes, cfg.layers, cfg.heads, cfg.embedding, cfg.dropout)
        elif cfg.name == "lstm":
            model = lstm(input_shape, num_classes, cfg.lstm_embedding, cfg.lstm_hidden, cfg.layers, cfg.dropout)
        else:
            factory = load_object(cfg.name, "model function", "model.name", call_with=("input_shape", "num_classes"))
            model = factory(input_shape, num_classes)
        if isinstance(model, nn.Module) and (cfg.lora.r > 0 or grad_checkpointing):
            model = adapt_model(model, cfg, grad_checkpointing)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name = {cfg.name!r}: the factory returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model
