"""How the package compiles its numba kernels: flags, caching and its fallback.

Every jitted kernel of the package is declared through :func:`jit` (or
:func:`jit_parallel` for the outer passes), so the flags live in one place:

* explicit fastmath flags, never ``fastmath=True``, which would license the
  compiler to drop NaN checks and approximate ``sqrt``/``atan2`` exactly where
  the kernels' accuracy lives;
* ``error_model="numpy"`` (a division by zero gives inf, not an exception);
* ``cache=True``, so the compiled code is reused across processes — unless the
  cache cannot be written (a read-only install without a writable ``$HOME``),
  in which case kernels compile in memory, once per process, after one warning.

numba checks only the file that defines a cached function when it decides
whether the cache is stale, not the files of the functions it calls; the
kernels of this package call each other across modules. So the first import
hashes the sources of every module that holds kernels and drops the package's
cache index when they changed since the cache was written.
"""

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

from numba import njit

__all__ = ["CACHE", "FASTMATH", "jit", "jit_parallel", "sources_digest"]

FASTMATH = {"nsz", "arcp", "contract"}

_PACKAGE = Path(__file__).resolve().parent
_STAMP = "limitkernel-sources.sha256"


class KernelCacheWarning(RuntimeWarning):
    """The compiled-kernel cache cannot be written; kernels compile per process."""


def _cache_dirs():
    """Where numba writes the cache of each package folder that holds kernels."""
    override = os.environ.get("NUMBA_CACHE_DIR")
    folders = [_PACKAGE, _PACKAGE / "layers"]
    if override:
        return [Path(override)]
    return [folder / "__pycache__" for folder in folders]


def _writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def sources_digest():
    """SHA-256 of every source file of the package (what compiled code depends on)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _prepare_cache():
    """True when the on-disk cache can be used (and is consistent with the sources)."""
    if os.environ.get("NUMBA_DISABLE_CACHE"):
        return False
    dirs = _cache_dirs()
    override = os.environ.get("NUMBA_CACHE_DIR")
    if not override and not all(_writable(d) for d in dirs):
        # numba falls back to a user-wide cache under $HOME; it needs one.
        home = os.environ.get("HOME")
        if not home or not _writable(Path(home) / ".cache"):
            return False
        return True  # numba's own locator takes over; its index is per file
    if override and not _writable(dirs[0]):
        return False
    try:
        digest = sources_digest()
        stamp = dirs[0] / _STAMP
        if not stamp.exists() or stamp.read_text() != digest:
            for folder in dirs:
                for old in list(folder.glob("*.nbi")) + list(folder.glob("*.nbc")):
                    old.unlink(missing_ok=True)
            stamp.write_text(digest)
    except OSError:
        return False
    return True


CACHE = _prepare_cache()
if not CACHE:
    warnings.warn(
        "limitkernel cannot write its compiled-kernel cache (the package folder and "
        "$HOME/.cache are not writable); kernels will compile on first use in every "
        "process. Set NUMBA_CACHE_DIR to a writable folder to keep them.",
        KernelCacheWarning, stacklevel=2,
    )


def jit(fn):
    """A small kernel: compiled once, cached, vectorisable, no Python objects."""
    return njit(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy")(fn)


def jit_parallel(fn):
    """An outer pass over rows: like :func:`jit`, with ``prange`` threads."""
    return njit(parallel=True, cache=CACHE, fastmath=FASTMATH, nogil=True,
                error_model="numpy")(fn)
