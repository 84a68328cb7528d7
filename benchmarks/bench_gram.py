"""Side-by-side timing of NNGP + NTK Gram matrices: limitkernel against baselines.

For every N and dtype this runs, each in its own fresh subprocess so that
the peak resident memory of every method is measured separately:

* ``floor``        numpy's ``x @ x.T`` alone (nothing that starts from the
                   input Gram matrix can be faster; BLAS syrk, one triangle),
* ``gemm``         numpy's ``x @ x.T.copy()`` (BLAS gemm, the full product),
* ``numpy``        a plain numpy layer-by-layer implementation
                   (``_numpy_reference.py``),
* ``limitkernel``  ``limitkernel.kernel(spec, x, None, get=("nngp", "ntk"),
                   dtype=dtype)``,
* ``products32``   the same with ``precision="float32"`` (the input products
                   x·x' as a float32 GEMM; float32 output only),
* ``nt``           Neural Tangents (JAX, CPU) under the Python of a separate
                   environment (``_nt_worker.py``),

on the network ``3 * [dense(w_std=1.5, b_std=0.05), relu],
dense(w_std=1.5, b_std=0.05)`` ("ntk" parameterisation), x against itself,
x of shape (N, 784) drawn from a standard normal distribution with a fixed
seed. With ``--cross M``, x against a second set x2 of M inputs (another draw
of the same distribution): the cross kernels (N, M), with the floor and the
GEMM both ``x @ x2.T`` (there is no triangle to save) and no numpy baseline.
Each worker warms up (JIT compilation and thread pools) before it is timed;
the time is the best of ``--repeats`` calls for N <= ``--repeat-max-n`` and of
a single call above. The table shows the time, the absolute peak RSS
of the worker process (``ru_maxrss``, including the interpreter, the inputs
and the output), the ratios to the floor and to the full GEMM, the ratio
Neural Tangents / limitkernel (in the summary, also Neural Tangents /
products32) and, for limitkernel in float32, its largest error against float64
on the first rows. See README.rst in this folder.
"""

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

SPEC_TEXT = "3 * [dense(w_std=1.5, b_std=0.05), relu], dense(w_std=1.5, b_std=0.05)"
INPUT_DIM = 784
DEFAULT_NS = (1000, 2000, 4000, 8000, 16000)
DEFAULT_DTYPES = ("float64", "float32")
METHODS = ("floor", "gemm", "numpy", "limitkernel", "products32", "nt")
LABELS = {
    "floor": "floor (x @ x.T)",
    "gemm": "gemm (x @ x.T.copy())",
    "numpy": "numpy layer-by-layer",
    "limitkernel": "limitkernel",
    "products32": "limitkernel, f32 x·x'",
    "nt": "neural-tangents",
}
DEFAULT_NT_PYTHON = Path("/work/nt-venv/bin/python")
MARKER = "BENCH_RESULT "
GB = 1e9
# Rows of limitkernel's float32 output compared with the same rows in float64.
ERROR_ROWS = 256


# ---------------------------------------------------------------------------
# Worker side: runs in a fresh subprocess, one method, one (N, dtype).
# ---------------------------------------------------------------------------


def _peak_rss_bytes():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _emit(result):
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def _reference():
    """The plain-numpy baseline module, which lives next to this file."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import _numpy_reference

    return _numpy_reference


def _make_method(method, dtype, gram_method="syrk"):
    """Return (function of x and x2, versions dict) for an in-environment method;
    x2 is None for x against itself."""
    versions = {"numpy": np.__version__}
    _numpy_reference = _reference()
    if method in ("floor", "gemm"):

        def run(x, x2):
            if x2 is not None:
                return x @ x2.T
            return _numpy_reference.gram(x, gram_method if method == "floor" else "gemm")

    elif method == "numpy":

        def run(x, x2):
            if x2 is not None:
                raise ValueError("the numpy baseline computes x against itself only")
            return _numpy_reference.nngp_ntk(x, gram_method=gram_method)

    elif method in ("limitkernel", "products32"):
        if (REPO_ROOT / "limitkernel").is_dir():
            sys.path.insert(0, str(REPO_ROOT))
        import limitkernel

        versions["limitkernel"] = getattr(limitkernel, "__version__", "?")
        kernel = limitkernel.kernel
        np_dtype = np.dtype(dtype)
        precision = "float32" if method == "products32" else "float64"

        def run(x, x2):
            return kernel(SPEC_TEXT, x, x2, get=("nngp", "ntk"), dtype=np_dtype,
                          precision=precision)

    else:
        raise ValueError(f"unknown method {method!r}")
    return run, versions


def _float32_error(out, x, x2=None):
    """Largest error of a float32 result against float64, on its first rows.

    The reference is ``limitkernel.kernel`` in float64 on the same inputs (the
    first ``ERROR_ROWS`` of them against all columns). Returns, per kernel, the
    largest ``|a - b| / |b|`` over entries ("entry") and the largest
    ``|a - b| / sqrt(K(x, x) K(x', x'))`` ("diag").
    """
    import limitkernel

    x64 = np.asarray(x, dtype=np.float64)
    cols = x64 if x2 is None else np.asarray(x2, dtype=np.float64)
    rows = min(ERROR_ROWS, len(x64))
    ref = limitkernel.kernel(SPEC_TEXT, x64[:rows], cols, get=("nngp", "ntk"))
    diag = limitkernel.kernel_diag(SPEC_TEXT, x64)
    diag2 = diag if x2 is None else limitkernel.kernel_diag(SPEC_TEXT, cols)
    errors = {}
    for kind in ("nngp", "ntk"):
        a = np.asarray(out[kind][:rows], dtype=np.float64)
        b = ref[kind]
        scale = np.sqrt(np.outer(diag[kind][:rows], diag2[kind]))
        errors[kind] = {"entry": float(np.max(np.abs(a - b) / np.abs(b))),
                        "diag": float(np.max(np.abs(a - b) / scale))}
    return errors


def _describe(out):
    """Dtype and shape of a method's output, for the record."""
    if isinstance(out, dict):
        return {k: [str(np.asarray(v).dtype), list(np.shape(v))] for k, v in out.items()}
    return {"out": [str(out.dtype), list(out.shape)]}


def worker_main(argv):
    parser = argparse.ArgumentParser(prog="bench_gram.py --worker")
    parser.add_argument("--worker", required=True,
                        choices=[m for m in METHODS if m != "nt"])
    parser.add_argument("--x", required=True)
    parser.add_argument("--x2")
    parser.add_argument("--dtype", required=True, choices=DEFAULT_DTYPES)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup-n", type=int, default=256)
    parser.add_argument("--save")
    parser.add_argument("--gram", default="syrk", choices=("syrk", "gemm"))
    args = parser.parse_args(argv)

    try:
        run, versions = _make_method(args.worker, args.dtype, args.gram)
    except (ImportError, AttributeError) as exc:
        _emit({"status": "n/a", "error": f"{type(exc).__name__}: {exc}"})
        return 0

    try:
        x = np.load(args.x).astype(args.dtype)
        x2 = None if args.x2 is None else np.load(args.x2).astype(args.dtype)
        t0 = time.perf_counter()
        warm = np.ascontiguousarray(x[: args.warmup_n])
        run(warm, None if x2 is None else warm[: max(1, len(warm) // 2)])  # compile, threads
        warmup = time.perf_counter() - t0
        gc.collect()
        setup_rss = _peak_rss_bytes()
        times = []
        out = None
        for _ in range(max(1, args.repeats)):
            out = None
            gc.collect()
            t0 = time.perf_counter()
            out = run(x, x2)
            times.append(time.perf_counter() - t0)
        if args.save and isinstance(out, dict):
            np.savez(args.save, **{k: np.asarray(v) for k, v in out.items()})
        extra = {}
        if args.worker in ("limitkernel", "products32") and args.dtype == "float32":
            extra["f32_error"] = _float32_error(out, x, x2)
        _emit(
            {
                **extra,
                "status": "ok",
                "time": min(times),
                "times": times,
                "warmup_time": warmup,
                "peak_rss_bytes": _peak_rss_bytes(),
                "peak_rss_after_setup_bytes": setup_rss,
                "output": _describe(out),
                "versions": versions,
            }
        )
    except MemoryError as exc:
        _emit({"status": "OOM", "error": f"{type(exc).__name__}: {exc}",
               "peak_rss_bytes": _peak_rss_bytes()})
    except (ArithmeticError, LookupError, OSError, RuntimeError, TypeError,
            ValueError) as exc:
        # Anything else still ends the worker; the driver reports "failed".
        _emit({"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:500]}",
               "peak_rss_bytes": _peak_rss_bytes()})
    return 0


# ---------------------------------------------------------------------------
# Driver side.
# ---------------------------------------------------------------------------


def _total_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _rss_of(pid):
    """Current resident memory of a process in bytes (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _nt_python(explicit):
    if explicit:
        return explicit
    env = os.environ.get("LIMITKERNEL_NT_PYTHON")
    if env:
        return env
    if DEFAULT_NT_PYTHON.exists():
        return str(DEFAULT_NT_PYTHON)
    return None


def run_worker(cmd, timeout, mem_limit, env=None, verbose=False):
    """Run one worker under a wall-clock timeout and a resident-memory guard.

    Returns the worker's result dict; a worker that is killed, times out or
    prints no result gets a status of "OOM", "timeout" or "failed".
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        killed_for = None
        seen_rss = 0
        while True:
            try:
                returncode = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            rss = _rss_of(proc.pid)
            if rss is not None:
                seen_rss = max(seen_rss, rss)
                if mem_limit and rss > mem_limit:
                    killed_for = "OOM"
            if time.monotonic() - start > timeout:
                killed_for = "timeout"
            if killed_for:
                proc.kill()
                returncode = proc.wait()
                break
        elapsed = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if verbose and stderr.strip():
        sys.stderr.write(stderr)
    result = None
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER):])
    if result is None:
        if killed_for == "OOM":
            note = f"killed by the memory guard at {seen_rss / GB:.1f} GB"
            result = {"status": "OOM", "error": note}
        elif killed_for == "timeout":
            result = {"status": "timeout", "error": f"killed after {timeout:g} s"}
        elif returncode in (-9, 137):
            # SIGKILL that the guard did not send: the kernel's OOM killer.
            result = {"status": "OOM", "error": "killed (SIGKILL, out of memory?)"}
        elif returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            result = {"status": "crashed", "error": f"worker died of {name}",
                      "signal": -returncode}
        else:
            tail = stderr.strip().splitlines()[-1:] or [f"exit code {returncode}"]
            result = {"status": "failed", "error": tail[0][:300]}
        if seen_rss:
            result.setdefault("peak_rss_bytes", seen_rss)
    result["wall_time"] = elapsed
    return result


def _label(method, res):
    """Row label; a star marks a rerun with the gemm form of x @ x.T."""
    return LABELS[method] + (" *" if res.get("gram") == "gemm" else "")


def _run_cell(method, n, dtype, x_path, args, mem_limit, nt_python, save_dir,
              x2_path=None):
    """Run (or skip) one method at one (N, dtype); return its result dict."""
    itemsize = np.dtype(dtype).itemsize
    if method == "products32" and dtype != "float32":
        return {"status": "skipped", "error": "input products in float32 are for float32 "
                "output only"}
    if method == "numpy" and x2_path is not None:
        return {"status": "skipped", "error": "the numpy baseline computes x against "
                "itself only"}
    if method == "numpy":
        need = _reference().estimate_bytes(n, INPUT_DIM, itemsize)
        if args.numpy_max_n and n > args.numpy_max_n:
            return {"status": "skipped", "error": f"N above --numpy-max-n "
                    f"{args.numpy_max_n}"}
        if mem_limit and need > mem_limit:
            return {"status": "skipped", "error": f"needs about {need / GB:.0f} GB, "
                    f"more than --mem-limit-gb {mem_limit / GB:g}"}
    if method == "nt":
        if nt_python is None:
            return {"status": "n/a", "error": "no Python with neural-tangents "
                    "(set LIMITKERNEL_NT_PYTHON or --nt-python)"}
        if args.nt_max_n and n > args.nt_max_n:
            return {"status": "skipped", "error": f"N above --nt-max-n {args.nt_max_n}"}

    repeats = args.repeats if n <= args.repeat_max_n else 1
    save = save_dir / f"{method}_{n}_{dtype}.npz" if save_dir else None
    if method == "nt":
        cmd = [nt_python, str(HERE / "_nt_worker.py")]
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
               "--warmup-n", str(args.warmup_n)]
        env = None
    cmd += ["--x", str(x_path), "--dtype", dtype, "--repeats", str(repeats)]
    if x2_path is not None:
        cmd += ["--x2", str(x2_path)]
    if save and method != "floor":
        cmd += ["--save", str(save)]
    res = run_worker(cmd, args.timeout, mem_limit, env=env, verbose=args.verbose)
    if res["status"] == "crashed" and method in ("floor", "numpy"):
        # Some OpenBLAS builds crash in threaded dsyrk, which numpy uses for
        # x @ x.T, at large N; measure the gemm form instead and say so.
        first = res["error"]
        res = run_worker(cmd + ["--gram", "gemm"], args.timeout, mem_limit, env=env,
                         verbose=args.verbose)
        res["gram"] = "gemm"
        res["error"] = (f"x @ x.T crashed ({first}); rerun as x @ x.T.copy() (gemm)"
                        + (f": {res['error']}" if res.get("error") else ""))
    res["saved"] = bool(res["status"] == "ok" and save and save.exists())
    return res


def _parse_list(text, convert):
    return [convert(item) for item in text.split(",") if item.strip()]


def _positive_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser():
    total = _total_memory_bytes()
    default_limit = round(0.9 * total / GB, 1) if total else 0.0
    parser = argparse.ArgumentParser(
        description="Time NNGP + NTK Gram matrices: limitkernel against numpy "
        "(floor and layer-by-layer) and Neural Tangents, side by side.",
    )
    parser.add_argument("--n", default=",".join(map(str, DEFAULT_NS)),
                        help="comma-separated numbers of inputs (default %(default)s)")
    parser.add_argument("--dtype", default=",".join(DEFAULT_DTYPES),
                        help="comma-separated dtypes among float64, float32 "
                        "(default %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods among {', '.join(METHODS)} "
                        "(default all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="time the best of this many calls for "
                        "N <= --repeat-max-n (default %(default)s)")
    parser.add_argument("--repeat-max-n", type=_positive_int, default=8000,
                        help="above this N, time a single call (default %(default)s)")
    parser.add_argument("--nt-max-n", type=_positive_int, default=8000,
                        help="skip Neural Tangents above this N; it needs about "
                        "18 GB at N=16000 in float64 (default %(default)s)")
    parser.add_argument("--numpy-max-n", type=_positive_int, default=0,
                        help="skip the numpy layer-by-layer baseline above this N "
                        "(default 0: only skip where its estimated memory exceeds "
                        "--mem-limit-gb)")
    parser.add_argument("--mem-limit-gb", type=float, default=default_limit,
                        help="kill a worker whose resident memory exceeds this; "
                        "0 disables the guard (default %(default)s, 90%% of RAM)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds allowed for one worker (default %(default)s)")
    parser.add_argument("--warmup-n", type=_positive_int, default=256,
                        help="inputs used by the warm-up call of the numpy and "
                        "limitkernel workers (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the standard normal inputs (default %(default)s)")
    parser.add_argument("--cross", type=_positive_int, default=0, metavar="M",
                        help="time the cross kernels of x (N inputs) against a second "
                        "set of M inputs (seed + 1) instead of x against itself "
                        "(default 0: x against itself)")
    parser.add_argument("--nt-python",
                        help="Python with neural-tangents installed (default: "
                        f"$LIMITKERNEL_NT_PYTHON, else {DEFAULT_NT_PYTHON} if it exists)")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--verbose", action="store_true",
                        help="pass the workers' stderr through")
    return parser


def _fmt_time(result):
    if result["status"] != "ok":
        return result["status"]
    return f"{result['time']:.3f}"


def _fmt_rss(result):
    rss = result.get("peak_rss_bytes")
    return f"{rss / GB:.2f}" if rss else "-"


def _ratio(num, den):
    if not num or not den or num["status"] != "ok" or den["status"] != "ok":
        return "-"
    if den["time"] <= 0:
        return "-"
    return f"{num['time'] / den['time']:.2f}"


HEADER = ("N", "dtype", "method", "time (s)", "peak RSS (GB)", "/ floor", "/ gemm",
          "NT / lk", "f32 err")
WIDTHS = (6, 7, 23, 10, 13, 8, 7, 7, 8)


def _fmt_error(result):
    """The largest float32 error against float64 relative to the diagonals."""
    errors = (result or {}).get("f32_error")
    if not errors:
        return ""
    return f"{max(e['diag'] for e in errors.values()):.1e}"


def _row(n, dtype, method, res, group):
    nt_over_lk = (_ratio(res, group.get("limitkernel")) if method == "nt" else
                  _ratio(group.get("nt"), res) if method == "products32" else "")
    return _format_row((n, dtype, _label(method, res), _fmt_time(res), _fmt_rss(res),
                        _ratio(res, group.get("floor")), _ratio(res, group.get("gemm")),
                        nt_over_lk, _fmt_error(res)))


def _format_row(cells):
    parts = []
    for i, (cell, width) in enumerate(zip(cells, WIDTHS)):
        parts.append(str(cell).ljust(width) if i in (1, 2) else str(cell).rjust(width))
    return "  ".join(parts)


def _table_rows(results, ns, dtypes, methods):
    rows = []
    for n in ns:
        for dtype in dtypes:
            group = results.get((n, dtype), {})
            for method in methods:
                res = group.get(method)
                if res is not None:
                    rows.append(_row(n, dtype, method, res, group))
    return rows


def _max_rel_diff(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    denom = np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(a - b) / denom))


def driver_main(argv):
    args = build_parser().parse_args(argv)
    ns = _parse_list(args.n, int)
    dtypes = _parse_list(args.dtype, str)
    methods = _parse_list(args.methods, str)
    for dtype in dtypes:
        if dtype not in DEFAULT_DTYPES:
            raise SystemExit(f"unknown dtype {dtype!r}; use float64 and/or float32")
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; use some of {METHODS}")
    methods = [m for m in METHODS if m in methods]
    if not ns or min(ns) <= 0:
        raise SystemExit("--n needs positive sizes")
    mem_limit = args.mem_limit_gb * GB if args.mem_limit_gb > 0 else None
    nt_python = _nt_python(args.nt_python)
    smallest = min(ns)

    if args.cross:
        print(f"bench_gram: NNGP + NTK of x against x2 (cross kernels, N x {args.cross}), "
              f"x, x2 ~ standard normal (seeds {args.seed}, {args.seed + 1}), "
              f"d = {INPUT_DIM}")
    else:
        print("bench_gram: NNGP + NTK of x with itself, x ~ standard normal "
              f"(seed {args.seed}), d = {INPUT_DIM}")
    print(f"  network: {SPEC_TEXT}")
    print(f"  machine: {os.cpu_count()} CPUs, "
          f"{(_total_memory_bytes() or 0) / GB:.1f} GB RAM, {platform.machine()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    print(f"  Neural Tangents python: {nt_python or 'not found (column shows n/a)'}")
    guard = f"memory guard {args.mem_limit_gb:g} GB" if mem_limit else "memory guard off"
    print(f"  repeats: best of {args.repeats} for N <= {args.repeat_max_n}, else 1; "
          f"timeout {args.timeout:g} s; {guard}")
    print(flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench_gram_"))
    results = {}
    versions = {}
    saved = {}
    print(_format_row(HEADER))
    print(_format_row(["-" * w for w in WIDTHS]), flush=True)
    x2_path = None
    if args.cross:
        LABELS.update(floor="floor (x @ x2.T)", gemm="gemm (x @ x2.T)")
        x2_path = workdir / "x2.npy"
        np.save(x2_path, np.random.default_rng(args.seed + 1).standard_normal(
            (args.cross, INPUT_DIM)))
    try:
        for n in ns:
            x_path = workdir / f"x_{n}.npy"
            rng = np.random.default_rng(args.seed)
            np.save(x_path, rng.standard_normal((n, INPUT_DIM)))
            for dtype in dtypes:
                group = results.setdefault((n, dtype), {})
                for method in methods:
                    res = _run_cell(method, n, dtype, x_path, args, mem_limit,
                                    nt_python, workdir if n == smallest else None,
                                    x2_path)
                    if res.pop("saved", None):
                        saved[(method, dtype)] = workdir / f"{method}_{n}_{dtype}.npz"
                    prefix = "nt:" if method == "nt" else ""
                    versions.update({prefix + k: v
                                     for k, v in res.get("versions", {}).items()})
                    group[method] = res
                    print(_row(n, dtype, method, res, group), flush=True)
            x_path.unlink()

        print()
        print("Summary")
        print(_format_row(HEADER))
        print(_format_row(["-" * w for w in WIDTHS]))
        for row in _table_rows(results, ns, dtypes, methods):
            print(row)
        print()
        if args.cross:
            print(f"N: rows of the cross kernels (N x {args.cross}). / floor, / gemm: "
                  "time over numpy's x @ x2.T (both) for the same N and dtype. NT / lk: "
                  "Neural Tangents time over limitkernel time.")
        else:
            print("/ floor, / gemm: time over numpy's x @ x.T (syrk) and over "
                  "x @ x.T.copy() (gemm) for the same N and dtype. NT / lk: Neural "
                  "Tangents time over limitkernel time (on the f32 x·x' row: over "
                  "that row's time).")
        print(f"f32 err: limitkernel float32 against limitkernel float64 on the "
              f"first {ERROR_ROWS} rows, max |a - b| / sqrt(K(x, x) K(x', x')) over "
              "both kernels (per kernel, and relative to each entry, below).")
        print("* the x @ x.T of this row was computed as x @ x.T.copy() (BLAS gemm) "
              "because x @ x.T (BLAS syrk) crashed; see the notes.")
        print("peak RSS: ru_maxrss of the worker process (interpreter, inputs, "
              "outputs and all), 1 GB = 1e9 bytes.")

        for (n, dtype), group in results.items():
            for method in ("limitkernel", "products32"):
                errors = (group.get(method) or {}).get("f32_error")
                if errors:
                    print(f"  N={n} {LABELS[method]} float32 vs float64: " + "; ".join(
                        f"{kind} {e['diag']:.2e} of sqrt(K(x,x)K(x',x')), "
                        f"{e['entry']:.2e} of the entry" for kind, e in errors.items()))
        notes = []
        for (n, dtype), group in results.items():
            for method, res in group.items():
                if not res.get("error"):
                    continue
                if res["status"] == "n/a":
                    notes.append(f"  {LABELS[method]} not available: {res['error']}")
                else:
                    notes.append(f"  N={n} {dtype} {_label(method, res)}: "
                                 f"{res['status']}, {res['error']}")
        if notes:
            print()
            print("Notes")
            for note in dict.fromkeys(notes):
                print(note)

        print()
        print(f"Sanity check at N = {smallest}: max over entries of |a - b| / |b|, "
              "b = numpy layer-by-layer in float64 (in the same dtype when float64 "
              "was not run)")
        any_check = False
        for dtype in dtypes:
            ref_path = saved.get(("numpy", "float64")) or saved.get(("numpy", dtype))
            if ref_path is None:
                continue
            ref = np.load(ref_path)
            ref_dtype = str(ref["ntk"].dtype)
            for method in ("numpy", "limitkernel", "nt"):
                path = saved.get((method, dtype))
                if path is None or path == ref_path:
                    continue
                other = np.load(path)
                diffs = [
                    f"{key} {_max_rel_diff(other[key], ref[key]):.2e}"
                    for key in ("nngp", "ntk")
                    if key in other and key in ref
                ]
                print(f"  {dtype}  {LABELS[method]:<21} vs numpy {ref_dtype}: "
                      + ", ".join(diffs))
                any_check = True
        for dtype in dtypes:
            # Without the numpy baseline (cross kernels), the two against each other.
            lk_path, nt_path = saved.get(("limitkernel", dtype)), saved.get(("nt", dtype))
            if saved.get(("numpy", dtype)) or lk_path is None or nt_path is None:
                continue
            ours, theirs = np.load(lk_path), np.load(nt_path)
            diffs = [f"{key} {_max_rel_diff(theirs[key], ours[key]):.2e}"
                     for key in ("nngp", "ntk")]
            print(f"  {dtype}  {LABELS['nt']:<21} vs limitkernel: " + ", ".join(diffs))
            any_check = True
        if not any_check:
            print("  (not available: needs the numpy baseline and limitkernel or "
                  "Neural Tangents at the smallest N, or both of these)")

        if versions:
            print()
            print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))

        if args.json:
            payload = {
                "spec": SPEC_TEXT,
                "input_dim": INPUT_DIM,
                "seed": args.seed,
                "cross": args.cross,
                "inputs": "standard normal",
                "versions": versions,
                "results": [
                    dict(res, n=n, dtype=dtype, method=method)
                    for (n, dtype), group in results.items()
                    for method, res in group.items()
                ],
            }
            with open(args.json, "w") as fh:
                json.dump(payload, fh, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--worker":
        return worker_main(argv)
    return driver_main(argv)


if __name__ == "__main__":
    sys.exit(main())
