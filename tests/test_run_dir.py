"""The run directory of `tbptt train` under kills, concurrent processes and damaged files.

Each test reproduces a fault an outside audit found (issue 13): two processes in one run, a kill
in the middle of a checkpoint, counters and state files that do not belong together, leftovers
of a killed writer, and a start that fails after the directory was created.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import TEXT, TINY, assert_one_line_error, params, tbptt

CLI = [sys.executable, "-m", "tbptt.app.cli"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(TEXT)
    return path


def snapshot(run):
    """Every file of a run directory, name -> bytes (but the lock, which names its holder)."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.name != "lock"}


def rows(run):
    """metrics.csv without the seconds column (the only one that depends on the clock)."""
    lines = (run / "metrics.csv").read_text().splitlines()
    drop = lines[0].split(",").index("seconds")
    return [[v for j, v in enumerate(line.split(",")) if j != drop] for line in lines]


# -- two processes, one run ---------------------------------------------------------------------
def test_a_second_process_on_a_training_run_is_refused(tmp_path, text):
    """While one process trains in a run, `--resume` of it and a new run into it are refused in
    one line; the first process goes on and its checkpoint stays consistent."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [*CLI, "train", "--data", str(text), *TINY, "--max-updates", "1000000"]
        + ["--checkpoint-every", "50", "--run-dir", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # training, with a first checkpoint written
            if (run / "checkpoint.json").exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1]
        resume = [*CLI, "train", "--resume", str(run), "--max-updates", "1", "--no-progress"]
        again = [*CLI, "train", "--data", str(text), *TINY, "--run-dir", str(run)]
        for second, words in ((resume, ["in use", str(run)]), (again, ["--run-dir", "--resume"])):
            res = subprocess.run(second, capture_output=True, text=True, timeout=120)
            assert_one_line_error(res.returncode, res.stderr, *words)
        assert first.poll() is None  # still training
    finally:
        first.send_signal(signal.SIGINT)
        err = first.communicate(timeout=120)[1]
    assert first.returncode == 130, err
    meta = json.loads((run / "checkpoint.json").read_text())
    assert (run / meta["state"]).is_file()
    assert [r[0] for r in rows(run)[1:]][-1] == str(meta["updates"])


def test_a_lock_that_is_a_link_is_never_written_through(tmp_path, text, capsys):
    """RUN/lock replaced by a symbolic link to a user's file: `--resume` refuses in one line
    naming the lock, and the file the link points to keeps its bytes."""
    run = tmp_path / "run"
    assert (
        tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)[0] == 0
    )
    precious = tmp_path / "precious.txt"
    precious.write_text("a user's file\n")
    (run / "lock").unlink(missing_ok=True)
    (run / "lock").symlink_to(precious)
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert_one_line_error(code, err, str(run / "lock"), "link")
    assert precious.read_text() == "a user's file\n"
    assert json.loads((run / "checkpoint.json").read_text())["updates"] == 10


def test_a_finished_run_leaves_no_lock(tmp_path, text, capsys):
    """A run that ends (finished, or refused at --resume) deletes RUN/lock: no stale lock is
    left to puzzle a user; the next --resume takes a new one."""
    run = tmp_path / "run"
    assert (
        tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)[0] == 0
    )
    assert not (run / "lock").exists()
    assert tbptt(capsys, "train", "--resume", run, "--max-updates", 20)[0] == 0
    assert not (run / "lock").exists()
    code, _, err = tbptt(capsys, "train", "--resume", run, "--hidden", 20)
    assert_one_line_error(code, err, "--hidden")
    assert not (run / "lock").exists()


# -- a kill in the middle of a checkpoint -------------------------------------------------------
KILLER = """
import os, signal, sys
from pathlib import Path
from tbptt.app.cli import main

kill_at, seen, replace = int(sys.argv[1]), [], os.replace

def killing_replace(src, dst, *args, **kw):  # SIGKILL before the kill_at-th checkpoint file
    name = Path(dst).name
    if name in ("metrics.csv", "checkpoint.json") or name.startswith("state-"):
        seen.append(name)
        if len(seen) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kw)

os.replace = killing_replace
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("kill_at", [4, 5, 6])
def test_a_kill_inside_a_checkpoint_loses_no_metrics_row(tmp_path, text, capsys, kill_at):
    """SIGKILL before the first, second or third of the three files the second checkpoint
    renames into place (metrics.csv, the state, checkpoint.json); the resumed run's metrics.csv
    equals that of a run never interrupted, row for row."""
    common = ["--data", text, *TINY, "--lr-decay", "none", "--max-updates", 40]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert tbptt(capsys, "train", *common, "--run-dir", whole)[0] == 0
    argv = [str(a) for a in ("train", *common, "--run-dir", cut)]
    killed = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *argv], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    code, _, err = tbptt(capsys, "train", "--resume", cut, "--no-progress")
    assert code == 0, err
    assert rows(cut) == rows(whole)
    for k, v in params(whole).items():
        np.testing.assert_array_equal(v, params(cut)[k])


def final_model(run):
    """The model's tensors in a run's latest state file (.npz or .pt), name -> numpy array."""
    state = run / json.loads((run / "checkpoint.json").read_text())["state"]
    if state.suffix == ".npz":
        return params(run)
    import torch

    model = torch.load(state, weights_only=True)["model"]
    return {k: v.numpy() for k, v in model.items()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_a_kill_before_the_first_checkpoint_json_starts_over(tmp_path, text, capsys, engine):
    """SIGKILL after the first state file is renamed into place but before the first
    checkpoint.json: `--resume` starts the run over from update 0 (the state file is a leftover
    of an unfinished checkpoint), and ends with the parameters of a run never interrupted."""
    if engine == "torch":
        pytest.importorskip("torch")
    common = ["--data", text, *TINY, "--engine", engine, "--lr-decay", "none"]
    common += ["--max-updates", 20]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert tbptt(capsys, "train", *common, "--run-dir", whole)[0] == 0
    argv = [str(a) for a in ("train", *common, "--run-dir", cut)]
    killed = subprocess.run([sys.executable, "-c", KILLER, "3", *argv], timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (cut / "checkpoint.json").exists() and list(cut.glob("state-*"))
    code, out, err = tbptt(capsys, "train", "--resume", cut, "--no-progress")
    assert code == 0, err
    assert "starts from the beginning" in out
    assert rows(cut) == rows(whole)
    a, b = final_model(whole), final_model(cut)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_loss_after_a_resume_averages_the_updates_since_the_checkpoint(
    tmp_path, text, capsys
):
    """As docs/cli.md says: train_loss is the mean over the updates since the previous row, and
    the first row after a --resume the mean over the updates since the checkpoint it resumed from
    (here a kill after the checkpoint of update 15, between the rows of updates 10 and 20)."""
    common = ["--data", text, *TINY, "--lr-decay", "none", "--max-updates", 20]
    each = tmp_path / "each"
    assert tbptt(capsys, "train", *common, "--eval-every", 1, "--run-dir", each)[0] == 0
    loss = {int(r[0]): float(r[4]) for r in rows(each)[1:]}  # one row, one loss per update
    cut = tmp_path / "cut"
    argv = [str(a) for a in ("train", *common, "--checkpoint-every", 15, "--run-dir", cut)]
    killed = subprocess.run([sys.executable, "-c", KILLER, "4", *argv], timeout=120)
    assert killed.returncode == -signal.SIGKILL  # before the last checkpoint's first file
    assert json.loads((cut / "checkpoint.json").read_text())["updates"] == 15
    code, _, err = tbptt(capsys, "train", "--resume", cut, "--no-progress")
    assert code == 0, err
    got = {int(r[0]): float(r[4]) for r in rows(cut)[1:]}
    assert sorted(got) == [10, 20]
    assert got[10] == pytest.approx(np.mean([loss[u] for u in range(1, 11)]), abs=1e-5)
    assert got[20] == pytest.approx(np.mean([loss[u] for u in range(16, 21)]), abs=1e-5)


# -- checkpoint.json against the state file -----------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("updates", 10, ["10 updates", "holds 100 steps"]),
        ("updates", -5, ["updates = -5"]),
        ("updates", True, ["updates = True"]),
        ("updates", 60.0, ["updates = 60.0"]),
        ("updates", "60", ["updates = '60'"]),
        ("seconds", float("nan"), ["seconds = nan"]),
    ],
)
def test_checkpoint_counters_are_checked(tmp_path, text, capsys, key, value, words):
    """A checkpoint.json whose counters are of the wrong kind, or do not match the state file,
    is one line naming it; nothing in the run directory changes (no metrics row deleted)."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 20, "--run-dir", run)
    meta = json.loads((run / "checkpoint.json").read_text())
    meta[key] = value
    (run / "checkpoint.json").write_text(json.dumps(meta))  # NaN as JSON's NaN
    before = snapshot(run)
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 30, "--time-budget", 60)
    assert_one_line_error(code, err, "checkpoint.json", *words)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "edit", [("k1 = 5", "k1 = 4"), ("k2 = 5", "k2 = 7"), ('inject = "new"', 'inject = "window"')]
)
def test_a_schedule_edited_in_config_toml_is_refused(tmp_path, text, capsys, edit):
    """A run will not continue with another k1, k2 or inject than its state was trained with:
    config.toml against checkpoint.json's settings names the setting; without them (a checkpoint
    of an earlier tbptt) the numpy engine's state, like the torch one's, names the schedule."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    config = (run / "config.toml").read_text()
    assert edit[0] in config
    (run / "config.toml").write_text(config.replace(edit[0], edit[1]))
    before = snapshot(run)
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert_one_line_error(code, err, edit[1], str(run / "config.toml"), edit[0])
    assert snapshot(run) == before
    meta = json.loads((run / "checkpoint.json").read_text())
    del meta["settings"]
    (run / "checkpoint.json").write_text(json.dumps(meta))
    before = snapshot(run)
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert_one_line_error(code, err, "schedule", "k1=5, k2=5, inject=new")
    assert snapshot(run) == before


def record_as_intact(run, state):
    """Make checkpoint.json record the state file's present size and SHA-256 (as a checkpoint
    written with it would): what the reader then finds is checked by the reader."""
    import hashlib

    meta = json.loads((run / "checkpoint.json").read_text())
    data = state.read_bytes()
    meta.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (run / "checkpoint.json").write_text(json.dumps(meta))


def flip_inside_the_largest_record(path):
    """Invert 8 bytes in the middle of the largest stored record of a zip file (.npz, .pt): the
    archive's structure stays readable, the numbers are damaged."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + k : info.header_offset + k + 2], "little")
        for k in (26, 28)
    )
    start = info.header_offset + 30 + name_len + extra_len  # the record's bytes
    mid = start + info.compress_size // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_a_state_file_with_flipped_bytes_is_refused(tmp_path, text, capsys, engine):
    """Bytes flipped inside a state file: `--resume` and `sample` say it is corrupted (the
    SHA-256 in checkpoint.json), never that training diverged; nothing changes."""
    if engine == "torch":
        pytest.importorskip("torch")
    run = tmp_path / "run"
    common = ["--data", text, *TINY, "--engine", engine, "--max-updates", 10]
    assert tbptt(capsys, "train", *common, "--run-dir", run)[0] == 0
    state = run / json.loads((run / "checkpoint.json").read_text())["state"]
    flip_inside_the_largest_record(state)
    before = snapshot(run)
    for command in (["train", "--resume", run, "--max-updates", 20], ["sample", run]):
        code, _, err = tbptt(capsys, *command)
        assert_one_line_error(code, err, "corrupted", state.name)
        assert "--lr" not in err and "diverged" not in err
    assert snapshot(run) == before


def test_damaged_checkpoints_never_suggest_loading_unsafely(tmp_path, text, capsys):
    """A state file holding Python objects (an .npz with an object array, a .pt with a class
    torch's safe loader refuses) is refused without advising allow_pickle or weights_only=False."""
    torch = pytest.importorskip("torch")
    from fractions import Fraction

    for engine in ("numpy", "torch"):
        run = tmp_path / engine
        common = ["--data", text, *TINY, "--engine", engine, "--max-updates", 10]
        assert tbptt(capsys, "train", *common, "--run-dir", run)[0] == 0
        state = run / json.loads((run / "checkpoint.json").read_text())["state"]
        if engine == "numpy":
            with open(state, "wb") as fh:
                np.savez(fh, **{"model.A": np.array([Fraction(1, 3)], dtype=object)})
        else:
            torch.save({"format": "tbptt.torch.TBPTT/2", "lr": Fraction(1, 3)}, state)
        record_as_intact(run, state)  # past the SHA-256, as far as the reader
        for command in (["train", "--resume", run, "--max-updates", 20], ["sample", run]):
            code, _, err = tbptt(capsys, *command)
            assert_one_line_error(code, err, state.name, "objects")
            for advice in ("allow_pickle", "weights_only", "unsafe", "trust"):
                assert advice not in err


# -- what a killed process leaves ---------------------------------------------------------------
def test_resume_removes_what_a_killed_writer_left(tmp_path, text, capsys):
    """Temporary files in the run directory and a half-created copy of it beside it are deleted
    on resume; another run's temporary folder is not touched."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    left = [run / ".tmp-state-00000020.npz-k2j4h1x9", run / ".tmp-metrics.csv-0a9b8c7d"]
    for p in left:
        p.write_bytes(b"half written")
    half = tmp_path / ".tmp-run-ab12cd34"  # the rename of a new run directory never happened
    other = tmp_path / ".tmp-run-2-ab12cd34"  # a run named run-2 being created right now
    for d in (half, other):
        d.mkdir()
        (d / "config.toml").write_text("")
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert code == 0, err
    assert not any(p.exists() for p in (*left, half)) and other.is_dir()
    assert not list(run.glob(".tmp-*"))


# -- where a run goes ---------------------------------------------------------------------------
def test_run_dir_beside_resume_must_be_the_run(tmp_path, text, capsys):
    """`--run-dir` with `--resume` elsewhere is refused (it used to be ignored); the same
    directory is accepted."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    before = snapshot(run)
    code, _, err = tbptt(capsys, "train", "--resume", run, "--run-dir", tmp_path / "other")
    assert_one_line_error(code, err, "--run-dir", "--resume")
    assert snapshot(run) == before and not (tmp_path / "other").exists()
    code, _, err = tbptt(capsys, "train", "--resume", run, "--run-dir", run, "--max-updates", 20)
    assert code == 0, err


def test_the_same_data_given_relative_resumes(tmp_path, text, capsys, monkeypatch):
    """`--data` on resume is compared as the file it names, however the path is written."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = tbptt(
        capsys, "train", "--data", "play.txt", *TINY, "--max-updates", 10, "--run-dir", "run"
    )
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = tbptt(
        capsys, "train", "--resume", "../run", "--data", "../play.txt", "--max-updates", 20
    )
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["updates"] == 20


def test_default_run_directories_do_not_collide(tmp_path, text, capsys, monkeypatch):
    """Two runs started within the same second get two directories (…-2), both complete."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: "20260101-120000")
    for _ in range(2):
        code, _, err = tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10)
        assert code == 0, err
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["20260101-120000-text-numpy-elman", "20260101-120000-text-numpy-elman-2"]
    for name in runs:
        assert (tmp_path / "runs" / name / "checkpoint.json").is_file()


@pytest.mark.parametrize(
    ("where", "words"),
    [("file", ["is a file"]), ("file/run", ["is a file"]), ("/proc/tbptt-run", ["cannot create"])],
)
def test_run_dir_that_cannot_be_created(tmp_path, text, capsys, monkeypatch, where, words):
    """--run-dir naming a file, a folder inside a file, or a place nobody may write (/proc, even
    for root): one line naming --run-dir."""
    if where.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    code, _, err = tbptt(
        capsys, "train", "--data", text, *TINY, "--max-updates", 5, "--run-dir", where
    )
    assert_one_line_error(code, err, "--run-dir", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "play.txt"]


# -- a start that fails -------------------------------------------------------------------------
def test_divergence_before_the_first_checkpoint_leaves_no_directory(tmp_path, capsys):
    """A run that diverges at its first updates is one line, and its directory (config.toml
    only) is removed."""
    values = np.sin(np.arange(400) / 10)[:, None]
    np.save(tmp_path / "s.npy", values)
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys,
        "train",
        "--data",
        tmp_path / "s.npy",
        *TINY,
        "--optimizer",
        "sgd",
        "--lr",
        1e30,
        "--max-updates",
        20,
        "--run-dir",
        run,
    )
    assert_one_line_error(code, err, "diverged")
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]


# -- damaged files of a run ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("vocab.json", "{not json"),
        ("vocab.json", '["a", "bc", 3]'),
        ("metrics.csv", "updates,steps\n1,2\n"),
        ("metrics.csv", "updates,steps,chars,seconds,lr,train_loss,valid_loss,k2\nten,,,,,,,\n"),
        ("metrics.csv", b"\xff\xfe\x00garbage"),
        ("config.toml", "hidden = \n"),
        ("config.toml", b"\xff\xfe\x00garbage"),
        ("config.toml", 'hidden = "many"\n'),
    ],
)
def test_a_damaged_run_file_is_named(tmp_path, text, capsys, name, content):
    """`--resume` of a run whose vocab.json, metrics.csv or config.toml is damaged: one line
    naming that file (not --config, which was not given); nothing changes."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    path = run / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = snapshot(run)
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert_one_line_error(code, err, str(path))
    assert "--config" not in err
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("vocab.json", "fifo"),
        ("vocab.json", "/dev/zero"),
        ("checkpoint.json", "fifo"),
        ("checkpoint.json", "/dev/zero"),
        ("config.toml", "/dev/zero"),
        ("state-00000010.npz", "fifo"),
    ],
)
def test_a_run_file_that_is_not_a_regular_file_is_refused_not_read(
    tmp_path, text, capsys, name, kind
):
    """A run file replaced by a FIFO (no writer) or by a link to /dev/zero (endless): `--resume`
    and `sample` refuse it in one line naming the file, instead of waiting or reading forever."""
    run = tmp_path / "run"
    assert (
        tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)[0] == 0
    )
    (run / name).unlink()
    if kind == "fifo":
        os.mkfifo(run / name)
    else:
        (run / name).symlink_to(kind)
    for command in (["train", "--resume", run, "--max-updates", 20], ["sample", run]):
        res = subprocess.run(
            [*CLI, *map(str, command)], capture_output=True, text=True, timeout=120
        )
        assert_one_line_error(res.returncode, res.stderr, name, "not a regular file")


def test_sample_before_the_first_checkpoint(tmp_path, text, capsys):
    """`sample` on a run that has not saved a checkpoint yet says so (it is a run directory)."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    for p in run.iterdir():  # as the run is before its first checkpoint
        if p.name not in ("config.toml", "vocab.json"):
            p.unlink()
    code, _, err = tbptt(capsys, "sample", run)
    assert_one_line_error(code, err, "no checkpoint")
    assert "not a tbptt run directory" not in err
