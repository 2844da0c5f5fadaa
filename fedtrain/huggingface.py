"""Hugging Face models from local folders, and LoRA through ``peft``.

``model.name = "hf:PATH"`` loads a ``transformers`` model from the local
folder PATH (what ``save_pretrained`` writes: ``config.json`` and the
weights); nothing is downloaded. The task picks the head:
``language_model`` → ``AutoModelForCausalLM``, ``classification`` on int64
token ids → ``AutoModelForSequenceClassification`` with ``num_classes``
labels. Token ids come from the data set as they are (Shakespeare's
character ids ``0 … num_classes − 1`` are used as the model's token ids) and
no tokenizer is loaded: no built-in data set is raw text. A language model's
vocabulary must hold the data's ``num_classes`` ids; :class:`HfLogits`
exposes only those first ``num_classes`` logits, so the next-token
distribution is over the data's vocabulary.

``model.lora.r > 0`` adapts any model — a Hugging Face one, a built-in or a
custom one — with LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models") through ``peft.get_peft_model``: only the adapters (and a
classification head) keep ``requires_grad``, so only they are federated
(:mod:`fedtrain.layout`). :func:`save_adapter` writes them in peft's format.

``transformers`` and ``peft`` are the ``llm`` extra; they are imported inside
the functions that need them, never with :mod:`fedtrain`.
"""

from __future__ import annotations

import enum
import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from fedtrain.config import HF_PREFIX, ConfigError, LoraConfig, ModelConfig

INSTALL_HINT = "pip install 'fedtrain[llm]'"

SAFE_LOADING = {"use_safetensors": True, "trust_remote_code": False}
"""A model folder is data: weights only from safetensors (a ``.bin``
checkpoint is a pickle, which can run code when read) and no Python file of
the folder is ever imported (``trust_remote_code``)."""


class HfHead(str, enum.Enum):
    """The ``transformers`` Auto class a built-in task needs, by ``task.name``."""

    CAUSAL_LM = "language_model"
    SEQUENCE_CLASSIFICATION = "classification"


EVALUATION_LOGITS_BYTES = 256 * 2**20
"""Without gradients (evaluation), a causal LM runs on at most as many
records at once as keep their full-vocabulary logits under this size: a
test batch of 1024 records × 80 positions × GPT-2's 50,257 tokens would
otherwise hold 16 GB of logits to keep the data's first few dozen."""


class HfLogits(nn.Module):
    """A Hugging Face model (or a peft model around one) that takes int64
    token ids ``(B, T)`` and returns a logits tensor: for a causal language
    model its first ``num_classes`` next-token logits ``(B, T, num_classes)``,
    for sequence classification ``(B, num_classes)``. Its one child is
    ``model``, so parameter names read ``model.<the Hugging Face name>``."""

    def __init__(self, model: nn.Module, num_classes: int, head: HfHead) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.head = head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype != torch.int64:
            raise TypeError(
                f"a Hugging Face model with task.name = {self.head.value!r} takes int64 token ids, "
                f"got {input_ids.dtype}"
            )
        if torch.is_grad_enabled() or self.head is not HfHead.CAUSAL_LM:
            return self._logits(input_ids)
        per_record = input_ids.shape[-1] * self.model.get_output_embeddings().weight.shape[0] * 4
        chunk = max(1, EVALUATION_LOGITS_BYTES // max(per_record, 1))
        return torch.cat([self._logits(part) for part in input_ids.split(chunk)])

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids).logits
        return logits[..., : self.num_classes] if self.head is HfHead.CAUSAL_LM else logits


def is_hf(name: str) -> bool:
    """Whether ``model.name`` names a Hugging Face model folder."""
    return name.startswith(HF_PREFIX)


def _require(package: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"{what} needs the {package!r} package: {INSTALL_HINT}") from None


def model_folder(name: str) -> Path:
    """The local folder of ``model.name = "hf:PATH"``; refused unless it
    holds a ``config.json``."""
    folder = Path(name[len(HF_PREFIX):]).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"model.name = {name!r}: {str(folder)!r} is not a folder; a Hugging Face model loads only from "
            "a local folder holding config.json and the weights (what save_pretrained writes)"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.name = {name!r}: {str(folder)!r} has no config.json; a Hugging Face model folder needs "
            "config.json and the weights (what save_pretrained writes)"
        )
    return folder


def head_for(task: str, name: str) -> HfHead:
    """The head ``task.name`` needs from the model ``model.name``; refused for
    any task but ``language_model`` and ``classification``."""
    try:
        return HfHead(task)
    except ValueError:
        raise ConfigError(
            f"model.name = {name!r} with task.name = {task!r}: a Hugging Face model serves "
            f"{' or '.join(repr(h.value) for h in HfHead)} only"
        ) from None


def load_hf_model(name: str, task: str, num_classes: int) -> HfLogits:
    """The model of ``model.name = "hf:PATH"`` for ``task.name``, in float32
    (``client.precision`` decides the arithmetic of training), loaded with
    ``local_files_only`` and :data:`SAFE_LOADING`. Call it under a seeded RNG: a head the checkpoint
    lacks (a new classifier) is initialised at random."""
    head = head_for(task, name)
    folder = model_folder(name)
    transformers = _require("transformers", f"model.name = {name!r}")
    try:
        if head is HfHead.CAUSAL_LM:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=torch.float32, **SAFE_LOADING
            )
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True, dtype=torch.float32, num_labels=num_classes, **SAFE_LOADING
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.name = {name!r}: transformers cannot load {str(folder)!r}: {exc}") from None
    if head is HfHead.CAUSAL_LM:
        vocabulary = model.get_output_embeddings().weight.shape[0]
        if vocabulary < num_classes:
            raise ConfigError(
                f"model.name = {name!r}: the model's vocabulary has {vocabulary} tokens, fewer than the data's "
                f"{num_classes} token ids; the data's ids are used as the model's token ids, so it needs "
                f">= {num_classes}"
            )
    elif model.config.pad_token_id is None:
        # Records are fixed-length and unpadded, so each record's last
        # position is its own; an id no token has says so to the model.
        model.config.pad_token_id = -1
    return HfLogits(model, num_classes, head)


def add_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """``model`` with LoRA adapters of rank ``lora.r`` on ``lora.target_modules``
    (for a Hugging Face model ``[]`` takes peft's default for its
    architecture; any other model must name its ``nn.Linear`` modules), the
    rest frozen. A Hugging Face model stays inside its :class:`HfLogits`; a
    sequence classifier's new head trains too (peft's ``SEQ_CLS``)."""
    peft = _require("peft", "model.lora.r > 0")
    task_type = None
    if isinstance(model, HfLogits):
        task_type = peft.TaskType.CAUSAL_LM if model.head is HfHead.CAUSAL_LM else peft.TaskType.SEQ_CLS
    elif not lora.target_modules:
        raise ConfigError(
            "model.lora.target_modules = []: peft knows default targets only for Hugging Face architectures; "
            "name the nn.Linear modules to adapt, e.g. ['query', 'value']"
        )
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or None,
        task_type=task_type,
    )
    try:
        if isinstance(model, HfLogits):
            model.model = peft.get_peft_model(model.model, config)
            return model
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"model.lora.target_modules = {list(lora.target_modules)}: peft refused them: {exc}"
        ) from None


def enable_grad_checkpointing_(model: nn.Module, name: str) -> None:
    """Recompute activations in the backward pass instead of storing them
    (``client.grad_checkpointing``); Hugging Face models only."""
    if not isinstance(model, HfLogits):
        raise ConfigError(
            f"client.grad_checkpointing = true with model.name = {name!r}: gradient checkpointing is for "
            "Hugging Face models (model.name = 'hf:PATH'); set it to false"
        )
    hf = model.model
    # transformers 5 renamed it; the old name warns there and is all 4.x has.
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
    enable()


def adapt_model(model: nn.Module, cfg: ModelConfig, grad_checkpointing: bool) -> nn.Module:
    """``model`` with gradient checkpointing (enabled before peft wraps the
    model, as peft expects) and LoRA as configured; call it under the model's
    seeded RNG (LoRA's ``A`` matrices are drawn at random). Under both, the
    embeddings' output is made to require grad, so that a checkpointed block
    whose own weights are frozen still passes gradients to its adapters."""
    if grad_checkpointing:
        enable_grad_checkpointing_(model, cfg.name)
    if cfg.lora.r > 0:
        model = add_lora(model, cfg.lora)
        if grad_checkpointing and isinstance(model, HfLogits):
            model.model.get_base_model().enable_input_require_grads()
    return model


def peft_model(model: nn.Module) -> nn.Module | None:
    """The peft model in ``model`` (itself, inside :class:`HfLogits`, or
    inside Opacus' ``GradSampleModule`` under ``_module``), or None. Without
    peft imported no peft model exists, so peft is not imported to look."""
    peft = sys.modules.get("peft")
    seen: object = model
    while isinstance(seen, nn.Module):
        if peft is not None and isinstance(seen, peft.PeftModel):
            return seen
        seen = seen.model if isinstance(seen, HfLogits) else getattr(seen, "_module", None)
    return None


def save_adapter(model: nn.Module, folder: Path) -> bool:
    """Write ``folder/"adapter"`` in peft's format (``save_pretrained``:
    ``adapter_config.json`` and the adapter weights) when ``model`` holds a
    peft model; returns whether it did. ``PeftModel.from_pretrained(base,
    folder / "adapter")`` puts the trained adapters on a fresh base model."""
    found = peft_model(model)
    if found is None:
        return False
    found.save_pretrained(Path(folder) / "adapter")
    return True
