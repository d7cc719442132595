"""Intermediate pickles: Astra's path layout, atomic writes, safe reads; and the integer version of Astra 0.8."""
from __future__ import annotations

import os
import pickle
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from astra_thepayne.db.models import version_to_int
from astra_thepayne.io import intermediate
from astra_thepayne.io.intermediate import (
    IntermediateFileError,
    intermediate_path,
    read_intermediate,
    write_intermediate,
)


@pytest.mark.parametrize("pk, tail", [(7, "00/07/7.pkl"), (123, "01/23/123.pkl"), (4567, "45/67/4567.pkl"),
                                      (1234567, "45/67/1234567.pkl")])
def test_path_layout_pads_the_key_to_four_digits(pk, tail, tmp_path):
    assert intermediate_path(pk, root=tmp_path) == tmp_path / tail
    assert intermediate_path(pk, tag="v2", root=tmp_path) == tmp_path / "v2" / tail


def test_root_follows_the_contract(monkeypatch, tmp_path):
    monkeypatch.delenv("MWM_ASTRA", raising=False)
    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    assert intermediate_path(1) == tmp_path / "out" / "00" / "01" / "1.pkl"
    monkeypatch.setenv("MWM_ASTRA", str(tmp_path / "mwm"))
    assert intermediate_path(1, version="0.1.0") == (tmp_path / "mwm" / "0.1.0" / "pipelines" / "ThePayne" /
                                                     "intermediate" / "00" / "01" / "1.pkl")


@pytest.mark.parametrize("tag", ["../x", "a/b", "..", "with space"])
def test_tags_cannot_escape_the_output_folder(tag, tmp_path):
    with pytest.raises(ValueError):
        intermediate_path(1, tag=tag, root=tmp_path)


def test_round_trip_in_astras_tuple_format(tmp_path):
    continuum, rectified = np.linspace(1, 2, 8575), np.full(8575, 0.9)
    path = write_intermediate(tmp_path / "00" / "01" / "1.pkl", continuum, rectified)
    with open(path, "rb") as fh:
        raw = pickle.load(fh)  # what Astra's reader does
    assert isinstance(raw, tuple) and len(raw) == 2
    got = read_intermediate(path)
    assert np.array_equal(got[0], continuum) and np.array_equal(got[1], rectified)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_intermediate(tmp_path / "1.pkl", np.ones(8575), np.ones(8575))
    before = path.read_bytes()

    def broken_dump(obj, fh, protocol=None):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(intermediate.pickle, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_intermediate(path, np.zeros(8575), np.zeros(8575))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["1.pkl"]


def test_pickles_written_from_many_threads_at_once_keep_the_umask_and_its_modes(tmp_path, monkeypatch):
    # the task writes its pickles from a thread pool; os.umask reads the umask only by setting it to 0 for a moment,
    # made longer here so that threads not kept apart would see each other's 0
    arrays = np.ones(8575), np.full(8575, 0.5)
    umask = os.umask

    def slow_umask(mask):
        old = umask(mask)
        if mask == 0:
            time.sleep(0.002)
        return old

    previous = umask(0o022)
    monkeypatch.setattr(os, "umask", slow_umask)
    try:
        with ThreadPoolExecutor(8) as pool:
            paths = list(pool.map(lambda pk: write_intermediate(intermediate_path(pk, root=tmp_path), *arrays),
                                  range(1, 120)))
        assert umask(0o022) == 0o022
    finally:
        umask(previous)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert stat.S_IMODE(path.parent.stat().st_mode) == stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o755
        assert np.array_equal(read_intermediate(path)[1], arrays[1])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(p.name for p in paths)


def test_reading_refuses_missing_wrong_and_unsafe_files(tmp_path):
    with pytest.raises(IntermediateFileError, match="does not exist"):
        read_intermediate(tmp_path / "missing.pkl")
    (tmp_path / "short.pkl").write_bytes(pickle.dumps((np.ones(10), np.ones(10))))
    with pytest.raises(IntermediateFileError, match="8575"):
        read_intermediate(tmp_path / "short.pkl")

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps((Evil(), Evil())))
    with pytest.raises(IntermediateFileError, match="unreadable"):
        read_intermediate(tmp_path / "evil.pkl")


def test_version_to_int_follows_astra_08():
    assert version_to_int("0.8.0") == 8000
    assert version_to_int("0.1.0") == 1000
    assert version_to_int("1.2.3") == 1_002_003
    assert version_to_int("0.6.0rc1") == 6000


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc (Linux)")
def test_a_pickle_and_the_folders_that_name_it_are_forced_to_disk(tmp_path, monkeypatch):
    """A row points at its pickle once committed: after a power cut the pickle must be there under its name. The
    file's own fsync writes its bytes; the rename and the folders made for it are entries of their folders, which
    are forced to disk too. Files written without fsync (plots, reports) sync nothing."""
    synced = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    path = tmp_path / "a" / "b" / "c" / "result.pkl"
    write_intermediate(path, np.ones(8575), np.ones(8575))
    names = [os.path.relpath(p, tmp_path) for p in synced]
    assert names[0].startswith(os.path.join("a", "b", "c", ".result.pkl."))  # the bytes, before the rename
    assert names[1:] == [os.path.join("a", "b", "c"), os.path.join("a", "b"), "a", "."]  # then the names
    synced.clear()
    write_intermediate(path.with_name("again.pkl"), np.ones(8575), np.ones(8575))  # the folders exist already
    assert [os.path.relpath(p, tmp_path) for p in synced][1:] == [os.path.join("a", "b", "c")]
    synced.clear()
    from astra_thepayne.files import atomic_write

    atomic_write(tmp_path / "d" / "plot.png", lambda handle: handle.write(b"png"))
    assert synced == []
