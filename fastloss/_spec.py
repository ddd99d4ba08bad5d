"""What each loss is: one row per loss, and nothing else.

Every other table is derived from these rows: the validation of a call (``_validation.validate``),
the routing (``_dispatch.route``), the option order of every kernel family, the torch custom ops'
schemas, the JAX option range checks, and what "mean" divides by (``_reduction``). A kernel family
finds its implementation of a loss as the attribute ``spec.kernel`` of its module, so adding a loss
is a row here, its kernels under that name, its public function and its reference (docs/architecture.md).

Nothing here imports a framework.
"""
from __future__ import annotations

from typing import NamedTuple


class Option(NamedTuple):
    """A numeric option of a loss. It is a value, not code: a jax tracer or a 0-d array works, and
    the kernels receive it in the order of ``LossSpec.options``.

    ``rule`` is its allowed range, checked eagerly (a ValueError naming it) and, for a traced value,
    inside the program (out of range: a NaN loss): "positive" (finite > 0), "non_negative" (finite
    >= 0), "unit" (in [0, 1]) or "binary" (True/False, 1/0).
    """
    name: str
    default: object
    rule: str


class LossSpec(NamedTuple):
    """One loss.

    name: its public function's name (and its torch custom op's).
    kernel: the name of its implementation in every kernel family and adapter (``jax_xla``, the
        Numba launchers, the Triton launchers, the FFI calls, the Pallas kernels, the torch
        second-order formulas).
    row_ndim: trailing axes one loss value covers: 1 (a row of classes) or 0 (an element).
    args: the names of its array arguments, for error messages.
    other: what the second argument holds: "labels" (integers), "targets" (floats of the first's
        shape), "either" (the softmax focal loss takes both), "teacher" (distillation: a second
        logits array, labels optional) or "linear" (the weight of a projection, labels after it).
    options: its numeric options, in kernel order.
    statics: keyword options that select kernel code (compile-time constants): "ignore_index",
        "softcap", "divergence".
    class_array: the keyword of an optional (C,) per-class array: "weight" (class weights, which
        "mean" divides by), or "alpha" (per-class factors that may replace the scalar ``alpha``,
        not counted by "mean").
    families: the kernel families with a fused kernel: "xla", "numba", "triton", "pallas".
    partitioned: whether its JAX kernel runs shard by shard under sharding (custom_partitioning).
    """
    name: str
    kernel: str
    row_ndim: int
    args: tuple
    other: str
    options: tuple = ()
    statics: tuple = ()
    class_array: str | None = None
    families: frozenset = frozenset(("xla", "numba", "triton"))
    partitioned: bool = False

    @property
    def option_names(self):
        return tuple(o.name for o in self.options)

    @property
    def has_labels(self):
        """Whether the second argument is (always) integer labels."""
        return self.other in ("labels", "linear")

    @property
    def weighted_mean(self):
        """Whether class weights change what "mean" divides by (torch's semantics)."""
        return self.class_array == "weight"


TEMPERATURE = Option("temperature", 1.0, "positive")
LABEL_SMOOTHING = Option("label_smoothing", 0.0, "unit")
Z_LOSS = Option("z_loss", 0.0, "non_negative")
_ALL = frozenset(("xla", "numba", "triton"))
_WITH_PALLAS = _ALL | {"pallas"}

SPARSE_CE = LossSpec(
    "sparse_softmax_cross_entropy", "sparse_cross_entropy", 1, ("logits", "labels"), "labels",
    (TEMPERATURE, LABEL_SMOOTHING, Z_LOSS), ("ignore_index", "softcap"), "weight", _WITH_PALLAS, True)
DENSE_CE = LossSpec(
    "softmax_cross_entropy", "softmax_cross_entropy", 1, ("logits", "targets"), "targets",
    (TEMPERATURE, LABEL_SMOOTHING), (), None, _WITH_PALLAS, True)
SIGMOID_CE = LossSpec(
    "sigmoid_cross_entropy", "sigmoid_cross_entropy", 0, ("logits", "targets"), "targets", (LABEL_SMOOTHING,))
MSE = LossSpec("mean_squared_error", "squared_error", 0, ("predictions", "targets"), "targets")
HUBER = LossSpec("huber", "huber", 0, ("predictions", "targets"), "targets", (Option("delta", 1.0, "positive"),))
SIGMOID_FOCAL = LossSpec(
    "sigmoid_focal_loss", "sigmoid_focal", 0, ("logits", "targets"), "targets",
    (Option("gamma", 2.0, "non_negative"), Option("alpha", 0.25, "unit"),
     Option("apply_class_balancing", False, "binary"), LABEL_SMOOTHING))
SOFTMAX_FOCAL = LossSpec(
    "softmax_focal_loss", "softmax_focal", 1, ("logits", "labels"), "either",
    (Option("gamma", 2.0, "non_negative"), LABEL_SMOOTHING, Option("alpha", 0.25, "non_negative")),
    ("ignore_index",), "alpha")
DISTILLATION = LossSpec(
    "distillation_loss", "distillation", 1, ("student_logits", "teacher_logits", "labels"), "teacher",
    (TEMPERATURE, Option("alpha", 0.5, "unit"), Option("beta", 0.5, "unit")), ("divergence", "ignore_index"))
LINEAR_CE = LossSpec(
    "linear_cross_entropy", "linear_cross_entropy", 1, ("hidden", "weight", "labels"), "linear",
    (TEMPERATURE, LABEL_SMOOTHING, Z_LOSS), ("ignore_index",), None, frozenset(("xla", "numba", "triton")))

SPECS = (SPARSE_CE, DENSE_CE, SIGMOID_CE, MSE, HUBER, SIGMOID_FOCAL, SOFTMAX_FOCAL, DISTILLATION, LINEAR_CE)
BY_NAME = {s.name: s for s in SPECS}
# The losses of two same-shaped or (rows, labels) inputs: one custom op / kernel call each.
PAIR_SPECS = tuple(s for s in SPECS if s.other in ("labels", "targets", "either"))

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
