"""Time Neural Tangents on one (N, dtype) case; run by ``bench_gram.py``.

This file runs under the Python of a separate environment that has
Neural Tangents and JAX installed (see README.rst), so it imports nothing from
limitkernel or from the other benchmark files. It speaks the same protocol as
the in-process workers of ``bench_gram.py``: it loads the inputs from a
``.npy`` file, warms up, times, and prints one line
``BENCH_RESULT {json}`` on stdout with the best time and the peak RSS of
this process.

With ``--x2``, the cross kernels of x against those inputs.

The network is the one the benchmark measures::

    stax.serial(3 * [Dense(w_std=1.5, b_std=0.05), Relu()],
                Dense(w_std=1.5, b_std=0.05))

(``--activation erf`` or ``gelu``: ``Erf()`` or ``Gelu(approximate=False)``
instead of ``Relu()``, for ``bench_activations.py``.)

(The width argument of ``stax.Dense`` does not change the infinite-width
kernels.) The kernel function is jitted with ``static_argnames="get"``; JAX
compiles for each input shape, so the warm-up call uses the full N.
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x", required=True, help=".npy file with the (N, d) inputs")
    parser.add_argument("--x2", help=".npy file with (M, d) inputs: cross kernels of x "
                        "against them (default: x against itself)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--save", help="write the kernels to this .npz file")
    parser.add_argument("--w-std", type=float, default=1.5)
    parser.add_argument("--b-std", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=3)
    parser.add_argument("--activation", default="relu", choices=("relu", "erf", "gelu"),
                        help="the hidden layers' activation (gelu: the exact one)")
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
        layers = []
        for _ in range(args.hidden):
            act = {"relu": stax.Relu, "erf": stax.Erf,
                   "gelu": lambda: stax.Gelu(approximate=False)}[args.activation]()
            layers += [stax.Dense(512, W_std=args.w_std, b_std=args.b_std), act]
        layers.append(stax.Dense(512, W_std=args.w_std, b_std=args.b_std))
        _, _, kernel_fn = stax.serial(*layers)
        kernel_fn = jax.jit(kernel_fn, static_argnames="get")

        x_host = np.load(args.x).astype(args.dtype)
        x = jax.device_put(jnp.asarray(x_host))
        x.block_until_ready()
        del x_host
        x2 = None
        if args.x2:
            x2 = jax.device_put(jnp.asarray(np.load(args.x2).astype(args.dtype)))
            x2.block_until_ready()
        rss_before = _peak_rss_bytes()

        def run():
            out = kernel_fn(x, x2, get=("nngp", "ntk"))
            out.nngp.block_until_ready()
            out.ntk.block_until_ready()
            return out

        t0 = time.perf_counter()
        out = run()  # warm-up: compiles for this shape
        warmup = time.perf_counter() - t0
        times = []
        for _ in range(max(1, args.repeats)):
            out = None
            gc.collect()
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        result_dtype = str(out.ntk.dtype)
        if args.save:
            np.savez(args.save, nngp=np.asarray(out.nngp), ntk=np.asarray(out.ntk))
        _emit(
            {
                "status": "ok",
                "time": min(times),
                "times": times,
                "warmup_time": warmup,
                "peak_rss_bytes": _peak_rss_bytes(),
                "peak_rss_after_setup_bytes": rss_before,
                "result_dtype": result_dtype,
                "versions": versions,
            }
        )
    except (MemoryError, ArithmeticError, LookupError, OSError, RuntimeError,
            TypeError, ValueError) as exc:
        # Anything else still ends the worker; the driver reports "failed".
        _emit(
            {
                "status": "OOM" if _is_oom(exc) else "failed",
                "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                "peak_rss_bytes": _peak_rss_bytes(),
                "versions": versions,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
