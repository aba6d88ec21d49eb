"""The README's examples and main command run as written, with "gpt2" standing for a local random checkpoint."""

from __future__ import annotations

import math
import re
import shlex
import shutil
from pathlib import Path

import pytest

from gpt2lite import GPT2, TokenData, Tokenizer
from gpt2lite.cli import main
from gpt2lite.training.objectives import evaluate_loss

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture
def gpt2_here(tiny_dir, tmp_path, monkeypatch):
    """A directory named "gpt2" in the working directory: a local path wins over the hub id."""
    shutil.copytree(tiny_dir, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_blocks_run(index, gpt2_here, capsys):
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def setup_line(start: str) -> str:
    """The line of the README's set-up block that starts with ``start``."""
    return next(line for line in blocks("bash")[0].splitlines() if line.startswith(start))


def test_readme_main_command_runs(gpt2_here, capsys):
    command = setup_line("pip install -e . &&").split("&&", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == "gpt2lite"
    assert main(argv[1:]) == 0
    assert len(capsys.readouterr().out) > 1


def test_readme_test_command_is_what_ci_runs():
    test_line = setup_line('pip install -e ".[test]"')
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert test_line in ci


def test_example_script_runs(tiny_dir, capsys):
    import importlib.util

    path = README.parent / "examples" / "generate_text.py"
    spec = importlib.util.spec_from_file_location("generate_text_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(tiny_dir))
    out = capsys.readouterr().out
    n = len(Tokenizer.gpt2().encode("One, two, three,"))
    assert f"logits shape: (2, {n}, 50257)" in out
    assert out.count("continued:") == 2


@pytest.mark.slow
def test_train_tiny_example_runs(tmp_path, capsys):
    import importlib.util

    path = README.parent / "examples" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    numbers = module.main(steps=12, out=str(tmp_path / "run"), progress=False, eval_batches=2)
    assert numbers["before"] > 10.0  # about ln(50257) = 10.8 for random weights
    assert numbers["after"] < numbers["before"] - 1.0
    # The saved model is the one that was evaluated: reloaded, the same held-out loss.
    reloaded = GPT2.from_pretrained(tmp_path / "run" / "final")
    held_out = evaluate_loss(reloaded, TokenData.open(tmp_path / "run" / "data"), block_size=128, batches=2,
                             batch_size=16)
    assert math.isclose(held_out, numbers["after"], rel_tol=1e-5)
    assert "sample from the saved checkpoint" in capsys.readouterr().out


def _example(name: str):
    import importlib.util

    path = README.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_generators_example_runs(tmp_path, capsys):
    rows = _example("compare_generators").main(steps=3, batch_size=2, block_size=16, width=16,
                                               out=str(tmp_path / "cmp"), plot=False)
    assert [r["model"] for r in rows] == ["RNN (tanh)", "LSTM", "GRU", "GPT-2 (2 layers)"]
    table = (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8")
    assert table.count("\n| ") == 6 and "held-out perplexity" in table  # header, rule, four models
    shown = capsys.readouterr()
    assert "training LSTM (2 of 4): 3 steps" in shown.out and "train: 100%" in shown.err  # progress, as it goes


def test_summarize_example_runs(tiny_dir, capsys):
    scores = _example("summarize").main(str(tiny_dir))
    assert set(scores) >= {"rouge1", "rouge2", "rougeL", "bleu"}
    assert all(0 <= scores[k] <= 1 for k in ("rouge1", "rouge2", "rougeL"))
    assert capsys.readouterr().out.count("reference:") == 3


@pytest.mark.slow
def test_classify_docs_example_beats_the_majority_baseline(tmp_path, capsys):
    numbers = _example("classify_docs").main(steps=60, out=str(tmp_path / "run"), progress=False)
    assert numbers["accuracy"] > numbers["baseline"] + 0.15, numbers
    assert "majority-class baseline" in capsys.readouterr().out


@pytest.mark.slow
def test_instruct_docs_example_learns_the_answers(tmp_path, capsys):
    numbers = _example("instruct_docs").main(pretrain_steps=30, sft_steps=20, out=str(tmp_path / "run"),
                                             progress=False, samples=2)
    assert numbers["best"] < numbers["first"] - 0.2, numbers  # the held-out answers' loss falls
    out = capsys.readouterr().out
    assert "held-out answer loss" in out and out.count("  before: ") == 2


@pytest.mark.slow
def test_quickstart_notebook_runs(tiny_dir, tmp_path):
    """The notebook, executed by a Jupyter kernel (nbclient), its parameter cell pointed at a local checkpoint."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(README.parent / "examples" / "quickstart.ipynb", as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = f"MODEL = {str(tiny_dir)!r}\nTRAIN_STEPS = 12\nOUT = {str(tmp_path / 'run')!r}"
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "".join(o.data.get("text/html", "") for o in outputs if "data" in o)
    assert html.count("<tr>") == 9  # the header and eight generated tokens
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the probability and loss plots
    text = "".join(o.get("text", "") for o in outputs)
    assert "validation loss:" in text
    # Jupyter's progress bar (a widget, with ipywidgets), not tqdm's warning and its text fallback.
    assert "IProgress not found" not in text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
