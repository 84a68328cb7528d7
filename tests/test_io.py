"""Atomic file output: permissions, failures, and paths that cannot be written."""

import os
import stat

import pytest

from limitkernel._io import atomic_path


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_written_file_gets_the_mode_the_umask_gives(tmp_path, umask, mask):
    umask(mask)
    target = tmp_path / "out.npz"
    with atomic_path(target, ".npz") as tmp, open(tmp, "wb") as fh:
        fh.write(b"data")
    # What open(path, "w") would give a new file: 0o666 without the umask bits.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    reference = tmp_path / "plain"
    reference.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), \
            atomic_path(target, ".json") as tmp, open(tmp, "w") as fh:
        fh.write("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target, ".json", sync=True) as tmp, open(tmp, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_directory_in_the_way_is_one_clear_error(tmp_path):
    target = tmp_path / "k.npz"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match=r"k\.npz is a directory"), \
            atomic_path(target, ".npz") as tmp, open(tmp, "wb") as fh:
        fh.write(b"x")
    assert os.listdir(tmp_path) == ["k.npz"] and not os.listdir(target)


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory .* does not exist"), \
            atomic_path(tmp_path / "nope" / "k.npz", ".npz"):
        pass
