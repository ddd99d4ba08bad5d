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
    files = ["test_losses.py"] if mode == "gpu" else [
        "test_keras_fit.py", "test_torch_step.py", "test_optax_step.py", "test_losses.py", "test_distillation.py",
        "test_linear_ce.py"]
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
        if info.get("kind") in STEP_KINDS or info.get("kind") == "linear-ce":
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


# step kind -> [(what is compared, stock provider, fastloss provider)]
STEP_KINDS = {
    "keras-fit": [("Keras train_on_batch", "keras-stock", "fastloss-keras")],
    "keras-distill": [("Keras Distiller, T = 3", "keras-stock", "fastloss-keras")],
    "torch-step": [("torch eager", "torch-eager", "fastloss-eager"),
                   ("torch.compile", "torch-compiled", "fastloss-compiled")],
    "optax-step": [("JAX + optax, jit", "optax-step", "fastloss-optax-step")],
}
# step kind -> the loss-only provider whose time at the step's logits shape is the stock loss's share
_STOCK_LOSS = {"keras-fit": {"jax": "keras-stock-jax", "torch": "keras-stock-torch"}, "torch-step": "torch",
               "optax-step": "optax"}


def _step_rows(benchmarks, loss_rows):
    """One row per (training step, framework): the step with the stock loss and with fastloss, their
    ratio, and where the loss-only table has the step's logits shape, the stock loss's share of the
    stock step (loss + gradient time over step time)."""
    times = {}
    for b in benchmarks:
        info = b["extra_info"]
        if info.get("kind") in STEP_KINDS:
            key = (info["kind"], info.get("step") or "x".join(map(str, info["shape"])),
                   info.get("backend") or info.get("device") or "")
            times.setdefault(key, {})[info["provider"]] = (b["stats"]["median"], info)
    rows = []
    for (kind, step, where), d in sorted(times.items()):
        for label, stock, fast in STEP_KINDS[kind]:
            if stock not in d or fast not in d:
                continue
            (ts, info), (tf, _) = d[stock], d[fast]
            batch, _, classes = info["shape"]
            base = _STOCK_LOSS.get(kind)
            base = base.get(where) if isinstance(base, dict) else base
            hit = [r for r in loss_rows if r["provider"] == base and r["shape"] == f"{batch}x{classes}"
                   and r["loss"] == "sparse_softmax_cross_entropy" and not r["variant"] and r["dtype"] == "float32"]
            share = hit[0]["median_ms"] / 1e3 / ts if hit else None
            rows.append(dict(kind=kind, what=label + (f" ({where})" if where else ""), step=step, stock_ms=ts * 1e3,
                             fastloss_ms=tf * 1e3, ratio=ts / tf, loss_share=share))
    return rows


def _step_table(rows):
    head = ("| training step | model | stock loss, ms | fastloss, ms | stock / fastloss | stock loss's share |\n"
            "|---|---|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['what']} | {r['step']} | {r['stock_ms']:.2f} | {r['fastloss_ms']:.2f} | {r['ratio']:.2f}x | "
        + (f"{100 * r['loss_share']:.0f}%" if r["loss_share"] is not None else "") + " |" for r in rows) + "\n"


def _step_chart(rows, path, title):
    """The steps' ratio against the stock loss's share of the stock step: where the loss is a small
    share the ratio can only be ~1 (never below is the bar), where it is large fastloss must win."""
    pts = [r for r in rows if r["loss_share"] is not None]
    if not pts:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        ax.scatter(100 * r["loss_share"], r["ratio"])
        ax.annotate(f"{r['what']}\n{r['step']}", (100 * r["loss_share"], r["ratio"]), fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("stock loss + gradient, % of the stock step")
    ax.set_ylabel("step time, stock / fastloss")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                    help="the training steps, 12 loss cases, distillation, 3 rounds (more for small "
                         "shapes)")
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
    first, second = "not keras-stock-torch and not torch-backend", "keras-stock-torch or torch-backend"
    if mode == "gpu":
        first = "fastloss-jax or jax-autodiff or optax or keras-stock-jax"
        second = "fastloss-triton or torch or keras-stock-torch or torch-compile or liger"
    with tempfile.TemporaryDirectory() as tmp:
        raw = _run_suite(mode, "jax", f"({first})" + only, os.path.join(tmp, "a.json"))
        raw += _run_suite(mode, "torch", f"({second})" + only, os.path.join(tmp, "b.json"))
    rows = _rows(raw)
    step_rows = _step_rows(raw, rows)
    fit_lines = _linear_lines(raw)
    if not rows and not fit_lines and not step_rows:
        raise SystemExit("no benchmark ran")
    machine = socket.gethostname().split(".")[0] or "machine"
    date = datetime.date.today().isoformat()
    hw = f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if mode == "gpu":
        hw = f"{_gpu_name()}; host {hw}"
    title = f"fastloss vs stock Keras, {mode} suite, {date}: {hw}"
    # Training steps first: what users feel. The loss-only table follows.
    table = ((f"## Training steps, stock loss vs fastloss\n\n{_step_table(step_rows)}\n" if step_rows else "")
             + (f"## Loss + gradient alone\n\n{_table(rows)}" if rows else "")
             + "".join(f"\n{line}\n" for line in fit_lines))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{machine}-{date}" + ("-quick" if args.quick else "-gpu" if args.gpu else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(date=date, hardware=hw, mode=mode, steps=step_rows, results=rows,
                       linear_ce=_linear_rows(raw)), f, indent=1)
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
    _step_chart(step_rows, stem + "-steps.png", title)
    print("\n" + table)
    bad = [r for r in rows if not r["correct"]]
    for r in bad:
        print(f"WRONG: {r['provider']} {r['case']}: loss {r['value']!r}, float64 reference {r['reference']!r}")
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
