"""lm-evaluation-harness against the server: its `local-completions` model equals its own `hf` backend.

lm-eval scores multiple-choice and loglikelihood tasks through /v1/completions
(echo + logprobs over token-id prompts); the same checkpoint through lm-eval's
transformers backend is the oracle. Both run offline on a small task written here.
"""

from __future__ import annotations

import json
import shutil

import pytest

from gpt2lite import TextGenerator
from gpt2lite.serve.app import ServerOptions
from gpt2lite.tokenizers.files import bundled_gpt2_files

lm_eval = pytest.importorskip("lm_eval")

from test_serve import running, serve_app  # noqa: E402

QUESTIONS = [
    ("The keyword that defines a function in Python is", ["def", "func", "lambda", "fn"], 0),
    ("A list in Python is written between", ["square brackets", "braces", "quotes"], 0),
    ("The value of 2 + 2 is", ["4", "5", "22"], 0),
    ("Python's name for a missing value is", ["None", "null", "nil", "undefined"], 0),
    ("To leave a loop early, write", ["break", "stop", "exit loop"], 0),
    ("A dictionary maps keys to", ["values", "lists", "loops"], 0),
]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "Readability counts more than clever code",
    "Errors should never pass silently",
    "Now is better than never",
    "Simple is better than complex",
]


def _task(tmp_path, name, output_type, rows, **fields):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": output_type, "test_split": "test", "metadata": {"version": 1.0}, **fields}


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with GPT-2's tokenizer files beside it, as transformers wants them."""
    directory = tmp_path_factory.mktemp("lm-eval-model")
    shutil.copytree(tiny_dir, directory, dirs_exist_ok=True)
    encoder, merges = bundled_gpt2_files()
    shutil.copy(encoder, directory / "vocab.json")
    shutil.copy(merges, directory / "merges.txt")
    return directory


@pytest.mark.slow
def test_lm_eval_local_completions_equals_its_hf_backend(checkpoint, tmp_path):
    from lm_eval.tasks import TaskManager

    mc = _task(tmp_path, "py_mc", "multiple_choice",
               [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS],
               doc_to_text="{{question}}", doc_to_choice="{{choices}}", doc_to_target="label",
               metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    ll = _task(tmp_path, "py_ll", "loglikelihood", [{"text": s} for s in SENTENCES],
               doc_to_text="{{text.split(' ')[:-1]|join(' ')}}", doc_to_target="{{' '+text.split(' ')[-1]}}",
               metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc"}])
    tasks = [mc, ll]
    manager = TaskManager(include_defaults=False)
    app = serve_app(TextGenerator.from_pretrained(checkpoint), ServerOptions(model_name="tiny"))
    with running(app) as url:
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=tasks, task_manager=manager, log_samples=True,
            model_args={"model": "tiny", "base_url": url + "/v1/completions", "tokenizer": str(checkpoint),
                        "tokenizer_backend": "huggingface", "max_length": 96, "batch_size": 2})
    oracle = lm_eval.simple_evaluate(model="hf", tasks=tasks, task_manager=manager, log_samples=True, device="cpu",
                                     batch_size=2, model_args={"pretrained": str(checkpoint), "dtype": "float32"})
    for task, metric in (("py_mc", "acc,none"), ("py_mc", "acc_norm,none"), ("py_ll", "acc,none")):
        assert served["results"][task][metric] == oracle["results"][task][metric], (task, metric)
    assert served["results"]["py_ll"]["perplexity,none"] == pytest.approx(
        oracle["results"]["py_ll"]["perplexity,none"], rel=1e-4)
    for task in ("py_mc", "py_ll"):
        ours = sorted((s["doc_id"], s["arguments"], s["filtered_resps"]) for s in served["samples"][task])
        theirs = sorted((s["doc_id"], s["arguments"], s["filtered_resps"]) for s in oracle["samples"][task])
        for (_, _, a), (_, _, b) in zip(ours, theirs, strict=True):
            for (lp_a, greedy_a), (lp_b, greedy_b) in zip(a, b, strict=True):
                assert float(lp_a) == pytest.approx(float(lp_b), abs=1e-4)
                assert bool(greedy_a) == bool(greedy_b)


@pytest.mark.slow
def test_lm_eval_remote_tokenizer_rolling_perplexity_equals_its_hf_backend(checkpoint, tmp_path):
    """``tokenizer_backend=remote`` (/tokenize, /detokenize, /tokenizer_info) scores rolling perplexity as ``hf``.

    lm-eval takes its prefix token from ``/tokenize`` of the end token's text: read as text, it was ``<``.
    """
    from lm_eval.tasks import TaskManager

    rolling = _task(tmp_path, "py_rolling", "loglikelihood_rolling", [{"text": " ".join(SENTENCES[i:i + 3])}
                                                                      for i in range(3)],
                    doc_to_text="", doc_to_target="{{text}}",
                    metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                 {"metric": "bits_per_byte"}])
    manager = TaskManager(include_defaults=False)
    app = serve_app(TextGenerator.from_pretrained(checkpoint), ServerOptions(model_name="tiny"))
    with running(app) as url:
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=[rolling], task_manager=manager,
            model_args={"model": "tiny", "base_url": url + "/v1/completions", "tokenizer_backend": "remote",
                        "max_length": 32, "batch_size": 2})
    oracle = lm_eval.simple_evaluate(model="hf", tasks=[rolling], task_manager=manager, device="cpu", batch_size=2,
                                     model_args={"pretrained": str(checkpoint), "dtype": "float32",
                                                 "max_length": 32})
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert served["results"]["py_rolling"][metric] == pytest.approx(
            oracle["results"]["py_rolling"][metric], rel=1e-4), metric
