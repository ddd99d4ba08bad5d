"""From per-row (or per-element) values to the loss, written once for every adapter.

- what "mean" divides by (``mean_count``): the non-ignored rows of a labelled loss, with class
  weights the sum of their labels' weights (torch's semantics), else the rows or the elements;
- the scale a fused kernel multiplies its gradient by (``mean_scale``: 1/count for "mean");
- the reduction itself (``reduce``: "none", "sum", "mean").

An empty or all-ignored batch divides by 1: the loss is 0.0 and the gradient 0, never NaN.
The functions work on NumPy arrays, torch tensors and jax arrays alike: the array namespace comes
in as ``xp`` (``numpy``, ``torch`` or ``jax.numpy``), so nothing here imports a framework.
"""
from __future__ import annotations

from ._validation import label_range_error

# Elements per partial sum of the elementwise losses when only their total is needed (the Numba
# kernels' block; the XLA formulation sums the same blocks so both return one shape).
PARTIAL_BLOCK = 4096

# The kernels' ignore_index when the user ignores no row (ignore_index=None): an int64 that no label
# array of a real dataset holds (a label of exactly -2**63 would count as ignored, not as invalid).
NO_IGNORE = -(2 ** 63)


def kernel_ignore_index(ignore_index):
    return NO_IGNORE if ignore_index is None else ignore_index


def user_ignore_index(kernel_value):
    """The inverse of kernel_ignore_index (the torch custom ops carry the kernel's int)."""
    return None if kernel_value == NO_IGNORE else kernel_value


def nonzero_or_one(count, xp=None):
    """What "mean" divides by: the count, or 1 where it is 0 (a weighted count may be negative or
    fractional, as torch allows). With ``xp`` the count is an array and stays on its device."""
    if xp is None:
        return count if count != 0 else 1
    return xp.where(count != 0, count, xp.ones_like(count))


def mean_scale(reduction: str, count) -> float:
    """d total / d value for a count known on the host: 1/count for "mean", else 1."""
    return 1.0 / nonzero_or_one(count) if reduction == "mean" else 1.0


def kept_rows(labels, ignore_index):
    """A boolean array: the rows whose label is not ``ignore_index`` (every row for None)."""
    if ignore_index is None:
        return labels == labels
    return labels != ignore_index


def mean_count(labels, ignore_index, n_cls, weight=None, *, xp, axis=None):
    """The count "mean" divides by for labelled rows, before nonzero_or_one: the non-ignored rows,
    or with class weights the sum of the weights of their labels (labels outside [0, C) count 0:
    they are errors, reported elsewhere). ``axis``: sum over the last axis only (per vmap index)."""
    kept = kept_rows(labels, ignore_index)
    if weight is None:  # count_nonzero: NumPy's sum of booleans costs ~10 us more per call
        return xp.sum(kept, axis=axis) if axis is not None else xp.count_nonzero(kept)
    counted = kept & (labels >= 0) & (labels < n_cls)
    per = xp.where(counted, weight[xp.clip(labels, 0, n_cls - 1)], xp.zeros_like(weight[:1]))
    return xp.sum(per, axis=axis) if axis is not None else xp.sum(per)


def reduce(values, reduction: str, count, shape, total, at_least_one=nonzero_or_one):
    """The loss from per-row / per-element values (already 0 for ignored rows).

    "none" -> ``values`` reshaped to ``shape``; "sum" -> ``total(values)``; "mean" -> the total over
    the count (nonzero_or_one). ``total`` is the framework's accurate sum; ``at_least_one`` is
    nonzero_or_one for a count that may live on a device (no host synchronisation).
    """
    if reduction == "none":
        return values.reshape(shape)
    t = total(values)
    return t if reduction == "sum" else t / at_least_one(count)


def check_label_range(labels, n_cls: int, ignore_index) -> None:
    """ValueError naming the first label outside [0, C) that is not ``ignore_index``.

    For eager calls: ``labels`` is a NumPy array or a torch tensor (one host sync, as torch's own
    cross-entropy check); jax callers pass ``np.asarray`` of a concrete array. Under ``jax.jit`` a
    traced label cannot raise: the kernel's NaN row is the answer there.
    """
    y = labels
    bad = (y < 0) | (y >= n_cls)
    if ignore_index is not None:
        bad = bad & (y != ignore_index)
    if bool(bad.any()):
        first = y[bad].reshape(-1)[0]
        raise label_range_error(int(first.item() if hasattr(first, "item") else first), n_cls, ignore_index)
