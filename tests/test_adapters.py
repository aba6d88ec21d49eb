"""Many LoRA adapters per batch (transforms/adapters.py, the scheduler, the server): PEFT as the oracle per row."""

from __future__ import annotations

import threading

import peft
import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from gpt2lite import GPT2, GenerationOptions, TextGenerator, load_model
from gpt2lite.cli import main
from gpt2lite.serve.app import ServerOptions, create_app
from gpt2lite.serve.scheduler import Request, Scheduler, UnknownAdapter
from gpt2lite.transforms.adapters import LoraSlots, MultiLoraLinear
from gpt2lite.transforms.quantize import Int4Linear, Int8Linear

# Three adapters unlike each other: ranks, scales, targets (one leaves the attention alone).
ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "beta": dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
    "gamma": dict(r=8, lora_alpha=16, target_modules=["mlp.c_proj", "c_fc"]),
}
NAMES = ["alpha", None, "beta", "gamma", "alpha", None]  # a batch mixing them, and rows with none
IDS = torch.randint(0, 50257, (len(NAMES), 9), generator=torch.Generator().manual_seed(3))


def _hf_lm(directory):
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory):
    """The three adapters, made and saved by peft with random B (so that each changes the output)."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = peft.get_peft_model(_hf_lm(tiny_dir), peft.LoraConfig(init_lora_weights=False, **settings))
        model.save_pretrained(root / name)
    return {name: root / name for name in ADAPTERS}


def _peft_logits(base_dir, adapter_dirs, name, ids):
    """PEFT's logits for ``ids`` with adapter ``name`` (None: the base model) on transformers' GPT-2."""
    model = _hf_lm(base_dir)
    if name is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dirs[name]).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _slots(model, adapter_dirs):
    slots = LoraSlots(model, max_loras=3)
    for name, path in adapter_dirs.items():
        slots.add(name, slots.read(str(path)))
    return slots


def test_a_mixed_batch_gives_each_row_peft_logits_for_its_adapter(tiny_dir, adapter_dirs):
    model = GPT2.from_pretrained(tiny_dir).eval()
    slots = _slots(model, adapter_dirs)
    assert sum(isinstance(m, MultiLoraLinear) for m in model.modules()) == 2 * 4  # every target, once
    slots.route(NAMES)
    with torch.no_grad():
        got = model(IDS)
    base = _peft_logits(tiny_dir, adapter_dirs, None, IDS)
    for i, name in enumerate(NAMES):
        expected = _peft_logits(tiny_dir, adapter_dirs, name, IDS[i : i + 1])[0]
        torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=1e-4)
        if name is not None:
            assert float((expected - base[i]).abs().max()) > 0.05  # the adapter matters
    # One adapter for the whole batch takes the shorter path: the same numbers.
    slots.route(["beta"] * len(NAMES))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS)[2], got[2], atol=1e-5, rtol=1e-5)


def _dequantized_copy(quantized, tiny_dir, directory):
    """A float checkpoint holding the weights a quantized model stands for, for PEFT to run."""
    model = GPT2.from_pretrained(tiny_dir)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (Int8Linear, Int4Linear)):  # the layers and the tied embedding
                target = model.get_submodule(name.removesuffix(".base_layer"))
                target.weight.copy_(module.dequantize())
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_over_a_quantized_base_the_products_stay_float(tiny_dir, adapter_dirs, tmp_path, mode):
    model = load_model(tiny_dir, quantize=mode).eval()
    slots = _slots(model, adapter_dirs)
    assert isinstance(model.h[0].attn.c_attn.base_layer, Int8Linear if mode == "int8" else Int4Linear)
    assert all(m.lora_A.dtype == torch.float32 for m in model.modules() if isinstance(m, MultiLoraLinear))
    slots.route(NAMES)
    with torch.no_grad():
        got = model(IDS)
    # The oracle: PEFT over the float weights the quantized ones stand for. The kernels also round
    # the activations (to 8 bits; int4's to bfloat16), so each row is as far from it as a base row, not further.
    float_dir = _dequantized_copy(model, tiny_dir, tmp_path / "dequantized")
    base_error = max(float((got[i] - _peft_logits(float_dir, adapter_dirs, None, IDS[i : i + 1])[0]).abs().max())
                     for i, name in enumerate(NAMES) if name is None)
    for i, name in enumerate(NAMES):
        expected = _peft_logits(float_dir, adapter_dirs, name, IDS[i : i + 1])[0]
        error = float((got[i] - expected).abs().max())
        effect = float((expected - _peft_logits(float_dir, adapter_dirs, None, IDS[i : i + 1])[0]).abs().max())
        assert error < 2 * base_error + 1e-4, (name, error, base_error)
        if name is not None:
            assert effect > 10 * error, (name, effect, error)


def test_over_a_prepacked_base_rows_equal_peft(tiny_dir, adapter_dirs):
    model = load_model(tiny_dir, prepack=True).eval()
    slots = _slots(model, adapter_dirs)
    slots.route(NAMES)
    with torch.no_grad():
        got = model(IDS)
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(got[i], _peft_logits(tiny_dir, adapter_dirs, name, IDS[i : i + 1])[0],
                                   atol=1e-4, rtol=1e-4)


# The scheduler: rows of different adapters in one batch, against a server of each adapter alone ------------

PROMPTS = [[464, 3290, 318, 257], [15496, 11, 616, 1438, 318], [40, 588, 262], [1212, 318, 257, 1332]]


def _options(i):
    """Greedy for even rows, seeded sampling for odd ones: both must come out as the lone server's."""
    return GenerationOptions(max_new_tokens=8, ignore_eos=True, **({"temperature": 0} if i % 2 == 0 else {"seed": i}))


def _tokens(model, specs, adapters=None, max_batch=8):
    """Each (prompt, adapter name, options)'s tokens, all submitted at once to one scheduler (one batch)."""
    scheduler = Scheduler(model, max_batch=max_batch, adapters=adapters)
    out: list[list[int]] = [[] for _ in specs]
    ended = threading.Semaphore(0)
    requests = [Request(list(prompt), options, on_token=lambda t, lp, top, i=i: out[i].append(t),
                        on_done=lambda reason, error: ended.release(), adapter=name)
                for i, (prompt, name, options) in enumerate(specs)]
    try:
        scheduler.submit(requests)
        for _ in specs:
            assert ended.acquire(timeout=60)
    finally:
        scheduler.stop()
    return out, scheduler.stats


def _merged(tiny_dir, adapter_dirs, name):
    """The model a server started with this adapter alone serves: the adapter merged into the weights."""
    if name is None:
        return load_model(tiny_dir).eval()
    return load_model(tiny_dir, adapter=adapter_dirs[name], merge_adapter=True).eval()


def test_rows_of_three_adapters_and_the_base_decode_together_as_each_would_alone(tiny_dir, adapter_dirs):
    model = load_model(tiny_dir).eval()
    names = ["alpha", "beta", None, "gamma"] * 2
    specs = [(PROMPTS[(i + i // 4) % 4], name, _options(i)) for i, name in enumerate(names)]
    mixed, stats = _tokens(model, specs, _slots(model, adapter_dirs))
    assert stats.steps <= 9  # one batch: 8 rows of 8 tokens in 8 steps (+1 to see them end)
    for name in ("alpha", "beta", "gamma", None):
        mine = [i for i, (_, n, _) in enumerate(specs) if n == name]
        alone, _ = _tokens(_merged(tiny_dir, adapter_dirs, name), [(specs[i][0], None, specs[i][2]) for i in mine])
        assert [mixed[i] for i in mine] == alone, name
        if name is not None:  # and the adapter matters: the base model gives other tokens
            base, _ = _tokens(model, [(specs[i][0], None, specs[i][2]) for i in mine])
            assert base != alone, name


def test_the_prefix_cache_is_shared_only_within_an_adapter(tiny_dir, adapter_dirs):
    model = load_model(tiny_dir).eval()
    slots = _slots(model, adapter_dirs)
    prompt = PROMPTS[1] * 3
    cached = []
    tokens = []
    for name in ("alpha", "beta", "beta", None):  # one row: each request finds the one before in the cache
        out, stats = _tokens(model, [(prompt, name, _options(0))], slots, max_batch=1)
        cached.append(stats.cached_prompt_tokens)
        tokens.append(out[0])
    # Each call is a new scheduler: the cache is its own. Within one, the rows must not mix.
    scheduler = Scheduler(model, max_batch=1, adapters=slots)
    out: dict[int, list[int]] = {}
    try:
        for i, name in enumerate(("alpha", "beta", "beta", None)):
            ended = threading.Event()
            out[i] = []
            scheduler.submit(Request(prompt, _options(0), on_token=lambda t, lp, top, i=i: out[i].append(t),
                                     on_done=lambda reason, error, ended=ended: ended.set(), adapter=name))
            assert ended.wait(timeout=60)
            cached.append(scheduler.stats.cached_prompt_tokens)
    finally:
        scheduler.stop()
    assert cached[4:] == [0, 0, len(prompt) - 1, len(prompt) - 1]  # only beta after beta reused the row
    assert [out[i] for i in range(4)] == tokens  # and each got the tokens it gets with a cache of its own


def test_load_and_unload_while_other_rows_decode(tiny_dir, adapter_dirs):
    model = load_model(tiny_dir).eval()
    slots = LoraSlots(model, max_loras=2)
    slots.add("alpha", slots.read(str(adapter_dirs["alpha"])))
    beta = slots.read(str(adapter_dirs["beta"]))
    scheduler = Scheduler(model, max_batch=4, adapters=slots)
    long = GenerationOptions(max_new_tokens=40, temperature=0, ignore_eos=True)
    tokens: dict[str, list[int]] = {"alpha": [], "beta": [], "base": []}
    order: list[str] = []
    ended = threading.Semaphore(0)
    control = {}

    def done(name):
        def on_done(reason, error):
            order.append(f"{name} {reason}")
            ended.release()
        return on_done

    def on_alpha_token(token, logprob, top):  # the scheduler's thread, between its steps
        tokens["alpha"].append(token)
        if len(tokens["alpha"]) == 3:
            control["load"] = scheduler.load_adapter("beta", beta)
            control["unload"] = scheduler.unload_adapter("alpha")
            control["unload"].add_done_callback(lambda f: order.append("alpha unloaded"))
            with pytest.raises(UnknownAdapter):  # refused at once, while its running request goes on
                scheduler.submit(Request(PROMPTS[0], long, on_token=print, on_done=print, adapter="alpha"))
            control["names"] = scheduler.adapter_names
        if len(tokens["alpha"]) == 6:  # beta is loaded by now: its rows join alpha's batch
            control["loaded"] = control["load"].done()
            scheduler.submit([
                Request(PROMPTS[1], _options(0), on_token=lambda t, lp, top: tokens["beta"].append(t),
                        on_done=done("beta"), adapter="beta"),
                Request(PROMPTS[2], _options(0), on_token=lambda t, lp, top: tokens["base"].append(t),
                        on_done=done("base"))])

    try:
        scheduler.submit(Request(PROMPTS[0], long, on_token=on_alpha_token, on_done=done("alpha"), adapter="alpha"))
        for _ in range(3):
            assert ended.acquire(timeout=60)
        control["unload"].result(timeout=30)
    finally:
        scheduler.stop()
    assert control["names"] == [] and control["loaded"]
    assert order == ["beta length", "base length", "alpha length", "alpha unloaded"]  # the unload waited
    assert scheduler.adapter_names == ["beta"] and slots.slots == {"beta": 2}
    assert tokens["alpha"] == _tokens(_merged(tiny_dir, adapter_dirs, "alpha"), [(PROMPTS[0], None, long)])[0][0]
    assert tokens["beta"] == _tokens(_merged(tiny_dir, adapter_dirs, "beta"), [(PROMPTS[1], None, _options(0))])[0][0]
    assert tokens["base"] == _tokens(_merged(tiny_dir, adapter_dirs, None), [(PROMPTS[2], None, _options(0))])[0][0]


# The server: /v1/models, requests by adapter name, loading and unloading, errors --------------------------


def _completion(client, model, prompt="The cat sat on", key="k"):
    r = client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    return r


def test_the_server_serves_adapters_by_name_loads_and_unloads_them(tiny_dir, adapter_dirs, tmp_path):
    auth = {"Authorization": "Bearer k"}
    gen = TextGenerator.from_pretrained(tiny_dir)
    options = ServerOptions(model_name="tiny", api_key="k", loras=(("alpha", str(adapter_dirs["alpha"])),),
                            max_loras=2)
    alone = {}
    for name in ("alpha", "beta"):  # a server started with that adapter alone, merged
        merged = TextGenerator.from_pretrained(tiny_dir, adapter=adapter_dirs[name])
        with TestClient(create_app(merged.model, merged.tokenizer, ServerOptions(model_name="tiny", api_key="k"))) as c:
            alone[name] = _completion(c, "tiny").json()["choices"][0]["text"]
    with TestClient(create_app(gen.model, gen.tokenizer, options)) as client:
        models = client.get("/v1/models", headers=auth).json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("alpha", "tiny")]
        assert models[1]["root"] == str(adapter_dirs["alpha"])
        assert _completion(client, "alpha").json()["choices"][0]["text"] == alone["alpha"]
        base = _completion(client, "tiny").json()["choices"][0]["text"]
        assert base != alone["alpha"]

        def load(name, path, key="k"):
            return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                               headers={"Authorization": f"Bearer {key}"})

        assert load("beta", adapter_dirs["beta"], key="wrong").status_code == 401
        r = load("beta", adapter_dirs["beta"])
        assert r.status_code == 200 and "beta" in r.text
        assert client.get("/v1/models/beta", headers=auth).json()["parent"] == "tiny"
        assert _completion(client, "beta").json()["choices"][0]["text"] == alone["beta"]
        chat = client.post("/v1/chat/completions", headers=auth, json={
            "model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
        assert chat.status_code == 200 and chat.json()["model"] == "beta"
        for path, body in (("/v1/messages", {"model": "beta", "max_tokens": 4, "messages": [{"role": "user",
                                                                                          "content": "hi"}]}),
                           ("/v1/responses", {"model": "beta", "input": "hi", "max_output_tokens": 4})):
            assert client.post(path, headers=auth, json=body).status_code == 200, path  # the chat path's dialects

        def error(r, status, param):
            assert r.status_code == status, r.text
            assert r.json()["error"]["param"] == param, r.text
            return r.json()["error"]["message"]

        assert "max_loras" in error(load("gamma", adapter_dirs["gamma"]), 400, "lora_name")  # 2 slots, both taken
        assert "loaded already" in error(load("beta", adapter_dirs["beta"]), 400, "lora_name")
        error(load("tiny", adapter_dirs["gamma"]), 400, "lora_name")
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=auth)
        assert r.status_code == 200
        assert "alpha" not in [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]]
        error(_completion(client, "alpha"), 404, "model")
        error(client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=auth), 404, "lora_name")
        # A directory that is no adapter, and an adapter made for another model: 400s naming lora_path.
        assert "adapter_config.json" in error(load("gamma", tmp_path), 400, "lora_path")
        torch.manual_seed(0)
        other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16))
        peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "o")
        assert "the model needs" in error(load("gamma", tmp_path / "o"), 400, "lora_path")
        r = load("gamma", adapter_dirs["gamma"])  # the slot alpha freed
        assert r.status_code == 200
        assert client.post("/v1/completions", headers=auth, json={"model": "gamma", "prompt": "x", "max_tokens": 2}
                           ).status_code == 200


def test_serve_flags_name_a_bad_adapter_in_one_line(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--lora", "no-path"])
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_dir), "--port", "0", "--device", "cpu", "--no-playground",
                 "--lora", f"french={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpt2lite: error: the LoRA adapter 'french'") and "adapter_config.json" in err
    assert err.count("\n") == 1
