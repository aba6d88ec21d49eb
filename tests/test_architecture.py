"""The package's shape: layers that import only downwards, one token chooser, a small top level, a typed API."""

from __future__ import annotations

import ast
from pathlib import Path

import gpt2lite

PACKAGE = Path(gpt2lite.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The gpt2lite modules ``path`` imports anywhere, inside functions and TYPE_CHECKING blocks too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in modules and name != "gpt2lite":
                found.add(name)
                break
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items() if name != "gpt2lite"}
    # Depth-first search for a back edge.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layers_import_only_downwards():
    # So models/ knows nothing of adapters, quantization or loading: those layers come after it.
    # Each layer may import the ones before it in this list (and itself), never those after it.
    order = ["errors", "io", "tokenizers", "models", "transforms", "generation", "loading", "training", "text",
             "serve", "cli"]
    modules = _modules()
    layer = {}
    for name in modules:
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in order:
            layer[name] = order.index(parts[1])
    for name, path in modules.items():
        if name not in layer:
            continue
        for dep in _imports(path, modules):
            if dep in layer:
                assert layer[dep] <= layer[name], f"{name} (layer {order[layer[name]]}) imports {dep}"


def test_the_server_chooses_no_tokens():
    # Token choice, penalties and log-probabilities belong to gpt2lite.generation; serve/ only schedules.
    for path in (PACKAGE / "serve").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for op in ("softmax", "topk", "argmax", "index_add", "multinomial", "choose_next", "LogitsProcessors"):
            assert op not in text, f"{path.name} uses {op}"


def test_top_level_is_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "cli.py"))
    assert len(top) <= 6, top


def test_public_api_is_declared_once_and_resolves():
    assert gpt2lite.__all__ == sorted(set(gpt2lite.__all__))
    for name in gpt2lite.__all__:
        value = getattr(gpt2lite, name)
        assert value is not None
        if callable(value):
            assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    assert (PACKAGE / "py.typed").is_file()
