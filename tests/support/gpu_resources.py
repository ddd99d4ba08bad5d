"""GPU truth without a GPU: compile every shipped kernel configuration to cubin and read its registers
and spills from the binary.

- Triton kernels for torch: each specialisation from ``triton_gpu.specializations()`` and
  ``triton_gpu.specializations()``, compiled with ``triton.compile`` for ``GPUTarget("cuda", arch)``.
- Pallas kernels for jax: each configuration from ``pallas_gpu.configurations()`` is lowered for CUDA
  (``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))``, which rejects what a GPU would);
  the Triton IR inside the ``__gpu$xla.gpu.triton`` custom call (MLIR bytecode) is printed as text
  with jaxlib's Triton dialect and compiled by the ``triton`` package. On a GPU, XLA compiles it with
  jaxlib's own Triton, so this is a proxy: same IR, possibly a different compiler version.

``cuobjdump -res-usage`` (bundled with triton) reports REG (registers per thread) and LOCAL (bytes of
local memory per thread: spills and stack arrays; 0 means nothing spilled).

Run as a script (``python -m tests.support.gpu_resources ARCH [triton|pallas]``) it prints one JSON object per
configuration; it must run without TRITON_INTERPRET (the interpreter cannot compile).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

REG_LIMIT = 128  # memory-bound kernels: at most 128 registers per thread (>= 2 blocks of 256 threads per SM)


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> dict:
    """{"REG": registers per thread, "LOCAL": local bytes per thread, "STACK": ...} of the cubin's
    one kernel, read with ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups())))


def _target(arch):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


# ------------------------------------------------------------------------------- torch (Triton)
def triton_reports(arch):
    import triton
    from triton.compiler import ASTSource

    from fastloss.kernels import triton_gpu as K
    for kernel, sig, const, warps in K.specializations():
        full = dict(sig, **{k: "constexpr" for k in const})
        name = f"{kernel.fn.__name__} {sig[next(iter(sig))]} {const}"
        try:
            out = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=const), target=_target(arch),
                                 options={"num_warps": warps})
            yield dict(kind="triton", name=name, warps=warps, **resource_usage(out.asm["cubin"]))
        except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
            yield dict(kind="triton", name=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")


# -------------------------------------------------------------------------------- jax (Pallas)
def _custom_calls(module):
    out = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.operation.name == "stablehlo.custom_call":
                        out.append(o)
                    walk(o.operation)
    walk(module.operation)
    return out


def triton_calls(lowered):
    """[(kernel name, Triton IR text, num_warps, num_stages)] of every Pallas Triton call in a program
    lowered for CUDA."""
    import jax._src.interpreters.mlir as jmlir
    from jax._src.lib import triton as jt
    from jax._src.lib.mlir import ir
    calls = []
    for op in _custom_calls(lowered.compiler_ir("stablehlo")):
        if str(op.attributes["call_target_name"]).strip('"') != "__gpu$xla.gpu.triton":
            continue
        cfg = op.attributes["mhlo.backend_config"]
        ctx = jmlir.make_ir_context()
        with ctx:
            jt.dialect.register_dialect(ctx)
            text = ir.Module.parse(cfg["ir"].value_bytes).operation.get_asm(enable_debug_info=False)
        calls.append((str(cfg["name"]).strip('"'), text, int(str(cfg["num_warps"]).split()[0]),
                      int(str(cfg["num_stages"]).split()[0])))
    return calls


def compile_ttir(text, arch, num_warps, num_stages):
    import triton
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(text)
        return triton.compile(path, target=_target(arch), options={"num_warps": num_warps, "num_stages": num_stages})


def lower_configuration(loss, dtype, n_cls, opts, rows=64):
    """The configuration's kernel call lowered for CUDA (as the dispatch makes it, inside ``jit``)."""
    import jax
    import jax.numpy as jnp

    from fastloss.kernels import pallas_gpu as P
    ctx = jax.enable_x64(True) if dtype == "float64" else jax.enable_x64(False)
    with ctx:
        dt = jnp.dtype(dtype)
        acc = jnp.float64 if dtype == "float64" else jnp.float32
        x = jax.ShapeDtypeStruct((rows, n_cls), dt)
        if loss == "sparse":
            n_params = 4 + (n_cls if opts["weight"] else 0)
            args = (x, jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((n_params,), acc))

            def fn(a, b, c):
                return P.sparse_cross_entropy(a, b, c, -100, opts["softcap"], bool(opts["weight"]),
                                              want_x=opts["want_x"])
        else:
            args = (x, x, jax.ShapeDtypeStruct((3,), acc))

            def fn(a, b, c):
                return P.softmax_cross_entropy(a, b, c, want_x=opts["want_x"], want_other=opts["want_other"])
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def pallas_reports(arch):
    from fastloss.kernels import pallas_gpu as P
    for loss, dtype, n_cls, opts in P.configurations():
        name = f"{loss} {dtype} C={n_cls} {opts}"
        try:
            calls = triton_calls(lower_configuration(loss, dtype, n_cls, opts))
            if len(calls) != 1:
                raise RuntimeError(f"expected one Triton call, found {len(calls)}")
            _, text, warps, stages = calls[0]
            out = compile_ttir(text, arch, warps, stages)
            yield dict(kind="pallas", name=name, warps=warps, **resource_usage(out.asm["cubin"]))
        except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
            yield dict(kind="pallas", name=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")


def problems(reports):
    """Sentences for the reports that fail: a compile error, a spill, more than REG_LIMIT registers."""
    bad = []
    for r in reports:
        if "error" in r:
            bad.append(f"{r['name']}: {r['error']}")
        elif r["LOCAL"] or r["STACK"]:
            bad.append(f"{r['name']}: spills ({r['LOCAL']} local bytes, {r['STACK']} stack bytes per thread)")
        elif r["REG"] > REG_LIMIT:
            bad.append(f"{r['name']}: {r['REG']} registers per thread (limit {REG_LIMIT})")
    return bad


def main(argv):
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arch, which = int(argv[0]), argv[1]
    reports = triton_reports(arch) if which == "triton" else pallas_reports(arch)
    for r in reports:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
