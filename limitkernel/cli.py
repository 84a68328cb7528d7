"""Command line: ``limitkernel kernel | activations | demo | compare | predict | check``.

Errors print one line on stderr and exit with status 2; outputs are written to a
temporary file and renamed into place, so a failed run leaves nothing behind.
"""

import argparse
import os
import sys
import time

import numpy as np

from ._io import atomic_path
from .experiments import DEMO_SCALES, DEMO_SPEC
from .spec import SpecError, parse

__all__ = ["main"]


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
        if lower.endswith((".csv", ".txt")):
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
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _cmd_kernel(args):
    from .gram import kernel

    if args.status:
        from .distributed import status

        print(status(args.status))
        return
    missing = [flag for flag, value in (("--arch", args.arch), ("--x", args.x),
                                        ("--out", args.out)) if not value]
    if missing:
        raise CLIError(f"kernel needs {', '.join(missing)} (or --status DIR to report on "
                       "a store)")
    spec = load_spec(args.arch)
    x1 = load_array(args.x)
    x2 = load_array(args.x2) if args.x2 else None
    get = tuple(k.strip() for k in args.get.split(",") if k.strip())
    if not args.out.lower().endswith(".npz"):
        _kernel_to_store(args, spec, x1, x2, get)
        return
    if args.memory or args.scheduler:
        raise CLIError("--memory and --scheduler write an on-disk store: give a directory "
                       f"for --out, not {args.out}")
    start = time.perf_counter()
    out = kernel(spec, x1, x2, get=get, dtype=args.dtype, progress=args.progress)
    elapsed = time.perf_counter() - start
    save_npz(args.out, out)
    shape = "x".join(str(s) for s in next(iter(out.values())).shape)
    print(f"wrote {', '.join(out)} ({shape}, {args.dtype}) to {args.out} in {elapsed:.2f} s")


def _kernel_to_store(args, spec, x1, x2, get):
    from .distributed import kernel_to_store, status

    start = time.perf_counter()
    kernel_to_store(spec, x1, x2, path=args.out, get=get, dtype=args.dtype,
                    memory=args.memory, scheduler=args.scheduler,
                    progress=True if args.progress else None)
    elapsed = time.perf_counter() - start
    state = status(args.out)
    n, m = state.shape
    print(f"wrote {', '.join(state.kinds)} ({n}x{m}, {state.dtype}) to the store {args.out} "
          f"in {elapsed:.2f} s ({state.total} tiles of edge {state.tile}); open it with "
          "limitkernel.open_store or np.load(..., mmap_mode='r')")


def _cmd_activations(args):
    from .activations import REGISTRY

    print(f"{'name':<14} {'parameters':<28} method")
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        params = ", ".join(f"{k}={v:g}" for k, v in cls.defaults.items()) or "-"
        print(f"{name:<14} {params:<28} {cls.method}")
        definition = (cls.__doc__ or "").strip().splitlines()
        if definition:
            print(f"{'':<14} {definition[0]}")
    print("\nAny other activation: limitkernel.Numerical(fn, dfn=None) in Python.")


def _cmd_demo(args):
    from .experiments import circle, run_demo

    spec = load_spec(args.arch) if args.arch else parse(DEMO_SPEC)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise CLIError(f"output directory does not exist: {os.path.dirname(args.out)}")
    if args.points is not None and args.points < 2:
        raise CLIError(f"--points must be at least 2, got {args.points}")
    result = run_demo(args.out_dir, "quick" if args.quick else args.scale, spec,
                      points=args.points)
    if args.out:
        from .gram import kernel

        gamma = np.asarray(result.fig1.coordinates["kernel"])
        x = circle(gamma)
        save_npz(args.out, {"gamma": gamma, "x": x, **kernel(spec, x)})
        print(f"wrote gamma, x and the limiting nngp, ntk on the unit circle to {args.out}")


def _parse_widths(text):
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise CLIError(f"--widths: expected comma-separated integers such as 64,256,1024, "
                       f"got {text!r}") from None
    if not widths or min(widths) < 1:
        raise CLIError(f"--widths: give positive widths such as 64,256,1024, got {text!r}")
    return widths


def _cmd_compare(args):
    from .experiments import run_compare

    if args.arch is None and args.torch_model is None:
        raise CLIError("give --arch SPEC, or --torch-model FILE to take the model's spec")
    spec = None if args.arch is None else load_spec(args.arch)
    model = None if args.torch_model is None else _load_torch_model(args.torch_model)
    widths = _parse_widths(args.widths)
    if args.seeds < 1 or args.steps < 0:
        raise CLIError(f"--seeds must be >= 1 and --steps >= 0, got {args.seeds} and "
                       f"{args.steps}")
    if args.y_columns < 1:
        raise CLIError(f"--y-columns must be at least 1, got {args.y_columns}")
    x, y = load_training(args.data, args.y_columns)
    x_test = load_array(args.test, "x") if args.test else None
    x_kernel = None
    if args.kernel_inputs is not None:
        if args.kernel_inputs < 1:
            raise CLIError(f"--kernel-inputs must be at least 1, got {args.kernel_inputs}")
        x_kernel = np.asarray(x)[:args.kernel_inputs]
    run_compare(spec, x, y, x_test, widths, args.seeds, args.steps, args.lr, args.out_dir,
                diag_reg=args.diag_reg, torch_model=model, x_kernel=x_kernel)


def _load_torch_model(path):
    """A whole model saved with ``torch.save(model, path)`` (this runs pickled code)."""
    import pickle

    from .torch_interop import _torch

    torch = _torch()
    if not os.path.exists(path):
        raise CLIError(f"--torch-model: file not found: {path}")
    try:
        model = torch.load(path, weights_only=False, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ImportError,
            ValueError) as err:
        raise CLIError(f"--torch-model: cannot load {path} ({type(err).__name__}: {err}); "
                       "save the whole model with torch.save(model, path)") from None
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"--torch-model: {path} holds a {type(model).__name__}, not a "
                       "torch.nn.Module; save the whole model with torch.save(model, path), "
                       "not its state_dict")
    return model


def _parse_times(values):
    """``--time`` values (each a number, ``inf`` or a comma-separated list) as floats."""
    times = []
    for value in values or ["inf"]:
        for item in value.split(","):
            if not item.strip():
                continue
            try:
                times.append(float(item))
            except ValueError:
                raise CLIError(f"--time: cannot read {item.strip()!r} as a number "
                               "(use e.g. --time 10,100,1000 or --time inf)") from None
    if not times:
        raise CLIError("--time is empty; give e.g. --time inf or --time 10,100,1000")
    return np.array(times)


def _parse_modes(text):
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in ("ntk", "nngp")]
    if bad or not modes:
        raise CLIError(f"--mode must name ntk and/or nngp, got {text!r}")
    return modes


def load_training(path, y_columns=1):
    """Training inputs and targets: arrays ``x`` and ``y`` of a .npz, or a table.

    A .csv (or .npy) table holds the inputs followed by the targets: its last
    ``y_columns`` columns are y, the others x.
    """
    if path.lower().endswith(".npz") and os.path.exists(path):
        with np.load(path) as data:
            if "x" not in data or "y" not in data:
                raise CLIError(f"{path} must hold arrays x and y, but it holds {data.files}")
        return load_array(path, "x"), load_array(path, "y")
    table = np.asarray(load_array(path), dtype=np.float64)
    if table.ndim != 2 or table.shape[1] <= y_columns:
        raise CLIError(
            f"{path}: expected a table with the inputs followed by {y_columns} target "
            f"column(s), got shape {table.shape}; set --y-columns or use a .npz with x and y"
        )
    x, y = table[:, :-y_columns], table[:, -y_columns:]
    return x, (y[:, 0] if y_columns == 1 else y)


def _cmd_predict(args):
    from .predict import GradientFlowEnsemble

    spec = load_spec(args.arch)
    if args.y_columns < 1:
        raise CLIError(f"--y-columns must be at least 1, got {args.y_columns}")
    x_train, y_train = load_training(args.train, args.y_columns)
    x_test = load_array(args.test, "x")
    times = _parse_times(args.time)
    modes = _parse_modes(args.mode)
    if args.solver == "cg":
        _predict_cg(args, spec, x_train, y_train, x_test, times, modes)
        return
    cov = None if args.mean_only else "var" if args.var_only else "full"
    start = time.perf_counter()
    ensemble = GradientFlowEnsemble(spec, x_train, y_train, learning_rate=args.lr,
                                    diag_reg=args.diag_reg,
                                    diag_reg_absolute=args.diag_reg_absolute)
    result = ensemble.predict(x_test, times, get=modes, cov=cov)
    elapsed = time.perf_counter() - start
    arrays = {"times": times}
    for mode, pred in result.items():
        arrays[f"{mode}_mean"] = pred.mean
        if cov == "full":
            arrays[f"{mode}_cov"] = pred.cov
        elif cov == "var":
            arrays[f"{mode}_var"] = pred.var
    save_npz(args.out, arrays)
    names = ", ".join(k for k in arrays if k != "times")
    print(f"wrote {names} and times ({len(times)} time(s) x {x_test.shape[0]} test inputs) "
          f"to {args.out} in {elapsed:.2f} s")


def _predict_cg(args, spec, x_train, y_train, x_test, times, modes):
    """t = ∞ means by conjugate gradients over kernel tiles (no N x N matrix)."""
    from .distributed import solve_cg

    if not np.all(np.isinf(times)):
        raise CLIError("--solver cg predicts the converged network only: drop --time or "
                       "use --time inf")
    if args.var_only:
        raise CLIError("--solver cg computes means only: drop --var-only")
    if args.store and len(modes) > 1:
        raise CLIError("--store holds one training kernel: give --mode ntk or --mode nngp")
    start = time.perf_counter()
    arrays = {"times": np.array([np.inf])}
    for mode in modes:
        sol = solve_cg(spec, x_train, y_train, x_test, kind=mode, diag_reg=args.diag_reg,
                       diag_reg_absolute=args.diag_reg_absolute, tol=args.cg_tol,
                       maxiter=args.cg_maxiter, rank=args.cg_rank, store=args.store,
                       memory=args.memory)
        print(f"{mode}: {sol}")
        if not sol.converged:
            raise CLIError(f"{mode}: CG did not reach --cg-tol {args.cg_tol:g} in "
                           f"{sol.iterations} iterations (residual {sol.residual:.2e}); raise "
                           "--cg-maxiter or --cg-rank, or regularise with --diag-reg")
        arrays[f"{mode}_mean"] = sol.mean[None]
    elapsed = time.perf_counter() - start
    save_npz(args.out, arrays)
    names = ", ".join(k for k in arrays if k != "times")
    print(f"wrote {names} and times (t = inf x {x_test.shape[0]} test inputs) to {args.out} "
          f"in {elapsed:.2f} s")


def _cmd_check(args):
    from .predict import check_kernel

    spec = load_spec(args.arch)
    x = load_array(args.x, "x")
    modes = _parse_modes(args.mode)
    reports = check_kernel(spec, x, get=modes, diag_reg=args.diag_reg,
                           diag_reg_absolute=args.diag_reg_absolute)
    print("\n\n".join(str(reports[m]) for m in modes))
    if not all(r.positive_definite for r in reports.values()):
        sys.exit(1)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="limitkernel",
        description="Exact infinite-width NNGP and NTK kernels of fully-connected networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("kernel", help="Gram matrices of a spec on inputs")
    p.add_argument("--arch",
                   help="spec text, e.g. '3 * [dense(w_std=1.5, b_std=0.05), relu], dense',"
                        " or a file holding the text or JSON form")
    p.add_argument("--x", help="inputs (n, d): .npy, .npz (array x) or .csv")
    p.add_argument("--x2", help="second input set (m, d); default: x with itself")
    p.add_argument("--get", default="nngp,ntk", help="kernels to compute (default nngp,ntk)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--out",
                   help="output .npz with arrays nngp and ntk, or a directory: an on-disk "
                        "store written tile by tile (rerun to resume after a crash)")
    p.add_argument("--progress", action="store_true", help="progress bar (needs tqdm)")
    p.add_argument("--memory",
                   help="memory budget of a store run, e.g. 4GB (sets the tile size; "
                        "default: the smaller of 4 GiB and half the available memory)")
    p.add_argument("--scheduler",
                   help="run the tiles of a store on Dask: 'local' (a LocalCluster on this "
                        "machine) or a scheduler address tcp://host:8786")
    p.add_argument("--status", metavar="DIR",
                   help="report the progress of the store DIR and exit")
    p.set_defaults(run=_cmd_kernel)

    p = sub.add_parser("activations", help="list activations and how each is computed")
    p.set_defaults(run=_cmd_activations)

    p = sub.add_parser("demo", help="finite networks against the limit: Jacot et al. "
                                    "(2018), Figures 1 and 2, on the unit circle")
    p.add_argument("--arch", help=f"spec (default: {DEMO_SPEC})")
    p.add_argument("--scale", default="laptop", choices=sorted(DEMO_SCALES),
                   help="sizes: laptop (default, about two minutes on 2 cores), paper "
                        "(the paper's widths), quick (seconds; a smoke test)")
    p.add_argument("--quick", action="store_true", help="same as --scale quick")
    p.add_argument("--points", type=int, help="points on the circle (default from the scale)")
    p.add_argument("--out-dir", default="limitkernel-demo",
                   help="directory for summary.json and the figures (default "
                        "./limitkernel-demo)")
    p.add_argument("--out", help="also write the limiting kernels on the circle to this .npz")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("compare", help="finite networks of several widths against the "
                                       "limit, on your spec and data")
    p.add_argument("--arch", help="spec text or a file holding it (default: the spec of "
                                  "--torch-model)")
    p.add_argument("--data", required=True,
                   help="training data: .npz with arrays x and y, or a .csv/.npy table "
                        "whose last --y-columns columns are y; for a convolutional spec "
                        "a .npz whose x holds images (n, H, W, C) or sequences (n, L, C), "
                        "channels last")
    p.add_argument("--test", help="test inputs for the output comparison (default: the "
                                  "training inputs)")
    p.add_argument("--kernel-inputs", type=int, metavar="K",
                   help="compare the NTKs on the first K training inputs only (default: "
                        "all; the empirical NTK of a CNN costs more than its training)")
    p.add_argument("--y-columns", type=int, default=1,
                   help="number of target columns at the end of a training table (default 1)")
    p.add_argument("--widths", default="64,256,1024",
                   help="comma-separated hidden widths (default 64,256,1024)")
    p.add_argument("--seeds", type=int, default=5, help="networks per width (default 5)")
    p.add_argument("--steps", type=int, default=1000,
                   help="gradient-descent steps (time t = steps; default 1000)")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate η (default 1)")
    p.add_argument("--diag-reg", type=float, default=0.0,
                   help="relative diagonal regulariser of the limiting NTK (default 0)")
    p.add_argument("--out-dir", default="limitkernel-compare",
                   help="directory for summary.json and the figures "
                        "(default ./limitkernel-compare)")
    p.add_argument("--torch-model", metavar="FILE",
                   help="a PyTorch model saved whole with torch.save(model, FILE), put "
                        "beside the limit as one more row (its empirical NTK on the kernel "
                        "inputs against the limit of its spec). WARNING: loading unpickles "
                        "the file, which runs any code it holds; use only files you trust. "
                        "Needs pip install 'limitkernel[torch]'")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser("predict", help="outputs of trained infinitely wide networks "
                                       "(gradient-flow ensemble / NNGP posterior)")
    p.add_argument("--arch", required=True, help="spec text or a file holding it")
    p.add_argument("--train", required=True,
                   help="training data: .npz with arrays x and y, or a .csv/.npy table "
                        "whose last --y-columns columns are y")
    p.add_argument("--test", required=True, help="test inputs: .npy, .npz (array x) or .csv")
    p.add_argument("--y-columns", type=int, default=1,
                   help="number of target columns at the end of a training table (default 1)")
    p.add_argument("--time", action="append",
                   help="training time(s): a number, inf, or a comma-separated list; "
                        "repeatable (default inf)")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate η (default 1)")
    p.add_argument("--diag-reg", type=float, default=0.0,
                   help="diagonal regulariser, relative to the mean diagonal (default 0)")
    p.add_argument("--diag-reg-absolute", action="store_true",
                   help="take --diag-reg in absolute units")
    p.add_argument("--mode", default="ntk,nngp",
                   help="ntk (all layers trained) and/or nngp (readout only; at t = inf the "
                        "NNGP posterior); default ntk,nngp")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--var-only", action="store_true",
                       help="write <mode>_var (variances) instead of <mode>_cov")
    which.add_argument("--mean-only", action="store_true", help="write only <mode>_mean")
    p.add_argument("--out", required=True,
                   help="output .npz: times, <mode>_mean, <mode>_cov or <mode>_var")
    p.add_argument("--solver", default="dense", choices=("dense", "cg"),
                   help="dense: factorise the training kernel (default); cg: conjugate "
                        "gradients over kernel tiles, for more training points than fit in "
                        "memory (t = inf means only)")
    p.add_argument("--cg-tol", type=float, default=1e-8,
                   help="CG: relative residual to reach (default 1e-8)")
    p.add_argument("--cg-maxiter", type=int, help="CG: iteration limit (default 10 * rank + 100)")
    p.add_argument("--cg-rank", type=int, default=200,
                   help="CG: rank of the pivoted-Cholesky preconditioner (default 200)")
    p.add_argument("--store", metavar="DIR",
                   help="CG: read the training kernel from this store (limitkernel kernel "
                        "--x TRAIN_X --get MODE --out DIR) instead of recomputing tiles")
    p.add_argument("--memory", help="CG: memory budget for tiles, e.g. 4GB")
    p.set_defaults(run=_cmd_predict)

    p = sub.add_parser("check", help="positive definiteness and conditioning of the kernels")
    p.add_argument("--arch", required=True, help="spec text or a file holding it")
    p.add_argument("--x", required=True, help="inputs (n, d): .npy, .npz (array x) or .csv")
    p.add_argument("--mode", default="ntk,nngp", help="kernels to check (default ntk,nngp)")
    p.add_argument("--diag-reg", type=float, default=0.0,
                   help="diagonal regulariser to include, relative to the mean diagonal")
    p.add_argument("--diag-reg-absolute", action="store_true",
                   help="take --diag-reg in absolute units")
    p.set_defaults(run=_cmd_check)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except BrokenPipeError:
        return 0
    except (CLIError, SpecError, ValueError, MemoryError, FloatingPointError,
            OSError, ImportError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"limitkernel: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
