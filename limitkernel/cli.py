"""Command line: ``limitkernel kernel | activations | demo``.

Errors print one line on stderr and exit with status 2; outputs are written to a
temporary file and renamed into place, so a failed run leaves nothing behind.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from .spec import SpecError, as_spec, parse

__all__ = ["main"]

DEMO_SPEC = "4 * [dense(w_std=1, b_std=0.1), relu], dense(w_std=1, b_std=0.1)"


class CLIError(Exception):
    """An error to report on one line, without a traceback."""


def load_spec(text):
    """The text form, a JSON string, or a path to a file holding either."""
    if os.path.isfile(text):
        with open(text) as fh:
            text = fh.read()
    return parse(text)


def load_array(path, key="x"):
    """Load a 2D array from .npy, .npz (array ``key``) or .csv."""
    if not os.path.exists(path):
        raise CLIError(f"input file not found: {path}")
    lower = path.lower()
    try:
        if lower.endswith(".npz"):
            with np.load(path) as data:
                if key in data:
                    return data[key]
                if len(data.files) == 1:
                    return data[data.files[0]]
                raise CLIError(f"{path} holds arrays {data.files} but none named {key!r}")
        if lower.endswith(".npy"):
            return np.load(path)
        if lower.endswith(".csv") or lower.endswith(".txt"):
            return _load_csv(path)
    except (ValueError, OSError) as err:
        raise CLIError(f"cannot read {path}: {err}") from None
    raise CLIError(f"unknown input format for {path}: use .npy, .npz or .csv")


def _load_csv(path):
    with open(path) as fh:
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",") if v.strip()]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    data = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    return data


def save_npz(path, arrays):
    """Write arrays to ``path`` atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise CLIError(f"output directory does not exist: {directory}")
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cmd_kernel(args):
    from .gram import kernel

    spec = load_spec(args.arch)
    x1 = load_array(args.x)
    x2 = load_array(args.x2) if args.x2 else None
    get = tuple(k.strip() for k in args.get.split(",") if k.strip())
    start = time.perf_counter()
    out = kernel(spec, x1, x2, get=get, dtype=args.dtype, progress=args.progress)
    elapsed = time.perf_counter() - start
    save_npz(args.out, out)
    shape = "x".join(str(s) for s in next(iter(out.values())).shape)
    print(f"wrote {', '.join(out)} ({shape}, {args.dtype}) to {args.out} in {elapsed:.2f} s")


def _cmd_activations(args):
    from .activations import REGISTRY

    print(f"{'name':<14} {'parameters':<28} method")
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        params = ", ".join(f"{k}={v:g}" for k, v in cls.defaults.items()) or "-"
        print(f"{name:<14} {params:<28} {cls.method}")
    print("\nAny other activation: limitkernel.Numerical(fn, dfn=None) in Python.")


def circle_inputs(n):
    """n points x = (cos γ, sin γ) on the unit circle, γ in [0, 2π)."""
    gamma = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return gamma, np.stack([np.cos(gamma), np.sin(gamma)], axis=1)


def _cmd_demo(args):
    from .gram import kernel

    spec = as_spec(args.arch) if args.arch else parse(DEMO_SPEC)
    gamma, x = circle_inputs(args.points)
    start = time.perf_counter()
    out = kernel(spec, x)
    elapsed = time.perf_counter() - start
    nngp, ntk = out["nngp"], out["ntk"]
    print(f"limitkernel demo: {spec}")
    print(f"inputs: {args.points} points on the unit circle x = (cos γ, sin γ) "
          "(Jacot et al. 2018, Figure 1)")
    print(f"computed NNGP and NTK ({args.points}x{args.points}) in {elapsed:.3f} s\n")
    print(f"{'γ / π':>8} {'K(x0, x)':>14} {'Θ(x0, x)':>14}")
    for index in np.linspace(0, args.points // 2, 9).astype(int):
        print(f"{gamma[index] / np.pi:8.3f} {nngp[0, index]:14.8f} {ntk[0, index]:14.8f}")
    eig = np.linalg.eigvalsh(ntk)
    print(f"\nNTK eigenvalues: smallest {eig[0]:.3e}, largest {eig[-1]:.3e}, "
          f"condition number {eig[-1] / max(eig[0], 1e-300):.3e}")
    if args.out:
        save_npz(args.out, {"gamma": gamma, "x": x, **out})
        print(f"wrote gamma, x, nngp, ntk to {args.out}")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="limitkernel",
        description="Exact infinite-width NNGP and NTK kernels of fully-connected networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("kernel", help="Gram matrices of a spec on inputs")
    p.add_argument("--arch", required=True,
                   help="spec text, e.g. '3 * [dense(w_std=1.5, b_std=0.05), relu], dense',"
                        " or a file holding the text or JSON form")
    p.add_argument("--x", required=True, help="inputs (n, d): .npy, .npz (array x) or .csv")
    p.add_argument("--x2", help="second input set (m, d); default: x with itself")
    p.add_argument("--get", default="nngp,ntk", help="kernels to compute (default nngp,ntk)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--out", required=True, help="output .npz with arrays nngp and ntk")
    p.add_argument("--progress", action="store_true", help="progress bar (needs tqdm)")
    p.set_defaults(run=_cmd_kernel)

    p = sub.add_parser("activations", help="list activations and how each is computed")
    p.set_defaults(run=_cmd_activations)

    p = sub.add_parser("demo", help="kernels on the unit circle (built-in input set)")
    p.add_argument("--arch", help=f"spec (default: {DEMO_SPEC})")
    p.add_argument("--points", type=int, default=256, help="points on the circle")
    p.add_argument("--out", help="also write the kernels to this .npz")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except BrokenPipeError:
        return 0
    except (CLIError, SpecError, ValueError, MemoryError, FloatingPointError,
            OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"limitkernel: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
