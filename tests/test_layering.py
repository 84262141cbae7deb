"""The package's layers: every import of a package module points down this order, with no function-local
import of a package module (those are how a cycle gets hidden). Local imports of slow or optional third-party
modules (torch.distributed.tensor, transformers, fla, matplotlib) stay allowed.

Checked twice: statically (the ``ast`` of every module, so a violation inside a rarely run function is
caught), and dynamically in fresh interpreters (importing the library pulls in no program module and not
``torch.distributed.tensor``)."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

PACKAGE = "torch_lightning_cache"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Bottom first. A module may import only modules listed before it (a package's __init__ is listed where
# its facade belongs: the top-level one re-exports the library, below the programs).
LAYERS = [
    "_C",  # the compiled operator library
    "ops",
    "sharding",
    "cache",
    "paging",  # page allocator of a paged K|V pool (plain Python, model-agnostic)
    "models",
    "models.hybrid",
    "models.tensor_parallel",
    "integrations",
    "integrations.transformers",
    "",  # torch_lightning_cache/__init__.py: the public API
    "cli",
    "cli.common",
    "cli.engine",
    "cli.baselines",
    "cli.bench",
    "cli.serve",
    "cli.tensor_parallel",
    "cli.demo",
    "__main__",
]
COMPILED = {"_C"}
LIBRARY = ["ops", "sharding", "cache", "models.hybrid", ""]  # what `import torch_lightning_cache` loads
PROGRAMS = [m for m in LAYERS if m == "cli" or m.startswith("cli.") or m == "__main__"]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(imported package module relative to the package, line, at module level) for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    base_parts = here if is_package else here[:-1]
    top_level = {id(node) for node in tree.body}
    # Statements directly under a module-level `if`/`try` still run at import time.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(child) for child in ast.walk(node) if isinstance(child, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base_parts[:len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                module = ".".join(parent + (node.module.split(".") if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                module = node.module[len(PACKAGE) + 1:]
            else:
                continue
            # `from . import ops` imports the submodule `ops`; `from .cache import X` imports `cache`.
            for alias in node.names:
                sub = f"{module}.{alias.name}" if module else alias.name
                targets.append(sub if sub in _sources() or sub in COMPILED else module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    targets.append(alias.name[len(PACKAGE) + 1:])
        for target in targets:
            found.append((target, node.lineno, id(node) in top_level))
    return found


def test_every_module_has_a_layer():
    assert sorted(_sources()) == sorted(m for m in LAYERS if m not in COMPILED), \
        "add new modules to LAYERS (in the layer they belong to)"


@pytest.mark.parametrize("name", [m for m in LAYERS if m not in COMPILED])
def test_imports_point_down(name):
    path = _sources()[name]
    rank = LAYERS.index(name)
    for target, line, at_module_level in _imports(name, path):
        shown = f"{PACKAGE}.{target}" if target else PACKAGE
        assert at_module_level, (f"{path.name}:{line} imports {shown} inside a function or class: package "
                                 "modules are imported at module level (a local import hides a cycle)")
        assert target in LAYERS, f"{path.name}:{line} imports {shown}, which has no layer"
        assert LAYERS.index(target) < rank, \
            f"{path.name}:{line}: {PACKAGE}.{name or '__init__'} imports {shown}, which is not below it"


def _fresh_imports(modules: list[str]) -> list[set[str]]:
    """For each module, the modules loaded by importing it alone in a new interpreter (run side by side)."""
    code = "import sys, importlib; importlib.import_module(sys.argv[1]); print('\\n'.join(sorted(sys.modules)))"
    runs = [subprocess.Popen([sys.executable, "-c", code, m], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT.parent) for m in modules]
    loaded = []
    for module, run in zip(modules, runs):
        out, err = run.communicate()
        assert run.returncode == 0, f"importing {module} alone failed:\n{err}"
        loaded.append(set(out.split()))
    return loaded


def test_the_library_loads_no_program_and_no_dtensor():
    """`import torch_lightning_cache` (what a model does) loads the library layers only, and not the
    one-second import of torch.distributed.tensor."""
    (loaded,) = _fresh_imports([PACKAGE])
    programs = sorted(m for m in loaded if m == f"{PACKAGE}.cli" or m.startswith(f"{PACKAGE}.cli.")
                      or m == f"{PACKAGE}.__main__")
    assert not programs, f"importing the library loaded program modules: {programs}"
    assert "torch.distributed.tensor" not in loaded
    for name in LIBRARY:
        assert (f"{PACKAGE}.{name}" if name else PACKAGE) in loaded


def test_the_command_line_loads_in_layer_order():
    """Each program module imports cleanly on its own in a fresh interpreter (no cycle that only a particular
    import order resolves)."""
    optional = ["integrations.transformers"] if importlib.util.find_spec("transformers") else []  # needs transformers
    _fresh_imports([f"{PACKAGE}.{name}" for name in PROGRAMS + ["models.tensor_parallel"] + optional])
