"""LoRA adapters: PEFT on transformers' GPT-2 as the oracle, both ways; training, merging, memory, the CLI."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpt2lite import (
    GPT2,
    GPT2ForSequenceClassification,
    LoraConfig,
    TextGenerator,
    TrainConfig,
    add_lora,
    load_model,
    merge_lora,
    prepare_data,
    save_model,
    train,
)
from gpt2lite.cli import main
from gpt2lite.errors import CheckpointError
from gpt2lite.transforms.lora import LoraLinear, has_lora

IDS = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(0))


def _randomize_b(model):
    """B starts at zero (the adapter is a no-op); give it values so that a wrong key or scale shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)


def _hf_lm(directory):
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


def test_our_adapter_loads_in_peft_with_equal_logits(tiny_dir, tmp_path):
    model = GPT2.from_pretrained(tiny_dir)
    add_lora(model, LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=("c_attn", "c_proj", "c_fc")))
    _randomize_b(model)
    model.eval()
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_dir)
    theirs = peft.PeftModel.from_pretrained(_hf_lm(tiny_dir), tmp_path).eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(model(IDS), expected, atol=1e-4, rtol=1e-4)
        # ... the adapter directory alone finds its base; merged weights give the same logits.
        again = load_model(tmp_path)
        torch.testing.assert_close(again(IDS), expected, atol=1e-4, rtol=1e-4)
        merged = merge_lora(again)
        assert not has_lora(merged)
        torch.testing.assert_close(merged(IDS), expected, atol=1e-4, rtol=1e-4)


def test_peft_adapter_loads_here_with_equal_logits(tiny_dir, tmp_path):
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["c_attn", "mlp.c_proj"], use_rslora=True,
                             init_lora_weights=False)  # random B, so the adapter changes the output
    theirs = peft.get_peft_model(_hf_lm(tiny_dir), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_model(tiny_dir, adapter=tmp_path)
    assert isinstance(ours.h[0].mlp.c_proj, LoraLinear) and not isinstance(ours.h[0].attn.c_proj, LoraLinear)
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        assert float((expected - GPT2.from_pretrained(tiny_dir)(IDS)).abs().max()) > 1e-2  # the adapter matters
        torch.testing.assert_close(ours(IDS), expected, atol=1e-4, rtol=1e-4)


def test_classifier_adapters_go_both_ways(tiny_dir, tmp_path):
    ours = GPT2ForSequenceClassification.from_pretrained(tiny_dir, labels=["a", "b", "c"])
    add_lora(ours, LoraConfig(r=2, target_modules=("c_attn", "c_fc")))
    _randomize_b(ours)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    save_model(ours.eval(), tmp_path / "ours")
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=3, pad_token_id=50256)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
        back = load_model(tmp_path / "ours", kind="classifier")  # labels travel with it
        assert back.labels == ("a", "b", "c")
        torch.testing.assert_close(back(IDS), ours(IDS))
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=2, pad_token_id=50256)
    made = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"], task_type="SEQ_CLS",
                                                   init_lora_weights=False)).eval()
    made.save_pretrained(tmp_path / "peft")
    loaded = load_model(tiny_dir, kind="classifier", labels=["no", "yes"], adapter=tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), made(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)


def test_saved_module_names_the_model_lacks_are_ignored_as_peft_does(tiny_dir, tmp_path):
    """peft lists every architecture's head names for SEQ_CLS; only those the model has (and holds) count."""
    ours = GPT2ForSequenceClassification.from_pretrained(tiny_dir, labels=["a", "b"])
    add_lora(ours, LoraConfig(r=2, target_modules=("c_attn",)))
    _randomize_b(ours)
    save_model(ours.eval(), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["modules_to_save"] = ["classifier", "score", "pre_classifier"]  # as peft 0.22 writes for SEQ_CLS
    config_path.write_text(json.dumps(config))
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=2, pad_token_id=50256)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    back = load_model(tiny_dir, kind="classifier", labels=["a", "b"], adapter=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
    # A listed module the model has, other than the head, is still refused by name ...
    config["modules_to_save"] = ["score", "ln_f"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"saves whole modules \['ln_f'\]"):
        load_model(tiny_dir, kind="classifier", labels=["a", "b"], adapter=tmp_path)
    # ... and so is one the model lacks when the weights file holds its tensors.
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights["base_model.model.pre_classifier.weight"] = torch.zeros(2, 2)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    config["modules_to_save"] = ["score", "pre_classifier"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"saves whole modules \['pre_classifier'\]"):
        load_model(tiny_dir, kind="classifier", labels=["a", "b"], adapter=tmp_path)


def test_unsupported_peft_options_are_refused(tiny_dir, tmp_path):
    theirs = peft.get_peft_model(_hf_lm(tiny_dir), peft.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="use_dora"):
        load_model(tiny_dir, adapter=tmp_path)
    with pytest.raises(ValueError, match=r"no linear layer of the model matches the LoRA targets \['q_proj'\]"):
        add_lora(GPT2.from_pretrained(tiny_dir), LoraConfig(target_modules=("q_proj",)))


def test_lora_quantize_and_prepack_work_on_any_model_with_linear_layers():
    """One walk over linear layers (by type, not GPT-2's names): PEFT on the same plain module is the oracle."""
    from gpt2lite import prepack, quantize

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Sequential(
            torch.nn.Linear(32, 32), torch.nn.GELU()), torch.nn.Linear(32, 8)).eval()

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    ours = add_lora(mlp(), LoraConfig(r=2, lora_alpha=4, target_modules=("0", "2.0")))
    _randomize_b(ours)
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2.0"])).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # the same adapter weights on both
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                p.copy_(dict(ours.named_parameters())[key])
        torch.testing.assert_close(ours(x), theirs(x))
        assert float((ours(x) - mlp()(x)).abs().max()) > 1e-3  # the adapters matter
        float_out = mlp()(x)
        for transform in (lambda m: quantize(m, "int8"), prepack):
            changed = transform(mlp())
            assert not any(type(m) is torch.nn.Linear for m in changed.modules())  # every layer was replaced
            torch.testing.assert_close(changed(x), float_out, atol=0.05, rtol=0.05)


@pytest.mark.slow
def test_lora_training_changes_only_the_adapters(tiny_dir, tmp_path):
    model = GPT2.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(r=4, target_modules=("c_attn", "c_fc")))
    data = prepare_data(["A few sentences of English text to fine-tune on. " * 100], tmp_path / "data")
    result = train(model, data, tmp_path / "run", TrainConfig(steps=3, batch_size=2, block_size=32, lr=1e-2,
                                                               warmup_steps=0, progress=False))
    state = model.state_dict()
    for key, value in before.items():
        now = state.get(key, state.get(key.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")))
        assert torch.equal(now, value), key
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(_hf_lm(tiny_dir), result.final_dir).eval()
    with torch.no_grad():  # the trained adapter, in peft on transformers' GPT-2
        torch.testing.assert_close(theirs(input_ids=IDS).logits, model.eval()(IDS), atol=1e-4, rtol=1e-4)
    gen = TextGenerator.from_pretrained(result.final_dir)  # the base comes from adapter_config.json
    assert not has_lora(gen.model)  # merged for generation
    with torch.no_grad():
        torch.testing.assert_close(gen.model(IDS), model.eval()(IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lora_keeps_optimizer_state_under_two_percent_on_124m(gpt2_124m_dir, tmp_path):
    model = GPT2.from_pretrained(gpt2_124m_dir)
    full = model.num_parameters()
    add_lora(model, LoraConfig(r=8, target_modules=("c_attn",)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = prepare_data(["Some text for one optimizer step. " * 60], tmp_path / "data")
    train(model, data, tmp_path / "run", TrainConfig(steps=1, batch_size=1, block_size=16, progress=False))
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    optimizer_numbers = sum(t.numel() for s in saved["optimizer"]["state"].values() for t in s.values()
                            if t.dim() > 0)
    assert optimizer_numbers == 2 * trainable  # AdamW's two moments, for the adapters only
    assert trainable / full < 0.02 and optimizer_numbers / (2 * full) < 0.02


@pytest.mark.slow
def test_freezing_blocks_and_gradient_checkpointing(tiny_dir, tmp_path):
    data = prepare_data(["Plain text for a couple of steps of training. " * 100], tmp_path / "data")
    config = dict(steps=2, batch_size=2, block_size=32, lr=1e-2, warmup_steps=0, progress=False)
    losses = {}
    for checkpointing in (False, True):
        model = GPT2.from_pretrained(tiny_dir)
        result = train(model, data, tmp_path / f"run{checkpointing}",
                       TrainConfig(**config, gradient_checkpointing=checkpointing))
        losses[checkpointing] = result.losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    model = GPT2.from_pretrained(tiny_dir)
    first = {k: v.clone() for k, v in model.h[0].state_dict().items()}
    last = {k: v.clone() for k, v in model.h[1].state_dict().items()}
    train(model, data, tmp_path / "frozen", TrainConfig(**config, freeze_blocks=1))
    assert all(torch.equal(v, model.h[0].state_dict()[k]) for k, v in first.items())
    assert not all(torch.equal(v, model.h[1].state_dict()[k]) for k, v in last.items())
    with pytest.raises(ValueError, match="freeze_blocks=3 but the model has 2 blocks"):
        train(GPT2.from_pretrained(tiny_dir), data, tmp_path / "x", TrainConfig(**config, freeze_blocks=3))


@pytest.mark.slow
def test_cli_lora_finetune_then_generate(tiny_dir, tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text("Some English text to adapt the model to. " * 150, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_dir), "--data", str(text), "--out", str(out), "--steps", "2",
                 "--lora-rank", "4", "--lora-targets", "c_attn,c_proj", "--block-size", "32", "--device", "cpu"]) == 0
    assert "LoRA adapter" in capsys.readouterr().out
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["c_attn", "c_proj"]
    assert main(["generate", "Hello", "--model", str(out / "final"), "--device", "cpu", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert main(["generate", "Hello", "--model", str(tiny_dir), "--adapter", str(out / "final"), "--device", "cpu",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert main(["finetune", "--preset", "tiny", "--data", str(text), "--out", str(tmp_path / "x"),
                 "--lora-rank", "4"]) == 1
    assert "--lora-rank adapts a trained model" in capsys.readouterr().err
