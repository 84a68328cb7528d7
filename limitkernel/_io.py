"""Atomic file output: a failed or interrupted run leaves no half-written file."""

import contextlib
import os
import secrets

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path, suffix="", sync=False):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the destination's directory, so the final
    ``os.replace`` is a rename within one file system, atomic on POSIX. It is
    created with mode 0o666 less the process umask, the mode ``open(path, "w")``
    gives a new file, and that is the mode ``path`` ends with. On any exception
    the temporary file is removed and the exception propagates.

    Parameters
    ----------
    path : str or path-like
        The file to write.
    suffix : str
        Ending of the temporary name (some writers choose a format by it).
    sync : bool
        Flush the file to disk before the rename, and the directory entry after
        it, so that the new content survives a power failure.

    Raises
    ------
    IsADirectoryError
        ``path`` is an existing directory.
    FileNotFoundError
        The directory of ``path`` does not exist.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: {path} is a directory; give the "
                                "path of a file")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: the directory {directory} does not "
                                "exist; create it first")
    while True:
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}"
                                      f".tmp{suffix}")
        try:
            # O_EXCL: never another writer's file; 0o666: the kernel applies the umask.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
        if sync:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        if sync:
            _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync(path, flags):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
