"""The threading layer the Numba kernels run on: TBB wherever it can be loaded.

Numba picks its threading layer at its first parallel launch, from ``tbb``, ``omp`` and ``workqueue``
in that order, taking the first whose runtime it can load. fastloss needs a layer that is

- fork-safe: Linux's default ``multiprocessing``, torch ``DataLoader`` workers and pre-fork servers
  fork after the parent has run kernels. GNU OpenMP (``omp``) aborts such a child at its first
  parallel region ("fork() called from a process already using GNU OpenMP");
- safe under concurrent launches: XLA calls the FFI kernels from several of its threads at once,
  and users call losses from Python threads. ``workqueue`` aborts the process on those.

TBB is both. The ``tbb`` package (in the ``numba`` extra) ships ``libtbb.so.12`` in its prefix's
``lib/``, which the dynamic loader does not search in a plain virtual environment, so Numba's TBB
layer fails to load and Numba falls back to OpenMP. ``prefer_tbb`` loads that library by its path
(``RTLD_GLOBAL``) before Numba's first launch, so Numba finds it: the user sets nothing.

A layer chosen by the user (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``) is left as
it is, and so is one already running (Numba launched its threads before fastloss's first call).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
import threading

_LOCK = threading.Lock()
_DONE = []


def _libtbb():
    """The path of the ``tbb`` package's ``libtbb.so.12``, or None (not installed, not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        files = importlib.metadata.files("tbb") or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libtbb.so.12":
            path = str(f.locate())
            if os.path.exists(path):
                return path
    return None


def prefer_tbb():
    """Make TBB loadable for Numba's first parallel launch (once per process; see the module
    docstring). Returns the path loaded, or None."""
    with _LOCK:
        if _DONE:
            return _DONE[0]
        path = None
        import numba
        from numba.np.ufunc import parallel
        user_choice = numba.config.THREADING_LAYER not in ("default", "safe", "threadsafe", "forksafe")
        launched = getattr(parallel, "_is_initialized", False)
        if not user_choice and not launched:
            path = _libtbb()
            if path is not None:
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:  # a broken install: Numba falls back to OpenMP, as without tbb
                    path = None
        _DONE.append(path)
        return path


def layer():
    """The threading layer Numba runs (launching its threads if it has not yet)."""
    import numba
    from numba.np.ufunc import parallel
    prefer_tbb()
    parallel._launch_threads()
    return numba.threading_layer()
