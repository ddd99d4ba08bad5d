"""The one place that picks a Numba kernel path from the shape and the layout (pure Python).

Each path is its own compiled entry point, so a process compiles only the paths its shapes use.
"""
from __future__ import annotations

# Rows of at most TINY_ROW classes stored back to back run in groups (rowstats.TINY_GROUP elements):
# 32 classes is one AVX2 vector loop unrolled 4x, the length below which a row's own exp loop never
# reaches LLVM's vector body.
TINY_ROW = 31
# Rows of at most SHORT_ROW classes (8 KiB of fp32: in L1 with its scratch row) take plain loops:
# the row is cached after its max pass, so the block-online bookkeeping costs more than it saves.
SHORT_ROW = 2048
# Rows are split into chunks only when there are fewer than 2 per thread (threads would idle) and
# they are long enough that each chunk (>= SPLIT_CHUNK classes, 16 KiB of fp32) outweighs the
# second read of the chunk that the split costs.
SPLIT_MIN_CLASSES = 16384
SPLIT_CHUNK = 4096

# Calls on fewer than SERIAL_MAX_ELEMENTS elements run on the calling thread alone (NumPy and torch
# CPU input): one thread finishes them (~10 us at up to 0.7 ns per element) before the pool's
# sleeping worker would have woken (15-40 us when other work runs between the calls, as in a
# training step; measured on a 2-vCPU EPYC, docs/performance.md).
SERIAL_MAX_ELEMENTS = 1 << 14
# Inside jax.jit on CPU (fastloss._jax.ffi): below FFI_MIN_ELEMENTS elements XLA's own fused loops
# finish before an FFI call and the thread pool's wake-up (~20-30 us) pay for themselves (measured
# crossover 32K-64K elements for sparse CE, MSE and sigmoid CE on a 2-vCPU EPYC, docs/performance.md).
FFI_MIN_ELEMENTS = 1 << 16
# The FFI gradient takes the logits' buffer only from FFI_ALIAS_MIN_BYTES up: aliasing makes XLA copy
# logits it cannot overwrite (a jit argument), a whole extra pass; a fresh buffer below glibc's
# largest mmap threshold (32 MiB) comes back from malloc's heap without page faults, above it
# every execution faults it in page by page (as long as the copy), so there the alias is the cheaper bet.
FFI_ALIAS_MIN_BYTES = 32 << 20


def split_chunks(n_rows: int, n_cls: int, threads: int) -> int:
    """Chunks per row for the split path (1: no split)."""
    if n_rows == 0 or n_rows >= 2 * threads or n_cls < SPLIT_MIN_CLASSES:
        return 1
    return min(-(-2 * threads // n_rows), n_cls // SPLIT_CHUNK)


def sparse_path(n_rows: int, n_cls: int, row_stride: int, threads: int, plain: bool = True):
    """("tiny" | "short" | "blocks" | "split", chunks per row) for sparse cross-entropy.

    ``plain`` is False with class weights or a softcap: only the whole-row paths (short, blocks)
    implement those, so tiny rows take "short" and few long rows "blocks" (same numbers, fewer
    threads busy on the second)."""
    if not plain:
        return ("short" if n_cls <= SHORT_ROW else "blocks"), 1
    chunks = split_chunks(n_rows, n_cls, threads)
    if chunks > 1:
        return "split", chunks
    if n_cls <= TINY_ROW and row_stride == n_cls:
        return "tiny", 1
    if n_cls <= SHORT_ROW:
        return "short", 1
    return "blocks", 1


def dense_path(n_cls: int, x_stride: int, t_stride: int) -> str:
    """"tiny" | "blocks" for dense-target cross-entropy."""
    return "tiny" if n_cls <= TINY_ROW and x_stride == n_cls and t_stride == n_cls else "blocks"
