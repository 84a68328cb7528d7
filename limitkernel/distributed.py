"""Gram matrices past one machine's memory: on-disk tiles, resumable runs, Dask, CG.

:func:`kernel_to_store` writes the NNGP and NTK matrices tile by tile into a
directory; every tile is the output of :meth:`limitkernel.gram.GramPlan.tile`,
the same tile function :func:`limitkernel.kernel` runs in memory. A tile is
recorded as done only after its bytes have reached the file, so a run killed at
any moment (even by SIGKILL) and rerun recomputes only the missing tiles. The
tiles run in this process or on a Dask cluster (``scheduler=``).

:func:`solve_cg` fits kernel regression on more training points than a dense
factorisation allows: preconditioned conjugate gradients whose products with
the training kernel run over tiles (computed on the fly, or read from a store).

The store
---------
A directory holding

* ``manifest.json``: spec, shape, kinds, dtype, tile edge, the fingerprint of
  the computation and a checksum of the manifest itself; written once, last,
  when the store is laid out;
* one ``.npy`` file per kernel (``nngp.npy``, ``ntk.npy``);
* ``done/``: one marker per finished tile, holding the CRC-32 of the tile's
  bytes in each file (and the fingerprint);
* ``lock``: the file a writer locks (``fcntl.flock``) for as long as it runs.

Plain ``.npy`` files rather than zarr: a Gram matrix is a dense array of fixed
shape whose values do not compress, so chunked compressed storage buys nothing;
any numpy opens the result with ``np.load(path, mmap_mode="r")``; and tiles are
written with ``os.pwrite`` at their offsets, which keeps the written pages in
the kernel's page cache and out of this process's resident memory (writing
through a memory map would count every touched page against the budget). A
tile is rewritten in full whenever its marker is missing or its bytes fail
their checksum, and its content is a deterministic function of the plan, so a
half-written tile is never seen as done and rewriting one is harmless: tasks
are idempotent and safe to retry. Workers of a cluster on several machines
need the store on a shared file system; they write tiles and markers only, and
only the process that drives the run takes the lock.

What identifies a computation
-----------------------------
The fingerprint hashes everything the stored numbers depend on: the spec text
(parameters in full precision), the values of every numerical activation and
of its derivative at fixed probe points (bit for bit, so two functions with
the same name are told apart), the inputs, the diagonals K(x, x) and Θ(x, x)
(which carry each activation's values at the inputs' own variances), the
kinds, the dtype and the code of the kernels. A function that cannot be
evaluated at the probe points cannot be identified, and its store is never
resumed.
"""

import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numba import prange

from . import gram as _gram
from ._io import atomic_path
from ._numba import jit_parallel, sources_digest
from ._version import __version__
from .layers import Numerical
from .gram import KINDS, MemoryBudgetError, available_memory, prepare
from .spec import Block, as_spec

__all__ = [
    "CGSolution",
    "StoreError",
    "StoreStatus",
    "StoreWarning",
    "kernel_to_store",
    "open_store",
    "parse_memory",
    "solve_cg",
    "status",
]

_FORMAT = "limitkernel-gram-store"
_FORMAT_VERSION = 2
# What the interpreter, numpy, numba and the compiled kernels take before any
# data: measured at about 200 MB; the budget keeps this much aside.
_OVERHEAD = 256 << 20
_DEFAULT_MEMORY = 4 << 30
_MIN_TILE = 64
_INSTALL_DASK = "pip install 'limitkernel[dask]'"
# Where numerical activations are evaluated to identify them: 0, ±45 and
# points in between, densest near 0 (sinh-spaced).
_PROBES = np.sinh(np.linspace(-4.5, 4.5, 181))
# Extensions that name a file: a store (a directory) is never given one.
_FILE_SUFFIXES = (".npy", ".npz", ".txt", ".csv", ".tsv", ".json", ".h5", ".hdf5", ".mat",
                  ".pkl", ".pickle", ".parquet", ".bin", ".dat", ".gz", ".zip", ".png",
                  ".pdf")
_TILE_NAME = re.compile(r"(\d+)_(\d+)")
# How long a writer retries a held lock before refusing (a --status probe
# holds it for microseconds).
_LOCK_PATIENCE = 2.0


class StoreError(ValueError):
    """A store path that cannot be used: another computation's, damaged, or busy."""


class StoreWarning(RuntimeWarning):
    """A store was repaired, or cannot be locked on its file system."""


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
            number = float(match.group(1))
        except ValueError:
            raise ValueError(f"memory must be a size such as '4GB', got {memory!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"memory must be a finite size such as '4GB', got {memory!r}")
        value = int(number * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory must be positive, got {memory!r}")
    return value


def _fixed_bytes(plan):
    """Bytes a plan holds: inputs, their unit-norm copies, diagonals, tables."""
    sides = [plan.rows] if plan.symmetric else [plan.rows, plan.cols]
    total = 0
    for side in sides:
        total += side.nbytes
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


# ------------------------------------------------------------ identity


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


def _sha(*parts):
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _kernel_code_hash():
    """Hash of the code that computes entries, so a changed kernel never mixes."""
    return _sha(_version(), sources_digest())


def _numerical_layers(layers):
    for layer in layers:
        if isinstance(layer, Numerical):
            yield layer
        elif isinstance(layer, Block):
            for branch in layer.branches:
                yield from _numerical_layers(branch.layers)


def _activations_hash(spec):
    """Bits of every numerical activation and its derivative at the probe points.

    Returns ``"unidentifiable: <why>: <random>"`` when a function cannot be
    evaluated there, which no other run reproduces.
    """
    digest = hashlib.sha256()
    for layer in _numerical_layers(spec.layers):
        for method in (layer.forward, layer.derivative):
            try:
                with np.errstate(all="ignore"):
                    values = np.asarray(method(_PROBES.copy()), dtype=np.float64)
                if values.shape != _PROBES.shape:
                    raise ValueError(f"it returned shape {values.shape} for "
                                     f"{_PROBES.shape[0]} points")
            except Exception as err:  # any failure of the user's code: unidentifiable
                why = f"calling {layer.name} on fixed probe points raised " \
                      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                return f"unidentifiable: {why}: {secrets.token_hex(8)}"
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _describe(spec, plan, x1, x2, kinds, dtype):
    """Manifest fields that identify a computation (everything but the tile edge)."""
    spec = as_spec(spec)
    inputs = [np.ascontiguousarray(x, dtype=np.float64) for x in (x1, x2) if x is not None]
    parts = {
        "spec": _sha(str(spec)),
        "activations": _activations_hash(spec),
        "inputs": _sha(*(f"{x.shape}" for x in inputs), *(x.tobytes() for x in inputs),
                       "symmetric" if x2 is None else "two sets"),
        "diagonals": _sha(plan.nngp_diag.tobytes(), plan.ntk_diag.tobytes()),
        "code": _kernel_code_hash(),
    }
    meta = {
        "format": _FORMAT, "format_version": _FORMAT_VERSION, "version": _version(),
        "spec": str(spec), "shape": list(plan.shape), "kinds": list(kinds),
        "dtype": np.dtype(dtype).name, "symmetric": x2 is None, "parts": parts,
    }
    if plan.precision != "float64":
        # Only then: the manifests (and fingerprints) of other stores are unchanged.
        meta["precision"] = plan.precision
    meta["fingerprint"] = _sha(_FORMAT, json.dumps(
        {k: meta[k] for k in ("shape", "kinds", "dtype", "precision", "symmetric", "parts")
         if k in meta}, sort_keys=True))
    return meta


_PART_NAMES = {
    "spec": "the spec", "activations": "an activation function (its values at fixed "
    "probe points)", "inputs": "the input values",
    "diagonals": "the activation functions' values at these inputs' variances",
    "code": "the package version or kernel code",
}


def _explain_mismatch(path, old, new):
    """The StoreError for a store that holds another computation."""
    unknown = [m["parts"]["activations"] for m in (old, new)
               if m["parts"]["activations"].startswith("unidentifiable")]
    if unknown:
        why = unknown[0].rsplit(":", 1)[0]
        return StoreError(
            f"{path} holds a computation with an activation that cannot be identified "
            f"({why.split(': ', 1)[1]}), so it is never resumed: give a new path, or "
            "delete this one to start afresh")
    diffs = [name for name in ("shape", "kinds", "dtype") if old[name] != new[name]]
    if old.get("precision", "float64") != new.get("precision", "float64"):
        diffs.append("precision (of the input products)")
    if old["symmetric"] != new["symmetric"]:
        diffs.append("x2 (given or not)")
    changed = [name for name in _PART_NAMES if old["parts"][name] != new["parts"][name]]
    if "diagonals" in changed and {"spec", "activations", "inputs"} & set(changed):
        changed.remove("diagonals")
    diffs += [_PART_NAMES[name] for name in changed]
    what = ", ".join(diffs) or "the fingerprint"
    return StoreError(
        f"{path} holds a different computation (differs in: {what}; stored spec "
        f"{old['spec']!r}); refusing to mix results: give a new path, or delete this one "
        "to start afresh")


# ------------------------------------------------------------ manifest


def _damaged(path, what, fatal):
    """The StoreError for damage: what is wrong and how to recover."""
    if fatal:
        return StoreError(f"{path} is damaged: {what}, so nothing in it can be trusted; "
                          f"delete the directory (rm -r {path}) and rerun to start afresh")
    return StoreError(f"{path} is damaged: {what}; rerun the command that wrote it, with "
                      "the same arguments, to recompute what is damaged")


_MANIFEST_TYPES = {
    "format": str, "format_version": int, "version": str, "spec": str, "shape": list,
    "kinds": list, "dtype": str, "symmetric": bool, "parts": dict, "fingerprint": str,
    "tile": int, "offsets": dict, "headers": dict, "checksum": str,
}


def _manifest_checksum(meta):
    return _sha(json.dumps({k: v for k, v in meta.items() if k != "checksum"},
                           sort_keys=True))


def _read_manifest(path):
    """The validated manifest of the store at ``path``, or None if there is none."""
    file = os.path.join(path, "manifest.json")
    try:
        with open(file, "rb") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _damaged(path, f"manifest.json cannot be read ({err})", True) from None
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise _damaged(path, f"manifest.json is not valid JSON ({err})", True) from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise StoreError(f"{path}/manifest.json is not a limitkernel Gram store")
    version = meta.get("format_version")
    other_format = StoreError(
        f"{path} is a store of format {version}, written by limitkernel "
        f"{meta.get('version')}; this version reads format {_FORMAT_VERSION} (with tile "
        "checksums) only: read its .npy files with np.load(..., mmap_mode='r'), or "
        "delete it and rerun to rewrite it")
    if version == 1 and "checksum" not in meta:  # format 1 had no checksums
        raise other_format
    if meta.get("checksum") != _manifest_checksum(meta):
        # The checksum is read first: a changed digit must not pass for a format.
        raise _damaged(path, "manifest.json was modified or damaged (its checksum does not "
                             "match its content)", True)
    if version != _FORMAT_VERSION:
        raise other_format
    bad = [k for k, kind in _MANIFEST_TYPES.items() if not isinstance(meta.get(k), kind)]
    if bad:  # a checksum that matches a malformed manifest: not written by this code
        raise _damaged(path, f"manifest.json was modified or damaged (bad {bad[0]!r})", True)
    return meta


def _layout(meta):
    return _Layout(meta["shape"][0], meta["shape"][1], meta["tile"], meta["symmetric"])


def _data_file(path, kind):
    return os.path.join(path, f"{kind}.npy")


def _create(path, meta):
    """Lay out a new store: empty done/, empty (sparse) .npy files, the manifest last.

    The manifest records each file's header bytes, so that a damaged header is
    found, and rewritten as it was, whatever numpy version reads it later.
    """
    done = os.path.join(path, "done")
    if os.path.lexists(done) and not os.path.isdir(done):
        os.remove(done)
    os.makedirs(done, exist_ok=True)
    for name in os.listdir(done):
        os.remove(os.path.join(done, name))
    offsets, headers = {}, {}
    for kind in meta["kinds"]:
        array = np.lib.format.open_memmap(_data_file(path, kind), mode="w+",
                                          dtype=np.dtype(meta["dtype"]),
                                          shape=tuple(meta["shape"]))
        offsets[kind] = int(array.offset)
        del array
        with open(_data_file(path, kind), "rb") as fh:
            headers[kind] = fh.read(offsets[kind]).hex()
    meta = dict(meta, offsets=offsets, headers=headers)
    meta["checksum"] = _manifest_checksum(meta)
    with atomic_path(os.path.join(path, "manifest.json"), sync=True) as tmp, \
            open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def _marker_names(path):
    try:
        return [name for name in os.listdir(os.path.join(path, "done"))
                if _TILE_NAME.fullmatch(name)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _open_or_create(path, meta):
    """The existing store at ``path`` if it holds the same computation, else a new one."""
    old = _read_manifest(path)
    if old is None:
        ours = {"done", "nngp.npy", "ntk.npy", "lock"}
        other = sorted(name for name in os.listdir(path)
                       if name not in ours and not name.startswith(".manifest.json."))
        if other:
            raise StoreError(
                f"{path} is a non-empty directory that is not a limitkernel store "
                f"(it holds {', '.join(other[:3])}); give a new or empty directory")
        markers = _marker_names(path)
        if markers:
            raise _damaged(path, f"manifest.json is missing but done/ holds "
                                 f"{_plural(len(markers), 'tile marker')}", True)
        return _create(path, meta)
    if old["fingerprint"] != meta["fingerprint"]:
        raise _explain_mismatch(path, old, meta)
    return old


# ------------------------------------------------------------ tiles on disk


def _plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _pwrite_block(fd, offset, ncols, r0, c0, block):
    """Write ``block`` at rows r0.., columns c0.. of a row-major (., ncols) array."""
    item = block.dtype.itemsize
    for ii in range(block.shape[0]):
        view = memoryview(block[ii]).cast("B")
        start = offset + ((r0 + ii) * ncols + c0) * item
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], start + written)


def _pread_block(fd, offset, ncols, r0, r1, c0, c1, dtype):
    """Rows r0:r1, columns c0:c1 of a row-major (., ncols) array; None if cut short."""
    out = np.empty((r1 - r0, c1 - c0), dtype=dtype)
    for ii in range(r1 - r0):
        view = memoryview(out[ii]).cast("B")
        start = offset + ((r0 + ii) * ncols + c0) * dtype.itemsize
        got = 0
        while got < len(view):
            step = os.preadv(fd, [view[got:]], start + got)
            if step == 0:
                return None
            got += step
    return out


def _crc(block):
    return zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B"))


def _marker(path, i, j):
    return os.path.join(path, "done", f"{i}_{j}")


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
    crcs = {}
    for kind, block in tiles.items():
        crcs[kind] = _crc(block)
        fd = os.open(_data_file(path, kind), os.O_WRONLY)
        try:
            offset = meta["offsets"][kind]
            _pwrite_block(fd, offset, layout.m, r0, c0, block)
            if layout.symmetric and i != j:
                _pwrite_block(fd, offset, layout.m, c0, r0, np.ascontiguousarray(block.T))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        del block
    with atomic_path(_marker(path, i, j)) as tmp, open(tmp, "w") as fh:
        json.dump({"fingerprint": meta["fingerprint"], "crc32": crcs}, fh)
    return i, j


def _read_marker(path, meta, name):
    """The CRC-32 of each kind recorded by marker ``name``, or None if unusable."""
    try:
        with open(os.path.join(path, "done", name)) as fh:
            record = json.load(fh)
        crcs = record["crc32"]
        if record["fingerprint"] != meta["fingerprint"] or \
                not all(isinstance(crcs[kind], int) for kind in meta["kinds"]):
            return None
        return crcs
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _data_bytes(meta, kind):
    """Expected length of a data file: its header and n · m entries."""
    n, m = meta["shape"]
    return meta["offsets"][kind] + n * m * np.dtype(meta["dtype"]).itemsize


def _structure(path, meta):
    """What is wrong with the files of a store whose manifest is sound (a list)."""
    problems = []
    if not os.path.isdir(os.path.join(path, "done")):
        problems.append("done/ (the markers of finished tiles) is missing")
    for kind in meta["kinds"]:
        file = _data_file(path, kind)
        if not os.path.lexists(file):
            problems.append(f"{kind}.npy is missing")
            continue
        if not os.path.isfile(file):
            problems.append(f"{kind}.npy is not a regular file")
            continue
        header = bytes.fromhex(meta["headers"][kind])
        with open(file, "rb") as fh:
            if fh.read(len(header)) != header:
                problems.append(f"{kind}.npy does not start with the .npy header it was "
                                "written with")
        size, expected = os.path.getsize(file), _data_bytes(meta, kind)
        if size != expected:
            problems.append(f"{kind}.npy is {size} bytes long, expected {expected} "
                            f"({'truncated' if size < expected else 'too long'})")
    return problems


def _check_tile(fds, meta, layout, i, j, crcs):
    """Kinds of tile (i, j) whose bytes (or mirror) do not match the marker."""
    r0, r1, c0, c1 = layout.bounds(i, j)
    dtype = np.dtype(meta["dtype"])
    bad = []
    for kind in meta["kinds"]:
        offset = meta["offsets"][kind]
        block = _pread_block(fds[kind], offset, layout.m, r0, r1, c0, c1, dtype)
        if block is None or _crc(block) != crcs[kind]:
            bad.append(f"{kind}.npy does not match its checksum")
            continue
        if layout.symmetric and i != j:
            mirror = _pread_block(fds[kind], offset, layout.m, c0, c1, r0, r1, dtype)
            if mirror is None or mirror.T.tobytes() != block.tobytes():
                bad.append(f"{kind}.npy: its mirror below the diagonal does not match "
                           "its checksum")
    return bad


def _scan(path, meta, verify):
    """(done tiles, problems, bad tiles) of a store whose manifest is sound.

    ``problems`` are the structural ones of :func:`_structure` and unreadable
    markers; ``bad`` lists ``(i, j, why)`` for tiles whose bytes fail their
    checksum (read only with ``verify``). Done tiles are those with a usable
    marker and, with ``verify``, sound bytes.
    """
    layout = _layout(meta)
    problems = _structure(path, meta)
    wanted = set(layout.tiles())
    markers = {}
    for name in _marker_names(path):
        i, j = map(int, name.split("_"))
        if (i, j) not in wanted:
            continue
        crcs = _read_marker(path, meta, name)
        if crcs is None:
            problems.append(f"the marker done/{name} is unreadable or belongs to another "
                            "computation")
        else:
            markers[i, j] = crcs
    bad = []
    if any(p.startswith(f"{kind}.npy") for p in problems for kind in meta["kinds"]):
        # A data file is damaged as a whole (reported above): no tile counts as done.
        return [], problems, bad
    if verify and markers:
        fds = {kind: os.open(_data_file(path, kind), os.O_RDONLY) for kind in meta["kinds"]}
        try:
            for (i, j), crcs in sorted(markers.items()):
                why = _check_tile(fds, meta, layout, i, j, crcs)
                if why:
                    bad.append((i, j, "; ".join(why)))
        finally:
            for fd in fds.values():
                os.close(fd)
        for i, j, _ in bad:
            del markers[i, j]
    return sorted(markers), problems, bad


def _repair(path, meta):
    """Make the files of a store whole again, for a writer; return what was wrong.

    A missing data file is laid out again (empty), a damaged header is written
    back as the manifest records it, a file of the wrong length is cut or
    extended to its length, a missing done/ is created. The caller then checks
    every tile against its checksum, which finds the tiles these repairs emptied.
    """
    problems = _structure(path, meta)
    done = os.path.join(path, "done")
    if os.path.lexists(done) and not os.path.isdir(done):
        os.remove(done)
    os.makedirs(done, exist_ok=True)
    for kind in meta["kinds"]:
        if not any(p.startswith(f"{kind}.npy") for p in problems):
            continue
        file = _data_file(path, kind)
        if os.path.lexists(file) and not os.path.isfile(file):
            raise _damaged(path, f"{kind}.npy is not a regular file (a directory or a "
                                 "device?), and is left alone", True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.pwrite(fd, bytes.fromhex(meta["headers"][kind]), 0)
            os.ftruncate(fd, _data_bytes(meta, kind))
            os.fsync(fd)
        finally:
            os.close(fd)
    return problems


# ------------------------------------------------------------ the lock


class _Lock:
    """An exclusive ``fcntl.flock`` on ``<store>/lock``, held while a run writes.

    A second writer is refused (after retrying for a moment) with the pid and
    host of the holder. On a file system without locks (some network file
    systems) a :class:`StoreWarning` says so and the run proceeds unlocked.
    """

    def __init__(self, path):
        self.path, self.file, self.fd = path, os.path.join(path, "lock"), None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + _LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _holder(self.fd)
                os.close(self.fd)
                raise StoreError(
                    f"{self.path} is being written by another writer ({holder}); one writer "
                    "at a time: wait until it finishes (limitkernel kernel --status "
                    f"{self.path} shows its progress), or stop it") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                     errno.EINVAL):
                    os.close(self.fd)
                    raise
                warnings.warn(
                    f"cannot lock {self.file} ({err.strerror}): this file system does not "
                    "support flock, so make sure only one writer runs on this store",
                    StoreWarning, stacklevel=3)
                break
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the lock


def _holder(fd):
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "a process that has not yet written its pid"


def _writer(path):
    """Who holds the lock of a store, or None (a probe that does not block)."""
    import fcntl

    try:
        fd = os.open(os.path.join(path, "lock"), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------ status and reading


@dataclass
class StoreStatus:
    """Progress and health of a store.

    Attributes
    ----------
    done, total : int
        Tiles finished (with a usable marker, and sound bytes if verified) and
        tiles in all.
    problems : tuple of str
        Damage to the files: missing or cut files, unreadable markers.
    bad_tiles : tuple of (int, int, str)
        Tiles whose bytes fail their checksum (found only with ``verify``).
    verified : bool
        The bytes of every finished tile were checked against their checksums.
    writer : str or None
        ``"pid … on host"`` of the process writing the store now, if any.
    """

    path: str
    spec: str
    shape: tuple
    kinds: tuple
    dtype: str
    tile: int
    done: int
    total: int
    fingerprint: str = field(repr=False)
    problems: tuple = ()
    bad_tiles: tuple = ()
    verified: bool = False
    writer: object = None

    @property
    def complete(self):
        return self.done == self.total

    @property
    def ok(self):
        """No damage found (the bytes were read only if ``verified``)."""
        return not self.problems and not self.bad_tiles

    @property
    def fraction(self):
        return self.done / self.total if self.total else 1.0

    def damage(self):
        """One line per problem and per tile that fails its checksum."""
        n, m = self.shape
        t = self.tile
        return list(self.problems) + [
            f"tile ({i}, {j}) (rows {i * t}:{min(n, (i + 1) * t)}, columns "
            f"{j * t}:{min(m, (j + 1) * t)}): {why}" for i, j, why in self.bad_tiles]

    def __str__(self):
        n, m = self.shape
        lines = [
            f"store      {self.path}",
            f"spec       {self.spec}",
            f"matrices   {', '.join(self.kinds)}: {n} x {m} {self.dtype}",
            (f"tiles      {self.done} of {self.total} done ({100 * self.fraction:.1f}%), "
             f"edge {self.tile}"),
        ]
        if self.writer:
            lines.append(f"writer     being written by {self.writer}")
        if self.verified and self.ok:
            lines.append(f"checksums  all {_plural(self.done, 'finished tile')} match their "
                         "checksums" if not self.complete else
                         f"checksums  all {_plural(self.done, 'tile')} match their checksums")
        elif not self.verified:
            lines.append("checksums  not read (--status DIR --verify, or status(path, "
                         "verify=True), reads the whole store to check them)")
        lines += [f"damage     {line}" for line in self.damage()]
        if not self.ok:
            state = ("damaged: rerun the command that wrote it, with the same arguments, "
                     "to recompute what is damaged")
        elif self.complete:
            state = "complete"
        elif self.writer:
            state = "incomplete: being written"
        else:
            state = "incomplete: rerun the command that wrote it to resume"
        lines.append(f"state      {state}")
        return "\n".join(lines)


def _sound_manifest(path):
    path = os.fspath(path)
    meta = _read_manifest(path) if os.path.isdir(path) else None
    if meta is None:
        if os.path.isdir(path) and _marker_names(path):
            raise _damaged(path, f"manifest.json is missing but done/ holds "
                                 f"{_plural(len(_marker_names(path)), 'tile marker')}", True)
        raise StoreError(f"{path} is not a limitkernel Gram store (no manifest.json); "
                         "write one with kernel_to_store or 'limitkernel kernel --store DIR'")
    return path, meta


def status(path, verify=False):
    """Progress and health of the store at ``path`` (:class:`StoreStatus`).

    Parameters
    ----------
    path : str or path-like
    verify : bool
        Also read every finished tile and check it against its checksum (reads
        the whole store once). Without it, damage to the files (missing, cut,
        unreadable markers) is still found, but not changed bytes.

    Raises
    ------
    StoreError
        ``path`` is not a store, or its manifest is damaged (nothing can be trusted).
    """
    path, meta = _sound_manifest(path)
    done, problems, bad = _scan(path, meta, verify)
    return StoreStatus(path=path, spec=meta["spec"], shape=tuple(meta["shape"]),
                       kinds=tuple(meta["kinds"]), dtype=meta["dtype"], tile=meta["tile"],
                       done=len(done), total=len(_layout(meta).tiles()),
                       fingerprint=meta["fingerprint"], problems=tuple(problems),
                       bad_tiles=tuple(bad), verified=verify, writer=_writer(path))


def _refuse_damage(state):
    damage = state.damage()
    if damage:
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        raise _damaged(state.path, damage[0] + more, False)


def open_store(path, partial=False, verify=True):
    """The matrices of a store as read-only memory maps: ``{kind: np.memmap}``.

    Parameters
    ----------
    path : str or path-like
    partial : bool
        Open an incomplete store too; its missing tiles read as zeros.
    verify : bool
        Check every finished tile against its checksum first (reads the whole
        store once). ``False`` trusts the markers.

    Raises
    ------
    StoreError
        The store is damaged (what, and how to recover, in the message), or
        incomplete and ``partial`` is False.
    """
    state = status(path, verify=verify)
    _refuse_damage(state)
    if not state.complete and not partial:
        raise StoreError(f"{state.path} is incomplete ({state.done} of {state.total} tiles); "
                         "rerun the command that wrote it to finish, or pass partial=True")
    return _memmaps(state.path, state.kinds)


def _memmaps(path, kinds):
    return {kind: np.load(_data_file(path, kind), mmap_mode="r") for kind in kinds}


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


def _file_suffix(path):
    """The extension of ``path`` if it names a file (``.npy``, ``.txt``, ...), else None.

    An existing store keeps working whatever its name.
    """
    suffix = os.path.splitext(os.fspath(path).rstrip(os.sep))[1].lower()
    if suffix in _FILE_SUFFIXES and not os.path.isfile(os.path.join(path, "manifest.json")):
        return suffix
    return None


def _check_store_path(path):
    """``path`` as a string; refuse one that names a file or is not a directory."""
    path = os.fspath(path)
    suffix = _file_suffix(path)
    if suffix:
        raise StoreError(f"{path} names a file ({suffix}), but a store is a directory of "
                         f"tiles; give a directory path without {suffix}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"{path} exists and is not a directory; give a directory path "
                         "for the store")
    return path


def kernel_to_store(spec, x1, x2=None, path=None, get=KINDS, dtype="float64", memory=None,
                    scheduler=None, progress=None, tile=None, verify=True,
                    precision="float64"):
    """Write the Gram matrices to an on-disk store, tile by tile; resume if interrupted.

    Parameters
    ----------
    spec, x1, x2, get, dtype, precision
        As for :func:`limitkernel.kernel`.
    path : str or path-like
        Directory of the store; created if missing. Rerunning with the same
        arguments finishes the missing tiles and recomputes damaged ones; a
        store of a different computation (spec, activation functions, inputs,
        kinds, dtype, precision or package version) is refused (:class:`StoreError`), and
        so is a store whose manifest is damaged.
    memory : int or str, optional
        Memory budget per process, e.g. ``"4GB"`` (default: the smaller of 4 GiB
        and half the available memory). It must hold the inputs (two copies) and
        the interpreter (about 256 MB); the rest sets the tile edge. On resume
        the tile edge of the store is kept.
    scheduler : None, "local", str or dask.distributed.Client
        ``None`` runs the tiles in this process; ``"local"`` on an embedded
        Dask LocalCluster; an address ("tcp://host:8786") or a Client on that
        cluster. Workers must see ``path`` (a shared file system). The
        scheduler is reached before anything is written.
    progress : None, bool or callable
        ``None`` shows a tqdm bar when stderr is a terminal, ``True`` always,
        ``False`` never; a callable is called as ``progress(done, total)``
        after every tile.
    tile : int, optional
        The tile edge, instead of the one the budget chooses.
    verify : bool
        On resume, check every finished tile against its checksum and
        recompute those that fail (reads the store once). ``False`` trusts the
        markers, except after a repair of the files.

    Returns
    -------
    dict
        ``{kind: read-only np.memmap}`` of the finished store.

    Raises
    ------
    StoreError
        The path names a file, holds another computation or a damaged manifest,
        or another writer is running on it (a second writer is refused, not
        queued).

    Notes
    -----
    One writer at a time: the run holds an exclusive ``flock`` on
    ``<path>/lock``. With a Dask scheduler only this process takes it; the
    workers write tiles and markers. Entries equal those of
    :func:`limitkernel.kernel` to about an ulp of the largest entry, not bit for
    bit: both run the same fused pass, but on dot products x·x′ from BLAS calls
    of other shapes (or thread counts), which round differently; each dot
    product is within γ_d Σ|x_k x′_k| of the exact one, γ_d = dε/(1 − dε).
    """
    if path is None:
        raise ValueError("path is required: the directory to write the store to")
    path = _check_store_path(path)
    if tile is not None and (int(tile) != tile or tile < 1):
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    budget = parse_memory(memory)
    plan = prepare(spec, x1, x2, get, dtype, precision)
    meta = _describe(spec, plan, x1, x2, plan.kinds, plan.dtype)
    in_flight = 1 if scheduler is not None else 2
    meta["tile"] = int(tile) if tile is not None else _tile_size(plan, budget, in_flight)
    client, owned = (None, []) if scheduler is None else _connect(scheduler)
    try:
        os.makedirs(path, exist_ok=True)
        with _Lock(path):
            meta = _open_or_create(path, meta)
            repaired = _repair(path, meta)
            done, problems, bad = _scan(path, meta, verify or bool(repaired))
            found = repaired + [p for p in problems if p not in repaired] + \
                [f"tile ({i}, {j}): {why}" for i, j, why in bad]
            # Markers not counted as done (unreadable, failed, stray) and the
            # temporary files of markers whose writer was killed.
            keep = {f"{i}_{j}" for i, j in done}
            for name in os.listdir(os.path.join(path, "done")):
                if name not in keep:
                    os.remove(os.path.join(path, "done", name))
            if found:
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                warnings.warn(f"{path} was damaged: {found[0]}{more}; recomputing the "
                              "tiles concerned", StoreWarning, stacklevel=2)
            _run(plan, path, meta, done, client, progress)
            return _memmaps(path, meta["kinds"])
    finally:
        for thing in owned:
            thing.close()


def _run(plan, path, meta, done, client, progress):
    tiles = _layout(meta).tiles()
    todo = [t for t in tiles if t not in set(done)]
    bar = _Progress(progress, len(tiles), len(done))
    try:
        if client is None:
            _run_local(plan, path, meta, todo, len(tiles), len(done), bar)
        else:
            _run_dask(plan, path, meta, todo, len(tiles), len(done), client, bar)
    finally:
        bar.close()
    missing = len(tiles) - len(_scan(path, meta, False)[0])
    if missing:
        raise RuntimeError(f"{_plural(missing, 'tile')} of {path} were not written; rerun "
                           "to finish")


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
        try:
            client = distributed.Client(scheduler)
        except OSError as err:
            raise OSError(f"cannot reach the Dask scheduler at {scheduler} ({err}); check the "
                          "address and that the scheduler runs, or compute here without a "
                          "scheduler") from None
        return client, [client]
    raise ValueError(f"scheduler must be None, 'local', an address or a dask.distributed."
                     f"Client, got {scheduler!r}")


def _run_dask(plan, path, meta, todo, total, initial, client, bar):
    distributed = _import_distributed()
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


@jit_parallel
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
        # The whole store is read many times below: checking it once first is cheap.
        state = status(store, verify=True)
        expected = _describe(spec, plan, x_train, None, state.kinds, state.dtype)
        if state.fingerprint != expected["fingerprint"] or kind not in state.kinds:
            raise StoreError(f"{store} does not hold the {kind} kernel of this spec on "
                             f"x_train; write it with kernel_to_store(spec, x_train, "
                             f"path=..., get='{kind}')")
        _refuse_damage(state)
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

