"""Command line: ``limitkernel kernel | activations | demo | compare | predict | check``.

Errors print one line on stderr and exit with status 2 (``--debug``, or the
environment variable ``LIMITKERNEL_DEBUG=1``, shows the traceback instead);
warnings print one line each. Outputs are written to a temporary file and
renamed into place, so a failed run leaves nothing behind.
"""

import argparse
import math
import os
import sys
import time
import warnings
import zipfile

import numpy as np

from ._io import atomic_path
from .experiments import DEMO_SCALES, DEMO_SPEC
from .spec import SpecError, parse

__all__ = ["main"]


class CLIError(Exception):
    """An error to report on one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line."""

    def error(self, message):
        # An argument may hold line breaks (it is quoted back): shown escaped.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_spec(text):
    """The text form, a JSON string, or a path to a file holding either."""
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as fh:
                content = fh.read()
        except (OSError, UnicodeDecodeError) as err:
            raise CLIError(f"--arch: cannot read the spec file {text}: {err}") from None
        try:
            return parse(content)
        except SpecError as err:
            raise SpecError(f"{text}: {err}") from None
    try:
        return parse(text)
    except SpecError as err:
        if text.strip().lower().endswith((".json", ".txt", ".spec")) or os.sep in text:
            raise SpecError(f"--arch {text!r} is neither a file nor a spec ({err})") from None
        raise


_NPY_MAGIC = b"\x93NUMPY"


def _head(path, size=6):
    with open(path, "rb") as fh:
        return fh.read(size)


def load_array(path, key="x"):
    """Load a 2D array from .npy, .npz (array ``key``) or .csv."""
    if not os.path.exists(path):
        raise CLIError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"input {path} is a directory, not a file of arrays")
    lower = path.lower()
    try:
        if lower.endswith(".npz"):
            if not zipfile.is_zipfile(path):
                raise CLIError(f"{path} is not a .npz file (not a zip archive of arrays); "
                               "write it with numpy.savez, or save a table as .csv")
            with np.load(path) as data:
                if key in data:
                    return _numeric(data[key], path)
                if len(data.files) == 1:
                    return _numeric(data[data.files[0]], path)
                raise CLIError(f"{path} holds arrays {data.files} but none named {key!r}")
        if lower.endswith(".npy"):
            if _head(path) != _NPY_MAGIC:
                raise CLIError(f"{path} is not a .npy file (it does not start with the .npy "
                               "header); write it with numpy.save, or name a comma-separated "
                               "table .csv")
            return _numeric(np.load(path), path)
        if lower.endswith((".csv", ".txt")):
            return _load_csv(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        if "pickled" in str(err) or "Object arrays" in str(err):
            raise CLIError(f"cannot read {path}: it holds Python objects, not numbers; save "
                           "a numeric array with numpy.save") from None
        raise CLIError(f"cannot read {path}: {err}") from None
    raise CLIError(f"unknown input format for {path}: use .npy, .npz or .csv")


def _numeric(array, path):
    if array.dtype.kind not in "biuf":
        raise CLIError(f"{path} holds an array of {array.dtype}, not real numbers; save a "
                       "numeric array")
    return array


def _load_csv(path):
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",") if v.strip()]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    with warnings.catch_warnings():
        # numpy warns of a file without data rows; said below as an error instead
        warnings.simplefilter("ignore", UserWarning)
        data = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    if data.size == 0:
        raise CLIError(f"{path} holds no rows of numbers"
                       + (" after its first line, read as a header" if skip else "")
                       + "; write one input per line, comma-separated")
    return data


def save_npz(path, arrays):
    """Write arrays to ``path`` atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise CLIError(f"output directory does not exist: {directory}")
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _announce_compilation():
    """Say so on stderr when the kernels are about to compile (a cold cache)."""
    from ._numba import CACHE, cold_kernels

    if cold_kernels():
        where = "first use only" if CACHE else "every run: the kernel cache is not writable"
        print(f"limitkernel: compiling kernels ({where})…", file=sys.stderr, flush=True)


def _cmd_kernel(args):
    from .gram import _check_get, kernel

    if args.status:
        _store_status(args)
        return
    if args.verify:
        raise CLIError("--verify goes with --status DIR (a store run always checks the "
                       "tiles it resumes from)")
    if args.out and args.store:
        raise CLIError(f"give --out FILE.npz (in memory) or --store DIR (a tile store on "
                       f"disk), not both: got --out {args.out} and --store {args.store}")
    target = args.out or args.store
    missing = [flag for flag, value in (("--arch", args.arch), ("--x", args.x),
                                        ("--out or --store", target)) if not value]
    if missing:
        raise CLIError(f"kernel needs {', '.join(missing)} (or --status DIR to report on "
                       "a store)")
    store = _store_target(args)
    spec = load_spec(args.arch)
    x1 = load_array(args.x)
    x2 = load_array(args.x2) if args.x2 else None
    get = _check_get(tuple(k.strip() for k in args.get.split(",") if k.strip()))
    if args.precision == "float32" and args.dtype != "float32":
        raise CLIError("--precision float32 (input products in float32) is for float32 "
                       "output only: add --dtype float32")
    if store is not None:
        _kernel_to_store(args, store, spec, x1, x2, get)
        return
    if os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} is a directory; give a file name ending in .npz "
                       "(or --store DIR for a tile store)")
    start = time.perf_counter()
    _announce_compilation()
    out = kernel(spec, x1, x2, get=get, dtype=args.dtype, progress=args.progress,
                 precision=args.precision)
    elapsed = time.perf_counter() - start
    save_npz(args.out, out)
    shape = "x".join(str(s) for s in next(iter(out.values())).shape)
    print(f"wrote {', '.join(out)} ({shape}, {args.dtype}) to the file {args.out} in "
          f"{elapsed:.2f} s")


def _store_target(args):
    """The store directory of a kernel run, or None for an in-memory .npz.

    ``--store DIR`` names a store; ``--out PATH`` does too when PATH does not end
    in .npz (as it always has), unless its extension names a file.
    """
    from .distributed import _check_store_path, _file_suffix

    if args.out and args.out.lower().endswith(".npz"):
        if args.memory or args.scheduler:
            raise CLIError(f"--memory and --scheduler write a tile store (a directory): give "
                           f"--store DIR, not --out {args.out}")
        return None
    path = args.store or args.out
    suffix = _file_suffix(path)
    stem = os.path.splitext(path.rstrip(os.sep))[0]
    if suffix and args.store:
        raise CLIError(f"--store {path} names a file ({suffix}), but a store is a directory "
                       f"of tiles: give --store DIR without an extension, or --out "
                       f"{stem}.npz for one .npz file")
    if suffix:
        raise CLIError(f"--out {path} names a file ({suffix}) that the kernel command does "
                       f"not write: give --out {stem}.npz for one .npz file with the "
                       "matrices, or --store DIR for a tile store (a directory)")
    return _check_store_path(path)


def _kernel_to_store(args, path, spec, x1, x2, get):
    from .distributed import kernel_to_store, status

    start = time.perf_counter()
    _announce_compilation()
    # A repaired store or an unlockable file system warns: one line each (see main).
    kernel_to_store(spec, x1, x2, path=path, get=get, dtype=args.dtype,
                    precision=args.precision, memory=args.memory, scheduler=args.scheduler,
                    progress=True if args.progress else None)
    elapsed = time.perf_counter() - start
    state = status(path)
    n, m = state.shape
    print(f"wrote {', '.join(state.kinds)} ({n}x{m}, {state.dtype}) to the tile store {path} "
          f"(a directory) in {elapsed:.2f} s: {_plural(state.total, 'tile')} of edge "
          f"{state.tile}; open it with limitkernel.open_store or np.load(DIR/ntk.npy, "
          "mmap_mode='r')")


def _store_status(args):
    from .distributed import status

    state = status(args.status, verify=args.verify)
    print(state)
    if not state.ok:
        sys.exit(1)


def _plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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
    _announce_compilation()
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
    _announce_compilation()
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
    if path.lower().endswith(".npz") and zipfile.is_zipfile(path):
        with np.load(path) as data:
            files = data.files
        if "x" not in files or "y" not in files:
            raise CLIError(f"{path} must hold arrays x and y, but it holds {files}")
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
    _announce_compilation()
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
    _announce_compilation()
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
    _announce_compilation()
    reports = check_kernel(spec, x, get=modes, diag_reg=args.diag_reg,
                           diag_reg_absolute=args.diag_reg_absolute)
    print("\n\n".join(str(reports[m]) for m in modes))
    if not all(r.positive_definite for r in reports.values()):
        sys.exit(1)


def _finite(text):
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _memory(text):
    """An argparse type: a memory budget such as 4GB, in bytes."""
    from .distributed import parse_memory

    try:
        return parse_memory(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a finite size such as 4GB or 512MiB, "
                                         f"got {text!r}") from None


def build_parser():
    parser = _Parser(
        prog="limitkernel",
        description="Exact infinite-width NNGP and NTK kernels of fully-connected networks.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (or set LIMITKERNEL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("kernel", help="Gram matrices of a spec on inputs")
    p.add_argument("--arch",
                   help="spec text, e.g. '3 * [dense(w_std=1.5, b_std=0.05), relu], dense',"
                        " or a file holding the text or JSON form")
    p.add_argument("--x", help="inputs (n, d): .npy, .npz (array x) or .csv")
    p.add_argument("--x2", help="second input set (m, d); default: x with itself")
    p.add_argument("--get", default="nngp,ntk", help="kernels to compute (default nngp,ntk)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--precision", default="float64", choices=("float64", "float32"),
                   help="precision of the input products x·x' (default float64); float32, "
                        "with --dtype float32 only, is about twice as fast and errs by up to "
                        "2e-5·max(1, χ)·max(1, √(d/65536)) of sqrt(K(x,x)K(x',x')) (χ: the "
                        "network's correlation slope at ρ = 1, d: the number of features)")
    p.add_argument("--out",
                   help="output .npz with arrays nngp and ntk (computed in memory); a path "
                        "without an extension is read as --store")
    p.add_argument("--store", metavar="DIR",
                   help="write an on-disk tile store to the directory DIR instead, tile by "
                        "tile within --memory (rerun the same command to resume after a "
                        "crash or to repair damage)")
    p.add_argument("--progress", action="store_true", help="progress bar (needs tqdm)")
    p.add_argument("--memory", type=_memory,
                   help="memory budget of a store run, e.g. 4GB (sets the tile size; "
                        "default: the smaller of 4 GiB and half the available memory)")
    p.add_argument("--scheduler",
                   help="run the tiles of a store on Dask: 'local' (a LocalCluster on this "
                        "machine) or a scheduler address tcp://host:8786")
    p.add_argument("--status", metavar="DIR",
                   help="report the progress and health of the store DIR and exit (status "
                        "1 if it is damaged)")
    p.add_argument("--verify", action="store_true",
                   help="with --status: read every finished tile and check its checksum")
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
    p.add_argument("--lr", type=_finite, default=1.0, help="learning rate η (default 1)")
    p.add_argument("--diag-reg", type=_finite, default=0.0,
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
    p.add_argument("--lr", type=_finite, default=1.0, help="learning rate η (default 1)")
    p.add_argument("--diag-reg", type=_finite, default=0.0,
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
    p.add_argument("--cg-tol", type=_finite, default=1e-8,
                   help="CG: relative residual to reach (default 1e-8)")
    p.add_argument("--cg-maxiter", type=int, help="CG: iteration limit (default 10 * rank + 100)")
    p.add_argument("--cg-rank", type=int, default=200,
                   help="CG: rank of the pivoted-Cholesky preconditioner (default 200)")
    p.add_argument("--store", metavar="DIR",
                   help="CG: read the training kernel from this store (limitkernel kernel "
                        "--x TRAIN_X --get MODE --out DIR) instead of recomputing tiles")
    p.add_argument("--memory", type=_memory, help="CG: memory budget for tiles, e.g. 4GB")
    p.set_defaults(run=_cmd_predict)

    p = sub.add_parser("check", help="positive definiteness and conditioning of the kernels")
    p.add_argument("--arch", required=True, help="spec text or a file holding it")
    p.add_argument("--x", required=True, help="inputs (n, d): .npy, .npz (array x) or .csv")
    p.add_argument("--mode", default="ntk,nngp", help="kernels to check (default ntk,nngp)")
    p.add_argument("--diag-reg", type=_finite, default=0.0,
                   help="diagonal regulariser to include, relative to the mean diagonal")
    p.add_argument("--diag-reg-absolute", action="store_true",
                   help="take --diag-reg in absolute units")
    p.set_defaults(run=_cmd_check)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error (or set "
                                  "LIMITKERNEL_DEBUG=1)")
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    print(f"limitkernel: warning: {text} ({category.__name__})",
          file=sys.stderr if file is None else file)


def main(argv=None):
    """Run the command line; returns the exit status (0, or 2 after an error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("LIMITKERNEL_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning
            args.run(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("limitkernel: interrupted", file=sys.stderr)
        return 130
    except (CLIError, SpecError, ValueError, MemoryError, FloatingPointError,
            OSError, ImportError) as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"limitkernel: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # no traceback escapes without --debug
        if debug:
            raise
        detail = " ".join(str(err).split())
        print(f"limitkernel: internal error: {type(err).__name__}"
              f"{': ' + detail if detail else ''}; this is a bug, please report it with the "
              "command line that caused it (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
