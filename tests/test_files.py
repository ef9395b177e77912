"""tbptt.files: the one writer every file of the project goes through."""

from __future__ import annotations

import os
import stat

import pytest

from tbptt.files import TMP_PREFIX, atomic_directory, atomic_write, remove_stale


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_replaces_whole_files_with_the_mode_open_gives(tmp_path):
    """bytes, text (UTF-8) and a writer function; the file gets 0o666 less the umask, as open()."""
    mask = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", b"\x00\x01")
        atomic_write(tmp_path / "b.txt", "héllo")
        atomic_write(tmp_path / "c.bin", lambda fh: fh.write(b"xyz"))
        atomic_write(tmp_path / "b.txt", "again")  # replaces
        with open(tmp_path / "d.txt", "w") as fh:  # what open() gives, for comparison
            fh.write("")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "again"
    assert (tmp_path / "c.bin").read_bytes() == b"xyz"
    assert {mode(tmp_path / n) for n in ("a.bin", "b.txt", "c.bin")} == {mode(tmp_path / "d.txt")}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(TMP_PREFIX)]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    """An error while writing: the target keeps its old content, no temporary file stays."""
    target = tmp_path / "keep.txt"
    atomic_write(target, "old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_atomic_directory_appears_whole_and_never_over_files(tmp_path):
    """A folder with its files in one rename; an existing non-empty folder is not replaced."""
    run = tmp_path / "runs" / "r1"
    atomic_directory(run, {"config.toml": "a = 1\n", "vocab.json": "[]\n"})
    assert sorted(os.listdir(run)) == ["config.toml", "vocab.json"]
    with pytest.raises(OSError):
        atomic_directory(run, {"other": "x"})
    assert sorted(os.listdir(run)) == ["config.toml", "vocab.json"]
    assert os.listdir(run.parent) == ["r1"]  # no temporary folder left


def test_remove_stale_deletes_what_a_killed_writer_left(tmp_path):
    """Temporary files and folders (TMP_PREFIX) go; everything else stays."""
    (tmp_path / f"{TMP_PREFIX}state-1.npz-abc").write_bytes(b"x")
    (tmp_path / f"{TMP_PREFIX}run-xyz").mkdir()
    (tmp_path / "state-1.npz").write_bytes(b"y")
    assert sorted(remove_stale(tmp_path)) == [
        f"{TMP_PREFIX}run-xyz",
        f"{TMP_PREFIX}state-1.npz-abc",
    ]
    assert os.listdir(tmp_path) == ["state-1.npz"]


def test_a_missing_folder_names_the_path_given(tmp_path, monkeypatch):
    """Writing into a folder that does not exist: an InputError naming the path as given (not the
    temporary name), on both engines' save; nothing is created."""
    import numpy as np
    import torch

    import tbptt
    import tbptt.torch

    monkeypatch.chdir(tmp_path)
    with pytest.raises(tbptt.InputError, match=r"^path 'missing/a\.txt': its folder .*missing "):
        atomic_write("missing/a.txt", b"x")
    trainer = tbptt.TBPTT(tbptt.ElmanRNN.init(n=3, m=2, p=1), tbptt.Truncation(2, 2), tbptt.SGD())
    trainer.feed(np.zeros((4, 2)), np.zeros((4, 1)))
    with pytest.raises(tbptt.InputError, match=r"^path 'nowhere/ck\.npz': its folder") as err:
        trainer.save("nowhere/ck.npz")
    assert TMP_PREFIX not in str(err.value)
    net = tbptt.torch.ElmanRNN(n=3, m=2, p=1)
    d = tbptt.torch.TBPTT(net, tbptt.Truncation(2, 2), torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(tbptt.InputError, match=r"^path 'nowhere/ck\.pt': its folder") as err:
        d.save("nowhere/ck.pt")
    assert TMP_PREFIX not in str(err.value)
    assert os.listdir(tmp_path) == []
