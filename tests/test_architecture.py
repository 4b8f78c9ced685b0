"""The import graph points one way, down the layers of ARCHITECTURE.md; no cycles; function-local
imports only where an import is heavy or optional; one copy of each shared helper."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env

PACKAGE = REPO / "rosa_ds"

# Layer of every module, top (0) to bottom; a module may import its own layer or lower ones.
LAYERS = {
    0: ["cli", "env_report", "plan", "export", "sweep"],  # the face: commands
    1: ["train", "evaluate", "telemetry", "generate"],  # the loop, evaluation, generation
    2: ["methods"],  # one class per method
    3: [
        "engine",
        "model",
        "adapted_model",
        "preflight",
        "data",
        "checkpoint",
        "reshard",
        "ds_config",
    ],
    4: ["adapters"],  # the adapter layer, masks, resampling
    5: ["quant"],  # frozen weights: the interface, 4-bit storage
    6: [  # kernels and helpers that know no model
        "kernels",
        "zero_params",
        "dist",
        "config",
        "errors",
        "targets",
        "weight_files",
        "atomic",
        "schedule",
        "precision",
        "numerics",
        "faults",
        "tracking",
        "watchdog",
        "preemption",
        "startup",
        "ladder",
        "__init__",
    ],
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
# Packages a function may import locally: heavy to import, or optional extras.
HEAVY_OR_OPTIONAL = {
    "deepspeed",
    "transformers",
    "triton",
    "bitsandbytes",
    "datasets",
    "mpi4py",
    "accelerate",
    "tokenizers",
    "peft",
    "matplotlib",
    "mlflow",  # optional trackers
    "wandb",
    "torch",  # only in the modules the command line loads before it knows the command
    "torch.utils.tensorboard",  # optional: metrics go to JSONL without it
    "torch.utils.cpp_extension",  # loads setuptools (0.1 s): only where a kernel is built
}
# rosa_ds modules that wrap an optional package, imported where they are first needed
OPTIONAL_MODULES = {"rosa_ds.kernels.triton_sparse"}
# The modules ``rosa_ds.cli`` loads for every command, even --help: they must not import torch
# at their top, so their local imports may name torch and any rosa_ds module.
LIGHT = {"cli", "config", "errors", "plan", "dist", "precision", "env_report", "ds_config",
         "sweep"}  # fmt: skip


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        out[".".join(rel.parts)] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, bool, int]]:
    """(imported module, at the top of the file?, line) for every import statement."""
    found = []
    typing_only = {  # ``if TYPE_CHECKING:`` imports at the top: for annotations, never run
        id(n)
        for block in tree.body
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for n in block.body
    }
    for node in ast.walk(tree):
        top = node in tree.body or id(node) in typing_only
        if isinstance(node, ast.Import):
            found += [(alias.name, top, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # a submodule by name, else the module it comes from
                sub = f"{node.module}.{alias.name}"
                is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").is_file()
                found.append((sub if is_module else node.module, top, node.lineno))
    return found


def _part(module: str) -> str:
    """The layer key of a rosa_ds module: its first component below the package."""
    return module.split(".")[1] if module.count(".") else "__init__"


MODULES = _modules()


def _internal_edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for name, tree in MODULES.items():
        for target, _, _ in _imports(tree):
            if target in MODULES and target != name:
                edges[name].add(target)
            elif f"{target}.__init__" in MODULES:
                edges[name].add(f"{target}.__init__")
    return edges


def test_every_module_has_a_layer():
    missing = sorted({_part(m) for m in MODULES} - set(LAYER_OF))
    assert not missing, f"add these to LAYERS (and ARCHITECTURE.md): {missing}"


def test_imports_point_down_the_layers():
    upward = []
    for name, targets in _internal_edges().items():
        for target in targets:
            if LAYER_OF[_part(target)] < LAYER_OF[_part(name)]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = _internal_edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_local_imports_only_for_heavy_or_optional_packages():
    offending = []
    for name, tree in MODULES.items():
        light = _part(name) in LIGHT
        for target, top, line in _imports(tree):
            root = target.split(".")[0]
            heavy = HEAVY_OR_OPTIONAL - {"torch"}
            if top or root in heavy or target in heavy or target in OPTIONAL_MODULES:
                continue
            if light and root in ("torch", "rosa_ds", "safetensors", "yaml"):
                continue
            offending.append(f"{name}:{line} imports {target}")
    assert not offending, "function-local imports to move to the top:\n" + "\n".join(
        sorted(set(offending))
    )


def test_the_command_line_does_not_import_torch_before_it_knows_the_command():
    """A bad config or ``--help`` answers in a fraction of a second: the LIGHT modules keep
    torch out of their top-level imports."""
    code = (
        "import sys, rosa_ds.cli, rosa_ds.config, rosa_ds.plan, rosa_ds.precision; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "helper",
    [
        "def _is_zero3",
        "def _world",
        "def _free_port(",
        "def _rank(",
        "def _quantized",
        "def _full_fp32",
        "def _matches",
        "def _safetensors_files",
        "def base_weight",
        "def quantized_modules",
        "def _write_atomic",
    ],
)
def test_duplicated_helpers_are_gone(helper):
    """Each of these once existed in two or more modules; their single homes are zero_params,
    dist.rank_world, the frozen-weight interface, targets, weight_files and atomic."""
    holders = [p.name for p in PACKAGE.rglob("*.py") if helper in p.read_text()]
    assert not holders, f"{helper} is back in {holders}"


def test_no_rank_lookup_outside_dist_and_collectives():
    """Rank and world size come from ``dist.rank_world`` (or a Placement), not ad-hoc lookups."""
    allowed = {"dist.py", "topk.py", "precision.py", "reshard.py"}  # collectives of their own
    holders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "get_rank()" in p.read_text() and p.name not in allowed
    ]
    assert not holders, f"use rosa_ds.dist.rank_world() in {holders}"


def test_every_public_class_says_why_it_exists():
    missing = [
        f"{name}.{node.name}"
        for name, tree in MODULES.items()
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and not node.name.startswith("_")
        and not ast.get_docstring(node)
    ]
    assert not missing, f"classes without a docstring: {missing}"


def test_no_benchmark_script_shadows_an_installed_module():
    """``python benchmarks/X.py`` puts ``benchmarks/`` first on the import path, so a script
    named like an installed package hides it from every library that imports it (transformers
    imports the ``kernels`` package when it is installed: a ``benchmarks/kernels.py`` broke
    every benchmark that builds a Llama)."""
    import importlib.util

    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    assert scripts
    shadowing = [f.name for f in scripts if importlib.util.find_spec(f.stem) is not None]
    assert not shadowing, shadowing
