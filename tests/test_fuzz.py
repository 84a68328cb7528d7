"""Fuzzing the spec parser, the JSON form, layer parameters, kernel() and the CLI.

Properties: every input either works or fails with the documented error (a
SpecError/ValueError/TypeError from Python; exit status 2 and one line on
stderr from the command line, never a traceback); a spec that parses prints
back to an equal spec (``parse(str(spec)) == spec``, and through JSON); a kernel
that is returned is finite.

The default run is sized for CI. ``LIMITKERNEL_FUZZ_EXAMPLES=N`` runs N examples
per property instead (a fuzzing campaign).
"""

import contextlib
import io
import json
import math
import os
import string
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import limitkernel as lk
from limitkernel import cli
from limitkernel.spec import REGISTRY, SpecError, from_json, parse, to_json

CAMPAIGN = int(os.environ.get("LIMITKERNEL_FUZZ_EXAMPLES", "0"))


def sized(examples):
    """Hypothesis settings: ``examples`` per property in CI, or the campaign's."""
    return settings(max_examples=CAMPAIGN or examples, deadline=None,
                    suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------- spec text

NAMES = sorted(REGISTRY)
BLOCKS = sorted(name for name, cls in REGISTRY.items() if cls.takes_branches)
KEYS = sorted({key for cls in REGISTRY.values() for key in cls.defaults})


NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-1e3, max_value=1e3).map(lambda v: f"{v:g}"),
    st.integers(-10, 10 ** 6).map(str),
    st.sampled_from(["1e999", "-1e999", "1e200", "1e150", "1e-320", "0", "-0", "1e", "--1",
                     "+.5", ".", "9" * 400, "1.5e308"]),
)
WORDS = ["ntk", "standard", "mup", "nan", "inf", "Infinity", "none", "true", "_x"]
VALUE_TEXT = st.one_of(
    NUMBER_TEXT,
    st.sampled_from(WORDS),
    st.sampled_from([f"{q}{w}{q}" for w in WORDS for q in "'\""]),
    st.lists(NUMBER_TEXT, min_size=2, max_size=3).map(":".join),
    st.text(alphabet="ab '\"\\,]", max_size=6).map(lambda t: f"'{t}'"),
    st.just(""),
)
SPACE = st.sampled_from(["", " ", "  ", "\n", "\t"])
LAYER_NAME = st.sampled_from(NAMES + ["rleu", "Dense", "x1"])
ANY_KEY = st.sampled_from(KEYS)
OWN_KEYS = {name: st.sampled_from(sorted(cls.defaults)) for name, cls in REGISTRY.items()
            if cls.defaults}


@st.composite
def _layer_text(draw, depth):
    name = draw(LAYER_NAME)
    text = name
    if draw(st.booleans()):
        keys = st.one_of(OWN_KEYS.get(name, ANY_KEY), ANY_KEY)
        pairs = draw(st.lists(st.tuples(keys, VALUE_TEXT), max_size=3))
        sep = draw(SPACE)
        text += "(" + ("," + sep).join(f"{k}{sep}={sep}{v}" for k, v in pairs) + ")"
    if depth < 3 and (name in BLOCKS or draw(st.integers(0, 9)) == 0):
        branches = draw(st.lists(_spec_text(depth + 1), min_size=1, max_size=3))
        text += "[" + "; ".join(branches) + "]"
    return text


@st.composite
def _element_text(draw, depth):
    kind = draw(st.integers(0, 5))
    if kind == 0 and depth < 3:
        count = draw(st.one_of(st.integers(0, 4).map(str),
                               st.sampled_from(["200000", "99999999999999999999", "007"])))
        return f"{count} * [{draw(_spec_text(depth + 1))}]"
    if kind == 1 and depth < 3:
        return f"[{draw(_spec_text(depth + 1))}]"
    return draw(_layer_text(depth))


@st.composite
def _spec_text(draw, depth=0):
    parts = draw(st.lists(_element_text(depth), min_size=1, max_size=4))
    return ("," + draw(SPACE)).join(parts)


@st.composite
def _mutated(draw, base):
    """``base`` with a few characters inserted, deleted or replaced."""
    text = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        if not text:
            break
        at = draw(st.integers(0, len(text)))
        op = draw(st.integers(0, 2))
        char = draw(st.sampled_from("[](),;*=:'\"\\ {}0123456789.eE-+_a\n"))
        text = (text[:at] + char + text[at:] if op == 0 else
                text[:at] + text[at + 1:] if op == 1 else text[:at] + char + text[at + 1:])
    return text


EXTREME = st.one_of(st.sampled_from([0.0, 1.0, 1.5, 1e-300, 1e-8, 1e8, 1e100, 1e150, -1.0,
                                     -1e150, 0.5, 2.0, 3.0]),
                    st.floats(-10, 10, allow_nan=False))


@st.composite
def _network_text(draw):
    """Specs that mostly parse and lower: layers with their own parameters, some
    extreme, ending with a dense readout."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        name = draw(st.sampled_from(NAMES))
        cls = REGISTRY[name]
        numeric = [key for key, value in cls.defaults.items()
                   if value is not None and not isinstance(value, str)]
        keys = draw(st.lists(st.sampled_from(numeric), unique=True, max_size=2)) \
            if numeric else []
        params = {key: draw(EXTREME) for key in keys}
        text = name + ("(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"
                       if params else "")
        if cls.takes_branches:
            branch = "dense, relu, dense" if draw(st.booleans()) else "erf, dense"
            text += "[" + "; ".join([branch] * (cls.n_branches or 2)) + "]"
        parts.append(("dense, " if draw(st.booleans()) else "") + text)
        if draw(st.integers(0, 3)) == 0:
            parts[-1] = f"{draw(st.integers(1, 30))} * [{parts[-1]}]"
    w_std, b_std = draw(EXTREME), draw(EXTREME)
    return ", ".join(parts + [f"dense(w_std={abs(w_std)!r}, b_std={abs(b_std)!r})"])


SPEC_TEXT = st.one_of(
    _network_text(),
    _mutated(_network_text()),
    _spec_text(),
    _mutated(_spec_text()),
    st.text(alphabet=string.ascii_lowercase[:6] + "[](),;*=:'\" 0123456789.e-_{}", max_size=40),
    st.text(max_size=20),
)


def _check_spec(spec):
    assert isinstance(spec, lk.Serial)
    text = str(spec)
    assert parse(text) == spec, text
    assert from_json(to_json(spec)) == spec
    assert "\n" not in text


def _check_message(err):
    assert str(err).strip(), type(err)


@sized(80)
@given(SPEC_TEXT)
def test_any_text_parses_or_raises_a_spec_error(text):
    try:
        spec = parse(text)
    except SpecError as err:
        event("SpecError")
        _check_message(err)
        return
    event("parsed")
    _check_spec(spec)


# ---------------------------------------------------------------- JSON

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
                         st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(NAMES + ["ntk", "standard", "rleu", ""]),
                         st.text(max_size=5))
JSON_ANY = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=10)


@st.composite
def _json_layer(draw, depth=0):
    entry = {}
    if draw(st.integers(0, 9)):
        entry["layer"] = draw(st.one_of(st.sampled_from(NAMES), JSON_SCALARS))
    for key in draw(st.lists(st.sampled_from(KEYS + ["x"]), max_size=3)):
        entry[key] = draw(st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3)))
    if depth < 3 and (entry.get("layer") in BLOCKS or draw(st.integers(0, 9)) == 0):
        entry["branches"] = draw(st.one_of(
            st.lists(st.lists(_json_layer(depth + 1), max_size=3), max_size=3), JSON_ANY))
    return entry


@st.composite
def _json_network(draw):
    """A JSON spec that mostly parses, sometimes with one entry spoilt."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(NAMES))
        cls = REGISTRY[name]
        entry = {"layer": name}
        for key, default in cls.defaults.items():
            if draw(st.booleans()):
                entry[key] = (draw(st.sampled_from(["ntk", "standard"]))
                              if isinstance(default, str) else draw(EXTREME))
        if cls.takes_branches:
            branch = [{"layer": "relu"}, {"layer": "dense"}]
            entry["branches"] = [branch] * (cls.n_branches or 2)
        layers.append(entry)
    layers.append({"layer": "dense"})
    if draw(st.booleans()):
        spoilt = layers[draw(st.integers(0, len(layers) - 1))]
        spoilt[draw(st.sampled_from(["layer", "branches"] + KEYS))] = draw(JSON_ANY)
    return {"layers": layers}


JSON_SPECS = st.one_of(
    _json_network(),
    st.lists(_json_layer(), max_size=4).map(lambda layers: {"layers": layers}),
    JSON_ANY,
    st.dictionaries(st.sampled_from(["layers", "x"]), JSON_ANY, max_size=2),
)


@sized(120)
@given(JSON_SPECS)
def test_any_json_parses_or_raises_a_spec_error(data):
    text = json.dumps(data)
    try:
        spec = parse(text) if text.lstrip().startswith("{") else from_json(text)
    except SpecError as err:
        event("SpecError")
        _check_message(err)
        return
    event("parsed")
    _check_spec(spec)


# ---------------------------------------------------------------- Python values

PY_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10 ** 400, 10 ** 400),
    st.booleans(),
    st.complex_numbers(max_magnitude=10),
    st.floats(-1e3, 1e3).map(np.float32),
    st.integers(-100, 100).map(np.int64),
    st.sampled_from([np.bool_(True), np.float64("nan"), None, "ntk", "standard", "x",
                     [1.0, 2.0], (1.0,), {}, object()]),
)


@sized(120)
@given(st.sampled_from(NAMES), st.dictionaries(st.sampled_from(KEYS + ["x"]), PY_VALUES,
                                               max_size=3))
def test_any_python_parameters_build_or_raise_a_spec_error(name, params):
    cls = REGISTRY[name]
    try:
        if cls.takes_branches:
            branches = [parse("relu, dense"), parse("erf, dense")][:cls.n_branches or 2]
            layer = cls.from_branches(branches, **params)
        else:
            layer = cls(**params)
    except SpecError as err:
        event("SpecError")
        _check_message(err)
        return
    except TypeError as err:  # Python's own check of a keyword (Dense(a=1))
        event("TypeError: unexpected keyword")
        assert "unexpected keyword argument" in str(err)
        return
    event("built")
    for value in layer.params.values():
        for number in value if isinstance(value, tuple) else (value,):
            assert number is None or isinstance(number, str) or (
                type(number) is float and math.isfinite(number))
    _check_spec(lk.serial(layer))


# ---------------------------------------------------------------- kernels

X = np.random.default_rng(0).standard_normal((5, 3))
KERNEL_ERRORS = (SpecError, ValueError, FloatingPointError, lk.MemoryBudgetError)


@sized(50)
@given(st.one_of(_network_text(), _spec_text()))
def test_any_spec_that_parses_gives_a_finite_kernel_or_a_clear_error(text):
    try:
        spec = parse(text)
    except SpecError:
        event("SpecError from parse")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = lk.kernel(spec, X)
        except KERNEL_ERRORS as err:
            event(f"{type(err).__name__} from kernel")
            _check_message(err)
            return
    event("kernel computed")
    for value in out.values():
        assert np.all(np.isfinite(value)), text


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("fuzz"))


def make_files(root):
    """Inputs for the command line, good and bad, in the folder ``root``."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal(6)
    np.save(root / "x.npy", x)
    np.save(root / "x1d.npy", x[:, 0])
    np.save(root / "x4.npy", rng.standard_normal((4, 4)))
    np.save(root / "nan.npy", np.where(x > 1, np.nan, x))
    np.save(root / "objects.npy", np.array([None, {}], dtype=object))
    np.savez(root / "train.npz", x=x, y=y)
    np.savez(root / "other.npz", a=x, b=y)
    np.savetxt(root / "table.csv", np.column_stack([x, y]), delimiter=",")
    (root / "text.npy").write_text("1,2\n")
    (root / "text.npz").write_text("1,2\n")
    (root / "empty.csv").write_text("")
    (root / "spec.txt").write_text("dense, relu, dense")
    (root / "spec.json").write_text(to_json("dense, erf, dense"))
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00")
    (root / "dir.npy").mkdir()
    return root


PATHS = ["x.npy", "x1d.npy", "x4.npy", "nan.npy", "objects.npy", "train.npz", "other.npz",
         "table.csv", "text.npy", "text.npz", "empty.csv", "missing.npy", "dir.npy",
         "spec.txt", "spec.json", "binary.txt", "out.npz", "store", "out.txt"]
CLI_SPECS = ["dense, relu, dense", "dense", "relu", "dense(w_std=1e200), dense", "",
             "3 * [dense, erf], dense", "dense, tanh, dense", '{"layers": [{"layer": 5}]}',
             "dense, residual[relu, dense], layernorm, dense", "dense, sign, dense",
             "dense(w_std=1e100), 3 * [relu, dense(w_std=1e100)]"]
FILE = st.sampled_from(PATHS).map(lambda p: ("FILE", p))
GARBAGE = st.one_of(NUMBER_TEXT, st.sampled_from(["", "x", "-1", "--", "ntk,,", "a,b"]),
                    FILE)
# Each option with values that mean something to it, and garbage now and then.
OPTIONS = {
    "--arch": st.one_of(st.sampled_from(CLI_SPECS), SPEC_TEXT,
                        st.sampled_from([("FILE", "spec.txt"), ("FILE", "spec.json"),
                                         ("FILE", "binary.txt"), ("FILE", "missing.npy")])),
    "--x": FILE, "--x2": FILE, "--data": FILE, "--test": FILE, "--train": FILE,
    "--store": FILE, "--status": FILE, "--torch-model": FILE,
    "--out": st.sampled_from([("FILE", "out.npz"), ("FILE", "store"), ("FILE", "out.txt"),
                              ("FILE", "nodir/out.npz")]),
    "--get": st.sampled_from(["ntk", "nngp", "nngp,ntk", "cov", "", ",", "ntk,ntk"]),
    "--mode": st.sampled_from(["ntk", "nngp", "ntk,nngp", "cov", "", ","]),
    "--dtype": st.sampled_from(["float32", "float64", "int8"]),
    "--memory": st.sampled_from(["4GB", "1MB", "1e999", "0", "-1", "inf", "nan", "12",
                                 "1e30"]),
    "--time": st.sampled_from(["inf", "10,100", "0", "-1", "nan", "x", "", "1e308"]),
    "--solver": st.sampled_from(["cg", "dense", "lu"]),
    "--y-columns": st.sampled_from(["1", "2", "0", "-1", "100", "x"]),
    "--lr": NUMBER_TEXT, "--diag-reg": NUMBER_TEXT, "--cg-tol": NUMBER_TEXT,
    "--cg-maxiter": st.sampled_from(["0", "1", "-5", "10", "x"]),
    "--cg-rank": st.sampled_from(["0", "1", "-5", "3", "x"]),
    "--points": st.sampled_from(["0", "1", "2", "x"]),
    "--widths": st.sampled_from(["4,8", "0", "-4", "x", "", "4,,8"]),
    "--seeds": st.sampled_from(["1", "0", "-1", "x"]),
    "--steps": st.sampled_from(["2", "0", "-1", "x"]),
    "--scheduler": st.sampled_from(["nowhere:1", "tcp://127.0.0.1:1"]),
}
SWITCHES = ["--diag-reg-absolute", "--var-only", "--mean-only", "--debug-not", "--bogus"]


def _files(*names):
    return st.sampled_from([("FILE", name) for name in names])


GOOD_SPECS = st.sampled_from(["dense, relu, dense", "3 * [dense, erf], dense",
                              "dense, tanh, dense", "dense(b_std=0.1), gelu, dense",
                              "dense, residual[relu, dense], layernorm, dense",
                              ("FILE", "spec.txt"), ("FILE", "spec.json")])
# Each command's options with values that work: (option, values, required).
COMMANDS = {
    "kernel": [("--arch", GOOD_SPECS, True), ("--x", _files("x.npy", "table.csv"), True),
               ("--x2", _files("x4.npy", "table.csv", "train.npz"), False),
               ("--get", st.sampled_from(["ntk", "nngp", "nngp,ntk"]), False),
               ("--dtype", st.sampled_from(["float32", "float64"]), False),
               ("--out", _files("out.npz", "store"), True)],
    "predict": [("--arch", GOOD_SPECS, True), ("--train", _files("train.npz", "table.csv"), True),
                ("--test", _files("x.npy", "x4.npy"), True),
                ("--time", st.sampled_from(["inf", "10,100", "0", "1e308"]), False),
                ("--lr", st.sampled_from(["1", "0.5", "0", "-1"]), False),
                ("--diag-reg", st.sampled_from(["0", "1e-6", "1", "-1"]), False),
                ("--mode", st.sampled_from(["ntk", "nngp", "ntk,nngp"]), False),
                ("--solver", st.sampled_from(["dense", "cg"]), False),
                ("--y-columns", st.sampled_from(["1", "2", "3"]), False),
                ("--out", _files("out.npz"), True)],
    "check": [("--arch", GOOD_SPECS, True), ("--x", _files("x.npy", "x4.npy"), True),
              ("--mode", st.sampled_from(["ntk", "nngp", "ntk,nngp"]), False),
              ("--diag-reg", st.sampled_from(["0", "1e-6"]), False)],
    "compare": [("--arch", GOOD_SPECS, True), ("--data", _files("train.npz", "table.csv"), True),
                ("--test", _files("x.npy", "x4.npy"), False),
                ("--diag-reg", st.sampled_from(["0", "1e-6"]), False)],
    "activations": [],
}


@st.composite
def _cli_argv(draw):
    """A command line that mostly works: each required option (and some optional
    ones) with a working value, then none to three mutations: an option dropped,
    a value swapped for another (often bad) one, an option or switch added."""
    command = draw(st.sampled_from(sorted(COMMANDS) * 4 + ["nonsense"]))
    pairs = [[option, draw(values)] for option, values, required in COMMANDS.get(command, [])
             if required or draw(st.booleans())]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 2))
        if kind == 0 and pairs:
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
        elif kind == 1 and pairs:
            pair = pairs[draw(st.integers(0, len(pairs) - 1))]
            pair[1:] = [draw(OPTIONS.get(pair[0], GARBAGE) if draw(st.booleans())
                             else GARBAGE)]
        else:
            option = draw(st.sampled_from(sorted(OPTIONS) + SWITCHES))
            pairs.append([option] + ([draw(OPTIONS[option])] if option in OPTIONS else []))
    return [command] + [item for pair in pairs for item in pair]


def _run_cli(argv):
    """main(argv) in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


# Sizes that keep the finite-network runs of ``compare`` to a fraction of a second.
SMALL_COMPARE = ["--widths", "4,8", "--seeds", "1", "--steps", "2"]


@sized(40)
@given(_cli_argv())
def test_any_command_line_exits_0_or_2_with_one_line_errors(files, monkeypatch, argv):
    monkeypatch.chdir(files)  # outputs named by garbage values land here
    command = argv[0]
    argv = [str(files / item[1]) if isinstance(item, tuple) else item for item in argv]
    if command == "compare":
        argv += SMALL_COMPARE + ["--out-dir", str(files / "compare")]
    status, _, err = _run_cli(argv)
    event(f"{command}: exit {status}")
    allowed = (0, 1, 2) if command == "check" else (0, 2)  # check: 1 = not PD
    assert status in allowed, (argv, status, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    errors = [line for line in err.splitlines() if ": error: " in line]
    if status == 2:
        assert len(errors) == 1, (argv, err)
    for line in err.splitlines():
        assert line.startswith("limitkernel"), (argv, err)
