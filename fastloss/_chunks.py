"""How many rows one chunk of the fused linear + cross-entropy takes (``linear_cross_entropy``).

One place decides it for every backend. A chunk holds ``rows x C`` logits (computed in fp32, the
cross-entropy gradient written over them), so its memory is ``rows * C * 4`` bytes; the weight's
gradient ``C x H`` (fp32) is accumulated once per chunk, so smaller chunks re-read and re-write it
more often and the row count of each matmul shrinks. Between the two, about 64 MiB of logits per
chunk was fastest in the sweep of docs/performance.md (512 rows at C=32000, 128 at C=128256); less
where the free memory is short, never fewer than 16 rows unless N is smaller.
"""
from __future__ import annotations

import os

TARGET_BYTES = 64 << 20  # fp32 logits per chunk
MIN_ROWS = 16


def free_bytes(device="cpu"):
    """Free memory on ``device`` ("cpu", or a torch CUDA device), or None when it is unknown."""
    if getattr(device, "type", device) == "cuda":
        import torch
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def rows_per_chunk(n_rows: int, n_cls: int, chunk_size=None, free=None) -> int:
    """The chunk's row count for ``n_rows`` rows of ``n_cls`` classes: ``chunk_size`` when given
    (at most ``n_rows``), else ~TARGET_BYTES of fp32 logits, at most 1/8 of ``free`` bytes, rounded
    down to a multiple of 16 rows (whole vector tiles for the matmuls)."""
    n_rows = max(int(n_rows), 1)
    if chunk_size is not None:
        return min(int(chunk_size), n_rows)
    budget = TARGET_BYTES if free is None else min(TARGET_BYTES, free // 8)
    rows = budget // (4 * max(int(n_cls), 1))
    rows = max(MIN_ROWS, rows - rows % MIN_ROWS)
    return min(rows, n_rows)
