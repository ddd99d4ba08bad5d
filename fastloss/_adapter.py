"""What every backend adapter shares: the loss table, the reduction rule, the mean scale and the
eager label check. A backend writes its kernels' calls; the rules around them live here, once.

Nothing here imports a framework: values are NumPy arrays, torch tensors or jax arrays, and the
framework-specific pieces (an accurate sum, a device-side nonzero_or_one) come in as arguments.
"""
from __future__ import annotations

from ._validation import label_range_error

# loss name -> number of trailing axes one loss value covers (1: a row of classes; 0: an element)
ROW_NDIM = {
    "sparse_softmax_cross_entropy": 1,
    "softmax_cross_entropy": 1,
    "sigmoid_cross_entropy": 0,
    "mean_squared_error": 0,
    "huber": 0,
    "sigmoid_focal_loss": 0,
    "softmax_focal_loss": 1,
}
LOSS_NAMES = tuple(ROW_NDIM)

# Elements per partial sum of the elementwise losses when only their total is needed (the Numba
# kernels' block; the XLA formulation sums the same blocks so both return one shape).
PARTIAL_BLOCK = 4096


def loss_table(make):
    """{loss name: make(name)}: the ``LOSSES`` registry entry of an adapter."""
    return {name: make(name) for name in LOSS_NAMES}


def nonzero_or_one(count):
    """What "mean" divides by: the count (of rows, elements, or with class weights the counted
    rows' summed weights, which torch lets be negative), or 1 where it is 0: an empty or
    all-ignored batch gives 0.0."""
    return count if count != 0 else 1


def mean_scale(reduction: str, count) -> float:
    """d total / d value: 1/count for "mean" (count 0 gives 1, with nothing to scale), else 1."""
    return 1.0 / nonzero_or_one(count) if reduction == "mean" else 1.0


def reduce(values, reduction: str, count, shape, total, at_least_one=nonzero_or_one):
    """The loss from per-row / per-element values (already 0 for ignored rows).

    "none" -> ``values`` reshaped to ``shape``; "sum" -> ``total(values)``; "mean" -> the total over
    the count (nonzero_or_one), so an empty batch or an all-ignored one gives 0.0 and a zero
    gradient, never NaN. ``total`` is the framework's accurate sum; ``at_least_one`` is
    nonzero_or_one for a count that may live on a device (no host synchronisation).
    """
    if reduction == "none":
        return values.reshape(shape)
    t = total(values)
    return t if reduction == "sum" else t / at_least_one(count)


# The kernels' ignore_index when the user ignores no row (ignore_index=None): an int64 that no label
# array of a real dataset holds (a label of exactly -2**63 would count as ignored, not as invalid).
NO_IGNORE = -(2 ** 63)


def kernel_ignore_index(ignore_index):
    return NO_IGNORE if ignore_index is None else ignore_index


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

