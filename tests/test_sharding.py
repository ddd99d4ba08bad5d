"""The cross-entropies under sharding on 8 simulated CPU devices: each device runs on its shard.

With the logits sharded over a mesh (rows: data parallelism; classes: vocabulary parallelism), the
loss and gradient must equal the one-device answers, the gradient must keep the logits' sharding,
and the compiled program must hold no all-gather (a fused kernel is a custom call XLA cannot split,
so without fastloss._jax_partition it gathers the (N, C) logits onto every device first).

XLA fixes its device count when jax starts, so the checks run in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Providers: the automatic choice (the
Numba kernel through the XLA FFI), the XLA formulation, and the Pallas kernel in interpret mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import fastloss
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

backend = None if sys.argv[1] == "auto" else sys.argv[1]
rng = np.random.default_rng(0)
n, c = 64, 1024
x = jnp.asarray(rng.standard_normal((n, c)) * 3, jnp.float32)
y = np.asarray(rng.integers(0, c, n), np.int32)
y[::7] = -100                                   # ignored rows
y = jnp.asarray(y)
t = jax.nn.softmax(jnp.asarray(rng.standard_normal((n, c)), jnp.float32))
w = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
losses = {
    "sparse": lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, backend=backend),
    "sparse-options": lambda a, b: fastloss.sparse_softmax_cross_entropy(
        a, b, temperature=0.7, label_smoothing=0.1, z_loss=1e-3, weight=w, softcap=30.0, backend=backend),
    "dense": lambda a, b: fastloss.softmax_cross_entropy(a, b, label_smoothing=0.1, backend=backend),
}
mesh = jax.make_mesh((2, 4), ("b", "c"), axis_types=(AxisType.Auto, AxisType.Auto))
out = []
for name, fn in losses.items():
    other = t if name == "dense" else y
    step = jax.value_and_grad(fn, argnums=(0, 1) if name == "dense" else 0)
    want = jax.jit(step)(x, other)
    for spec in (P("b", None), P(("b", "c"), None), P(None, "c"), P("b", "c")):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        os_ = jax.device_put(other, NamedSharding(mesh, spec if name == "dense" else P(spec[0])))
        fn_j = jax.jit(step)
        got = fn_j(xs, os_)
        hlo = fn_j.lower(xs, os_).compile().as_text()
        g, gw = (got[1][0], want[1][0]) if name == "dense" else (got[1], want[1])
        out.append(dict(loss=name, spec=str(spec), value=float(got[0]), want=float(want[0]),
                        grad_err=float(jnp.max(jnp.abs(g - gw))), grad_scale=float(jnp.max(jnp.abs(gw))),
                        grad_spec=str(g.sharding.spec), all_gather="all-gather" in hlo))
print(json.dumps(out))
"""


# "numba" rather than the automatic choice: each device's shard here is below plan.FFI_MIN_ELEMENTS,
# where the automatic choice runs the XLA formulation (the "jax" case).
@pytest.mark.parametrize("backend", ["numba", "jax", "triton"])
def test_sharded_equals_one_device_without_gathering_the_logits(backend):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TRITON_INTERPRET="1",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, backend], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert len(results) == 12
    for r in results:
        where = f"{backend} {r['loss']} {r['spec']}"
        assert abs(r["value"] - r["want"]) <= 2e-6 * abs(r["want"]), where
        assert r["grad_err"] <= 2e-6 * r["grad_scale"], where
        assert r["grad_spec"] == r["spec"], f"{where}: gradient sharded as {r['grad_spec']}"
        assert not r["all_gather"], f"{where}: the compiled program gathers"
