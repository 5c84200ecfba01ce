"""The library's layers point one way (docs/architecture.md, rule 11).

Walks the `import` statements of every module under src/peftkit with `ast` (nothing is imported) and fails on:
- an import cycle between peftkit modules through module-level imports;
- an import inside a function that closes a cycle, unless it is listed in `LAZY_CYCLES` with the reason;
- a library module importing an application (`peftkit.train`, `peftkit.cli`, `peftkit.serve`), at any level.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"
APPS = ("peftkit.train", "peftkit.cli", "peftkit.serve", "peftkit.__main__")

# (importer, imported): imports inside a function that close a cycle, each with the reason it is there
LAZY_CYCLES = {
    ("peftkit.tuners.base", "peftkit.tuners.switching"): (
        "BaseTuner's HF-named switches (enable/disable_adapter_layers, set_requires_grad, targeted_module_names) "
        "delegate to switching.py, the one implementation shared with PeftModel and plain modules with injected "
        "layers; switching.py needs the AdapterLayer/BaseTuner types"
    ),
    ("peftkit.peft_model", "peftkit.task_models"): (
        "the old import path peftkit.peft_model.PeftModelForCausalLM (and pickles naming it) resolves through "
        "the module's __getattr__; task_models.py subclasses PeftModel, so it cannot be imported at the top"
    ),
    ("peftkit.peft_model", "peftkit.mixed_model"): (
        "get_peft_model(..., mixed=True) returns a PeftMixedModel (HF peft's signature), which builds on "
        "PeftModel's saving and loading; mixed_model.py is loaded only when a mixed model is asked for"
    ),
    ("peftkit.tuners.ia3", "peftkit.tuners.bnb_layers"): (
        "IA3Model.create_layer picks the bitsandbytes layer (a subclass of IA3Layer) only for a quantized "
        "target, so bitsandbytes-specific code loads only when a quantized base is seen"
    ),
}


def _is_app(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPS)


def _modules() -> dict[str, Path]:
    out = {}
    for file in SRC.rglob("*.py"):
        parts = list(file.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def _imports(module: str, file: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported peftkit module, at module level?) for every import in `file` (TYPE_CHECKING blocks skipped)."""
    package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top = False
        if isinstance(node, ast.Import):
            found.extend((a.name, top) for a in node.names if a.name.startswith("peftkit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("peftkit"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in known else target, top))
        for child in ast.iter_child_nodes(node):
            visit(child, top)

    visit(ast.parse(file.read_text(encoding="utf-8")), True)
    return [(m, top) for m, top in found if m in known and m != module]


def _graph(top_only: bool) -> dict[str, set[str]]:
    known = _modules()
    return {m: {t for t, top in _imports(m, f, known) if top or not top_only} for m, f in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_cycle_through_module_level_imports():
    assert _cycles(_graph(top_only=True)) == []


def test_every_function_level_import_closing_a_cycle_is_documented():
    graph = _graph(top_only=False)
    top = _graph(top_only=True)
    closing = {
        (a, b)
        for component in _cycles(graph)
        for a in component
        for b in graph[a] & component
        if b not in top[a]
    }
    undocumented = sorted(closing - set(LAZY_CYCLES))
    assert not undocumented, f"imports inside functions closing a cycle, not in LAZY_CYCLES: {undocumented}"
    stale = sorted(set(LAZY_CYCLES) - closing)
    assert not stale, f"LAZY_CYCLES entries that no longer close a cycle (remove them): {stale}"


def test_library_never_imports_the_apps():
    known = _modules()
    offenders = [
        (m, t) for m, f in known.items() if not _is_app(m) for t, _ in _imports(m, f, known) if _is_app(t)
    ]
    assert offenders == []


def test_the_walk_sees_imports():
    """The checks above would pass vacuously if the walk found nothing: it finds known edges of both kinds."""
    graph, top = _graph(top_only=False), _graph(top_only=True)
    assert "peftkit.config" in top["peftkit.tuners.base"]
    assert "peftkit.task_models" in graph["peftkit.peft_model"] - top["peftkit.peft_model"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
    assert _is_app("peftkit.train.loop") and not _is_app("peftkit.training_prep")
