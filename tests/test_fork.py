"""Processes and threads around the CPU kernels (fastloss/_numpy/threads.py): a child forked after
the parent ran the kernels computes the parent's numbers (NumPy, torch, a torch DataLoader's
workers, jax arrays first used in the child), so does a spawned child, and threads calling every
backend at once get the single-threaded answers.

Each case runs in a fresh interpreter: Numba picks its threading layer once per process, at its first
parallel launch, so a fresh process is the only honest start. No environment variable is set: the
layer must come out right on its own.

JAX itself cannot run in a child forked after the parent used it (its CPU client's threads do not
survive a fork: a plain optax loss deadlocks there too), so the jax case forks before jax is used;
torch's intra-op pool does not survive one either, so a torch child sets one thread, as
DataLoader's workers do.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

from .support.harness import require_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent("""
    import multiprocessing as mp, os, sys
    import numpy as np, fastloss
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 3200)).astype(np.float32)
    y = rng.integers(0, 3200, 512)

    def in_child(fn, method="fork"):
        ctx = mp.get_context(method)
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(fn, q))
        p.start()
        result = q.get(timeout=120)  # before join: a child exits only once its queue is drained
        p.join(60)
        assert p.exitcode == 0, f"child exited with {p.exitcode}"
        return result

    def _child(fn, q):
        q.put(fn())
""")


def _run(body, timeout=300):
    """Run PRELUDE + ``body`` as a script (a file: a spawned child imports it again as its main)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_THREADING", "LD_PRELOAD"))}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PRELUDE + textwrap.dedent(body))
    try:
        out = subprocess.run([sys.executable, f.name], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=timeout)
    finally:
        os.unlink(f.name)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _numpy_loss():
    return "float(fastloss.sparse_softmax_cross_entropy(x, y, label_smoothing=0.1))"


def test_threading_layer_is_fork_safe():
    require_backend("numba")
    out = _run("""
        from fastloss._numpy import threads
        print(threads.layer())
    """)
    assert out.split()[-1] == "tbb", out


def test_fork_after_numpy_use():
    require_backend("numba")
    _run(f"""
        parent = {_numpy_loss()}
        child = in_child(lambda: {_numpy_loss()})
        assert child == parent, (child, parent)
        vg = fastloss.value_and_grad(fastloss.softmax_cross_entropy)
        t = np.abs(rng.standard_normal(x.shape)).astype(np.float32)
        g_parent = vg(x, t)[1]
        g_child = in_child(lambda: vg(x, t)[1])
        assert np.array_equal(g_child, g_parent)
    """)


def test_fork_after_torch_use():
    require_backend("numba")
    _run("""
        import torch
        xt = torch.tensor(x, requires_grad=True); yt = torch.tensor(y)
        def step():
            xt.grad = None
            loss = fastloss.sparse_softmax_cross_entropy(xt, yt)
            loss.backward()
            return float(loss.detach()), xt.grad.numpy().copy()  # NumPy: no shared-memory handoff
        def in_worker():
            # torch's own intra-op pool does not survive a fork (a plain tensor.clone() deadlocks in
            # such a child); DataLoader's workers set one thread for that reason, and so does this one
            torch.set_num_threads(1)
            return step()
        parent = step()
        child = in_child(in_worker)
        assert child[0] == parent[0] and np.array_equal(child[1], parent[1])
    """)


def test_dataloader_workers_call_fastloss():
    require_backend("numba")
    _run("""
        import torch
        from torch.utils.data import DataLoader, Dataset

        class PerSampleLoss(Dataset):          # per-sample losses, e.g. to filter or weight data
            def __len__(self):
                return 8
            def __getitem__(self, i):
                rows = slice(64 * i, 64 * (i + 1))
                return fastloss.sparse_softmax_cross_entropy(torch.tensor(x[rows]), torch.tensor(y[rows]))

        # the main process trains with fastloss first (its threads are running when the workers fork)
        xt = torch.tensor(x, requires_grad=True)
        fastloss.sparse_softmax_cross_entropy(xt, torch.tensor(y)).backward()
        got = torch.cat([b for b in DataLoader(PerSampleLoss(), batch_size=2, num_workers=2)])
        want = torch.stack([PerSampleLoss()[i] for i in range(8)])
        assert torch.equal(got, want), (got, want)
    """)


def test_spawn_child():
    require_backend("numba")
    # A spawned child imports the script again (as __mp_main__): the test itself is guarded.
    _run(f"""
        import functools
        parent = {_numpy_loss()}
        fn = functools.partial(fastloss.sparse_softmax_cross_entropy, x, y, label_smoothing=0.1)
        if __name__ == "__main__":
            child = float(in_child(fn, "spawn"))
            assert child == parent, (child, parent)
    """)


def test_fork_then_jax_in_the_child():
    require_backend("jax")
    require_backend("numba")
    _run(f"""
        parent = {_numpy_loss()}

        def with_jax():
            import jax
            f = jax.jit(lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, label_smoothing=0.1,
                                                                          backend="numba"))
            return float(f(x, y))
        child = in_child(with_jax)
        assert abs(child - parent) <= 1e-6 * abs(parent), (child, parent)
    """)


def test_threads_call_every_backend_at_once():
    require_backend("numba")
    require_backend("jax")
    _run("""
        import threading, torch, jax
        jitted = jax.jit(lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, backend="numba"))
        calls = {
            "numpy": lambda: float(fastloss.sparse_softmax_cross_entropy(x, y)),
            "torch": lambda: float(fastloss.sparse_softmax_cross_entropy(torch.tensor(x), torch.tensor(y))),
            "jax-ffi": lambda: float(jitted(x, y)),
            "jax-xla": lambda: float(fastloss.sparse_softmax_cross_entropy(jax.numpy.asarray(x), y, backend="jax")),
        }
        want = {k: f() for k, f in calls.items()}
        got, errors = {k: [] for k in calls}, []

        def worker(k):
            try:
                for _ in range(10):
                    got[k].append(calls[k]())
            except Exception as exc:
                errors.append(repr(exc))
        ts = [threading.Thread(target=worker, args=(k,)) for k in calls for _ in range(2)]
        [t.start() for t in ts]
        [t.join(120) for t in ts]
        assert not errors, errors
        for k in calls:
            assert len(got[k]) == 20 and all(v == want[k] for v in got[k]), (k, got[k], want[k])
    """)
