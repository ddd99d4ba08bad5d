"""The benchmark report: ``python -m bench [--quick] [--out DIR]``.

Runs the pytest-benchmark suites (bench/test_losses.py, bench/test_distillation.py, the training
steps and, in the full report, bench/test_linear_ce.py) in two processes, one per Keras backend
(Keras holds one backend per process: keras-stock-torch runs in the second), prints one table and
writes ``<machine>-<date>.{json,md,png}`` to ``--out`` (default ``bench-results/`` in the current
directory, ignored by git; the project's reference runs are kept in ``bench/results/``). Every provider's loss is checked against
the float64 reference on the same data; a wrong number is flagged, never reported as a win.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# Large CPU buffers backed by transparent huge pages, for every provider alike: XLA:CPU hands each
# execution fresh memory, and 4 KiB page faults on a 0.5 GB gradient cost more than the kernel
# (docs/jax.md, "Memory on CPU"). A GLIBC_TUNABLES already set by the user is kept as it is.
HUGEPAGES = "glibc.malloc.hugetlb=1"


def _run_suite(mode, keras_backend, select, json_path):
    env = dict(os.environ, FASTLOSS_BENCH=mode, KERAS_BACKEND=keras_backend, PYTHONUNBUFFERED="1")
    env.setdefault("GLIBC_TUNABLES", HUGEPAGES)
    # GPU: XLA takes memory as it needs it rather than 75% of the device up front, so its peak is
    # measurable and torch (the reference) can share the device.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    files = ["test_losses.py"] if mode == "gpu" else ["test_losses.py", "test_distillation.py", "test_keras_fit.py",
                                                     "test_linear_ce.py", "test_torch_step.py"]
    cmd = [sys.executable, "-m", "pytest", *(os.path.join(HERE, f) for f in files),
           "--benchmark-only",
           f"--benchmark-json={json_path}", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rs",
           "--benchmark-disable-gc", "-k", select, "-v"]
    print(f"\n== {mode} suite, KERAS_BACKEND={keras_backend}: {select}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode not in (0, 1, 5):  # 1: some check failed (reported below), 5: nothing selected
        raise SystemExit(f"benchmark suite crashed (exit {proc.returncode})")
    if not os.path.exists(json_path):
        return []
    with open(json_path) as f:
        return json.load(f)["benchmarks"]


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name():
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return "no CUDA device"


def _rows(benchmarks):
    rows = []
    for b in benchmarks:
        info = b["extra_info"]
        if info.get("kind") in ("keras-fit", "keras-distill", "torch-step", "linear-ce"):
            continue
        med = b["stats"]["median"]
        floor = info["bytes"] / info["copy_bw"]
        rows.append(dict(case=info["case"], loss=info["loss"], variant=info.get("variant", ""),
                         shape="x".join(map(str, info["shape"])),
                         dtype=info["dtype"], provider=info["provider"], median_ms=med * 1e3,
                         min_ms=b["stats"]["min"] * 1e3,
                         gbps=info["bytes"] / med / 1e9, floor_frac=floor / med, peak_mib=info["peak_extra_mib"],
                         value=info["value"], reference=info["reference"], rel_err=info["rel_err"],
                         correct=info["correct"]))
    for r in rows:  # speedup over stock Keras measured in the same run: JAX backend, else torch backend
        for baseline in ("keras-stock-jax", "keras-stock-torch"):
            base = [o for o in rows if o["case"] == r["case"] and o["provider"] == baseline]
            if base:
                r["speedup_vs_keras"] = base[0]["median_ms"] / r["median_ms"]
                r["baseline"] = baseline
                break
        else:
            r["speedup_vs_keras"], r["baseline"] = float("nan"), None
        # an option's cost (class weights, softcap): its time over the same provider's plain loss
        plain = [o for o in rows if r["variant"] and not o["variant"] and o["loss"] == r["loss"]
                 and (o["shape"], o["dtype"], o["provider"]) == (r["shape"], r["dtype"], r["provider"])]
        r["vs_plain"] = r["median_ms"] / plain[0]["median_ms"] if plain else None
    from .providers import PROVIDERS
    order = {p: i for i, p in enumerate(PROVIDERS)}
    return sorted(rows, key=lambda r: (r["case"], order.get(r["provider"], 99)))


def _fit_lines(benchmarks):
    """The Keras model.fit step comparison (stock loss vs fastloss.keras), one line per backend."""
    fits = {}
    for b in benchmarks:
        info = b["extra_info"]
        if info.get("kind") == "keras-fit":
            fits.setdefault(info["backend"], {})[info["provider"]] = (b["stats"]["median"], info["shape"])
    steps = {b["extra_info"]["provider"]: (b["stats"]["median"], b["extra_info"]) for b in benchmarks
             if b["extra_info"].get("kind") == "torch-step"}
    lines = []
    if steps:
        info = next(iter(steps.values()))[1]
        batch, _, classes = info["shape"]
        base = steps.get("torch-compiled", (float("nan"),))[0]
        lines.append(f"PyTorch training step, Linear({info['shape'][1]}->{classes}) head, batch {batch}, "
                     f"{info['device']}: " + ", ".join(
                         f"{p} {t * 1e3:.1f} ms ({base / t:.2f}x torch-compiled)" for p, (t, _) in sorted(steps.items())))
    distills = {b["extra_info"]["provider"]: (b["stats"]["median"], b["extra_info"]["shape"]) for b in benchmarks
                if b["extra_info"].get("kind") == "keras-distill"}
    if "keras-stock" in distills and "fastloss-keras" in distills:
        (ts, shape), (tf, _) = distills["keras-stock"], distills["fastloss-keras"]
        lines.append(f"Keras Distiller train_on_batch, Dense({shape[1]}->{shape[2]}) student and teacher, batch "
                     f"{shape[0]}, T = 3: stock LogitsDistillation {ts * 1e3:.1f} ms, fastloss.keras "
                     f"{tf * 1e3:.1f} ms ({ts / tf:.2f}x)")
    for backend, d in sorted(fits.items()):
        if "keras-stock" in d and "fastloss-keras" in d:
            (ts, shape), (tf, _) = d["keras-stock"], d["fastloss-keras"]
            lines.append(f"Keras train_on_batch, Dense({shape[1]}->{shape[2]}) softmax head, batch {shape[0]}, "
                         f"{backend} backend: stock loss {ts * 1e3:.1f} ms, fastloss.keras {tf * 1e3:.1f} ms "
                         f"({ts / tf:.2f}x)")
    return lines


def _linear_rows(benchmarks):
    """The fused linear + CE measurements, for the JSON report."""
    return [dict(case=b["extra_info"]["case"], provider=b["extra_info"]["provider"], median_s=b["stats"]["median"],
                 min_s=b["stats"]["min"], peak_mib=b["extra_info"]["peak_extra_mib"], flop=b["extra_info"]["flop"],
                 value=b["extra_info"]["value"], reference=b["extra_info"]["reference"],
                 correct=b["extra_info"]["correct"])
            for b in benchmarks if b["extra_info"].get("kind") == "linear-ce"]


def _linear_lines(benchmarks):
    """The fused linear + CE cases: time and peak memory per provider, against the unfused pair of the
    same framework and stock Keras (compute-bound: no bandwidth floor)."""
    cases = {}
    for b in benchmarks:
        info = b["extra_info"]
        if info.get("kind") == "linear-ce":
            cases.setdefault(info["case"], {})[info["provider"]] = (b["stats"]["median"], info)
    lines = []
    for case, d in sorted(cases.items()):
        parts = []
        for provider, (t, info) in d.items():
            pair = d.get("unfused-" + provider.split("-")[-1]) if provider.startswith("fastloss") else None
            keras_t = d.get("keras-stock-jax", (float("nan"),))[0]
            extra = f", {t / pair[0]:.2f}x the time and {info['peak_extra_mib'] / max(pair[1]['peak_extra_mib'], 1e-9):.2f}x " \
                    f"the memory of the unfused pair" if pair else ""
            flag = "" if info["correct"] else " WRONG"
            parts.append(f"{provider} {t:.2f} s, {info['flop'] / t / 1e9:.0f} GFLOP/s, peak {info['peak_extra_mib']:.0f} MiB"
                         f" ({keras_t / t:.2f}x stock Keras{extra}){flag}")
        lines.append(f"Linear + CE loss and gradients ({case}): " + "; ".join(parts))
    return lines


def _table(rows):
    # "min ms" is there because this project's bench VM has slow phases (host contention, up to
    # ~1.5x): the median is what a run gave, the min how fast the code goes when the machine is quiet.
    # Ratios and floor fractions use the median.
    head = ("| loss | shape | dtype | provider | median ms | min ms | vs stock Keras | GB/s | % of floor | "
            "peak MiB | matches fp64 |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        ok = "yes" if r["correct"] else f"**NO** (rel err {r['rel_err']:.1e})"
        speed = "n/a" if r["baseline"] is None else \
            f"{r['speedup_vs_keras']:.2f}x" + ("" if r["baseline"] == "keras-stock-jax" else " (torch)")
        if r["vs_plain"] is not None:
            speed = f"{r['vs_plain']:.2f}x plain's time"
        name = r["loss"].replace("_", " ") + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(f"| {name} | {r['shape']} | {r['dtype']} | {r['provider']} | "
                     f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {speed} | {r['gbps']:.1f} | "
                     f"{100 * r['floor_frac']:.0f}% | {r['peak_mib']:.0f} | {ok} |")
    return head + "\n".join(lines) + "\n"


def _chart(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = sorted({r["case"] for r in rows})
    from .providers import PROVIDERS
    providers = [p for p in PROVIDERS if p != "keras-stock-jax" and any(r["provider"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases) + 2), 5.5))
    width = 0.8 / max(len(providers), 1)
    for k, p in enumerate(providers):
        vals = []
        for c in cases:
            hit = [r for r in rows if r["case"] == c and r["provider"] == p]
            vals.append(hit[0]["speedup_vs_keras"] if hit else 0.0)
        xs = [i + (k - (len(providers) - 1) / 2) * width for i in range(len(cases))]
        bars = ax.bar(xs, vals, width, label=p)
        for x, v in zip(xs, vals):
            if v > 0:
                ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        del bars
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cases)))
    from .cases import SHORT
    labels = []
    for c in cases:
        r = next(r for r in rows if r["case"] == c)
        labels.append(f"{SHORT[r['loss']]}\n{r['shape']}\n{r['dtype']}")
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speedup over stock Keras (JAX backend; torch for bf16), loss + grad")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="9 loss cases, distillation, the Keras fits and the torch step, 3 rounds: "
                         "~12 minutes on a 2-core CPU")
    ap.add_argument("--gpu", action="store_true",
                    help="the GPU cases alone (jax arrays and torch CUDA tensors), 5 rounds; they skip "
                         "with a message where no GPU is visible")
    ap.add_argument("--out", default="bench-results",
                    help="where the JSON/markdown/PNG go (default: bench-results/, git-ignored)")
    ap.add_argument("--only", default=None,
                    help="a pytest -k expression selecting benchmarks, e.g. 'linear' (default: all)")
    args = ap.parse_args(argv)
    mode = "gpu" if args.gpu else "quick" if args.quick else "full"
    only = f" and ({args.only})" if args.only else ""
    # Two processes, one per Keras backend; on a GPU the jax providers in the first and the torch
    # ones in the second, so that neither framework's allocator holds memory the other needs.
    first, second = "not keras-stock-torch", "keras-stock-torch"
    if mode == "gpu":
        first = "fastloss-jax or jax-autodiff or optax or keras-stock-jax"
        second = "fastloss-triton or torch or keras-stock-torch or torch-compile or liger"
    with tempfile.TemporaryDirectory() as tmp:
        raw = _run_suite(mode, "jax", f"({first})" + only, os.path.join(tmp, "a.json"))
        raw += _run_suite(mode, "torch", f"({second})" + only, os.path.join(tmp, "b.json"))
    rows = _rows(raw)
    fit_lines = _fit_lines(raw) + _linear_lines(raw)
    if not rows and not fit_lines:
        raise SystemExit("no benchmark ran")
    machine = socket.gethostname().split(".")[0] or "machine"
    date = datetime.date.today().isoformat()
    hw = f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if mode == "gpu":
        hw = f"{_gpu_name()}; host {hw}"
    title = f"fastloss vs stock Keras, {mode} suite, {date}: {hw}"
    table = (_table(rows) if rows else "") + "".join(f"\n{line}\n" for line in fit_lines)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{machine}-{date}" + ("-quick" if args.quick else "-gpu" if args.gpu else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(date=date, hardware=hw, mode=mode, results=rows, linear_ce=_linear_rows(raw)), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}\n\nMedian (and min) of {3 if args.quick else 5} runs of loss + gradient; ratios and floor "
                f"fractions use the median; floor = bytes moved / `np.copyto` bandwidth measured in the same run, "
                f"just before each case's providers (best of 5; GPU cases: the device's own copy, median of 20, CUDA events). JAX providers run `jit(value_and_grad)` with the logits "
                f"donated (a fresh copy each round, outside the timing), as a training loop's dead intermediate; every "
                f"provider runs with `GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', HUGEPAGES)}`. Linear + CE "
                f"cases: median of 3 runs, peak memory from XLA's accounting (JAX) or resident memory "
                f"(torch).\n\n{table}")
    if rows:
        _chart(rows, stem + ".png", title)
    print("\n" + table)
    bad = [r for r in rows if not r["correct"]]
    for r in bad:
        print(f"WRONG: {r['provider']} {r['case']}: loss {r['value']!r}, float64 reference {r['reference']!r}")
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
