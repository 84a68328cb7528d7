"""How the package compiles its numba kernels: flags, caching, its fallbacks, threads.

Every jitted kernel of the package is declared through :func:`jit` (or
:func:`jit_parallel` for the outer passes), so the flags live in one place:

* explicit fastmath flags, never ``fastmath=True``, which would license the
  compiler to drop NaN checks and approximate ``sqrt``/``atan2`` exactly where
  the kernels' accuracy lives;
* ``error_model="numpy"`` (a division by zero gives inf, not an exception);
* ``cache=True``, so the compiled code is reused across processes.

Where the cache goes is numba's own choice (``NUMBA_CACHE_DIR``, else the
package's ``__pycache__``, else ``$HOME/.cache/numba``); this module asks numba's
locators which one it will use. When none is writable (a read-only install
without a writable home), numba would refuse every ``cache=True`` function at
import; the cache then goes to a private folder of the user's temporary
directory (``numba.config.CACHE_DIR``), after one :class:`KernelCacheWarning`,
and if even that cannot be written, kernels compile in memory, once per process.

numba checks only the file that defines a cached function when it decides
whether the cache is stale, not the files of the functions it calls; the
kernels of this package call each other across modules. So the first import
hashes the sources of the package and drops its cached kernels when they
changed since the cache was written.

numba's ``workqueue`` threading layer (its fallback when neither TBB nor
OpenMP is installed) aborts the process when two threads run parallel kernels
at once; under that layer :func:`jit_parallel` kernels take a lock, so that
threads calling :func:`limitkernel.kernel` concurrently take turns instead.
"""

import functools
import hashlib
import os
import stat
import tempfile
import threading
import warnings
from pathlib import Path

import numba
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.core.extending import intrinsic

__all__ = ["CACHE", "FASTMATH", "KernelCacheWarning", "cold_kernels", "fma", "jit",
           "jit_parallel", "sources_digest"]

FASTMATH = {"nsz", "arcp", "contract"}

_PACKAGE = Path(__file__).resolve().parent
_STAMP = "limitkernel-sources.sha256"
# One module of each package folder that holds kernels: where numba caches a
# folder's kernels depends only on the folder.
_KERNEL_FILES = (_PACKAGE / "_fused.py", _PACKAGE / "layers" / "dense.py")


class KernelCacheWarning(RuntimeWarning):
    """The compiled-kernel cache cannot be written where numba would put it."""


def _probe():
    """A function for numba's cache locators to place (never called)."""


def _numba_cache_dir(py_file):
    """The folder numba caches the functions of ``py_file`` in, or None if none is
    writable (numba would then refuse ``cache=True``)."""
    try:
        from numba.core.caching import CacheImpl

        locators = CacheImpl._locator_classes
    except (ImportError, AttributeError):  # another numba: judge the in-tree folder only
        folder = Path(py_file).parent / "__pycache__"
        return folder if _writable(folder) else None
    for locator in locators:
        found = locator.from_function(_probe, str(py_file))
        if found is not None:
            return Path(found.get_cache_path())
    return None


def _writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def _private_temp_dir():
    """A folder of the temporary directory that only this user can write, or None."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    owner = "user" if uid is None else uid
    folder = Path(tempfile.gettempdir()) / f"limitkernel-numba-cache-{owner}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    # Compiled code is loaded from here: refuse a folder someone else made.
    if (not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid)
            or info.st_mode & 0o022):
        return None
    return folder if _writable(folder) else None


def sources_digest():
    """SHA-256 of every source file of the package (what compiled code depends on)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _drop_stale(folders):
    """Empty the kernel caches in ``folders`` written from other sources."""
    digest = sources_digest()
    for folder in folders:
        stamp = folder / _STAMP
        if not stamp.exists() or stamp.read_text() != digest:
            for old in list(folder.glob("*.nbi")) + list(folder.glob("*.nbc")):
                old.unlink(missing_ok=True)
            stamp.write_text(digest)


def _prepare_cache():
    """Whether kernels are cached on disk; moves the cache where it can be written."""
    if os.environ.get("NUMBA_DISABLE_CACHE"):
        return False
    folders = [_numba_cache_dir(path) for path in _KERNEL_FILES]
    if None in folders:
        fallback = _private_temp_dir()
        if fallback is None:
            warnings.warn(
                "limitkernel cannot write its compiled-kernel cache (neither the package "
                "folder, $HOME/.cache nor the temporary directory is writable); kernels "
                "will compile on first use in every process. Set NUMBA_CACHE_DIR to a "
                "writable folder to keep them.", KernelCacheWarning, stacklevel=3)
            return False
        numba.config.CACHE_DIR = str(fallback)
        folders = [_numba_cache_dir(path) for path in _KERNEL_FILES]
        warnings.warn(
            f"limitkernel cannot write its compiled-kernel cache in the package folder or "
            f"$HOME/.cache; compiled kernels (and, in this process, numba's cache for any "
            f"other code) go to {fallback}. Set NUMBA_CACHE_DIR to a writable folder to "
            "choose another.", KernelCacheWarning, stacklevel=3)
        if None in folders:
            return False
    try:
        _drop_stale(folders)
    except OSError:
        pass  # numba still checks each defining file's own stamp
    return True


CACHE = _prepare_cache()

# Every kernel declared here, by module and name (for :func:`cold_kernels`).
_KERNELS = {}


def _register(fn, dispatcher):
    _KERNELS[(fn.__module__, fn.__qualname__)] = dispatcher
    return dispatcher


def jit(fn):
    """A small kernel: compiled once, cached, vectorisable, no Python objects."""
    return _register(fn, njit(cache=CACHE, fastmath=FASTMATH, nogil=True,
                              error_model="numpy")(fn))


@intrinsic
def fma(typingctx, x, y, z):
    """x·y + z rounded once, in a jitted kernel (LLVM's ``llvm.fma``).

    With ``contract`` among the flags, the compiler may fuse ``a*b + c*d`` as
    either (a·b) + fl(c·d) or fl(a·b) + (c·d), and its choice can differ
    between two loops that spell the sum alike; a kernel whose bits must not
    depend on the loop that computes them writes the fused step out.
    """
    if not all(isinstance(t, types.Float) for t in (x, y, z)):
        return None
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        double = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [double],
                                              ir.FunctionType(double, [double] * 3))
        return builder.call(fn, args)

    return sig, codegen


_LAUNCH_LOCK = threading.Lock()
_serialise = None  # whether parallel kernels must take turns; None until known


def _must_serialise():
    """True under numba's workqueue threading layer (or before the layer is known)."""
    global _serialise
    if _serialise is None:
        if numba.config.THREADING_LAYER == "workqueue":
            _serialise = True
        else:
            try:
                _serialise = numba.threading_layer() == "workqueue"
            except ValueError:  # no parallel kernel has run yet
                return True
    return _serialise


def jit_parallel(fn):
    """An outer pass over rows: like :func:`jit`, with ``prange`` threads.

    Called from Python only. Under the workqueue threading layer, which is not
    thread-safe, calls take a lock (so do calls made before the first parallel
    kernel has run and numba has chosen its layer).
    """
    dispatcher = _register(fn, njit(parallel=True, cache=CACHE, fastmath=FASTMATH,
                                    nogil=True, error_model="numpy")(fn))

    @functools.wraps(fn)
    def launch(*args):
        if _must_serialise():
            with _LAUNCH_LOCK:
                return dispatcher(*args)
        return dispatcher(*args)

    launch.dispatcher = dispatcher
    return launch


def cold_kernels(module="limitkernel._fused"):
    """Names of the kernels of ``module`` that have no compiled code cached on disk.

    Their first call in this process compiles them. Without an on-disk cache
    every kernel is cold; None when numba's cache cannot be inspected.
    """
    kernels = {name: disp for (mod, name), disp in _KERNELS.items() if mod == module}
    if not CACHE:
        return sorted(kernels)
    try:
        return sorted(name for name, disp in kernels.items()
                      if not os.path.exists(disp._cache._cache_file._index_path))
    except AttributeError:
        return None
