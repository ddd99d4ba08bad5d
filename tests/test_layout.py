"""The package's structure, checked from its source (docs/architecture.md): no import circle, no
private name used across modules, one spec row per loss from which every table is derived, and the
kernels importable as ``fastloss.kernels`` from a checkout."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastloss")


def _modules():
    """{module name: path} of every module under fastloss/."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _is_package(name):
    return MODULES.get(name, "").endswith("__init__.py")


def _imports(name):
    """[(imported module, names taken from it, line, local name bound to the module | None)] for every
    import statement of ``name``, function-level imports included (a lazy import still closes a
    circle when it runs)."""
    tree = ast.parse(open(MODULES[name]).read())
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, (), node.lineno, a.asname) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # `from pkg import module`
                    out.append((sub, (), node.lineno, a.asname or a.name))
                else:
                    out.append((base, (a.name,), node.lineno, None))
    return [entry for entry in out if entry[0] in MODULES]


def test_no_import_circle():
    graph = {m: sorted({dep for dep, _, _, _ in _imports(m)} - {m}) for m in MODULES}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in graph[m]:
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


NUMBA = "fastloss.kernels.numba_cpu"


def _shared_privately(a, b):
    """The Numba kernel family shares its ``_`` building blocks between its own modules (helpers
    that are compiled into the kernels, not an interface): a package-private vocabulary."""
    return a.startswith(NUMBA + ".") and b.startswith(NUMBA + ".")


def test_no_private_name_crosses_a_module():
    bad = []
    for m in MODULES:
        modules = {}  # local name -> the fastloss module bound to it
        for dep, names, line, local in _imports(m):
            bad += [f"{m}:{line} imports {dep}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__") and not _shared_privately(m, dep)]
            if local is not None:
                modules[local] = dep
        for node in ast.walk(ast.parse(open(MODULES[m]).read())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{m}:{node.lineno} uses {modules[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def _strings(path):
    """Every string constant of a module that is not a docstring."""
    tree = ast.parse(open(path).read())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_a_loss_name_lives_in_its_spec_row():
    """Outside its spec row, its public function (and the public name lists) and its Keras class, a
    loss's name appears in no string of fastloss/: every table is derived from the spec. (A name that
    is also a kernel's, such as "huber", is the kernel's vocabulary in the kernel families.)"""
    from fastloss._spec import SPECS
    kernels = {s.kernel for s in SPECS}
    names = {s.name for s in SPECS} - kernels
    allowed = {os.path.join(PKG, f) for f in ("_spec.py", "losses.py", "keras.py", "__init__.py")}
    found = [f"{os.path.relpath(path, ROOT)}:{line}: {value!r}"
             for path in MODULES.values() if path not in allowed
             for line, value in _strings(path) if any(n in value for n in names)]
    assert not found, "\n".join(found)


def test_every_family_has_what_its_specs_name():
    """Each spec's kernel exists in every family it lists (and in the adapters that serve them)."""
    from fastloss import _spec
    from fastloss._jax import ffi
    from fastloss._numpy import launch as numba_launch
    from fastloss._torch import launch as triton_launch
    from fastloss._torch import second_order
    from fastloss.kernels import jax_xla, pallas_gpu
    where = {"xla": (jax_xla,), "numba": (numba_launch, ffi), "triton": (triton_launch,), "pallas": (pallas_gpu,)}
    missing = []
    for spec in _spec.PAIR_SPECS + (_spec.DISTILLATION,):
        for family in spec.families:
            for module in where[family]:
                if not callable(getattr(module, spec.kernel, None)):
                    missing.append(f"{spec.name}: {module.__name__}.{spec.kernel}")
        if not callable(getattr(second_order, spec.kernel, None)):
            missing.append(f"{spec.name}: second_order.{spec.kernel}")
    assert not missing, missing


def test_kernels_import_from_a_checkout():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert "package-dir" not in text
    assert not os.path.exists(os.path.join(ROOT, "kernels"))
    code = "import fastloss.kernels, fastloss.kernels.numba_cpu.plan as p; print(fastloss.kernels.__file__)"
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(PKG, "kernels", "__init__.py")
    assert importlib.util.find_spec("fastloss.kernels.triton_gpu") is not None


@pytest.mark.parametrize("name", sorted(m for m in MODULES if ".kernels" not in m))
def test_modules_stay_small(name):
    """Outside the kernels a module does one thing: at most ~400 lines."""
    assert sum(1 for _ in open(MODULES[name])) <= 430, name
