"""The README's Chinese path, run as written: a tiny GPT-2 trained on Chinese text with a BERT vocab.txt alone and
with --char, then generation, streaming, chat and the server; transformers' AutoTokenizer is the oracle for the saved
vocabularies, the text itself (no space between Chinese characters) for what comes out. Then the rest of a user's
first day: a served run's name, what --compile says."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import httpx
import pytest
import transformers

from gpt2lite import TextGenerator
from gpt2lite.cli import main
from gpt2lite.serve.app import ServerOptions
from test_serve import running, serve_app

README = Path(__file__).resolve().parent.parent / "README.md"
# Hand-written sentences, no spaces (Chinese is written without them).
CORPUS = ("春天来了，花开了，小鸟在树上唱歌。我们一起去公园散步，看见很多人在放风筝。"
          "夏天很热，孩子们喜欢在河里游泳。秋天的树叶变黄了，农民忙着收庄稼。冬天下雪了，大家在院子里堆雪人。")
UNSEEN = "龘"  # in neither vocabulary: the BERT one reads it as [UNK], the character one refuses it
SPACED = re.compile(r"[\u4e00-\u9fff] +[\u4e00-\u9fff]")  # a space between two Chinese characters
FAST = ["--steps", "3", "--batch-size", "2", "--block-size", "32", "--warmup-steps", "1", "--eval-interval", "3",
        "--save-interval", "3", "--device", "cpu"]


def cli(argv: list[str]) -> tuple[int, str, str]:
    """The command's exit status, stdout and stderr (captured here: the servers below log to pytest's own capture)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def readme_commands() -> list[list[str]]:
    """The commands of the README's Chinese block, as argument lists without the program name."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
                 if "zh-char" in b)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("gpt2lite ")]


@pytest.mark.slow
def test_the_readme_chinese_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("文章.txt").write_text((CORPUS + "\n") * 40, encoding="utf-8")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(CORPUS)), "##天", "##了"]
    Path("bert-base-chinese").mkdir()
    Path("bert-base-chinese/vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    commands = {args[0] + ("-char" if "--char" in args else ""): args for args in readme_commands()}
    for name in ("finetune", "finetune-char"):
        assert cli([*commands[name], *FAST])[0] == 0, name
    generate = commands["generate"]
    status, printed, _ = cli([*generate, "--seed", "0"])
    assert status == 0 and printed.strip() and not SPACED.search(printed)
    assert cli([*generate[:1], UNSEEN, *generate[2:], "--max-new-tokens", "3"])[0] == 0  # [UNK], not an error

    for run, unseen_ok in (("runs/zh-bert", True), ("runs/zh-char", False)):
        final = Path(run, "final")
        gen = TextGenerator.from_pretrained(final)
        # transformers reads the saved vocabulary with the same ids.
        theirs = transformers.AutoTokenizer.from_pretrained(final)
        assert theirs(CORPUS, add_special_tokens=False)["input_ids"] == gen.tokenizer.encode(CORPUS)
        text = gen("春天来了", max_new_tokens=30, seed=0, ignore_eos=True)
        assert len(text) > 5 and not SPACED.search(text), text
        assert "".join(gen.stream("春天来了", max_new_tokens=30, seed=0, ignore_eos=True)) == text
        reply = gen.chat([{"role": "user", "content": "春天来了"}], max_new_tokens=10, seed=0)
        assert isinstance(reply, str) and not SPACED.search(reply)
        card = (final / "README.md").read_text(encoding="utf-8")
        assert "print(gen('春天来了，花开了" in card and str(tmp_path) not in card
        with running(serve_app(gen, ServerOptions(model_name="zh"))) as url:
            for path, body in (("/v1/completions", {"prompt": "春天来了{}", "max_tokens": 8}),
                               ("/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "春天来了{}"}], "max_tokens": 8})):
                for extra in ("", UNSEEN):
                    sent = {k: (v.format(extra) if isinstance(v, str) else
                                [{**m, "content": m["content"].format(extra)} for m in v] if k == "messages" else v)
                            for k, v in body.items()}
                    r = httpx.post(url + path, json={"model": "zh", "seed": 0, **sent}, timeout=60)
                    if extra and not unseen_ok:
                        assert r.status_code == 400 and UNSEEN in r.json()["error"]["message"], (run, path, r.text)
                        continue
                    assert r.status_code == 200, (run, path, r.text)
                    choice = r.json()["choices"][0]
                    out = choice["text"] if "text" in choice else choice["message"]["content"]
                    assert not SPACED.search(out), (run, path, out)
    status, _, err = cli(["generate", UNSEEN, "--model", "runs/zh-char/final", "--max-new-tokens", "3"])
    assert status == 1 and f"'{UNSEEN}'" in err and err.count("\n") == 1
    # The README's evaluate line on Chinese: sacrebleu's zh words.
    Path("generated.txt").write_text("春天来了，花开了。\n", encoding="utf-8")
    Path("reference.txt").write_text("春天到了，花都开了。\n", encoding="utf-8")
    status, printed, _ = cli(commands["evaluate"])
    assert status == 0 and "tokenize: zh" in printed


# the rest of a user's first day ---------------------------------------------------------------------------------


def test_a_served_training_run_is_named_after_its_run_folder(tmp_path):
    from gpt2lite.cli.serve import _served_name

    run = tmp_path / "zh-char"
    for folder in ("final", "best"):
        (run / folder).mkdir(parents=True)
    assert _served_name(str(run / "final")) == "final"  # no run.json: any folder called final keeps its name
    (run / "run.json").write_text("{}")
    assert _served_name(str(run / "final")) == "zh-char" and _served_name(str(run / "best")) == "zh-char-best"
    assert _served_name(str(run)) == "zh-char" and _served_name("gpt2") == "gpt2"


def test_generate_with_compile_says_it_is_compiling(tiny_dir, monkeypatch):
    monkeypatch.setattr(TextGenerator, "stream", lambda self, *args, **kwargs: iter(["text"]))  # no real compile
    status, out, err = cli(["generate", "Hello", "--model", str(tiny_dir), "--compile", "--max-new-tokens", "2"])
    assert status == 0 and out == "text\n" and "compiling the decode step" in err
    assert "compiling" not in cli(["generate", "Hello", "--model", str(tiny_dir), "--max-new-tokens", "2"])[2]
