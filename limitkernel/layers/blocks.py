"""Blocks of branches: residual, parallel and concat, and the stash ops they lower to.

A block lowers to a straight program over the entry state: SAVE copies the
state (K, 1 − ρ, Θ — or, in a finite network, the activations) into a stash
slot, LOAD restores it (to start the next branch from the block input), and ADD
forms a weighted sum of the stashed state and the current one (a concatenation,
in a finite network of ``concat``). A sum of branches B1 … Bk with weights w_b
becomes ``SAVE in, B1, SAVE acc, LOAD in, B2, ADD acc, …``. Slots 2·depth and
2·depth + 1 belong to the blocks at nesting depth ``depth``.

In the fused pass the stash is a per-row scratch array with three rows
(K, 1 − ρ, Θ) per slot.
"""

import math
from typing import ClassVar

import numpy as np

from .._numba import jit
from .._program import OpKind
from ..spec import Block, SpecError, register

__all__ = [
    "ADD",
    "LOAD",
    "OP_ADD",
    "OP_LOAD",
    "OP_SAVE",
    "SAVE",
    "Concat",
    "Parallel",
    "Residual",
    "stash_op",
]

OP_SAVE = 20
OP_LOAD = 21
OP_ADD = 22


class _BlockLowering:
    """How residual, parallel and concat lower: one implementation for the three."""

    def weighted_branches(self):
        """[(branch or None for the skip connection, kernel weight)]."""
        return [(branch, 1.0) for branch in self.branches]

    def lower(self, builder, where):
        fan_in, unsized = builder.fan_in, builder.unsized
        gaussian, depth = builder.gaussian, builder.depth
        slot_in, slot_acc = 2 * depth, 2 * depth + 1
        builder.n_slots = max(builder.n_slots, slot_acc + 1)
        pairs = self.weighted_branches()
        weights = [w for _, w in pairs]
        concat = isinstance(self, Concat)
        results, last_unsized = [], unsized
        acc_row = builder.emit(SAVE, f"the input of {where}", slot=slot_in, n_slots=0)
        acc_slot = slot_in
        for index, (branch, _) in enumerate(pairs):
            if branch is None:  # the skip connection of a residual block
                results.append((fan_in, gaussian, False))
                continue
            if index > 0 and acc_slot != slot_in:
                # Back to the block input (after a skip connection it is still current).
                builder.emit(LOAD, f"{where}, branch {index + 1}", slot=slot_in, n_slots=0)
            label = f"{where}, branch {index + 1}: " if len(pairs) > 1 and \
                not isinstance(self, Residual) else f"{where}: "
            builder.fan_in, builder.unsized = fan_in, unsized
            builder.gaussian, builder.independent = gaussian, False
            builder.depth = depth + 1
            builder.lower(branch.layers, label)
            builder.depth = depth
            results.append((builder.fan_in, builder.gaussian, builder.independent))
            last_unsized = builder.unsized or last_unsized
            if index == 0:
                acc_row = builder.emit(SAVE, f"{where}, branch 1", slot=slot_acc, n_slots=0)
                acc_slot = slot_acc
                continue
            first = index == 1
            builder.emit(ADD, f"the output of {where}", slot=acc_slot,
                         w_stash=weights[0] if first else 1.0, w_current=weights[index],
                         stash_layer=acc_row, concat=concat,
                         scale_stash=self.finite_scales()[0] if first else 1.0,
                         scale_current=self.finite_scales()[index])
            if index < len(pairs) - 1:
                acc_row = builder.emit(SAVE, f"{where}", slot=slot_acc, n_slots=0)
                acc_slot = slot_acc
        if concat:
            widths = [r[0] for r in results]
            builder.set_width(None if None in widths else sum(widths), last_unsized)
            builder.gaussian, builder.independent = "concat", all(r[2] for r in results)
            return
        shared = [i + 1 for i, r in enumerate(results) if not r[2]]
        if len(shared) > 1 and builder.check_limit:
            names = ("the skip connection and the branch" if isinstance(self, Residual)
                     else "branches " + " and ".join(map(str, shared)))
            raise SpecError(
                f"{where}: {names} do not end with a dense layer of their own, so "
                "their outputs are correlated and the kernel of their sum is not the "
                "sum of their kernels; end every branch but one with a dense layer"
            )
        builder.set_width(self._summed_width(where, [r[0] for r in results]), last_unsized)
        builder.gaussian = True if all(r[1] is True for r in results) else "sum"
        builder.independent = all(r[2] for r in results)

    def _summed_width(self, where, widths):
        """The width of a sum of branches: the one they state (None if none does)."""
        known = sorted({w for w in widths if w is not None})
        if len(known) > 1:
            names = ("the skip connection and the branch" if isinstance(self, Residual)
                     else "the branches")
            raise SpecError(f"{where}: {names} end with widths "
                            f"{' and '.join(f'{w:g}' for w in known)}, but a sum needs "
                            "them equal; give their last dense or conv layers one width")
        return known[0] if known else None

    def finite_scales(self):
        """The factor of each branch in the finite network's sum."""
        return [1.0] * len(self.branches)


@register
class Residual(_BlockLowering, Block):
    """``α·x + β·f(x)`` for a branch f (a skip connection).

    The branch must end with a dense layer of its own (optionally followed by
    layernorm or dropout), so that f(x) is independent of x in the limit; then
    K ← α² K + β² K_f and Θ ← α² Θ + β² Θ_f, the cross terms having mean zero.
    """

    name = "residual"
    defaults: ClassVar[dict] = {"alpha": 1.0, "beta": 1.0}
    n_branches = 1

    def __init__(self, branch, alpha=1.0, beta=1.0):
        super().__init__([branch], alpha=alpha, beta=beta)

    @classmethod
    def from_branches(cls, branches, **params):
        if len(branches) != 1:
            raise SpecError(f"residual takes one branch, got {len(branches)}; for a "
                            "sum of several branches use parallel[...; ...]")
        return cls(branches[0], **params)

    def weighted_branches(self):
        return [(None, self.alpha ** 2), (self.branches[0], self.beta ** 2)]

    def finite_scales(self):
        return [self.alpha, self.beta]


@register
class Parallel(_BlockLowering, Block):
    """The sum of two or more branches applied to the same input (fan-out, sum).

    All branches but at most one must end with a dense layer of their own, so
    that the branch outputs are independent and the kernels add (Neural
    Tangents' ``serial(FanOut(k), parallel(...), FanInSum())``).
    """

    name = "parallel"
    defaults: ClassVar[dict] = {}

    def __init__(self, *branches):
        super().__init__(branches)


@register
class Concat(_BlockLowering, Block):
    """The concatenation of two or more branches along the features.

    A layer that reads the concatenation sees the average of the branch kernels
    weighted by the branches' shares of the width, ``widths`` (relative sizes,
    default equal): K ← Σ_b w_b K_b / Σ_b w_b, and Θ likewise, as Neural
    Tangents' ``FanInConcat`` does with the branches' channel counts. The units
    of different branches have different covariances, so what follows must be a
    dense layer (or layers that keep it linear: identity, dropout).
    """

    name = "concat"
    defaults: ClassVar[dict] = {"widths": None}

    def __init__(self, *branches, widths=None):
        super().__init__(branches, widths=widths)
        if self.widths is not None and len(self.widths) != len(self.branches):
            raise SpecError(
                f"concat: widths gives {len(self.widths)} values for "
                f"{len(self.branches)} branches; give one per branch, e.g. "
                f"widths={':'.join(['1'] * len(self.branches))}"
            )

    def _check(self, key, value):
        if key != "widths" or value is None:
            return super()._check(key, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise SpecError(f"concat: widths must be numbers, one per branch, "
                            f"got {value!r}") from None
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise SpecError(f"concat: widths must be positive, got {value!r}")
        return values

    def fractions(self):
        """Each branch's share of the concatenated width."""
        widths = self.widths or (1.0,) * len(self.branches)
        total = math.fsum(widths)
        return tuple(w / total for w in widths)

    def weighted_branches(self):
        return list(zip(self.branches, self.fractions()))


# ------------------------------------------------------------ the stash ops


class _StashOp(OpKind):
    """SAVE, LOAD or ADD: a step of a block's program that is not a layer."""

    def __init__(self, name, code, row_params):
        self.name, self.code, self.row_params = name, code, row_params

    def __repr__(self):
        return self.name

    def diag_update(self, op, state):
        slot = op.params["slot"]
        if self is SAVE:
            state.stash[slot] = (state.q, state.theta, state.grad)
        elif self is LOAD:
            state.q, state.theta, state.grad = state.stash[slot]
        else:
            aq, at, ag = state.stash[slot]
            wa, wb = op.params["w_stash"], op.params["w_current"]
            state.q, state.theta = wa * aq + wb * state.q, wa * at + wb * state.theta
            state.grad = wa * ag + wb * state.grad

    # ------------------------------------------------------------ finite network

    def finite_width(self, op, width, stash):
        slot = op.params["slot"]
        if self is SAVE:
            stash[slot] = width
            return width
        if self is LOAD:
            return stash[slot]
        if op.params["concat"]:
            return None if None in (stash[slot], width) else stash[slot] + width
        if width != stash[slot]:
            raise ValueError(f"{op.where}: the branches output widths {stash[slot]} and "
                             f"{width}, but a sum needs them equal; give their last dense "
                             "layers one width")
        return width

    def finite_forward(self, op, params, h, run):
        slot = op.params["slot"]
        if self is SAVE:
            run.stash[slot] = h
            return h, None
        if self is LOAD:
            return run.stash[slot], None
        kept = run.stash[slot]
        if op.params["concat"]:
            return np.concatenate([kept, h], axis=-1), kept.shape[-1]
        wa, wb = op.params["scale_stash"], op.params["scale_current"]
        return (kept if wa == 1.0 else wa * kept) + (h if wb == 1.0 else wb * h), None

    def finite_backward(self, op, params, delta, record, run):
        slot = op.params["slot"]
        if self is SAVE:
            kept = run.gstash.pop(slot, None)
            return kept if delta is None else (delta if kept is None else delta + kept)
        if self is LOAD:
            _accumulate(run.gstash, slot, delta)
            return None
        if op.params["concat"]:
            _accumulate(run.gstash, slot, np.ascontiguousarray(delta[..., :record]))
            return np.ascontiguousarray(delta[..., record:])
        wa, wb = op.params["scale_stash"], op.params["scale_current"]
        _accumulate(run.gstash, slot, delta if wa == 1.0 else wa * delta)
        return delta if wb == 1.0 else wb * delta


def _accumulate(store, slot, value):
    if value is None:
        return
    store[slot] = value if store.get(slot) is None else store[slot] + value


# Parameter rows: SAVE, LOAD (slot, number of slots); ADD (slot, weight of the
# stashed state, weight of the current one, the op whose entering diagonals are
# those of the stashed state).
SAVE = _StashOp("SAVE", OP_SAVE, ("slot", "n_slots"))
LOAD = _StashOp("LOAD", OP_LOAD, ("slot", "n_slots"))
ADD = _StashOp("ADD", OP_ADD, ("slot", "w_stash", "w_current", "stash_layer"))


@jit
def copy_state(q12, one_minus_rho, ntk, dq, dc, dt, want_ntk):
    n = q12.shape[0]
    for j in range(n):
        dq[j] = q12[j]
        dc[j] = one_minus_rho[j]
    if want_ntk:
        for j in range(n):
            dt[j] = ntk[j]


@jit
def add_row(q12, one_minus_rho, ntk, aq, ac, at, r11, r22, s11, s22, n11, n22, wa2, wb2,
            want_ntk):
    """State ← wa²·(stashed state) + wb²·(current state), for independent terms.

    ``r11``, ``r22`` are the roots of the diagonals of the current state,
    ``s11``, ``s22`` those of the stashed one, ``n11``, ``n22`` those of the sum.
    K and Θ add. With x = wa·√q_a and y = wb·√q_b the standard deviations of the
    two terms (row input 1, column input 2) and t = √(x² + y²) that of the sum,
    1 − ρ of the sum is, exactly,
    [(x1 y2 − x2 y1)² / (t1 t2 + x1 x2 + y1 y2) + x1 x2 (1 − ρ_a) + y1 y2 (1 − ρ_b)] / (t1 t2)
    (Lagrange's identity for the first term), a sum of non-negative terms.
    """
    n = q12.shape[0]
    wa = math.sqrt(wa2)
    wb = math.sqrt(wb2)
    x1 = wa * s11
    y1 = wb * r11
    for j in range(n):
        x2 = wa * s22[j]
        y2 = wb * r22[j]
        q12[j] = wa2 * aq[j] + wb2 * q12[j]
        if want_ntk:
            ntk[j] = wa2 * at[j] + wb2 * ntk[j]
        nrm = n11 * n22[j]
        xx = x1 * x2
        yy = y1 * y2
        # 0 exactly for identical inputs: the compiler may fuse a product into
        # the subtraction, and fma(x1, y2, −x2 y1) keeps x1 y1's rounding error
        # (at variances of 1e36 that left 1 − ρ = 4e-34 after a parallel block,
        # and an rbf layer's diagonal of 1 became 0). Written in the
        # differences instead, it cancels catastrophically between inputs of
        # very different norms.
        lag = 0.0 if (x1 == x2 and y1 == y2) else x1 * y2 - x2 * y1
        if nrm > 0.0:
            # Each term divided by t1 t2 before it is summed, and lag² as a
            # product of two ratios: lag is of the order of the variances, and
            # its square overflowed from variances of 1e154 on (found by fuzzing:
            # 1 − ρ became 2, and a later ReLU gave K = 0 at variances of 1e182).
            inv = 1.0 / nrm
            cn = (lag * inv) * (lag / (nrm + xx + yy)) + (xx * inv) * ac[j] + \
                (yy * inv) * one_minus_rho[j]
        else:
            cn = 0.0
        one_minus_rho[j] = min(max(cn, 0.0), 2.0)


@jit
def stash_op(code, q12, one_minus_rho, ntk, stash, layer, i, j0, roots1, roots2, p,
             want_ntk):
    """Run SAVE, LOAD or ADD on a row; returns the (grown) stash.

    ``roots1[l, i]``, ``roots2[l, j]`` are the roots of the diagonals entering op
    l for the row input i and the column inputs j0 …
    """
    n = q12.shape[0]
    slot = int(p[0])
    if code == OP_SAVE and stash.shape[1] < n:
        stash = np.empty((3 * int(p[1]), n))
    aq = stash[3 * slot, :n]
    ac = stash[3 * slot + 1, :n]
    at = stash[3 * slot + 2, :n]
    if code == OP_SAVE:
        copy_state(q12, one_minus_rho, ntk, aq, ac, at, want_ntk)
    elif code == OP_LOAD:
        copy_state(aq, ac, at, q12, one_minus_rho, ntk, want_ntk)
    else:
        row = int(p[3])
        add_row(q12, one_minus_rho, ntk, aq, ac, at, roots1[layer, i],
                roots2[layer, j0:j0 + n], roots1[row, i], roots2[row, j0:j0 + n],
                roots1[layer + 1, i], roots2[layer + 1, j0:j0 + n], p[1], p[2], want_ntk)
    return stash
