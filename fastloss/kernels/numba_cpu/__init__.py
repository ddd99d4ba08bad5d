"""Numba CPU kernels: fused loss + gradient, parallel over rows, with a vectorisable exp.

Every kernel computes per-row (or per-block) losses in the accumulation dtype (fp32, fp64 for fp64
input), the log-sum-exp, and, when asked, the gradient already multiplied by ``scale`` = d total /
d row, so a training step needs no second pass. Modules, bottom up:

- ``base``: compiler flags and typing helpers; ``intrinsics``: LLVM IR building blocks;
- ``approx``: branch-free exp2, reciprocal and log1p; ``halfio``: bfloat16/float16 loads and stores;
- ``rowstats``: online row statistics, groups of short rows, gradient stores;
- ``sparse_ce``, ``sparse_split``, ``dense_ce``, ``distill``, ``elementwise``, ``focal``: the kernels;
- ``options``: the option packs the row kernels take (one NamedTuple each, built in one place);
- ``plan``: which entry point a shape and layout take (pure Python);
- ``xla_ffi``: C handlers through which XLA calls these kernels inside ``jax.jit`` (imported only by
  ``fastloss._jax.ffi``, at the first trace that needs it).

docs/numba.md explains the design (what vectorises and why, the memory traffic of each pass).
"""
from . import plan
from .approx import SIGMOID_COEF
from .dense_ce import dense_blocks, dense_tiny
from .distill import DIVERGENCES, distill_rows
from .elementwise import BLOCK, huber, sigmoid_cross_entropy, sigmoid_focal, squared_error
from .focal import softmax_focal
from .sparse_ce import sparse_blocks, sparse_short, sparse_tiny
from .sparse_split import sparse_split

SPARSE = {"tiny": sparse_tiny, "short": sparse_short, "blocks": sparse_blocks, "split": sparse_split}
DENSE = {"tiny": dense_tiny, "blocks": dense_blocks}

__all__ = ["BLOCK", "DENSE", "DIVERGENCES", "distill_rows", "huber", "SIGMOID_COEF", "SPARSE", "plan", "sigmoid_cross_entropy", "sigmoid_focal",
           "softmax_focal", "squared_error"]
