"""The documentation runs: every docstring example, and every Python example in README.md.

README examples run as a user would paste them: each in a fresh interpreter (the Keras one sets
KERAS_BACKEND itself, before importing keras)."""
from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys

import pytest

import fastloss
from fastloss import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docstring_examples_run():
    attempted = 0
    for module in (losses,):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 15


def _readme_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_an_example_per_framework():
    text = "\n".join(_readme_blocks())
    for needle in ("import numpy as np, fastloss", "import jax", "import torch", 'os.environ["KERAS_BACKEND"]'):
        assert needle in text


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_example_runs(index, tmp_path):
    code = _readme_blocks()[index].replace("/tmp/fastloss-model.keras", str(tmp_path / "model.keras"))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # the example sets it itself
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_saved_keras_model_loads_in_a_new_process_after_import(tmp_path):
    # The README's note: a model compiled with a fastloss loss loads in a fresh process once
    # fastloss.keras is imported.
    path = tmp_path / "m.keras"
    save = ("import os; os.environ['KERAS_BACKEND'] = 'jax'\n"
            "import keras, fastloss.keras as fk\n"
            "m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])\n"
            "m.compile(loss=fk.SparseCategoricalCrossentropy(from_logits=True, temperature=2.0))\n"
            f"m.save({str(path)!r})\n")
    load = ("import os; os.environ['KERAS_BACKEND'] = 'jax'\n"
            "import keras, fastloss.keras\n"
            f"m = keras.models.load_model({str(path)!r})\n"
            "print(type(m.loss).__module__, m.loss.get_config()['temperature'])\n")
    for code in (save, load):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["fastloss.keras", "2.0"]


def test_docs_never_link_outside_the_repository():
    outside = "../" + "shared"  # the contract's source sits beside the repository, never in a clone
    for folder, _, files in os.walk(ROOT):
        if any(part in folder for part in (".git", ".venv", "node_modules", "__pycache__")):
            continue
        for name in files:
            if name.endswith((".md", ".py")):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    assert outside not in f.read(), os.path.join(folder, name)
    assert fastloss.__version__
