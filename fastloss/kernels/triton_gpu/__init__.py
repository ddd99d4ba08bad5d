"""Triton kernels for torch tensors (CUDA, or the interpreter with TRITON_INTERPRET=1 on CPU).

- ``common``: accumulator constants, lane vectors, widening, the softcap's tanh;
- ``cross_entropy``: sparse and dense softmax cross-entropy, one program per row;
- ``elementwise``: sigmoid CE, squared error, Huber, sigmoid focal, one program per block;
- ``distill``: distillation over student and teacher rows;
- ``focal``: the softmax focal loss;
- ``params``: the option pack each kernel reads from its PARAMS vector;
- ``configs``: class blocks, warps, and every specialisation the launchers can ask for.

Importing this package imports triton (the launchers in ``fastloss._torch.launch`` do so at their
first call).
"""
from .configs import distill_block, elem_block, gamma_int, num_warps, row_block, specializations
from .cross_entropy import dense_ce_kernel, sparse_ce_kernel
from .distill import distill_kernel
from .elementwise import huber_kernel, sigmoid_ce_kernel, sigmoid_focal_kernel, squared_error_kernel
from .focal import softmax_focal_kernel

__all__ = ["dense_ce_kernel", "distill_block", "distill_kernel", "elem_block", "gamma_int", "huber_kernel",
           "num_warps", "row_block", "sigmoid_ce_kernel", "sigmoid_focal_kernel", "softmax_focal_kernel",
           "sparse_ce_kernel", "specializations", "squared_error_kernel"]
