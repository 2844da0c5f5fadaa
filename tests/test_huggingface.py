"""Hugging Face models from local folders and LoRA through peft: a tiny
GPT-2 built from its config with random weights and saved to a temporary
folder, loaded as ``hf:PATH``, adapted with LoRA, trained federated on a
Shakespeare-shaped folder of plays (with and without DP), its adapter
reloaded by peft; and Opacus' per-sample gradients of the LoRA weights
checked against autograd record by record (Opacus issue #820)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtrain import config
from fedtrain.config import ConfigError, GradSampleMode, LoraConfig, ModelConfig
from fedtrain.huggingface import HfLogits, save_adapter
from fedtrain.models import build_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
T = 16


def _gpt2_config() -> "transformers.GPT2Config":
    return transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with random weights, saved as transformers saves a model."""
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    torch.manual_seed(7)
    transformers.GPT2LMHeadModel(_gpt2_config()).save_pretrained(folder)
    return folder


def _play(names: tuple[str, ...] = ("HOR", "BER", "FRAN"), lines: int = 40) -> str:
    """A play in the Gutenberg layout whose roles speak enough for a client each."""
    out = ["THE LONG TEST", "", "PERSONS REPRESENTED.", "", "Horatio.", "", "ACT I.", "", "Scene I. A room.", ""]
    for i in range(lines):
        for name in names:
            out += [f"{name.title()}.", f"Speech {i} of {name}, and what a speech it is, my lord!", ""]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def plays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plays")
    (folder / "long_gut.txt").write_text(_play(), encoding="utf-8")
    return folder


def _hf(folder: Path) -> ModelConfig:
    return ModelConfig(name=f"hf:{folder}")


# --- loading ---------------------------------------------------------------


def test_a_local_causal_lm_keeps_the_data_ids_and_exposes_only_their_logits(gpt2: Path) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = build_model(_hf(gpt2), (T,), 40, seed=0, task="language_model")
    after = torch.get_rng_state()
    x = torch.randint(0, 40, (3, T))

    with torch.no_grad():
        got = model(x)
        raw = transformers.GPT2LMHeadModel.from_pretrained(gpt2, local_files_only=True)(input_ids=x).logits

    assert torch.equal(after, before)
    assert isinstance(model, HfLogits) and got.shape == (3, T, 40)
    torch.testing.assert_close(got, raw[..., :40], rtol=0, atol=0)
    assert "model.transformer.h.0.attn.c_attn.weight" in dict(model.named_parameters())


def test_sequence_classification_on_token_ids_and_other_tasks_refused(gpt2: Path) -> None:
    model = build_model(_hf(gpt2), (T,), 5, seed=0, task="classification")

    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (4, T)))
    with pytest.raises(TypeError, match="takes int64 token ids, got torch.float32"):
        model(torch.zeros(4, T))
    with pytest.raises(ConfigError, match=r"task.name = 'regression': a Hugging Face model serves 'language_model'"):
        build_model(_hf(gpt2), (T,), 1, seed=0, task="regression")

    assert logits.shape == (4, 5)
    adapted = build_model(ModelConfig(name=f"hf:{gpt2}", lora=LoraConfig(r=2)), (T,), 5, seed=0, task="classification")
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert any(".score." in n for n in trainable) and any(".lora_A." in n for n in trainable)
    a = build_model(_hf(gpt2), (T,), 5, seed=3, task="classification").state_dict()
    b = build_model(_hf(gpt2), (T,), 5, seed=3, task="classification").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the new head is drawn from the seed


def test_missing_folders_small_vocabularies_and_misplaced_options_are_refused(gpt2: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.name = 'hf:.*nowhere'.*is not a folder.*config.json"):
        build_model(_hf(tmp_path / "nowhere"), (T,), 40, seed=0, task="language_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.name = 'hf:.*empty'.*has no config.json"):
        build_model(_hf(tmp_path / "empty"), (T,), 40, seed=0, task="language_model")
    with pytest.raises(ConfigError, match=rf"vocabulary has {VOCAB} tokens, fewer than the data's 200 token ids"):
        build_model(_hf(gpt2), (T,), 200, seed=0, task="language_model")
    with pytest.raises(ConfigError, match=r"model.lora.target_modules = \[\]: .*name the nn.Linear modules"):
        build_model(ModelConfig(name="mlp", lora=LoraConfig(r=4)), (64,), 10, seed=0)
    with pytest.raises(ConfigError, match=r"model.lora.target_modules = \['nope'\]: peft refused them"):
        build_model(ModelConfig(name="mlp", lora=LoraConfig(r=4, target_modules=["nope"])), (64,), 10, seed=0)
    with pytest.raises(ConfigError, match=r"client.grad_checkpointing = true with model.name = 'mlp'"):
        build_model(ModelConfig(name="mlp"), (64,), 10, seed=0, grad_checkpointing=True)


def test_without_the_llm_extra_the_message_names_the_install(gpt2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it imports

    with pytest.raises(ConfigError, match=r"needs the 'transformers' package: pip install 'fedtrain\[llm\]'"):
        build_model(_hf(gpt2), (T,), 40, seed=0, task="language_model")


def test_importing_fedtrain_imports_neither_transformers_nor_peft() -> None:
    code = ("import sys, fedtrain, fedtrain.models, fedtrain.run; "
            "print('transformers' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.split() == ["False", "False"]


# --- LoRA ------------------------------------------------------------------


def test_lora_on_a_built_in_model_freezes_all_but_the_adapters() -> None:
    lora = LoraConfig(r=2, target_modules=["query", "value"])
    cfg = ModelConfig(name="gpt", layers=1, heads=2, embedding=16, lora=lora)

    model = build_model(cfg, (T,), 12, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"query", "value"}
    assert model(torch.randint(0, 12, (2, T))).shape == (2, T, 12)


def _lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from fedtrain.training.task import LanguageModel

    return LanguageModel().summed_loss(model(x[:, :-1]), x[:, 1:])


def _lora_gpt2(gpt2: Path, grad_checkpointing: bool = False) -> torch.nn.Module:
    cfg = ModelConfig(name=f"hf:{gpt2}", lora=LoraConfig(r=4, target_modules=["c_attn"]))
    model = build_model(cfg, (T,), 40, seed=0, task="language_model", grad_checkpointing=grad_checkpointing)
    with torch.no_grad():  # B = 0 would make every gradient of A zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(gpt2: Path) -> None:
    x = torch.randint(0, 40, (3, T + 1), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = _lora_gpt2(gpt2, checkpointing)
        _lm_loss(model, x).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})

    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        assert grads[1][name] is not None and float(grads[0][name].abs().max()) > 0
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
    from fedtrain.privacy.dpsgd import make_private_model

    with pytest.raises(ConfigError, match=r"client.grad_checkpointing = true with privacy.mode = 'sample'"):
        make_private_model(model, fix=False)


@pytest.mark.parametrize("mode", [GradSampleMode.HOOKS, GradSampleMode.EW, GradSampleMode.FUNCTORCH])
def test_opacus_per_sample_gradients_of_lora_equal_autograd_per_record(gpt2: Path, mode: GradSampleMode) -> None:
    """Opacus issue #820 reports PEFT versions whose LoRA per-sample gradients
    are silently wrong: each record's gradient of every A and B matrix must
    be the one autograd gives for that record alone."""
    from fedtrain.privacy.dpsgd import _wrap, choose_mode, make_private_model

    model = make_private_model(_lora_gpt2(gpt2), fix=False)
    x = torch.randint(0, 40, (4, T + 1), generator=torch.Generator().manual_seed(2))
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 4 and all("lora_" in n for n in lora)

    want = []
    for record in x:
        model.zero_grad()
        _lm_loss(model, record[None]).backward()
        want.append({n: p.grad.clone() for n, p in lora.items()})
    model.zero_grad()
    wrapped = _wrap(model, mode)
    _lm_loss(wrapped, x).backward()
    got = {n: p.grad_sample.clone() for n, p in lora.items()}
    if hasattr(wrapped, "remove_hooks"):
        wrapped.remove_hooks()

    for n in lora:
        assert got[n].shape == (len(x), *lora[n].shape)
        for i in range(len(x)):
            torch.testing.assert_close(got[n][i], want[i][n], rtol=1e-4, atol=1e-6)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(getattr(p, "grad_sample", None) is None and p.grad is None for p in frozen)
    assert choose_mode(model, GradSampleMode.AUTO, x[:2, :-1]) is not GradSampleMode.AUTO


# --- federated runs --------------------------------------------------------


def _run_config(gpt2: Path, plays: Path, extra: list[str]) -> config.Config:
    return config.load(None, [
        "data.dataset=shakespeare", f"data.root={json.dumps(str(plays))}", f"data.seq_len={T}",
        "data.partition=natural", "data.num_clients=3", "strategy.clients_per_round=3",
        "task.name=language_model", f"model.name={json.dumps('hf:' + str(gpt2))}", "model.lora.r=4",
        "client.optimizer=adam", "client.lr=0.01", "client.batch_size=16", "run.rounds=3", *extra,
    ])


def _frozen_initial(cfg: config.Config, num_classes: int) -> dict[str, torch.Tensor]:
    model = build_model(cfg.model, (T,), num_classes, cfg.run.seed, cfg.task.name)
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _check_run(cfg: config.Config, run: Path, num_classes: int) -> dict[str, torch.Tensor]:
    """The run's ``model.pt``, after checking that its frozen base is the initial one exactly."""
    state = torch.load(run / "model.pt", weights_only=True)
    frozen = _frozen_initial(cfg, num_classes)
    assert len(frozen) > 10
    for name, tensor in frozen.items():
        assert torch.equal(state[name], tensor), name
    return state


def test_a_federated_lora_run_trains_only_the_adapters_and_writes_them(gpt2: Path, plays: Path, tmp_path: Path) -> None:
    from fedtrain.data import load_dataset
    from fedtrain.simulation import simulate

    cfg = _run_config(gpt2, plays, [])
    num_classes = load_dataset(cfg.data, 0).num_classes

    result = simulate(cfg, tmp_path / "run", plot=lambda *a: None)

    total = sum(t.numel() for t in _frozen_initial(cfg, num_classes).values()) + result.layout.numel
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_trainable_parameters"] == result.layout.numel <= 0.10 * total
    assert summary["num_parameters"] == total
    assert all(".lora_A." in n or ".lora_B." in n for n in result.layout.names)
    rows = [r.as_json() for r in result.records]
    assert rows[-1]["loss"] < rows[0]["loss"]
    state = _check_run(cfg, tmp_path / "run", num_classes)
    assert any("lora_B" in n and float(state[n].abs().max()) > 0 for n in state)  # B starts at zero

    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    base = transformers.AutoModelForCausalLM.from_pretrained(gpt2, local_files_only=True)
    loaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    trained = build_model(cfg.model, (T,), num_classes, cfg.run.seed, cfg.task.name)
    trained.load_state_dict(state)
    x = torch.randint(0, num_classes, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits[..., :num_classes], trained.eval()(x), rtol=0, atol=1e-6)


def test_save_adapter_finds_peft_inside_opacus_and_skips_other_models(gpt2: Path, tmp_path: Path) -> None:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(_lora_gpt2(gpt2), batch_first=True, loss_reduction="sum")

    assert save_adapter(wrapped, tmp_path / "a") and (tmp_path / "a" / "adapter" / "adapter_config.json").is_file()
    assert not save_adapter(build_model(_hf(gpt2), (T,), 40, seed=0, task="language_model"), tmp_path / "b")
    assert not (tmp_path / "b").exists()
    wrapped.remove_hooks()


@pytest.mark.parametrize("privacy", [
    ["privacy.mode=user", "privacy.noise_multiplier=0.1", "privacy.clip=1.0"],
    ["privacy.mode=sample", "privacy.noise_multiplier=0.3", "privacy.max_grad_norm=1.0",
     "privacy.grad_sample_mode=auto"],
], ids=["user", "sample"])
def test_private_lora_runs_leave_the_frozen_base_untouched(
    gpt2: Path, plays: Path, tmp_path: Path, privacy: list[str]
) -> None:
    from fedtrain.data import load_dataset
    from fedtrain.simulation import simulate

    cfg = _run_config(gpt2, plays, ["run.rounds=2", *privacy])
    num_classes = load_dataset(cfg.data, 0).num_classes

    result = simulate(cfg, tmp_path / "run", plot=lambda *a: None)

    assert all(r.num_failed == 0 and r.num_clients == 3 for r in result.records)
    assert result.summary.epsilon is not None and result.summary.epsilon > 0
    state = _check_run(cfg, tmp_path / "run", num_classes)
    assert torch.isfinite(torch.cat([state[n].reshape(-1) for n in result.layout.names])).all()


def test_a_folder_whose_weights_are_a_pickle_is_refused(gpt2: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((gpt2 / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2, local_files_only=True)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")

    with pytest.raises(ConfigError, match="cannot load"):
        build_model(_hf(pickled), (T,), 40, seed=0, task="language_model")


def test_evaluation_without_gradients_runs_in_chunks_with_the_same_logits(gpt2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtrain.huggingface as hf

    model = build_model(_hf(gpt2), (T,), 40, seed=0, task="language_model").eval()
    x = torch.randint(0, 40, (7, T))
    with torch.no_grad():
        whole = model(x)
        calls = []
        inner = model.model.forward
        monkeypatch.setattr(model.model, "forward", lambda **kw: calls.append(len(kw["input_ids"])) or inner(**kw))
        monkeypatch.setattr(hf, "EVALUATION_LOGITS_BYTES", 3 * T * model.model.get_output_embeddings().weight.shape[0] * 4)
        chunked = model(x)
    assert calls == [3, 3, 1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
