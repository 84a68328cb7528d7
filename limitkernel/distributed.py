"""Gram matrices past one machine's memory: on-disk tiles, resumable runs, Dask, CG.

:func:`kernel_to_store` writes the NNGP and NTK matrices tile by tile into a
directory; every tile is the output of :meth:`limitkernel.gram.GramPlan.tile`,
the same tile function :func:`limitkernel.kernel` runs in memory. A tile is
recorded as done only after its bytes have reached the file, so a run killed at
any moment (even by SIGKILL) and rerun recomputes only the missing tiles, and
the result is byte for byte that of an uninterrupted run. The tiles run in
this process or on a Dask cluster (``scheduler=``).

:func:`solve_cg` fits kernel regression on more training points than a dense
factorisation allows: preconditioned conjugate gradients whose products with
the training kernel run over tiles (computed on the fly, or read from a store).

The store
---------
A directory holding ``manifest.json`` (spec, shape, kinds, dtype, tile size and
the fingerprint of the inputs), one ``.npy`` file per kernel (``nngp.npy``,
``ntk.npy``) and ``done/``, one empty marker file per finished tile.

Plain ``.npy`` files rather than zarr: a Gram matrix is a dense array of fixed
shape whose values do not compress, so chunked compressed storage buys nothing;
any numpy opens the result with ``np.load(path, mmap_mode="r")``; and tiles are
written with ``os.pwrite`` at their offsets, which keeps the written pages in
the kernel's page cache and out of this process's resident memory (writing
through a memory map would count every touched page against the budget). A
tile is rewritten in full whenever its marker is missing, and its content is a
deterministic function of the plan, so a half-written tile is never seen as
done and rewriting one is harmless: tasks are idempotent and safe to retry.
Workers of a cluster on several machines need the store on a shared file
system.
"""

import hashlib
import json
import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from . import gram as _gram
from ._numba import sources_digest
from ._version import __version__
from .gram import KINDS, MemoryBudgetError, available_memory, prepare
from .spec import as_spec

__all__ = [
    "CGSolution",
    "StoreError",
    "StoreStatus",
    "kernel_to_store",
    "open_store",
    "parse_memory",
    "solve_cg",
    "status",
]

_FORMAT = "limitkernel-gram-store"
_FORMAT_VERSION = 1
# What the interpreter, numpy, numba and the compiled kernels take before any
# data: measured at about 200 MB; the budget keeps this much aside.
_OVERHEAD = 256 << 20
_DEFAULT_MEMORY = 4 << 30
_MIN_TILE = 64
_INSTALL_DASK = "pip install 'limitkernel[dask]'"


class StoreError(ValueError):
    """A store path that cannot be used: another computation's, or not a store."""


# ------------------------------------------------------------ memory budget


_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6,
          "g": 10 ** 9, "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_memory(memory):
    """Bytes from an int or a text such as ``"4GB"``, ``"512 MiB"``, ``"1.5e9"``.

    ``None`` means the smaller of 4 GiB and half the memory available now.
    """
    if memory is None:
        avail = available_memory()
        return _DEFAULT_MEMORY if avail is None else min(_DEFAULT_MEMORY, avail // 2)
    if isinstance(memory, (int, np.integer)) and not isinstance(memory, bool):
        value = int(memory)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(memory))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory must be a number of bytes or a size such as '4GB' "
                             f"or '512MiB', got {memory!r}")
        try:
            value = int(float(match.group(1)) * _UNITS[unit])
        except ValueError:
            raise ValueError(f"memory must be a size such as '4GB', got {memory!r}") from None
    if value <= 0:
        raise ValueError(f"memory must be positive, got {memory!r}")
    return value


def _fixed_bytes(plan):
    """Bytes a plan holds: inputs, their unit-norm copies, diagonals, tables."""
    sides = [plan.rows] if plan.symmetric else [plan.rows, plan.cols]
    total = 0
    for side in sides:
        total += side.x.nbytes + side.xn.nbytes + side.roots.nbytes
        total += side.h.nbytes + side.hd.nbytes
    return total


def _tile_size(plan, budget, in_flight=1):
    """The largest tile edge (a multiple of 64) whose working set fits the budget.

    Per tile entry: 8 bytes of GEMM scratch, and for each of ``in_flight`` tiles
    (one being computed while the previous one is written) one output per
    kernel and, for the mirrored tile of the symmetric case, one transposed copy.
    """
    n, m = plan.shape
    per_entry = 8 + in_flight * plan.dtype.itemsize * (len(plan.kinds) + plan.symmetric)
    fixed = _fixed_bytes(plan) + _OVERHEAD
    room = budget - fixed
    edge = math.isqrt(max(room, 0) // per_entry)
    if edge < _MIN_TILE and edge < max(n, m):
        need = fixed + per_entry * _MIN_TILE ** 2
        raise MemoryBudgetError(
            f"memory={_gram._format_bytes(budget)} is too small: the inputs and their "
            f"tables take {_gram._format_bytes(_fixed_bytes(plan))} (plus "
            f"{_gram._format_bytes(_OVERHEAD)} for the interpreter); give at least "
            f"memory='{math.ceil(need / 1e9 * 10) / 10}GB'"
        )
    if edge < max(n, m):
        edge = edge // _MIN_TILE * _MIN_TILE
    return max(1, min(edge, max(n, m)))


# ------------------------------------------------------------ the store


class _Layout:
    """The tile grid of an n × m matrix with square tiles of edge ``tile``."""

    def __init__(self, n, m, tile, symmetric):
        self.n, self.m, self.tile, self.symmetric = n, m, tile, symmetric
        self.rows = math.ceil(n / tile)
        self.cols = math.ceil(m / tile)

    def tiles(self):
        """Grid indices (i, j) of the tiles to compute: the upper ones if symmetric."""
        return [(i, j) for i in range(self.rows)
                for j in range(i if self.symmetric else 0, self.cols)]

    def bounds(self, i, j):
        t = self.tile
        return i * t, min((i + 1) * t, self.n), j * t, min((j + 1) * t, self.m)


def _version():
    return __version__


def _kernel_code_hash():
    """Hash of the code that computes entries, so a changed kernel never mixes."""
    digest = hashlib.sha256(_version().encode())
    digest.update(sources_digest().encode())
    return digest.hexdigest()


def _fingerprint(spec_text, x1, x2, kinds, dtype):
    digest = hashlib.sha256()
    for part in (_FORMAT, spec_text, ",".join(kinds), str(dtype), _kernel_code_hash()):
        digest.update(part.encode())
        digest.update(b"\0")
    for x in (x1, x2):
        if x is None:
            digest.update(b"symmetric\0")
        else:
            digest.update(f"{x.shape}".encode())
            digest.update(np.ascontiguousarray(x).data)
    return digest.hexdigest()


def _marker(path, i, j):
    return os.path.join(path, "done", f"{i}_{j}")


def _read_manifest(path):
    try:
        with open(os.path.join(path, "manifest.json")) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read manifest.json ({err}); remove the directory "
                         "to start afresh") from None
    if meta.get("format") != _FORMAT:
        raise StoreError(f"{path}/manifest.json is not a limitkernel Gram store")
    return meta


def _layout(meta):
    return _Layout(meta["shape"][0], meta["shape"][1], meta["tile"], meta["symmetric"])


def _create(path, meta):
    """Lay out the store: empty (sparse) .npy files, then the manifest, last."""
    os.makedirs(os.path.join(path, "done"), exist_ok=True)
    n, m = meta["shape"]
    offsets = {}
    for kind in meta["kinds"]:
        array = np.lib.format.open_memmap(os.path.join(path, f"{kind}.npy"), mode="w+",
                                          dtype=np.dtype(meta["dtype"]), shape=(n, m))
        offsets[kind] = int(array.offset)
        del array
    meta = dict(meta, offsets=offsets)
    tmp = os.path.join(path, "manifest.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(path, "manifest.json"))
    return meta


def _open_or_create(path, meta):
    """The existing store at ``path`` if it holds the same computation, else a new one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"{path} exists and is not a directory; give a directory path "
                         "for the store (or a .npz path for an in-memory kernel)")
    old = _read_manifest(path) if os.path.isdir(path) else None
    if old is None:
        if os.path.isdir(path):
            ours = {"done", "nngp.npy", "ntk.npy", "manifest.json.tmp"}
            other = sorted(set(os.listdir(path)) - ours)
            if other:
                raise StoreError(
                    f"{path} is a non-empty directory that is not a limitkernel store "
                    f"(it holds {', '.join(other[:3])}); give a new or empty directory")
        return _create(path, meta)
    if old["fingerprint"] != meta["fingerprint"]:
        diffs = [name for name in ("spec", "shape", "kinds", "dtype", "version")
                 if old.get(name) != meta.get(name)]
        what = ", ".join(diffs) if diffs else "the input values or the kernel code"
        raise StoreError(
            f"{path} holds a different computation (differs in: {what}; stored spec "
            f"{old.get('spec')!r}); refusing to mix results: give a new path, or delete "
            "this one to start afresh")
    return old


def _pwrite_block(fd, offset, ncols, r0, c0, block):
    """Write ``block`` at rows r0.., columns c0.. of a row-major (., ncols) array."""
    item = block.dtype.itemsize
    for ii in range(block.shape[0]):
        row = block[ii]
        start = offset + ((r0 + ii) * ncols + c0) * item
        view = memoryview(row).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], start + written)


def _write_tile(plan, path, meta, i, j):
    """Compute tile (i, j), write it (and its mirror), then mark it done.

    Idempotent: the marker is created only after the bytes are on disk
    (``fdatasync``), and a tile without a marker is simply written again.
    """
    if os.path.exists(_marker(path, i, j)):
        return i, j
    return _store_tile(path, meta, i, j, plan.tile(*_layout(meta).bounds(i, j)))


def _store_tile(path, meta, i, j, tiles):
    layout = _layout(meta)
    r0, _, c0, _ = layout.bounds(i, j)
    m = layout.m
    for kind, block in tiles.items():
        fd = os.open(os.path.join(path, f"{kind}.npy"), os.O_WRONLY)
        try:
            offset = meta["offsets"][kind]
            _pwrite_block(fd, offset, m, r0, c0, block)
            if layout.symmetric and i != j:
                _pwrite_block(fd, offset, m, c0, r0, np.ascontiguousarray(block.T))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        del block
    fd = os.open(_marker(path, i, j), os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    return i, j


def _done(path, layout):
    names = set(os.listdir(os.path.join(path, "done")))
    return [(i, j) for i, j in layout.tiles() if f"{i}_{j}" in names]


@dataclass
class StoreStatus:
    """Progress of a store: tiles done out of the total, and what it holds."""

    path: str
    spec: str
    shape: tuple
    kinds: tuple
    dtype: str
    tile: int
    done: int
    total: int
    fingerprint: str = field(repr=False)

    @property
    def complete(self):
        return self.done == self.total

    @property
    def fraction(self):
        return self.done / self.total if self.total else 1.0

    def __str__(self):
        n, m = self.shape
        state = "complete" if self.complete else "incomplete: rerun the same command to resume"
        return "\n".join([
            f"store      {self.path}",
            f"spec       {self.spec}",
            f"matrices   {', '.join(self.kinds)}: {n} x {m} {self.dtype}",
            (f"tiles      {self.done} of {self.total} done ({100 * self.fraction:.1f}%), "
             f"edge {self.tile}"),
            f"state      {state}",
        ])


def status(path):
    """Progress of the store at ``path`` (:class:`StoreStatus`)."""
    path = os.fspath(path)
    meta = _read_manifest(path) if os.path.isdir(path) else None
    if meta is None:
        raise StoreError(f"{path} is not a limitkernel Gram store (no manifest.json); "
                         "write one with kernel_to_store or 'limitkernel kernel --out DIR'")
    layout = _layout(meta)
    return StoreStatus(path=path, spec=meta["spec"], shape=tuple(meta["shape"]),
                       kinds=tuple(meta["kinds"]), dtype=meta["dtype"], tile=meta["tile"],
                       done=len(_done(path, layout)), total=len(layout.tiles()),
                       fingerprint=meta["fingerprint"])


def open_store(path, partial=False):
    """The matrices of a store as read-only memory maps: ``{kind: np.memmap}``.

    Raises :class:`StoreError` when tiles are missing, unless ``partial=True``
    (missing tiles then read as zeros).
    """
    state = status(path)
    if not state.complete and not partial:
        raise StoreError(f"{path} is incomplete ({state.done} of {state.total} tiles); "
                         "rerun the command that wrote it to finish, or pass partial=True")
    return {kind: np.load(os.path.join(os.fspath(path), f"{kind}.npy"), mmap_mode="r")
            for kind in state.kinds}


# ------------------------------------------------------------ progress


class _Progress:
    """tqdm bar (quiet when not a terminal, unless forced) or a user callback."""

    def __init__(self, progress, total, initial):
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is None or progress is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if progress is True:
                    warnings.warn("progress=True needs tqdm: pip install "
                                  "'limitkernel[progress]'", stacklevel=3)
                return
            self.bar = tqdm(total=total, initial=initial, unit="tile", desc="gram tiles",
                            disable=None if progress is None else False, smoothing=0.1)

    def update(self, done, total):
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(done, total)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------ writing


def kernel_to_store(spec, x1, x2=None, path=None, get=KINDS, dtype="float64", memory=None,
                    scheduler=None, progress=None, tile=None):
    """Write the Gram matrices to an on-disk store, tile by tile; resume if interrupted.

    Parameters
    ----------
    spec, x1, x2, get, dtype
        As for :func:`limitkernel.kernel`.
    path : str or path-like
        Directory of the store; created if missing. Rerunning with the same
        arguments finishes the missing tiles; a store of a different spec,
        inputs, kinds, dtype or package version is refused (:class:`StoreError`).
    memory : int or str, optional
        Memory budget per process, e.g. ``"4GB"`` (default: the smaller of 4 GiB
        and half the available memory). It must hold the inputs (two copies) and
        the interpreter (about 256 MB); the rest sets the tile edge. On resume
        the tile edge of the store is kept.
    scheduler : None, "local", str or dask.distributed.Client
        ``None`` runs the tiles in this process; ``"local"`` on an embedded
        Dask LocalCluster; an address ("tcp://host:8786") or a Client on that
        cluster. Workers must see ``path`` (a shared file system).
    progress : None, bool or callable
        ``None`` shows a tqdm bar when stderr is a terminal, ``True`` always,
        ``False`` never; a callable is called as ``progress(done, total)``
        after every tile.
    tile : int, optional
        The tile edge, instead of the one the budget chooses.

    Returns
    -------
    dict
        ``{kind: read-only np.memmap}`` of the finished store (:func:`open_store`).
    """
    if path is None:
        raise ValueError("path is required: the directory to write the store to")
    path = os.fspath(path)
    plan = prepare(spec, x1, x2, get, dtype)
    budget = parse_memory(memory)
    spec_text = str(as_spec(spec))
    meta = {
        "format": _FORMAT, "format_version": _FORMAT_VERSION, "version": _version(),
        "spec": spec_text, "shape": list(plan.shape), "kinds": list(plan.kinds),
        "dtype": plan.dtype.name, "symmetric": plan.symmetric,
        "fingerprint": _fingerprint(spec_text, plan.rows.x,
                                    None if plan.symmetric else plan.cols.x,
                                    plan.kinds, plan.dtype.name),
    }
    if tile is not None and (int(tile) != tile or tile < 1):
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    in_flight = 1 if scheduler is not None else 2
    meta["tile"] = int(tile) if tile is not None else _tile_size(plan, budget, in_flight)
    meta = _open_or_create(path, meta)
    layout = _layout(meta)
    tiles = layout.tiles()
    done = set(_done(path, layout))
    todo = [t for t in tiles if t not in done]
    bar = _Progress(progress, len(tiles), len(done))
    try:
        if scheduler is None:
            _run_local(plan, path, meta, todo, len(tiles), len(done), bar)
        else:
            _run_dask(plan, path, meta, todo, len(tiles), len(done), scheduler, bar)
    finally:
        bar.close()
    missing = len(tiles) - len(_done(path, layout))
    if missing:
        raise RuntimeError(f"{missing} tiles of {path} were not written; rerun to finish")
    return open_store(path)


def _run_local(plan, path, meta, todo, total, count, bar):
    """Compute tile k + 1 while a writer thread stores tile k (GEMM, the fused
    pass and ``pwrite`` all release the GIL)."""
    layout = _layout(meta)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for i, j in todo:
            tiles = plan.tile(*layout.bounds(i, j))
            if pending is not None:
                pending.result()
                count += 1
                bar.update(count, total)
            pending = writer.submit(_store_tile, path, meta, i, j, tiles)
            del tiles
        if pending is not None:
            pending.result()
            bar.update(count + 1, total)


# ------------------------------------------------------------ Dask


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ImportError(f"running on Dask needs dask.distributed: {_INSTALL_DASK}") from None
    return distributed


def _connect(scheduler):
    """(client, things to close) for a scheduler argument."""
    distributed = _import_distributed()
    if isinstance(scheduler, distributed.Client):
        return scheduler, []
    if scheduler == "local":
        cluster = distributed.LocalCluster(threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        return client, [client, cluster]
    if isinstance(scheduler, str):
        client = distributed.Client(scheduler)
        return client, [client]
    raise ValueError(f"scheduler must be None, 'local', an address or a dask.distributed."
                     f"Client, got {scheduler!r}")


def _run_dask(plan, path, meta, todo, total, initial, scheduler, bar):
    distributed = _import_distributed()
    client, owned = _connect(scheduler)
    try:
        plan_future = client.scatter(plan, broadcast=True, hash=False)
        # Deterministic keys: a resubmitted tile of the same store is the same task.
        futures = [client.submit(_write_tile, plan_future, path, meta, i, j,
                                 key=f"limitkernel-tile-{meta['fingerprint'][:16]}-{i}-{j}",
                                 retries=3)
                   for i, j in todo]
        count = initial
        for future in distributed.as_completed(futures):
            future.result()
            count += 1
            bar.update(count, total)
    finally:
        for thing in owned:
            thing.close()


# ------------------------------------------------------------ conjugate gradients


@dataclass
class CGSolution:
    """Kernel regression by preconditioned conjugate gradients.

    Attributes
    ----------
    mean : (M,) or (M, c) array
        Predicted mean on the test inputs (``None`` without test inputs).
    alpha : (N,) or (N, c) array
        The weights solving (A + λI) α = Y.
    iterations : int
        CG iterations run.
    residual : float
        The largest, over target columns, true relative residual
        ‖Y − (A + λI) α‖ / ‖Y‖, recomputed with a final product.
    tol : float
        The requested relative residual.
    converged : bool
    rank : int
        Rank of the pivoted-Cholesky preconditioner.
    history : list of float
        The CG (recursive) relative residual after every iteration.
    """

    mean: object
    alpha: np.ndarray
    iterations: int
    residual: float
    tol: float
    converged: bool
    rank: int
    history: list = field(repr=False)

    def __str__(self):
        state = "converged" if self.converged else "NOT converged"
        return (f"CG {state} in {self.iterations} iterations: relative residual "
                f"{self.residual:.2e} (tol {self.tol:.1e}), preconditioner rank {self.rank}")


class _TileOperator:
    """Products with the symmetric training kernel, over tiles.

    From a store: row blocks read with plain file reads into one buffer (a
    memory map would count every page read against this process's memory).
    Otherwise: upper tiles computed on the fly by the plan, each used for
    itself and its mirror.
    """

    def __init__(self, plan, kind, budget, store=None):
        self.plan, self.kind, self.store = plan, kind, store
        n = plan.shape[0]
        if store is not None:
            meta = _read_manifest(store)
            self.file = os.path.join(store, f"{kind}.npy")
            self.offset = meta["offsets"][kind]
            self.dtype = np.dtype(meta["dtype"])
            per_row = n * (self.dtype.itemsize + 8)
            self.rows = max(1, min(n, (budget - _OVERHEAD) // (2 * per_row)))
        else:
            self.layout = _Layout(n, n, _tile_size(plan, budget), True)

    def _read(self, fh, r0, r1, buffer):
        n = self.plan.shape[0]
        out = buffer[:(r1 - r0) * n]
        fh.seek(self.offset + r0 * n * self.dtype.itemsize)
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            step = fh.readinto(view[got:])
            if not step:
                raise StoreError(f"{self.file} is shorter than its manifest says")
            got += step
        return out.reshape(r1 - r0, n)

    def row(self, j):
        if self.store is not None:
            with open(self.file, "rb") as fh:
                return self._read(fh, j, j + 1, np.empty(self.plan.shape[0],
                                                         self.dtype))[0].astype(np.float64)
        return self.plan.tile(j, j + 1, 0, self.plan.shape[0])[self.kind][0].astype(
            np.float64)

    def matvec(self, v):
        n = v.shape[0]
        out = np.zeros_like(v)
        if self.store is not None:
            buffer = np.empty(self.rows * n, self.dtype)
            vt = np.ascontiguousarray(v.T)
            with open(self.file, "rb", buffering=0) as fh:
                for r0 in range(0, n, self.rows):
                    r1 = min(r0 + self.rows, n)
                    block = self._read(fh, r0, r1, buffer)
                    if block.dtype == np.float64:
                        out[r0:r1] = block @ v
                    else:
                        _rows_times(block, vt, out[r0:r1])
            return out
        for i, j in self.layout.tiles():
            r0, r1, c0, c1 = self.layout.bounds(i, j)
            block = self.plan.tile(r0, r1, c0, c1)[self.kind].astype(np.float64)
            out[r0:r1] += block @ v[c0:c1]
            if i != j:
                out[c0:c1] += block.T @ v[r0:r1]
        return out


@njit(parallel=True, cache=True, nogil=True)
def _rows_times(block, vt, out):
    """out = block @ vt.T in float64 arithmetic, for a float32 row block.

    Reads the block once (BLAS would first need a float64 copy of it); four
    partial sums per row break the dependency chain of the accumulation.
    """
    nr, n = block.shape
    for i in prange(nr):
        for k in range(vt.shape[0]):
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            stop = n - n % 4
            for j in range(0, stop, 4):
                a0 += np.float64(block[i, j]) * vt[k, j]
                a1 += np.float64(block[i, j + 1]) * vt[k, j + 1]
                a2 += np.float64(block[i, j + 2]) * vt[k, j + 2]
                a3 += np.float64(block[i, j + 3]) * vt[k, j + 3]
            for j in range(stop, n):
                a0 += np.float64(block[i, j]) * vt[k, j]
            out[i, k] = (a0 + a1) + (a2 + a3)


def _pivoted_cholesky(op, diag, rank, rel_tol=1e-10):
    """Rows L (r, N) with LᵀL ≈ A, greedy on the largest remaining diagonal."""
    d = diag.astype(np.float64).copy()
    n = d.shape[0]
    rank = min(rank, n)
    factor = np.zeros((rank, n))
    stop = rel_tol * float(np.sum(d))
    k = 0
    for k in range(rank):
        p = int(np.argmax(d))
        if d[p] <= stop:
            break
        row = op.row(p) - factor[:k, p] @ factor[:k]
        factor[k] = row / math.sqrt(d[p])
        d -= factor[k] ** 2
        np.maximum(d, 0.0, out=d)
        d[p] = 0.0
    else:
        k = rank
    return factor[:k], d


def solve_cg(spec, x_train, y_train, x_test=None, kind="ntk", diag_reg=0.0,
             diag_reg_absolute=False, tol=1e-8, maxiter=None, rank=200, store=None,
             memory=None, progress=None):
    """Kernel regression at t = ∞ without the N × N matrix in memory.

    Solves (A + λI) α = Y by conjugate gradients, A the NTK ("ntk") or NNGP
    ("nngp") Gram matrix of the training inputs, and predicts
    mean = A(x*, X) α, the t = ∞ mean of :class:`limitkernel.GradientFlowEnsemble`
    (with the same ``diag_reg`` convention: relative to the mean diagonal of A
    unless ``diag_reg_absolute``).

    Parameters
    ----------
    tol : float
        Stop when every column's relative residual ‖Y − (A + λI)α‖/‖Y‖ ≤ tol. The
        error of α then obeys ‖Δα‖/‖α‖ ≤ κ(A + λI)·tol.
    maxiter : int, optional
        Default: 10 · rank + 100.
    rank : int
        Rank of the partial pivoted Cholesky preconditioner P = LᵀL + (λ + δ)I,
        δ the mean of the remaining diagonal; applied by the Woodbury identity.
    store : str, optional
        A complete store of the training kernel (``kernel_to_store(spec,
        x_train, path=store, get=kind)``): products read it in row blocks
        instead of recomputing tiles.
    memory : int or str, optional
        Budget for tiles and row blocks (see :func:`kernel_to_store`).
    progress : None, bool or callable
        As for :func:`kernel_to_store`, counting iterations; a callable gets
        ``(iteration, relative residual)``.

    Returns
    -------
    CGSolution
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'ntk' or 'nngp', got {kind!r}")
    tol = float(tol)
    if not (0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if int(rank) < 0:
        raise ValueError(f"rank must be >= 0, got {rank!r}")
    plan = prepare(spec, x_train, None, (kind,), "float64")
    n = plan.shape[0]
    y = np.asarray(y_train, dtype=np.float64)
    if y.ndim not in (1, 2) or y.shape[0] != n or not np.all(np.isfinite(y)):
        raise ValueError(f"y_train must be a finite array of shape ({n},) or ({n}, c), "
                         f"got shape {y.shape}")
    b = y.reshape(n, -1)
    budget = parse_memory(memory)
    if store is not None:
        store = os.fspath(store)
        state = status(store)
        if state.fingerprint != _fingerprint(str(as_spec(spec)), plan.rows.x, None,
                                             state.kinds, state.dtype) \
                or kind not in state.kinds:
            raise StoreError(f"{store} does not hold the {kind} kernel of this spec on "
                             f"x_train; write it with kernel_to_store(spec, x_train, "
                             f"path=..., get='{kind}')")
        if not state.complete:
            raise StoreError(f"{store} is incomplete ({state.done} of {state.total} "
                             "tiles); rerun the command that wrote it to finish")
    op = _TileOperator(plan, kind, budget, store)
    diag = plan.ntk_diag if kind == "ntk" else plan.nngp_diag
    mean_diag = float(np.mean(diag))
    reg = float(diag_reg) if diag_reg_absolute else float(diag_reg) * mean_diag
    if not (math.isfinite(reg) and reg >= 0):
        raise ValueError(f"diag_reg must be a finite number >= 0, got {diag_reg!r}")

    factor, rest = _pivoted_cholesky(op, diag, int(rank))
    shift = reg + max(float(np.mean(rest)), 1e-12 * mean_diag)
    inner = np.linalg.cholesky(shift * np.eye(len(factor)) + factor @ factor.T)

    def precondition(r):
        if not len(factor):
            return r / shift
        w = np.linalg.solve(inner.T, np.linalg.solve(inner, factor @ r))
        return (r - factor.T @ w) / shift

    def apply(v):
        return op.matvec(v) + reg * v

    maxiter = 10 * len(factor) + 100 if maxiter is None else int(maxiter)
    norm_b = np.linalg.norm(b, axis=0)
    norm_b[norm_b == 0] = 1.0
    x = np.zeros_like(b)
    r = b.copy()
    z = precondition(r)
    p = z.copy()
    rz = np.sum(r * z, axis=0)
    history = []
    bar = _Progress(False if callable(progress) else progress, maxiter, 0)
    iterations = 0
    try:
        for iterations in range(1, maxiter + 1):
            ap = apply(p)
            curv = np.sum(p * ap, axis=0)
            alpha = np.divide(rz, curv, out=np.zeros_like(rz), where=curv > 0)
            x += alpha * p
            r -= alpha * ap
            res = float(np.max(np.linalg.norm(r, axis=0) / norm_b))
            history.append(res)
            bar.update(iterations, maxiter)
            if callable(progress):
                progress(iterations, res)
            if res <= tol:
                break
            z = precondition(r)
            rz_new = np.sum(r * z, axis=0)
            beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
            rz = rz_new
            p = z + beta * p
    finally:
        bar.close()
    true_res = float(np.max(np.linalg.norm(b - apply(x), axis=0) / norm_b))
    alpha_out = x.reshape(y.shape)
    mean = None
    if x_test is not None:
        mean = _cross_product(spec, x_test, x_train, kind, x, budget).reshape(
            (-1,) + y.shape[1:])
    return CGSolution(mean=mean, alpha=alpha_out, iterations=iterations,
                      residual=true_res, tol=tol, converged=true_res <= tol,
                      rank=len(factor), history=history)


def _cross_product(spec, x_test, x_train, kind, alpha, budget):
    """A(x*, X) α over column tiles of the test-train kernel."""
    plan = prepare(spec, x_test, x_train, (kind,), "float64")
    m, n = plan.shape
    edge = _tile_size(plan, budget)
    out = np.zeros((m, alpha.shape[1]))
    for r0 in range(0, m, edge):
        r1 = min(r0 + edge, m)
        for c0 in range(0, n, edge):
            c1 = min(c0 + edge, n)
            out[r0:r1] += plan.tile(r0, r1, c0, c1)[kind] @ alpha[c0:c1]
    return out

