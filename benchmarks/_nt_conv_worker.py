"""Time Neural Tangents on one convolutional network; a subprocess worker.

This file runs under the Python of a separate environment that has Neural
Tangents and JAX installed (see README.rst), so it imports nothing from
limitkernel or from the other benchmark files. It loads the inputs from
``.npy`` files, builds the kernel function of one of the networks below, warms
up with one full call, times ``--repeats`` more calls and prints one line
``BENCH_RESULT {json}`` on stdout: the best wall-clock time, all times, the CPU
time of this process in each timed call (all threads; less sensitive than the
wall clock to other load on the machine), the warm-up time, the peak RSS of
this process and the versions. ``--save`` also writes the
kernels to an ``.npz`` file (``nngp``, ``ntk``).

The networks (every layer ``W_std=--w-std``, ``b_std=--b-std``; defaults
1.4142 and 0.05; the ``out_chan`` / ``out_dim`` arguments do not change the
infinite-width kernels)::

    myrtle     (N, H, W, C) images, e.g. 8x8x1:
               stax.serial(Conv(3x3, SAME), Relu, Conv(3x3, SAME), Relu,
                           AvgPool((2, 2), strides=(2, 2), padding='VALID'),
                           Conv(3x3, SAME), Relu, GlobalAvgPool, Dense(1))
    flatten2d  the same without the pool: 3 * [Conv(3x3, SAME), Relu],
               Flatten, Dense(1)
    cnn1d      (N, L, C) sequences: 3 * [Conv(3, SAME), Relu],
               GlobalAvgPool, Dense(1)

The same networks in limitkernel's text form are printed in the result
(``spec``). The kernel function is wrapped by
``nt.batch(kernel_fn, batch_size=B)``, which jit-compiles it and computes the
kernel in B x B blocks (Neural Tangents' docstring advises against jitting the
batched function again); ``--batch-size 0`` computes it in one block (still
jit-compiled). ``nt.batch`` needs N (and N2) divisible by B. The result is
brought to the host with ``block_until_ready()`` inside the timed region.

Example::

    /path/to/nt-venv/bin/python benchmarks/_nt_conv_worker.py \\
        --case myrtle --x digits400.npy --batch-size 20 --repeats 2
"""

import argparse
import gc
import json
import os
import resource
import sys
import time

MARKER = "BENCH_RESULT "


def _peak_rss_bytes():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _emit(result):
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def _is_oom(exc):
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text or (
        "Out of memory" in text
    )


def network(stax, case, w_std, b_std):
    """(stax layers, limitkernel spec text, input rank) of ``case``."""
    if case == "cnn1d":
        def conv():
            return stax.Conv(16, (3,), padding="SAME", W_std=w_std, b_std=b_std)
    else:
        def conv():
            return stax.Conv(16, (3, 3), padding="SAME", W_std=w_std, b_std=b_std)
    readout = stax.Dense(1, W_std=w_std, b_std=b_std)
    c = f"conv(k=3, padding=same, w_std={w_std!r}, b_std={b_std!r})"
    d = f"dense(w_std={w_std!r}, b_std={b_std!r})"
    if case == "myrtle":
        layers = [conv(), stax.Relu(), conv(), stax.Relu(),
                  stax.AvgPool((2, 2), strides=(2, 2), padding="VALID"),
                  conv(), stax.Relu(), stax.GlobalAvgPool(), readout]
        spec = f"{c}, relu, {c}, relu, avg_pool(k=2), {c}, relu, global_avg_pool, {d}"
        return layers, spec, 4
    if case == "flatten2d":
        layers = [conv(), stax.Relu(), conv(), stax.Relu(), conv(), stax.Relu(),
                  stax.Flatten(), readout]
        return layers, f"3 * [{c}, relu], flatten, {d}", 4
    if case == "cnn1d":
        layers = [conv(), stax.Relu(), conv(), stax.Relu(), conv(), stax.Relu(),
                  stax.GlobalAvgPool(), readout]
        return layers, f"3 * [{c}, relu], global_avg_pool, {d}", 3
    raise ValueError(case)


def _load(path, rank, dtype, np):
    x = np.load(path)
    if x.ndim != rank:
        shape = "(N, H, W, C) images" if rank == 4 else "(N, L, C) sequences"
        raise ValueError(f"{path}: expected {shape} ({rank} axes), got shape {x.shape}")
    return x.astype(dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=("myrtle", "cnn1d", "flatten2d"))
    parser.add_argument("--x", required=True, help=".npy file with the inputs")
    parser.add_argument("--x2", help=".npy file with second inputs (default: x itself)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--batch-size", type=int, default=0,
                        help="nt.batch block size; must divide N (and N2); 0: one block")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--save", help="write the kernels to this .npz file")
    parser.add_argument("--w-std", type=float, default=1.4142)
    parser.add_argument("--b-std", type=float, default=0.05)
    args = parser.parse_args(argv)

    # Keep JAX on the CPU and quiet; these must be set before it is imported.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    try:
        import jax

        if args.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import neural_tangents as nt
        import numpy as np
        from neural_tangents import stax
    except (ImportError, AttributeError, RuntimeError) as exc:
        _emit({"status": "n/a", "error": f"{type(exc).__name__}: {exc}"})
        return 0

    versions = {
        "neural_tangents": getattr(nt, "__version__", "?"),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
    }
    try:
        layers, spec, rank = network(stax, args.case, args.w_std, args.b_std)
        x_host = _load(args.x, rank, args.dtype, np)
        x2_host = None if args.x2 is None else _load(args.x2, rank, args.dtype, np)
        n1 = x_host.shape[0]
        n2 = n1 if x2_host is None else x2_host.shape[0]
        if args.batch_size < 0 or (args.batch_size and (n1 % args.batch_size
                                                        or n2 % args.batch_size)):
            raise ValueError(
                f"--batch-size must be 0 or a positive divisor of N = {n1}"
                + ("" if x2_host is None else f" and N2 = {n2}")
                + f", got {args.batch_size}")
        _, _, kernel_fn = stax.serial(*layers)
        kernel_fn = nt.batch(kernel_fn, batch_size=args.batch_size)

        x = jax.device_put(jnp.asarray(x_host))
        x2 = None if x2_host is None else jax.device_put(jnp.asarray(x2_host))
        del x_host, x2_host
        rss_before = _peak_rss_bytes()

        def run():
            out = kernel_fn(x, x2, ("nngp", "ntk"))
            out.nngp.block_until_ready()
            out.ntk.block_until_ready()
            return out

        t0 = time.perf_counter()
        out = run()  # warm-up: compiles for the block shapes
        warmup = time.perf_counter() - t0
        times, cpu_times = [], []
        for _ in range(max(1, args.repeats)):
            out = None
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            out = run()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        nngp, ntk = np.asarray(out.nngp), np.asarray(out.ntk)
        if not (np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))):
            raise ArithmeticError("Neural Tangents returned non-finite kernel entries")
        if args.save:
            tmp = args.save + ".tmp.npz"
            np.savez(tmp, nngp=nngp, ntk=ntk)
            os.replace(tmp, args.save)
        _emit(
            {
                "status": "ok",
                "case": args.case,
                "spec": spec,
                "n1": n1,
                "n2": n2,
                "input_shape": list(x.shape[1:]),
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "result_dtype": str(ntk.dtype),
                "time": min(times),
                "times": times,
                "cpu_times": cpu_times,
                "warmup_time": warmup,
                "peak_rss_bytes": _peak_rss_bytes(),
                "peak_rss_after_setup_bytes": rss_before,
                "versions": versions,
            }
        )
    except (MemoryError, ArithmeticError, LookupError, OSError, RuntimeError,
            TypeError, ValueError) as exc:
        # Anything else still ends the worker; the driver reports "failed".
        _emit(
            {
                "status": "OOM" if _is_oom(exc) else "failed",
                "case": args.case,
                "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                "peak_rss_bytes": _peak_rss_bytes(),
                "versions": versions,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
