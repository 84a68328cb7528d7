"""Write Neural Tangents' kernels of small convolutional networks as reference data.

This script runs only under the Python of a separate environment that has
Neural Tangents and its pinned JAX (never in the test suite)::

    python3 -m venv NT_VENV
    NT_VENV/bin/pip install neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 \\
        'numpy<2' 'scipy<1.13' tensorflow==2.15.1
    NT_VENV/bin/python tests/data/make_nt_conv.py      # from the repository root

It overwrites ``tests/data/nt_conv.npz`` (the arrays) and ``tests/data/nt_conv.json``
(the manifest) next to itself. It takes about two minutes on two cores and up to
about 6.5 GB of memory (the tanh quadrature), and gives the same numbers on every run
(fixed seeds, float64 throughout). Before writing, it checks the arrays of most
ReLU, sign, step, layernorm and standard-parameterisation cases against a plain
numpy implementation of the conventions written in the manifest (``np_kernels``
below), and records the differences there (``numpy_checks``), with how far the
tanh kernels move with the quadrature degree (``tanh_convergence``).

For every case the manifest gives the network twice, as limitkernel's spec text
(``spec``) and as the exact ``stax`` expression that produced the numbers (``nt``,
evaluated here with ``eval``), the input shapes, the seed, and the array keys.
The npz holds, for a case ``c``:

``c/x1`` (3, ...) and ``c/x2`` (2, ...)
    inputs, ``numpy.random.default_rng(seed).standard_normal``: x1 first, then x2.
``c/nngp_11``, ``c/ntk_11`` (3, 3) and ``c/nngp_12``, ``c/ntk_12`` (3, 2)
    ``kernel_fn(x1, None)`` and ``kernel_fn(x1, x2)``.
``c/x1dup``, ``c/nngp_dup``, ``c/ntk_dup`` (some cases)
    x1 with its third input replaced by its first (an exact duplicate), and
    ``kernel_fn(x1dup, None)``.

Where Neural Tangents' own layer cannot give a finite value (``RectifiedMonomial``
returns NaN wherever a correlation is exactly 1, which a convolutional network
always has at equal positions of the same input), the case uses
``stax.Elementwise`` with the Cho–Saul closed forms below, and the script first
checks those closed forms against ``RectifiedMonomial`` on the entries where the
latter is finite (cases ``*_nt_native``).
"""

import inspect
import json
import os
import sys
import warnings

# Keep JAX on the CPU and quiet; these must be set before it is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import neural_tangents as nt
import numpy as np
from neural_tangents import stax

HERE = os.path.dirname(os.path.abspath(__file__))
NPZ = os.path.join(HERE, "nt_conv.npz")
MANIFEST = os.path.join(HERE, "nt_conv.json")

# Gauss-Hermite degree of the tanh case, and the degrees its convergence is
# checked against (the manifest records the differences).
TANH_DEG = 400
TANH_CHECK_DEGS = (100, 200, 300, 400)


# ------------------------------------------------------------ closed forms


def arccos_j(n, theta):
    """Cho & Saul (2009) arc-cosine function J_n(θ), n = 0, 1, 2, 3.

    E[relu(u)^n relu(v)^n] = (q11 q22)^(n/2) J_n(θ) / (2π) for centred Gaussians
    u, v with variances q11, q22 and correlation cos θ.
    """
    s, c, r = jnp.sin(theta), jnp.cos(theta), jnp.pi - theta
    if n == 0:
        return r
    if n == 1:
        return s + r * c
    if n == 2:
        return 3.0 * s * c + r * (1.0 + 2.0 * c ** 2)
    if n == 3:
        return 4.0 * s ** 3 + 15.0 * s * c ** 2 + r * (9.0 * s ** 2 * c + 15.0 * c ** 3)
    raise ValueError(n)


def relu_pow_nngp(n):
    """(cov12, var1, var2) -> E[φ(u)φ(v)] for φ(x) = max(x, 0)^n."""
    def nngp_fn(cov12, var1, var2):
        prod = var1 * var2
        # θ from arctan2 is exactly 0 for an input paired with itself (arccos of a
        # rounded correlation would give ~1e-8, which J_0 = π − θ does not forgive).
        theta = jnp.arctan2(jnp.sqrt(jnp.maximum(prod - cov12 ** 2, 0.0)), cov12)
        return prod ** (n / 2.0) * arccos_j(n, theta) / (2.0 * jnp.pi)
    return nngp_fn


def relu_pow_d_nngp(n):
    """(cov12, var1, var2) -> E[φ'(u)φ'(v)] for φ(x) = max(x, 0)^n (0 for n = 0)."""
    def d_nngp_fn(cov12, var1, var2):
        if n == 0:
            return jnp.zeros_like(cov12)
        return n ** 2 * relu_pow_nngp(n - 1)(cov12, var1, var2)
    return d_nngp_fn


def relu_pow_fn(n):
    return lambda x: (x >= 0) * x ** n


NAMESPACE = {
    "stax": stax,
    "jnp": jnp,
    "relu_pow_fn": relu_pow_fn,
    "relu_pow_nngp": relu_pow_nngp,
    "relu_pow_d_nngp": relu_pow_d_nngp,
}


# ------------------------------------------------- layers in both notations
#
# Each helper returns (limitkernel spec text, Neural Tangents stax expression).
# The out_chan / out_dim argument of stax.Conv / stax.Dense does not change the
# infinite-width kernels in the "ntk" parameterisation; it is the layer width in
# the "standard" one.


def _num(value):
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


def conv(k=3, padding="same", w=1.5, b=0.1, stride=1, dim=2, width=None):
    """A convolution; ``k`` an int (square filter) or a tuple (rows, columns)."""
    ks = tuple(k) if isinstance(k, tuple) else (k,) * dim
    spec_k = ":".join(str(v) for v in k) if isinstance(k, tuple) else str(k)
    parts = [f"k={spec_k}"]
    if stride != 1:
        parts.append(f"stride={stride}")
    parts += [f"padding={padding}", f"w_std={_num(w)}", f"b_std={_num(b)}"]
    nt_args = [str(width or 16), str(ks), f"strides={(stride,) * len(ks)}",
               f"padding='{padding.upper()}'", f"W_std={_num(w)}", f"b_std={_num(b)}"]
    if width is not None:
        parts += ["parameterization=standard", f"width={width}"]
        nt_args.append("parameterization='standard'")
    return f"conv({', '.join(parts)})", f"stax.Conv({', '.join(nt_args)})"


def dense(w=1.3, b=0.15, width=None, standard=False, readout=False):
    """A dense layer (the readout when ``readout``; hidden layers act per position)."""
    parts = [f"w_std={_num(w)}", f"b_std={_num(b)}"]
    out = 1 if readout else (width or 16)
    nt_args = [str(out), f"W_std={_num(w)}", f"b_std={_num(b)}"]
    if standard:
        parts.append("parameterization=standard")
        if width is not None:
            parts.append(f"width={width}")
        nt_args.append("parameterization='standard'")
    return f"dense({', '.join(parts)})", f"stax.Dense({', '.join(nt_args)})"


def avg_pool(k=2, stride=None, padding="valid", dim=2):
    stride = k if stride is None else stride
    parts = [f"k={k}"]
    if stride != k:
        parts.append(f"stride={stride}")
    if padding != "valid":
        parts.append(f"padding={padding}")
    nt_code = (f"stax.AvgPool({(k,) * dim}, strides={(stride,) * dim}, "
               f"padding='{padding.upper()}', normalize_edges=False)")
    return f"avg_pool({', '.join(parts)})", nt_code


GAP = ("global_avg_pool", "stax.GlobalAvgPool()")
FLATTEN = ("flatten", "stax.Flatten()")
RELU = ("relu", "stax.Relu()")
GELU = ("gelu", "stax.Gelu(approximate=False)")
ERF = ("erf", "stax.Erf()")
LAYERNORM = ("layernorm", "stax.LayerNorm(axis=-1, eps=1e-12)")


def _serial_nt(layers):
    return f"stax.serial({', '.join(nt for _, nt in layers)})"


def residual(branch):
    """x + f(x): Neural Tangents' FanOut / parallel(Identity, f) / FanInSum."""
    spec = f"residual[{', '.join(s for s, _ in branch)}]"
    nt_code = (f"stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), "
               f"{_serial_nt(branch)}), stax.FanInSum())")
    return spec, nt_code


def parallel(*branches):
    spec = "parallel[" + "; ".join(", ".join(s for s, _ in br) for br in branches) + "]"
    nt_code = (f"stax.serial(stax.FanOut({len(branches)}), stax.parallel("
               + ", ".join(_serial_nt(br) for br in branches) + "), stax.FanInSum())")
    return spec, nt_code


def net(*layers):
    return ", ".join(s for s, _ in layers), _serial_nt(layers)


# ----------------------------------------------------------------- cases


def _activations():
    """(case suffix, (spec, nt), conv w_std, conv b_std, covers/notes)."""
    def rp(n):
        return (f"relu_pow(k={n})" if n else "step",
                (f"stax.Elementwise(relu_pow_fn({n}), relu_pow_nngp({n}), "
                 f"relu_pow_d_nngp({n}))"))
    return [
        ("relu", RELU, 1.5, 0.1, ""),
        ("leaky_relu", ("leaky_relu(alpha=0.1)", "stax.LeakyRelu(0.1)"), 1.4, 0.2, ""),
        ("abrelu", ("abrelu(a=-0.3, b=1.2)", "stax.ABRelu(-0.3, 1.2)"), 1.3, 0.1, ""),
        ("abs", ("abs", "stax.Abs()"), 1.4, 0.15, ""),
        ("identity", ("identity", "stax.Identity()"), 1.2, 0.1, ""),
        ("sign", ("sign", "stax.Sign()"), 1.5, 0.2,
         ("stax.Sign() sets every nonzero entry of its same-input covariance cov1 to 1, "
          "also between different positions (correct only at equal positions); nothing "
          "in this network reads those entries (no pool between a Sign and the next "
          "activation; checked in numpy_checks). A pool after Sign would make NT's "
          "value wrong. nngp_11/ntk_11 are accurate only to ~3e-5 relative (see "
          "accuracy); the 12 arrays to ~1e-14.")),
        ("relu_pow2", rp(2), 1.3, 0.1,
         ("stax.Elementwise with the Cho-Saul closed form: stax.RectifiedMonomial(2) "
          "returns NaN wherever rho == 1 (every same-position entry of a conv net); "
          "the closed form is checked against RectifiedMonomial in relu_pow2_nt_native.")),
        ("relu_pow3", rp(3), 1.0, 0.1,
         "as relu_pow2; checked in relu_pow3_nt_native."),
        ("step", rp(0), 1.4, 0.1,
         ("phi(x) = (x >= 0), NT's RectifiedMonomial(0) (NTK contribution zero), via "
          "stax.Elementwise as for relu_pow (RectifiedMonomial(0) is NaN at rho == 1); "
          "checked in step_nt_native. It differs from limitkernel's step (1 for x > 0) "
          "only at zero-variance inputs, which these inputs do not have (b_std > 0). "
          "Accurate to ~2e-10 relative (see accuracy).")),
        ("erf", ("erf(a=1.1, b=0.7, c=0.2)", "stax.Erf(1.1, 0.7, 0.2)"), 1.5, 0.15, ""),
        ("sigmoid_like", ("sigmoid_like", "stax.Sigmoid_like()"), 1.6, 0.1, ""),
        ("gelu", GELU, 1.4, 0.1, ""),
        ("sin", ("sin(a=1.0, b=0.8, c=0.3)", "stax.Sin(1.0, 0.8, 0.3)"), 1.3, 0.2, ""),
        ("cos", ("cos(a=1.2, b=0.9, c=0.1)", "stax.Cos(1.2, 0.9, 0.1)"), 1.4, 0.1, ""),
        ("rbf", ("rbf(gamma=0.5)", "stax.Rbf(0.5)"), 1.3, 0.15, ""),
        ("gaussian", ("gaussian(a=1.0, b=-0.5)", "stax.Gaussian(1.0, -0.5)"), 1.5, 0.1, ""),
        ("exp", ("exp(a=0.5, b=0.3)", "stax.Exp(0.5, 0.3)"), 1.3, 0.1, ""),
    ]


def cases():
    """Every case: dict(name, covers, spec, nt, shape, dup, notes)."""
    out = []

    def add(name, covers, layers, shape, dup=False, notes="", keys=("11", "12")):
        spec, nt_code = net(*layers)
        out.append({"name": name, "covers": covers, "spec": spec, "nt": nt_code,
                    "shape": list(shape), "dup": dup, "notes": notes, "keys": list(keys)})

    # 2D flatten networks.
    add("flat_same", "2D conv 'same' padding, flatten, dense",
        [conv(3, "same", 1.5, 0.1), RELU, conv(3, "same", 1.4, 0.2), RELU,
         FLATTEN, dense(1.3, 0.15, readout=True)], (5, 5, 2), dup=True)
    add("flat_valid", "2D conv 'valid' padding (5x5 -> 3x3 -> 1x1)",
        [conv(3, "valid", 1.6, 0.1), RELU, conv(3, "valid", 1.3, 0.15), RELU,
         FLATTEN, dense(1.4, 0.1, readout=True)], (5, 5, 2))
    add("flat_circular", "2D conv 'circular' padding (periodic)",
        [conv(3, "circular", 1.4, 0.2), RELU, conv(3, "circular", 1.5, 0.1), RELU,
         FLATTEN, dense(1.3, 0.2, readout=True)], (5, 5, 2))
    add("flat_stride2", "2D conv stride 2 'same' on 6x6 (6 -> 3 -> 2)",
        [conv(3, "same", 1.5, 0.15, stride=2), RELU, conv(3, "same", 1.4, 0.1, stride=2),
         RELU, FLATTEN, dense(1.6, 0.1, readout=True)], (6, 6, 2),
        notes="'same' with stride 2 pads like lax.padtype_to_pads: total padding "
              "max((out-1)*stride + k - n, 0) with out = ceil(n/stride), the smaller "
              "half before; 6 -> 3 pads (0, 1), 3 -> 2 pads (1, 1).")
    add("flat_k3x2", "2D non-square filter k=3:2 (3 rows, 2 columns), 'same'",
        [conv((3, 2), "same", 1.4, 0.1), RELU, conv((3, 2), "same", 1.5, 0.2), RELU,
         FLATTEN, dense(1.3, 0.1, readout=True)], (5, 5, 2),
        notes="k=3:2 is filter_shape (3, 2) = (rows/H, columns/W) with NHWC inputs. "
              "'same' with an even tap count pads asymmetrically: (0, 1) along W.")

    # 2D pooling networks.
    add("pool_gap", "avg_pool(k=2) [VALID, stride 2] between convs, global_avg_pool",
        [conv(3, "same", 1.5, 0.1), RELU, avg_pool(2), conv(3, "same", 1.4, 0.15), RELU,
         GAP, dense(1.3, 0.1, readout=True)], (6, 6, 1), dup=True)
    add("myrtle", "Myrtle-style net on 8x8x1",
        [conv(3, "same", 1.4142, 0.05), RELU, conv(3, "same", 1.4142, 0.05), RELU,
         avg_pool(2), conv(3, "same", 1.4142, 0.05), RELU, GAP,
         dense(1.4142, 0.05, readout=True)], (8, 8, 1))
    add("pool_same", "avg_pool(k=2, padding=same) on odd 5x5 (outside counts as zero)",
        [conv(3, "same", 1.6, 0.1), RELU, avg_pool(2, padding="same"),
         conv(3, "same", 1.3, 0.2), RELU, GAP, dense(1.5, 0.1, readout=True)],
        (5, 5, 2),
        notes="AvgPool 'SAME' with normalize_edges=False divides every window by "
              "k*k (=4), the zero padding counting in the mean; 5 -> 3 pads (0, 1): "
              "the last output row/column averages one real row/column and one of zeros.")
    add("pool_k3s1", "avg_pool(k=3, stride=1) VALID (5x5 -> 3x3)",
        [conv(3, "same", 1.4, 0.1), RELU, avg_pool(3, stride=1),
         conv(3, "same", 1.5, 0.15), RELU, GAP, dense(1.3, 0.2, readout=True)],
        (5, 5, 2))
    add("pool_k3s1_same", "avg_pool(k=3, stride=1, padding=same) (size kept)",
        [conv(3, "same", 1.3, 0.2), RELU, avg_pool(3, stride=1, padding="same"),
         conv(3, "same", 1.4, 0.1), RELU, GAP, dense(1.5, 0.1, readout=True)],
        (5, 5, 2))
    add("pool_flatten", "avg_pool then flatten, dense",
        [conv(3, "same", 1.5, 0.2), RELU, avg_pool(2), FLATTEN,
         dense(1.4, 0.1, readout=True)], (6, 6, 1))

    # 1D networks on (L, C) = (8, 2) sequences.
    add("seq_gap", "1D conv same then valid (k=5), gelu, global_avg_pool",
        [conv(3, "same", 1.5, 0.1, dim=1), RELU, conv(5, "valid", 1.4, 0.2, dim=1), GELU,
         GAP, dense(1.3, 0.1, readout=True)], (8, 2), dup=True)
    add("seq_stride_flat", "1D conv stride 2 'same', flatten",
        [conv(3, "same", 1.6, 0.15, stride=2, dim=1), RELU, FLATTEN,
         dense(1.4, 0.1, readout=True)], (8, 2))
    add("seq_circular", "1D conv 'circular', global_avg_pool",
        [conv(3, "circular", 1.4, 0.1, dim=1), RELU, conv(3, "circular", 1.3, 0.2, dim=1),
         RELU, GAP, dense(1.5, 0.15, readout=True)], (8, 2))

    # Every closed-form activation.
    for suffix, act, w, b, notes in _activations():
        add(f"act_{suffix}", f"activation {act[0]} in conv, ACT, conv, ACT, gap, dense",
            [conv(3, "same", w, b), act, conv(3, "same", w, b), act, GAP,
             dense(1.3, 0.1, readout=True)], (4, 4, 2),
            dup=suffix in ("relu", "erf"), notes=notes)

    # NT's own RectifiedMonomial, on entries where it is finite (x1 against x2 in a
    # flatten network, where NT keeps only same-position covariances and takes the
    # diagonal from its own closed form).
    for n, name in ((2, "relu_pow2"), (3, "relu_pow3"), (0, "step")):
        act = (f"relu_pow(k={n})" if n else "step", f"stax.RectifiedMonomial({n})")
        add(f"{name}_nt_native",
            f"{act[0]} with NT's RectifiedMonomial({n}), x1 against x2 only",
            [conv(3, "same", 1.2, 0.1), act, conv(3, "same", 1.2, 0.1), act, FLATTEN,
             dense(1.3, 0.1, readout=True)], (4, 4, 2), keys=("12",),
            notes="only kernel_fn(x1, x2) is stored: kernel_fn(x1, None) is NaN on its "
                  "diagonal (rho == 1 there).")

    # Hermite-series activation.
    add("tanh", "tanh by Gauss-Hermite quadrature, conv, tanh, conv, relu, gap",
        [conv(3, "same", 1.5, 0.1),
         ("tanh", (f"stax.ElementwiseNumerical(jnp.tanh, deg={TANH_DEG}, "
                   "df=lambda x: 1.0 - jnp.tanh(x) ** 2)")),
         conv(3, "same", 1.4, 0.15), RELU, GAP, dense(1.3, 0.1, readout=True)],
        (4, 4, 2), dup=True)

    # Blocks inside conv stacks.
    add("residual", "residual block of convs (x + f(x)), relu, gap",
        [conv(3, "same", 1.4, 0.1),
         residual([RELU, conv(3, "same", 1.3, 0.1), RELU, conv(3, "same", 1.2, 0.15)]),
         RELU, GAP, dense(1.3, 0.1, readout=True)], (4, 4, 2),
        notes="The form conv, relu, residual[conv, relu, conv], relu is refused by NT "
              "(FanInSum needs every input Gaussian: the skip carries relu output); "
              "here the block input is a conv output.")
    add("parallel", "parallel[conv, relu, conv; conv, erf, conv] after conv, relu",
        [conv(3, "same", 1.5, 0.1), RELU,
         parallel([conv(3, "same", 1.3, 0.1), RELU, conv(3, "same", 1.2, 0.1)],
                  [conv(3, "same", 1.4, 0.2), ERF, conv(3, "same", 1.1, 0.1)]),
         RELU, GAP, dense(1.3, 0.15, readout=True)], (4, 4, 2))
    add("dense_spatial", "dense on a spatial input (per position, on channels)",
        [conv(3, "same", 1.5, 0.1), RELU, dense(1.4, 0.2), RELU, FLATTEN,
         dense(1.3, 0.1, readout=True)], (5, 5, 2))
    add("layernorm", "layernorm over channels, per position, after a conv",
        [conv(3, "same", 1.4, 0.1), LAYERNORM, RELU, conv(3, "same", 1.5, 0.2), GAP,
         dense(1.3, 0.1, readout=True)], (4, 4, 2), dup=True,
        notes="stax.LayerNorm(axis=-1) (its default) normalises over channels only: "
              "K_pp'(x, x') / sqrt((K_pp(x, x) + eps)(K_p'p'(x', x') + eps)).")

    # Standard parameterisation.
    add("standard_gap", "standard parameterisation: convs of widths 7, 5, gap, dense",
        [conv(3, "same", 1.5, 0.1, width=7), RELU, conv(3, "same", 1.4, 0.2, width=5),
         RELU, GAP, dense(1.3, 0.1, standard=True, readout=True)], (4, 4, 2),
        notes="NTK multiplier of K_old: first conv 3*3*2 = 18, second 3*3*7 = 63, "
              "readout 5 (the channels after global_avg_pool).")
    add("standard_flatten", "standard parameterisation: conv width 6, flatten, dense",
        [conv(3, "same", 1.4, 0.1, width=6), RELU, FLATTEN,
         dense(1.5, 0.2, standard=True, readout=True)], (4, 4, 2),
        notes="After Flatten the readout's input width is H*W*C = 4*4*6 = 96.")
    add("standard_dense_spatial", "standard parameterisation: dense on a spatial input",
        [conv(3, "same", 1.3, 0.15, width=6), RELU,
         dense(1.4, 0.1, width=4, standard=True), RELU, GAP,
         dense(1.2, 0.1, standard=True, readout=True)], (4, 4, 2),
        notes="NTK multiplier: conv 3*3*2 = 18, hidden dense 6 (channels), readout 4.")
    return out


# ---------------------------------------------------------------- running


def kernel_pair(nt_code, x1, x2):
    """(nngp, ntk) of kernel_fn(x1, x2) for the stax expression ``nt_code``."""
    _, _, kernel_fn = eval(nt_code, dict(NAMESPACE))
    kernel_fn = jax.jit(kernel_fn, static_argnames="get")
    out = kernel_fn(jnp.asarray(x1), None if x2 is None else jnp.asarray(x2),
                    get=("nngp", "ntk"))
    return np.asarray(out.nngp), np.asarray(out.ntk)


def _check_finite(name, key, array):
    if not np.all(np.isfinite(array)):
        raise SystemExit(f"{name}: {key} has non-finite entries; drop or fix the case")


def _max_rel(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def run_case(case, seed, arrays):
    name = case["name"]
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((3, *case["shape"]))
    x2 = rng.standard_normal((2, *case["shape"]))
    arrays[f"{name}/x1"], arrays[f"{name}/x2"] = x1, x2
    stored = [f"{name}/x1", f"{name}/x2"]
    jobs = []
    if "11" in case["keys"]:
        jobs.append(("11", x1, None))
    if "12" in case["keys"]:
        jobs.append(("12", x1, x2))
    if case["dup"]:
        x1dup = x1.copy()
        x1dup[2] = x1dup[0]
        arrays[f"{name}/x1dup"] = x1dup
        stored.append(f"{name}/x1dup")
        jobs.append(("dup", x1dup, None))
    for tag, a, b in jobs:
        nngp, ntk = kernel_pair(case["nt"], a, b)
        for kind, value in (("nngp", nngp), ("ntk", ntk)):
            key = f"{name}/{kind}_{tag}"
            _check_finite(name, key, value)
            if b is None and not np.allclose(value, value.T, rtol=1e-13, atol=0.0):
                raise SystemExit(f"{name}: {key} is not symmetric to rounding")
            arrays[key] = value
            stored.append(key)
    if case["dup"]:
        for kind in ("nngp", "ntk"):
            d = arrays[f"{name}/{kind}_dup"]
            case.setdefault("dup_row_difference", {})[kind] = float(
                np.max(np.abs(d[0] - d[2])))
    case["seed"] = seed
    case["x1_shape"] = list(x1.shape)
    case["x2_shape"] = list(x2.shape)
    case["arrays"] = stored
    del case["shape"], case["dup"], case["keys"]
    if not case["notes"]:
        del case["notes"]


def check_closed_forms(arrays, report):
    """The Elementwise stand-ins against NT's own layers, where those are finite."""
    by_name = {c["name"]: c for c in report["cases"]}
    checks = {}
    # relu_pow / step: Elementwise closed form vs RectifiedMonomial on x1 vs x2.
    for n, name in ((2, "relu_pow2"), (3, "relu_pow3"), (0, "step")):
        native = by_name[f"{name}_nt_native"]
        code = native["nt"].replace(
            f"stax.RectifiedMonomial({n})",
            f"stax.Elementwise(relu_pow_fn({n}), relu_pow_nngp({n}), relu_pow_d_nngp({n}))")
        nngp, ntk = kernel_pair(code, arrays[f"{name}_nt_native/x1"],
                                arrays[f"{name}_nt_native/x2"])
        diff = max(_max_rel(nngp, arrays[f"{name}_nt_native/nngp_12"]),
                   _max_rel(ntk, arrays[f"{name}_nt_native/ntk_12"]))
        checks[f"{name}: Elementwise closed form vs RectifiedMonomial({n})"] = diff
    for label, diff in checks.items():
        if not diff < 1e-10:
            raise SystemExit(f"closed-form check failed: {label}: {diff:.3g}")
    report["closed_form_checks"] = {
        "what": "max relative difference over nngp and ntk, x1 against x2",
        "results": checks,
        "helpers": inspect.getsource(arccos_j) + "\n\n" + inspect.getsource(relu_pow_nngp)
        + "\n\n" + inspect.getsource(relu_pow_d_nngp) + "\n\n"
        + inspect.getsource(relu_pow_fn),
    }


# ------------------------------------- an independent float64 numpy check
#
# A plain numpy implementation of the conventions in CONVENTIONS, holding the
# full (input, input, H, H, W, W) arrays, for the ReLU / sign / step networks.
# It confirms the conventions (padding amounts, strides, filter orientation,
# pooling, flatten) and measures how accurate Neural Tangents' own numbers are.
# A sequence (L, C) runs as an image (L, 1, C) with filters (k, 1).


def _np_pads(n, k, stride, padding):
    """(before, after, output size) of lax's 'VALID' / 'SAME' along one axis."""
    if padding == "valid":
        return 0, 0, (n - k) // stride + 1
    out = -(-n // stride)
    total = max((out - 1) * stride + k - n, 0)
    return total // 2, total - total // 2, out


def _np_window(K, axis, k, stride, padding, taps):
    """Sum over the (t, u) offsets in ``taps`` of K on the axis pair (axis, axis+1)."""
    n = K.shape[axis]
    lo, hi, out = _np_pads(n, k, stride, padding)
    if padding == "circular":
        index = np.arange(-lo, n + hi) % n
        padded = np.take(np.take(K, index, axis=axis), index, axis=axis + 1)
    else:
        widths = [(0, 0)] * K.ndim
        widths[axis] = widths[axis + 1] = (lo, hi)
        padded = np.pad(K, widths)
    total = 0.0
    for t, u in taps:
        cut = [slice(None)] * K.ndim
        cut[axis] = slice(t, t + (out - 1) * stride + 1, stride)
        cut[axis + 1] = slice(u, u + (out - 1) * stride + 1, stride)
        total = total + padded[tuple(cut)]
    return total


def _np_conv(K, filter_shape, stride, padding):
    for axis, k in zip((2, 4), filter_shape):
        K = _np_window(K, axis, k, stride, padding, [(t, t) for t in range(k)]) / k
    return K


def _np_pool(K, k, stride, padding):
    taps = [(t, u) for t in range(k) for u in range(k)]
    for axis in (2, 4):
        K = _np_window(K, axis, k, stride, padding, taps) / k ** 2
    return K


def _np_activation(name, K, T):
    d = np.einsum("nnhhww->nhw", K)
    prod = np.einsum("nhw,mHW->nmhHwW", d, d)
    theta = np.arctan2(np.sqrt(np.maximum(prod - K ** 2, 0.0)), K)
    if name == "relu":
        return (np.sqrt(prod) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
                / (2 * np.pi), T * (np.pi - theta) / (2 * np.pi))
    if name == "sign":
        return 1.0 - 2.0 * theta / np.pi, 0.0 * T
    if name == "step":
        return (np.pi - theta) / (2 * np.pi), 0.0 * T
    raise ValueError(name)


def np_kernels(x, layers):
    """(nngp, ntk) of all inputs ``x`` (n, H, W, C) against themselves."""
    K = np.einsum("nhwc,mHWc->nmhHwW", x, x) / x.shape[-1]
    T = np.zeros_like(K)
    for layer in layers:
        kind, args = layer[0], layer[1:]
        if kind == "conv":
            filter_shape, stride, padding, w, b, fan_in = (args + (None,))[:6]
            A = _np_conv(K, filter_shape, stride, padding)
            T = w ** 2 * _np_conv(T, filter_shape, stride, padding)
            K = w ** 2 * A + b ** 2
            # "ntk": Θ ← σ_w² A(Θ) + K_new; "standard": Θ ← fan_in A(K) + σ_w² A(Θ) + 1.
            T = T + (K if fan_in is None else fan_in * A + 1.0)
        elif kind == "pool":
            K, T = (_np_pool(Z, *args) for Z in (K, T))
        elif kind == "flatten":
            K, T = (np.einsum("nmhhww->nm", Z) / (Z.shape[2] * Z.shape[4])
                    for Z in (K, T))
        elif kind == "gap":
            K, T = (Z.mean(axis=(2, 3, 4, 5)) for Z in (K, T))
        elif kind == "layernorm":  # over channels, per position
            d = np.einsum("nnhhww->nhw", K) + args[0]
            norm = np.sqrt(np.einsum("nhw,mHW->nmhHwW", d, d))
            K, T = K / norm, T / norm
        elif kind == "dense":
            w, b, n_in = (args + (None,))[:3]
            T = w ** 2 * T + (n_in * K + 1.0 if n_in is not None else 0.0)
            K = w ** 2 * K + b ** 2
            T = T + (K if n_in is None else 0.0)
        else:
            K, T = _np_activation(kind, K, T)
    return K, T


def _c(k, padding, w, b, stride=1, fan_in=None):
    return ("conv", k if isinstance(k, tuple) else (k, k), stride, padding, w, b, fan_in)


def _seq(k, padding, w, b, stride=1):
    return ("conv", (k, 1), stride, padding, w, b)


def _act_net(act, w, b):
    return [_c(3, "same", w, b), (act,), _c(3, "same", w, b), (act,), ("gap",),
            ("dense", 1.3, 0.1)]


# The networks of some cases again, in np_kernels' terms (same parameters).
NP_NETS = {
    "flat_same": [_c(3, "same", 1.5, 0.1), ("relu",), _c(3, "same", 1.4, 0.2), ("relu",),
                  ("flatten",), ("dense", 1.3, 0.15)],
    "flat_valid": [_c(3, "valid", 1.6, 0.1), ("relu",), _c(3, "valid", 1.3, 0.15),
                   ("relu",), ("flatten",), ("dense", 1.4, 0.1)],
    "flat_circular": [_c(3, "circular", 1.4, 0.2), ("relu",), _c(3, "circular", 1.5, 0.1),
                      ("relu",), ("flatten",), ("dense", 1.3, 0.2)],
    "flat_stride2": [_c(3, "same", 1.5, 0.15, 2), ("relu",), _c(3, "same", 1.4, 0.1, 2),
                     ("relu",), ("flatten",), ("dense", 1.6, 0.1)],
    "flat_k3x2": [_c((3, 2), "same", 1.4, 0.1), ("relu",), _c((3, 2), "same", 1.5, 0.2),
                  ("relu",), ("flatten",), ("dense", 1.3, 0.1)],
    "pool_gap": [_c(3, "same", 1.5, 0.1), ("relu",), ("pool", 2, 2, "valid"),
                 _c(3, "same", 1.4, 0.15), ("relu",), ("gap",), ("dense", 1.3, 0.1)],
    "myrtle": [_c(3, "same", 1.4142, 0.05), ("relu",), _c(3, "same", 1.4142, 0.05),
               ("relu",), ("pool", 2, 2, "valid"), _c(3, "same", 1.4142, 0.05),
               ("relu",), ("gap",), ("dense", 1.4142, 0.05)],
    "pool_same": [_c(3, "same", 1.6, 0.1), ("relu",), ("pool", 2, 2, "same"),
                  _c(3, "same", 1.3, 0.2), ("relu",), ("gap",), ("dense", 1.5, 0.1)],
    "pool_k3s1": [_c(3, "same", 1.4, 0.1), ("relu",), ("pool", 3, 1, "valid"),
                  _c(3, "same", 1.5, 0.15), ("relu",), ("gap",), ("dense", 1.3, 0.2)],
    "pool_k3s1_same": [_c(3, "same", 1.3, 0.2), ("relu",), ("pool", 3, 1, "same"),
                       _c(3, "same", 1.4, 0.1), ("relu",), ("gap",), ("dense", 1.5, 0.1)],
    "pool_flatten": [_c(3, "same", 1.5, 0.2), ("relu",), ("pool", 2, 2, "valid"),
                     ("flatten",), ("dense", 1.4, 0.1)],
    "seq_stride_flat": [_seq(3, "same", 1.6, 0.15, 2), ("relu",), ("flatten",),
                        ("dense", 1.4, 0.1)],
    "seq_circular": [_seq(3, "circular", 1.4, 0.1), ("relu",), _seq(3, "circular", 1.3, 0.2),
                     ("relu",), ("gap",), ("dense", 1.5, 0.15)],
    "dense_spatial": [_c(3, "same", 1.5, 0.1), ("relu",), ("dense", 1.4, 0.2), ("relu",),
                      ("flatten",), ("dense", 1.3, 0.1)],
    # Standard parameterisation: fan-ins C_in * k * k and the dense input widths.
    "standard_gap": [_c(3, "same", 1.5, 0.1, fan_in=2 * 9), ("relu",),
                     _c(3, "same", 1.4, 0.2, fan_in=7 * 9), ("relu",), ("gap",),
                     ("dense", 1.3, 0.1, 5)],
    "standard_flatten": [_c(3, "same", 1.4, 0.1, fan_in=2 * 9), ("relu",), ("flatten",),
                         ("dense", 1.5, 0.2, 4 * 4 * 6)],
    "standard_dense_spatial": [_c(3, "same", 1.3, 0.15, fan_in=2 * 9), ("relu",),
                               ("dense", 1.4, 0.1, 6), ("relu",), ("gap",),
                               ("dense", 1.2, 0.1, 4)],
    "layernorm": [_c(3, "same", 1.4, 0.1), ("layernorm", 1e-12), ("relu",),
                  _c(3, "same", 1.5, 0.2), ("gap",), ("dense", 1.3, 0.1)],
    "act_relu": _act_net("relu", 1.5, 0.1),
    "act_sign": _act_net("sign", 1.5, 0.2),
    "act_step": _act_net("step", 1.4, 0.1),
}


def check_numpy(arrays, report):
    """Every NP_NETS case against np_kernels: max relative difference per array."""
    results = {}
    for name, layers in NP_NETS.items():
        x1, x2 = arrays[f"{name}/x1"], arrays[f"{name}/x2"]
        x = np.concatenate([x1, x2])
        if x.ndim == 3:  # sequences (n, L, C) as images (n, L, 1, C)
            x = x[:, :, None, :]
        K, T = np_kernels(x, layers)
        blocks = {"11": (slice(0, 3), slice(0, 3)), "12": (slice(0, 3), slice(3, 5))}
        row = {}
        for tag, block in blocks.items():
            for kind, ref in (("nngp", K[block]), ("ntk", T[block])):
                row[f"{kind}_{tag}"] = _max_rel(arrays[f"{name}/{kind}_{tag}"], ref)
        # The 12 kernels and the NNGP must agree to rounding everywhere (this is the
        # check of the conventions); NT's ntk_11 carries its own larger error.
        worst_12 = max(row["nngp_12"], row["ntk_12"])
        limit_12 = 1e-9 if name == "act_step" else 1e-13
        if not worst_12 < limit_12:
            raise SystemExit(f"numpy check failed: {name}: {row}")
        results[name] = row
    report["numpy_checks"] = {
        "what": "max relative difference of the stored Neural Tangents arrays from an "
                "independent float64 numpy implementation of the conventions above "
                "(np_kernels in make_nt_conv.py), per array",
        "results": results,
    }
    return results


def check_tanh(arrays, report):
    """How far NT's Gauss-Hermite tanh kernels move with the quadrature degree."""
    case = next(c for c in report["cases"] if c["name"] == "tanh")
    x1, x2 = arrays["tanh/x1"], arrays["tanh/x2"]
    results = {}
    for deg in TANH_CHECK_DEGS:
        if deg == TANH_DEG:
            results[deg] = [(arrays["tanh/nngp_11"], arrays["tanh/ntk_11"]),
                            (arrays["tanh/nngp_12"], arrays["tanh/ntk_12"])]
            continue
        code = case["nt"].replace(f"deg={TANH_DEG}", f"deg={deg}")
        results[deg] = [kernel_pair(code, x1, None), kernel_pair(code, x1, x2)]
    ref = results[TANH_DEG]
    diffs = {}
    for deg in TANH_CHECK_DEGS:
        if deg == TANH_DEG:
            continue
        diffs[f"deg {deg} vs {TANH_DEG}"] = {
            f"{kind}_{tag}": _max_rel(results[deg][i][j], ref[i][j])
            for i, tag in enumerate(("11", "12")) for j, kind in enumerate(("nngp", "ntk"))}
    report["tanh_convergence"] = {
        "what": "max relative difference per array of the tanh case against the "
                f"stored deg={TANH_DEG}",
        "results": diffs,
        "notes": "ntk_11 does not settle below ~1e-10 because of the ReLU after the "
                 "tanh: NT's ReLU derivative kernel at an input paired with itself "
                 "carries that error (see numpy_checks, act_relu ntk_11), whatever "
                 "the degree. A separate run with deg 500 and 600 (about 13 GB of "
                 "memory at 600) put deg 400 within 1e-14 of deg 600 for nngp_11, "
                 "nngp_12 and ntk_12.",
    }
    return diffs


CONVENTIONS = {
    "inputs": "channels-last: (N, H, W, C) images, (N, L, C) sequences; input "
              "covariance K0_pp'(x, x') = x_p . x'_p' / C.",
    "conv": "ntk parameterisation: K_pp' <- W_std^2 * mean over the k (k*k) taps d of "
            "K_{p+d, p'+d} + b_std^2 (the mean runs over all taps, padding zeros "
            "included); Theta_pp' <- W_std^2 * mean_d Theta_{p+d, p'+d} + K_new. "
            "Padding as lax: 'same' pads max((out-1)*s + k - n, 0) zeros with the "
            "smaller half first (asymmetric for even k or some strides), 'valid' none, "
            "'circular' wraps (same amounts). Stride subsamples p and p' alike.",
    "flatten": "K <- mean over positions p of K_pp (same-position entries only); NT "
               "marks the result non-Gaussian, so a dense layer must follow.",
    "avg_pool": "K <- mean over the window of p and the window of p' (window k x k, "
                "stride = k unless given); 'same' pads with zeros that count in the "
                "mean (normalize_edges=False: divide by k*k always).",
    "global_avg_pool": "K <- mean over all position pairs (p, p').",
    "dense_on_spatial": "acts per (p, p') entry on the channel axis: K_pp' <- "
                        "W_std^2 K_pp' + b_std^2; Theta likewise + K_new.",
    "layernorm": "stax.LayerNorm(axis=-1): over channels per position, "
                 "K_pp'(x, x') / sqrt((K_pp(x, x) + eps) (K_p'p'(x', x') + eps)).",
    "spec_syntax_assumed": "conv(k=INT or ROWS:COLS, stride=1, padding=same|valid|"
                           "circular, w_std, b_std, parameterization, width); "
                           "avg_pool(k, stride=k, padding=valid|same); "
                           "global_avg_pool; flatten; dense; residual[...]; "
                           "parallel[...; ...]; layernorm.",
}

ACCURACY = (
    "Neural Tangents' kernel_fn(x, None) pairs every input with itself through two "
    "code paths (the same-input covariance cov1 and the full nngp) whose values differ "
    "by rounding, so the angle of an input with itself comes out near 1e-8 instead of "
    "0. Kernels with a term linear in the angle (the ReLU derivative kernel, sign, "
    "step) inherit that: measured against an independent float64 numpy "
    "implementation (numpy_checks), ntk_11 of the ReLU networks is off by up to "
    "~3e-9 relative, act_sign's nngp_11/ntk_11 by ~3e-5 (the second sign amplifies "
    "the first one's error), act_step by ~2e-10 in every array; nngp_11 and all 12 "
    "arrays of the ReLU networks agree to ~1e-15. The *_dup arrays are kernel_fn(x, "
    "None) too and share the ntk_11 error. Compare with tolerances above these.")

STANDARD = {
    "source": "neural_tangents 0.6.5, neural_tangents/_src/stax/linear.py: Conv "
              "kernel_fn inside _Conv ('standard' branch) and Dense kernel_fn "
              "('standard' branch).",
    "conv": "Theta_new = (C_in * prod(filter_shape)) * A(K_old) + W_std^2 * A(Theta_old) "
            "+ 1;  K_new = W_std^2 * A(K_old) + b_std^2, where A is the mean over "
            "filter taps of the conv stencil (padding zeros counted), K_old the "
            "pre-layer NNGP and C_in the channel count of the layer input (the "
            "previous layer's width, or the input's C). The +1 is there whenever b_std "
            "is not None (even b_std=0.0); it is absent for b_std=None.",
    "dense": "Theta_new = n_in * K_old + W_std^2 * Theta_old + 1;  K_new = W_std^2 * "
             "K_old + b_std^2, per (p, p') entry, with n_in = the size of the input's "
             "channel axis (the previous conv/dense width; after Flatten H*W*C; after "
             "GlobalAvgPool C). +1 only when b_std is not None.",
    "ntk_for_comparison": "ntk parameterisation: Theta_new = K_new + W_std^2 * "
                          "A(Theta_old) (K_new including b_std^2).",
}


def main():
    warnings.filterwarnings("ignore", message=".*Numerical Activation Layer.*")
    all_cases = cases()
    arrays = {}
    for index, case in enumerate(all_cases):
        run_case(case, 20240 + index, arrays)
        print(f"{case['name']:<24s} {case['spec']}", file=sys.stderr)
    report = {
        "description": "Neural Tangents' NNGP and NTK of small convolutional networks "
                       "(float64, CPU). Arrays in nt_conv.npz; written by "
                       "make_nt_conv.py (see its docstring to rerun).",
        "versions": {"neural_tangents": nt.__version__, "jax": jax.__version__,
                     "numpy": np.__version__},
        "conventions": CONVENTIONS,
        "standard_parameterization": STANDARD,
        "accuracy": ACCURACY,
        "dropped": [
            {"case": "conv, relu, residual[conv, relu, conv], relu, global_avg_pool, dense",
             "reason": "NT refuses it: FanInSum is implemented only for Gaussian "
                       "inputs, and the skip branch carries a relu output. Replaced "
                       "by the case 'residual'."},
        ],
        "cases": all_cases,
    }
    check_closed_forms(arrays, report)
    numpy_results = check_numpy(arrays, report)
    diffs = check_tanh(arrays, report)
    print("tanh convergence:", diffs, file=sys.stderr)
    print("closed-form checks:", report["closed_form_checks"]["results"], file=sys.stderr)
    for name, row in numpy_results.items():
        print(f"numpy check {name:<16s}", " ".join(f"{k} {v:.1e}" for k, v in row.items()),
              file=sys.stderr)

    tmp_npz, tmp_json = NPZ + ".tmp.npz", MANIFEST + ".tmp"
    np.savez_compressed(tmp_npz, **arrays)
    with open(tmp_json, "w") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")
    os.replace(tmp_npz, NPZ)
    os.replace(tmp_json, MANIFEST)
    print(f"wrote {NPZ} ({os.path.getsize(NPZ)} bytes) and {MANIFEST}", file=sys.stderr)


if __name__ == "__main__":
    main()
