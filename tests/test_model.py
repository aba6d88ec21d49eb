"""The model against transformers' GPT2LMHeadModel on the same random weights, loaded from every layout."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpt2lite import GPT2, CheckpointError, GPT2Config, ModelNotFoundError


def hf_logits(hf_model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits


def random_ids(shape, seed=0, vocab=50257):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def ours_124m(gpt2_124m_dir):
    return GPT2.from_pretrained(gpt2_124m_dir)


@pytest.mark.slow
def test_logits_equal_transformers_124m(ours_124m, hf_124m):
    ids = random_ids((2, 40))
    with torch.no_grad():
        ours = ours_124m(ids)
    assert ours.shape == (2, 40, 50257)
    assert max_diff(ours, hf_logits(hf_124m, ids)) < 1e-4


@pytest.mark.slow
def test_left_padded_batch_equals_transformers(ours_124m, hf_124m):
    ids = random_ids((3, 12), seed=1)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :11] = 0
    with torch.no_grad():
        ours = ours_124m(ids, attention_mask=mask)
    # transformers' forward counts positions from the mask only inside generate(); give them here.
    theirs = hf_logits(hf_124m, ids, mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    real = mask.bool()
    assert not ours.isnan().any()
    assert max_diff(ours[real], theirs[real]) < 1e-4


@pytest.mark.parametrize("layout", ["directory", "bare_file", "save_pretrained", "sharded"])
def test_layouts_tiny(layout, tiny_dir, hf_tiny, tmp_path):
    if layout == "directory":
        source = tiny_dir
    elif layout == "bare_file":
        source = tiny_dir / "model.safetensors"
    elif layout == "save_pretrained":
        source = tmp_path / "hf"
        hf_tiny.save_pretrained(source)
    else:
        source = tmp_path / "sharded"
        hf_tiny.save_pretrained(source, max_shard_size="1MB")
        assert (source / "model.safetensors.index.json").exists()
    model = GPT2.from_pretrained(source)
    if layout == "bare_file":
        # n_head is not in any shape: give the config when it is not GPT-2's head width of 64.
        model = GPT2.from_pretrained(source, config=GPT2Config.from_json_file(tiny_dir / "config.json"))
    ids = random_ids((2, 17), seed=2)
    with torch.no_grad():
        assert max_diff(model(ids), hf_logits(hf_tiny, ids)) < 1e-4


@pytest.mark.slow
def test_bare_file_infers_config(gpt2_124m_dir):
    model = GPT2.from_pretrained(gpt2_124m_dir / "model.safetensors", device="meta")
    assert model.config == GPT2Config.from_preset("gpt2")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_half_precision(dtype, tol, tiny_dir, hf_tiny):
    model = GPT2.from_pretrained(tiny_dir, dtype=dtype)
    assert model.dtype == dtype
    ids = random_ids((2, 20), seed=3)
    with torch.no_grad():
        ours = model(ids)
    assert ours.dtype == dtype
    assert max_diff(ours, hf_logits(hf_tiny, ids)) < tol


@pytest.mark.slow
def test_tied_head_is_one_tensor(ours_124m):
    names = [n for n, _ in ours_124m.named_parameters()]
    assert not any("lm_head" in n for n in names)
    assert ours_124m.num_parameters() == 124_439_808  # GPT-2 small, as published


@pytest.mark.slow
def test_kv_cache_matches_full_forward(ours_124m):
    ids = random_ids((2, 24), seed=4)
    cache = ours_124m.new_state(2, 24)
    with torch.no_grad():
        full = ours_124m(ids)
        step = [ours_124m.feed(ids[:, :10], cache, last_only=False)]
        step += [ours_124m.feed(ids[:, t : t + 1], cache) for t in range(10, 24)]
    assert cache.lengths.tolist() == [24, 24]
    assert max_diff(torch.cat(step, dim=1), full) < 1e-4


def test_save_pretrained_roundtrip(tiny_dir, hf_tiny, tmp_path):
    model = GPT2.from_pretrained(tiny_dir)
    out = model.save_pretrained(tmp_path / "saved")
    stored = load_file(out / "model.safetensors")
    published = load_file(tiny_dir / "model.safetensors")
    assert stored.keys() == {k for k in published if not re.fullmatch(r"h\.\d+\.attn\.bias", k)}
    for key, t in stored.items():
        assert torch.equal(t, published[key]), key
    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = random_ids((1, 30), seed=5)
    with torch.no_grad():
        assert max_diff(GPT2.from_pretrained(out)(ids), hf_logits(hf_tiny, ids)) < 1e-4
        assert max_diff(hf_logits(reloaded_hf, ids), hf_logits(hf_tiny, ids)) < 1e-6


def test_load_skips_random_init(tiny_dir, monkeypatch):
    """Loading builds the model on the meta device and adopts the file's tensors: no init, no second copy."""

    def fail(*args, **kwargs):
        raise AssertionError("random initialisation ran during from_pretrained")

    monkeypatch.setattr(GPT2, "_init_weights", staticmethod(fail))
    model = GPT2.from_pretrained(tiny_dir)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.training


# errors ----------------------------------------------------------------------------


def test_missing_directory_and_hub_offline(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        GPT2.from_pretrained(tmp_path / "nope" / "x")
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        GPT2.from_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        GPT2.from_pretrained("gpt2", cache_dir=tmp_path / "cache", local_files_only=True)


def test_hub_cache_path(tiny_dir, hf_tiny, tmp_path):
    """A repo already in the huggingface_hub cache loads through the real hub code, offline."""
    commit = "1" * 40
    repo = tmp_path / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    model = GPT2.from_pretrained("someone/tiny-gpt2", cache_dir=tmp_path, local_files_only=True)
    ids = random_ids((1, 8), seed=6)
    with torch.no_grad():
        assert max_diff(model(ids), hf_logits(hf_tiny, ids)) < 1e-4


def _rewrite(tiny_dir, tmp_path, edit):
    d = tmp_path / "edited"
    shutil.copytree(tiny_dir, d)
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    d = _rewrite(tiny_dir, tmp_path, lambda t: t.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['h\.1\.mlp\.c_fc\.bias'\]"):
        GPT2.from_pretrained(d)


def test_misshapen_tensor_names_both_shapes(tiny_dir, tmp_path):
    def edit(t):
        t["h.0.attn.c_attn.weight"] = t["h.0.attn.c_attn.weight"].t().contiguous()

    d = _rewrite(tiny_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight.*\(192, 64\).*\(64, 192\)"):
        GPT2.from_pretrained(d)


def test_unknown_tensor_is_an_error(tiny_dir, tmp_path):
    d = _rewrite(tiny_dir, tmp_path, lambda t: t.update({"h.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        GPT2.from_pretrained(d)


def test_untied_lm_head_is_an_error(tiny_dir, tmp_path):
    d = _rewrite(tiny_dir, tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["wte.weight"])}))
    with pytest.raises(CheckpointError, match="ties the LM head"):
        GPT2.from_pretrained(d)


def test_bad_config(tiny_dir, tmp_path):
    d = tmp_path / "cfg"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPT2.from_pretrained(d)
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=64, n_head=5)
    with pytest.raises(ValueError, match="unknown dtype"):
        GPT2.from_pretrained(tiny_dir, dtype="int4")


def test_forward_input_errors(tiny_dir):
    model = GPT2.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="50257"):
        model(torch.tensor([[1, 50257]]))
    with pytest.raises(ValueError, match="context of 96"):
        model(torch.zeros(1, 97, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
