"""A spec lowered to a straight program of ops: what the kernels and finite networks run.

Lowering walks the spec once. Every layer appends its ops through
:meth:`Builder.emit` (``Layer.lower``), and blocks of branches become the
stash ops SAVE, LOAD and ADD, so the program is a flat list that the fused
numba pass (:mod:`limitkernel._fused`), the diagonals below and the finite
networks (:mod:`limitkernel.finite`) all walk in order.

An op is ``(kind, where, params)``: ``kind`` is the layer object (or, for the
stash ops, a small op object) that knows what the op does, ``params`` its
parameters by name. For the numba pass they are packed into one row of a float
matrix in the order ``kind.row_params`` names, and each row kernel unpacks its
own row; nothing else reads a column by position.

While lowering, the builder tracks what the exactness of the limit rests on:
whether the current layer is a mean-zero Gaussian (what activations and
layernorm need) and whether it is independent of the block input (what a sum of
branches needs), and the input width of the next dense layer (the fan-in of the
"standard" parameterisation); a layer that breaks a rule is named in the error.
"""

import numpy as np

from .spec import SpecError, as_spec

__all__ = ["Builder", "Op", "OpKind", "Program", "ROW_WIDTH"]

# Entries of the widest parameter row.
ROW_WIDTH = 8


class OpKind:
    """What every op kind provides (defaults for the parts most kinds do not need).

    A layer kind derives from :class:`limitkernel.spec.Layer` and from this
    class; the stash ops of blocks derive from this class only.

    Kernels
        ``code`` (its opcode: the fused pass of :mod:`limitkernel._fused`
        dispatches on it) and ``row_params`` (the names of its parameter row,
        in the order its row kernel unpacks them); ``diag_update(op, state)``
        advances a :class:`Diagonal` (every input with itself).
    Finite networks (:mod:`limitkernel.finite`)
        ``finite_width(op, width, stash)`` the output width for an input of
        ``width`` units; ``finite_init(op, fan_in, fan_out, rng)`` its trained
        parameters (None when it has none); ``finite_forward(op, params, h, run)`` the
        output on a batch ``h`` (N, ..., width), recording in ``run`` what
        ``finite_backward(op, params, delta, record, run)`` needs to turn the signals
        ``delta`` (N, r, ..., width) at its output into those at its input.
    """

    code = None
    row_params = ()
    has_params = False

    def diag_update(self, op, state):
        raise NotImplementedError(f"{self!r} has no diagonal update")

    def finite_width(self, op, width, stash):
        return width

    def finite_init(self, op, fan_in, fan_out, rng):
        return None

    def finite_forward(self, op, params, h, run):
        raise NotImplementedError(f"{self!r} has no finite-network forward pass")

    def finite_backward(self, op, params, delta, record, run):
        raise NotImplementedError(f"{self!r} has no finite-network backward pass")


class Op:
    """One step of a program: ``kind`` does it, with ``params`` by name.

    ``shape`` is the spatial shape (H, W) of the state entering the op, or None
    for vectors.
    """

    __slots__ = ("kind", "params", "shape", "where")

    def __init__(self, kind, where, params, shape=None):
        self.kind, self.where, self.params, self.shape = kind, where, params, shape

    @property
    def positions(self):
        """Positions of the state entering the op (1 for vectors)."""
        return 1 if self.shape is None else self.shape[0] * self.shape[1]

    def __str__(self):
        return str(self.kind)

    def row(self):
        """The parameters in the order of ``kind.row_params`` (for the numba pass)."""
        return [float(self.params[name]) for name in self.kind.row_params]


class Builder:
    """What lowering knows at the current layer; layers advance it through ``emit``.

    Attributes
    ----------
    fan_in : float or None
        Input width of the next dense or conv layer: d (or the input channels)
        for the first, then the ``width`` of the last dense or conv layer; None
        once such a layer leaves its width unsaid (the infinite width of the
        limit), so that a "standard" layer after it is refused, not given a
        stale width (see :meth:`require_fan_in`).
    gaussian : True or str
        True when the current layer is a mean-zero Gaussian in the limit;
        otherwise why not (see :func:`why_not_gaussian`).
    independent : bool
        The current layer ends with a dense layer of its own inside the current
        block, so it is independent of the block input.
    depth : int
        Nesting depth of blocks (stash slots 2·depth and 2·depth + 1 are theirs).
    spatial : (int, int) or None
        Spatial shape (H, W) of the current layer (sequences are (1, L)), or
        None once the network works on vectors.
    sequence : bool
        The inputs are sequences (N, L, C), not images.
    pairs : bool
        The program carries every pair of positions (it pools), not only the
        same-position covariances.
    """

    def __init__(self, input_shape, check_limit=True, pairs=False):
        self.check_limit = check_limit
        self.ops = []
        self.geometries = []
        self.pairs = pairs
        if len(input_shape) == 1:
            self.spatial = None
        elif len(input_shape) == 2:
            self.spatial = (1, int(input_shape[0]))
        else:
            self.spatial = (int(input_shape[0]), int(input_shape[1]))
        self.input_spatial = self.spatial
        # Sequences are (1, L) shapes, but a (1, W) shape may also be an image.
        self.sequence = len(input_shape) == 2
        self.fan_in = float(input_shape[-1])
        self.unsized = None  # where the layer that left fan_in unsaid is
        self.gaussian = True
        self.independent = False
        self.depth = 0
        self.n_slots = 0
        self.final = False

    def emit(self, kind, where, **params):
        """Append an op; returns its index."""
        missing = [name for name in kind.row_params if name not in params]
        if missing or len(kind.row_params) > ROW_WIDTH:
            raise RuntimeError(f"{kind!r} declares row_params {kind.row_params}, "
                               f"emitted {sorted(params)}")
        self.ops.append(Op(kind, where, params, self.spatial))
        return len(self.ops) - 1

    def add_geometry(self, geometry):
        """Register the index maps of a spatial op; returns their index."""
        self.geometries.append(geometry)
        return len(self.geometries) - 1

    def set_width(self, width, where):
        """The output width of a dense or conv layer at ``where`` (None: unsaid)."""
        self.fan_in, self.unsized = width, (where if width is None else None)

    def require_fan_in(self, where):
        """The fan-in a "standard" layer's NTK needs; refuse one left unsaid."""
        if self.fan_in is None:
            raise SpecError(f"{where}: the standard parameterisation's NTK grows with "
                            f"the layer's input width, but {self.unsized} leaves its "
                            "width unsaid; give it width=...")
        return self.fan_in

    def require_gaussian(self, where, what):
        """Refuse a layer that needs a mean-zero Gaussian input where there is none."""
        if self.gaussian is not True and self.check_limit:
            raise SpecError(f"{where}: {what}, but {why_not_gaussian(self.gaussian)}; "
                            "put a dense layer before it")

    def lower(self, layers, path="", is_last=False):
        """Append the ops of ``layers`` (a list), each at its place ``path``."""
        for pos, layer in enumerate(layers):
            where = f"{path}layer {pos + 1} ({short(layer)})"
            self.final = is_last and pos == len(layers) - 1
            layer.lower(self, where)
        return self


def _needs_pairs(layers):
    """Whether some layer (in any branch) needs every pair of positions (pooling)."""
    for layer in layers:
        if getattr(layer, "needs_pairs", False):
            return True
        if any(_needs_pairs(b.layers) for b in getattr(layer, "branches", ())):
            return True
    return False


def _runs(index_map, stride):
    """Per tap, up to two runs (first output, end, first input) of outputs whose
    inputs advance by ``stride`` (wrap-around splits a run in two)."""
    out = np.zeros((index_map.shape[1], 2, 3), dtype=np.int64)
    for t in range(index_map.shape[1]):
        col, runs, o = index_map[:, t], [], 0
        while o < len(col):
            if col[o] < 0:
                o += 1
                continue
            start = o
            while o + 1 < len(col) and col[o + 1] == col[o] + stride:
                o += 1
            runs.append((start, o + 1, col[start]))
            o += 1
        if len(runs) > 2:
            raise RuntimeError(f"an index map splits into {len(runs)} runs")
        if runs:  # a tap that only ever meets the padding has none
            out[t, :len(runs)] = runs
    return out


def _pack_geometries(geometries):
    """One int table of the spatial ops' shapes and one of their index maps.

    Row g of ``geo``: (H_in, W_in, H_out, W_out, k_y, k_x, offset of the y map,
    offset of the x map, stride y, stride x, offset of the y runs, offset of
    the x runs) into ``imap``. The y map is (H_out, k_y) and the x map
    (W_out, k_x), each entry an input index or −1 (a zero of the padding); the
    runs are (k, 2, 3): per tap, up to two ranges of outputs [start, end) whose
    inputs start at a given index and advance by the stride.
    """
    geo = np.zeros((max(len(geometries), 1), 12), dtype=np.int64)
    maps, offset = [], 0
    for g, (shape_in, shape_out, my, mx, strides) in enumerate(geometries):
        ry, rx = _runs(my, strides[0]), _runs(mx, strides[1])
        parts = [my.ravel(), mx.ravel(), ry.ravel(), rx.ravel()]
        starts = np.cumsum([offset] + [len(q) for q in parts])
        geo[g] = (shape_in[0], shape_in[1], shape_out[0], shape_out[1], my.shape[1],
                  mx.shape[1], starts[0], starts[1], strides[0], strides[1], starts[2],
                  starts[3])
        maps.extend(parts)
        offset = starts[-1]
    imap = np.concatenate(maps).astype(np.int64) if maps else np.zeros(1, dtype=np.int64)
    return geo, imap


def short(layer):
    """A layer's text, cut short for messages about blocks."""
    text = str(layer)
    return text if len(text) <= 40 else text[:37] + "..."


def why_not_gaussian(state):
    return {
        False: "its input is the output of an activation",
        "dropout": "its input has gone through dropout (each unit is a mixture)",
        "concat": "its input is a concatenation (its units have different "
                  "covariances)",
        "flatten": "its input is a flatten of positions (units at different positions "
                   "have different variances; put it before the flatten)",
        "sum": "its input is a sum with a non-Gaussian term (a skip connection "
               "or branch that does not end with a dense layer)",
    }.get(state, "its input is not Gaussian")


def _overflow_message(index, op, q):
    if np.all(np.isfinite(q)):
        what = (f"the NTK Θ(x, x) overflows while the variances stay at most "
                f"{float(np.max(q)):.3g} (each activation multiplies Θ by E[φ'(u)²], each "
                "dense layer by w_std²)")
    else:
        what = "the variances K(x, x) overflow"
    return (f"the kernel overflows at layer {index + 1} ({op}): {what}; lower the "
            "parameters of this layer or of the layers before it, or the input scale")


class Diagonal:
    """The state of every input with itself, as :meth:`Program.diagonals` walks.

    ``q`` K(x, x), ``theta`` Θ(x, x), ``grad`` ∂K(x, x')/∂K⁰(x, x') at x' = x
    (for the correlation slope χ), all (n,) arrays; ``stash`` the stash slots.
    """

    def __init__(self, q):
        self.q = q
        self.theta = np.zeros_like(q)
        self.grad = np.ones_like(q)
        self.stash = {}


class Program:
    """A spec lowered for inputs of ``n_features`` features.

    With ``check_limit=False`` (finite networks) the rules that the limit's
    exactness rests on are not enforced.

    Attributes
    ----------
    ops : list of Op
    codes : (L,) int64 array
        Opcode of each op (``kind.code``), for the numba pass.
    prm : (L, ROW_WIDTH) float array
        Parameter rows, each packed in its kind's ``row_params`` order.
    n_slots : int
        Stash slots the program uses.
    chi, chi_max : float or None
        After :meth:`diagonals`: the network's correlation slope at ρ = 1, the
        median and the largest over the inputs.
    """

    def __init__(self, spec, input_shape, check_limit=True):
        spec = as_spec(spec)
        if not len(spec):
            raise SpecError("empty spec: give layers such as 'dense, relu, dense'")
        last = spec.layers[-1]
        if not getattr(last, "readout", False):
            raise SpecError(
                f"the network must end with a dense readout layer, but its last layer "
                f"is {last}; append ', dense'"
            )
        input_shape = (int(input_shape),) if np.ndim(input_shape) == 0 else \
            tuple(int(v) for v in input_shape)
        self.input_shape = input_shape
        self.pairs = _needs_pairs(spec.layers)
        builder = Builder(input_shape, check_limit, self.pairs).lower(spec.layers,
                                                                      is_last=True)
        self.ops = builder.ops
        self.spatial = builder.input_spatial
        self.n_slots = builder.n_slots
        for op in self.ops:
            if "n_slots" in op.params:
                op.params["n_slots"] = self.n_slots
        self.codes = np.array([op.kind.code for op in self.ops], dtype=np.int64)
        self.prm = np.zeros((len(self.ops), ROW_WIDTH))
        for index, op in enumerate(self.ops):
            row = op.row()
            self.prm[index, :len(row)] = row
        # The op that turns positions into vectors (flatten, global_avg_pool).
        self.collapse = next((i for i, op in enumerate(self.ops)
                              if op.shape is not None and getattr(op.kind, "collapses", False)),
                             None)
        self.geo, self.imap = _pack_geometries(builder.geometries)
        # Positions of the state entering each op (and leaving the last), and where
        # they start in the per-input tables of diagonals.
        self.positions = np.array([op.positions for op in self.ops] + [1], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.positions[:-1])]).astype(np.int64)
        self.chi = self.chi_max = None

    @property
    def table_width(self):
        """Entries per input of the tables of diagonals (all ops' positions)."""
        return int(self.offsets[-1] + self.positions[-1])

    def work_size(self):
        """Edge of the square scratch arrays a pair of positions needs (see
        :func:`limitkernel._fused_spatial.run_pair`)."""
        size = int(self.positions.max())
        for hi, wi, ho, wo, ky, kx, *_ in self.geo:
            size = max(size, int(ho * wi), int(ky * kx))
        return size

    def spatial_diagonals(self, x):
        """Per-position diagonals of inputs x (n, P, C), same-position regime.

        Returns ``(var, nngp, ntk)`` with ``var`` (n, R): K(x, x) at every
        position entering every op (offsets ``self.offsets``).
        """
        state = Diagonal(np.einsum("npc,npc->np", x, x) / x.shape[2])
        state.program = self
        var = np.empty((x.shape[0], self.table_width))
        var[:, :self.positions[0]] = state.q
        for index, op in enumerate(self.ops):
            op.kind.diag_update(op, state)
            q = state.q if state.q.ndim == 2 else state.q[:, None]
            if not np.all(np.isfinite(q)) or not np.all(np.isfinite(state.theta)):
                raise FloatingPointError(
                    f"the kernel overflows at layer {index + 1} ({op}): variances reach "
                    f"{float(np.max(q)):.3g}; lower w_std, b_std or the input scale")
            off = self.offsets[index + 1]
            var[:, off:off + q.shape[1]] = q
        return var, state.q, state.theta

    @property
    def layers(self):
        """The object behind each op (the layer, or the stash op)."""
        return [op.kind for op in self.ops]

    def diagonals(self, x):
        """Square roots of the diagonals entering each op; final K and Θ diagonals.

        Returns ``(roots, nngp, ntk)`` with ``roots`` of shape (L + 1, n).
        """
        state = Diagonal(np.einsum("ij,ij->i", x, x) / x.shape[1])
        roots = np.empty((len(self.ops) + 1, x.shape[0]))
        roots[0] = np.sqrt(state.q)
        for index, op in enumerate(self.ops):
            # An overflow is reported below, with its layer and its cause.
            with np.errstate(over="ignore", invalid="ignore"):
                op.kind.diag_update(op, state)
            if not np.all(np.isfinite(state.q)) or not np.all(np.isfinite(state.theta)):
                raise FloatingPointError(_overflow_message(index, op, state.q))
            roots[index + 1] = np.sqrt(state.q)
        q = state.q
        with np.errstate(all="ignore"):
            slope = state.grad * roots[0] ** 2 / q
        slope = slope[np.isfinite(slope) & (q > 0)]
        # The network's correlation slope dρ_out/dρ_in at ρ = 1 (the mean-field χ
        # of the whole stack): < 1 ordered, > 1 chaotic.
        self.chi = float(np.median(slope)) if slope.size else None
        self.chi_max = float(np.max(slope)) if slope.size else None
        return roots, q, state.theta

    def hermite_tables(self, roots):
        """Hermite coefficients of every numerical layer, for the given inputs.

        Returns a list with one ``(coef, dcoef)`` pair of (n, T) arrays per
        numerical layer and records the layer's table index and T in ``prm``.
        Row and column tables (two calls, for x1 and x2) must cut each series
        after the same T for the tail bound to hold, so every call raises T to
        the largest yet chosen on this program and recomputes, in place, the
        tables of earlier calls that are shorter.
        """
        calls = self.__dict__.setdefault("_hermite_calls", [])
        numerical = [index for index, op in enumerate(self.ops)
                     if getattr(op.kind, "series", False)]
        tables = []
        for index in numerical:
            self.ops[index].params["table"] = len(tables)
            tables.append(self.ops[index].kind.coefficients(roots[index] ** 2))
        calls.append((roots, tables))
        for slot, index in enumerate(numerical):
            kind = self.ops[index].kind
            terms = max(t[slot][0].shape[1] for _, t in calls)
            for past_roots, past in calls:
                if past[slot][0].shape[1] < terms:
                    past[slot] = kind.coefficients(past_roots[index] ** 2, terms=terms)
            self.ops[index].params["terms"] = terms
            self.prm[index, :len(kind.row_params)] = self.ops[index].row()
        return tables
