"""The package's shape: imports run one way (tokenizer -> data -> training -> entry points, the
model on its own), no import cycle anywhere, files of a readable size, a quiet start, and the
composed run config inside every checkpoint."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tinyreason

PACKAGE = Path(tinyreason.__file__).resolve().parent
# `python -m` commands: they may import anything; nothing may import them
ENTRY_POINTS = {
    "tinyreason.train",
    "tinyreason.evaluate",
    "tinyreason.generate",
    "tinyreason.export",
    "tinyreason.prepare",
    "tinyreason.bench.__main__",
    "tinyreason.tokenizer.__main__",
}
# what each layer may import (prefixes of module names); the rest of the package is off limits
ALLOWED = {
    "tinyreason.model": ("tinyreason.model",),
    "tinyreason.tokenizer": ("tinyreason.tokenizer",),
    "tinyreason.data": ("tinyreason.data", "tinyreason.tokenizer"),
    "tinyreason.compose": (),
}
LIBRARY = (
    "tinyreason.sampling",
    "tinyreason.speculative",
    "tinyreason.evaluation",
    "tinyreason.checkpoints",
)
MAX_LINES = 450
DATA_TABLES = {"tinyreason/data/templates.py"}  # word tables, not logic


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, modules: set[str]) -> set[str]:
    """Every tinyreason module `path` imports, at any depth (imports inside functions count: they
    run too), except under `if TYPE_CHECKING:`; `from a import b` is module a.b when one exists,
    and importing a module from outside its package imports the package's `__init__` first."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # drop TYPE_CHECKING blocks
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if not target.startswith("tinyreason"):
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                inside = name == prefix or name.startswith(prefix + ".")
                if prefix in modules and (i == len(parts) or not inside):
                    found.add(prefix)
    found.discard(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, root, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_walker_sees_a_cycle():
    """The check can fail: two modules importing each other inside functions are a cycle."""
    graph = {
        "tinyreason.a": {"tinyreason.b"},
        "tinyreason.b": {"tinyreason.a"},
        "tinyreason.c": set(),
    }
    assert cycles(graph) == [["tinyreason.a", "tinyreason.b"]]


def test_imports_run_one_way():
    graph = import_graph(PACKAGE)
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            if target in ENTRY_POINTS and module not in ENTRY_POINTS:
                wrong.append(f"{module} imports the entry point {target}")
            if module.startswith(LIBRARY) and target.startswith("tinyreason.training"):
                wrong.append(f"{module} (library) imports {target}")
            for layer, allowed in ALLOWED.items():
                in_layer = module == layer or module.startswith(layer + ".")
                if in_layer and module not in ENTRY_POINTS and not target.startswith(allowed):
                    wrong.append(f"{module} ({layer}) imports {target}")
    assert wrong == []


def test_files_stay_readable():
    long = {
        str(f.relative_to(PACKAGE.parent)): n
        for f in PACKAGE.rglob("*.py")
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in long.items() if k not in DATA_TABLES} == {}


def test_fp8_recipe_names_match_the_kernels():
    """precision.py names the torchao recipes without importing fp8.py (and so torchao)."""
    from tinyreason.training import fp8
    from tinyreason.training.precision import RECIPES

    assert RECIPES["fp8"] == fp8.TORCHAO_RECIPES
    assert (*RECIPES["fp8"], *RECIPES["fp8_blockwise"]) == fp8.RECIPES


def test_debug_run_starts_quietly_and_stores_its_config_in_every_checkpoint(cache_dir, tmp_path):
    """`python -m tinyreason.train debug=fast`: no torchao / pytree / Lightning-tip lines, no
    torchao imported at all; every checkpoint holds the composed config, equal to the saved
    `.hydra/config.yaml` resolved (the config that ran)."""
    from conftest import run_train_cli

    run = tmp_path / "run"
    proc = run_train_cli(
        "debug=fast", "logger=none", "export.hf=false", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for noise in ("torchao", "Failed to load", "LeafSpec", "litlogger", "KernelPreference"):
        assert noise not in output, noise
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    saved.run_dir = str(run)  # `${hydra:runtime.output_dir}` resolves only inside the app
    saved = OmegaConf.to_container(saved, resolve=True)
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) >= 2
    for ckpt in ckpts:
        stored = torch.load(ckpt, map_location="cpu", weights_only=True)["run_config"]
        assert stored == saved, ckpt.name


@pytest.mark.parametrize("root", [PACKAGE])
def test_every_module_is_in_the_graph(root):
    graph = import_graph(root)
    assert (
        "tinyreason.tokenizer.special" in graph and graph["tinyreason.tokenizer.special"] == set()
    )
    assert "tinyreason.model.flops" in graph["tinyreason.training.callbacks"]
