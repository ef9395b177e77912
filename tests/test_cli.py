"""`tbptt train` and `tbptt sample` end to end on tiny data: outputs, resume, errors."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reference import rel_err

import tbptt as tbptt_
from tbptt.app.cli import main

TEXT = "".join(
    f"{w}: to be, or not to be, that is the question {i}.\n"
    for i, w in enumerate(["HAMLET", "OPHELIA", "HORATIO"] * 60)
)
TINY = ["--hidden", "12", "--batch", "3", "--k1", "5", "--k2", "5", "--eval-every", "10"]
TINY += ["--checkpoint-every", "10", "--no-progress"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(TEXT)
    return path


def tbptt(capsys, *args):
    """Run the command in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def params(run):
    """The model's parameters in a run's latest checkpoint."""
    state = json.loads((run / "checkpoint.json").read_text())["state"]
    with np.load(run / state) as z:
        return {k: z[k] for k in z.files if k.startswith(("model.", "opt."))}


def assert_one_line_error(code, err, *words):
    """Exit code 2, one line on stderr naming what is wrong, no traceback."""
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_help_reads_like_documentation(capsys):
    """Every flag of the issue is documented, with examples."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "examples:" in out
    for opt in (
        "--engine",
        "--cell",
        "--hidden",
        "--layers",
        "--k1",
        "--k2",
        "--inject",
        "--optimizer",
        "--lr",
        "--clip",
        "--batch",
        "--seed",
        "--device",
        "--dtype",
        "--time-budget",
        "--max-updates",
        "--run-dir",
        "--task",
        "--data",
        "--config",
        "--resume",
    ):
        assert opt in out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--temperature" in capsys.readouterr().out


def test_train_writes_a_complete_run_directory(tmp_path, text, capsys):
    """Config, vocabulary, metrics, plot, one checkpoint; nats/char and a sample on stdout."""
    run = tmp_path / "run"
    code, out, err = tbptt(
        capsys, "train", "--data", text, *TINY, "--max-updates", 20, "--run-dir", run
    )
    assert code == 0, err
    assert "nats/char" in out and "bits/char" in out and "sample:" in out
    names = sorted(p.name for p in run.iterdir())
    assert names == [
        "checkpoint.json",
        "config.toml",
        "loss.png",
        "metrics.csv",
        "state-00000020.npz",
        "vocab.json",
    ]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0] == "updates,steps,chars,seconds,lr,train_loss,valid_loss,k2"
    assert [r.split(",")[0] for r in lines[1:]] == ["10", "20"]
    assert json.loads((run / "vocab.json").read_text()) == sorted(set(TEXT))
    assert not list(tmp_path.glob(".tmp*"))


def test_sample_continues_the_priming_text(tmp_path, text, capsys):
    """`tbptt sample` prints the prime and then --length characters of the vocabulary."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    code, out, err = tbptt(capsys, "sample", run, "--prime", "HAM", "--length", 40)
    assert code == 0, err
    sample = out[:-1]  # print's newline
    assert sample.startswith("HAM") and len(sample) == 43 and set(sample) <= set(TEXT)
    again = tbptt(capsys, "sample", run, "--prime", "HAM", "--length", 40)[1]
    assert again == out  # the same seed draws the same text
    code, _, err = tbptt(capsys, "sample", run, "--prime", "Z")
    assert_one_line_error(code, err, "'Z'")


def split_and_whole(tmp_path, capsys, common) -> tuple:
    """Train 40 updates in one go, and 20 then 20 more with --resume; both run directories."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert tbptt(capsys, "train", *common, "--max-updates", 40, "--run-dir", whole)[0] == 0
    assert tbptt(capsys, "train", *common, "--max-updates", 20, "--run-dir", split)[0] == 0
    code, _, err = tbptt(capsys, "train", "--resume", split, "--max-updates", 40, "--no-progress")
    assert code == 0, err
    a, b = params(whole), params(split)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    return whole, split


def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, text, capsys):
    """20 updates, then 20 more with --resume, equal 40 updates in one go, bit for bit."""
    _, split = split_and_whole(tmp_path, capsys, ["--data", text, *TINY, "--lr-decay", "none"])
    rows = (split / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["10", "20", "30", "40"]


def test_adapt_k2_follows_aicher_and_resumes_exactly(tmp_path, text, capsys):
    """--adapt-k2 sets k2 to bias.suggest_k's K on the last 2 x adapt-max steps, and a resumed
    run goes on with the k2 in force at the save: the same parameters as one run."""
    adapt = ["--k1", 4, "--k2", 4, "--adapt-k2", 0.1, "--adapt-every", 10, "--adapt-max", 16]
    common = ["--data", text, *TINY, "--lr-decay", "none", *adapt]
    whole, _ = split_and_whole(tmp_path, capsys, common)
    rows = (whole / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",k2")
    k2s = [int(r.split(",")[-1]) for r in rows[1:]]
    assert all(4 <= k <= 16 for k in k2s) and k2s != [4] * len(k2s)  # it moved, within bounds


def test_resume_rejects_a_changed_setting(tmp_path, text, capsys):
    """A resumed run keeps what it computes; only the budget may change."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    before = sorted(p.name for p in run.iterdir())
    code, _, err = tbptt(capsys, "train", "--resume", run, "--hidden", 20)
    assert_one_line_error(code, err, "--hidden")
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, text):
    """SIGINT stops after the current update with a checkpoint; resuming ends where an
    uninterrupted run ends."""
    common = [sys.executable, "-m", "tbptt.app.cli", "train", "--data", str(text), *TINY]
    common += ["--max-updates", "3000", "--checkpoint-every", "100000"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([*common, "--run-dir", str(whole)], check=True, capture_output=True)
    proc = subprocess.Popen([*common, "--run-dir", str(cut)], stderr=subprocess.PIPE, text=True)
    for _ in range(200):  # the run directory appears once data and model are ready
        if cut.exists():
            break
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    stopped = json.loads((cut / "checkpoint.json").read_text())["updates"]
    assert 0 < stopped < 3000
    resume = [sys.executable, "-m", "tbptt.app.cli", "train", "--resume", str(cut), "--no-progress"]
    subprocess.run(resume, check=True, capture_output=True)
    a, b = params(whole), params(cut)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_config_file_is_read_and_flags_override_it(tmp_path, text, capsys, monkeypatch):
    """--config sets fields, a flag beats the file, and the run's config.toml reads back."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{text}"\nhidden = 7\nbatch = 3\nk1 = 4\nk2 = 6\nmax-updates = 5\n')
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys, "train", "--config", cfg, "--k2", 8, "--run-dir", run, "--no-progress"
    )
    assert code == 0, err
    saved = (run / "config.toml").read_text()
    assert "hidden = 7" in saved and "k2 = 8" in saved and "k1 = 4" in saved
    code, _, err = tbptt(
        capsys,
        "train",
        "--config",
        run / "config.toml",
        "--run-dir",
        tmp_path / "again",
        "--no-progress",
    )
    assert code == 0, err
    for k, v in params(run).items():
        np.testing.assert_array_equal(v, params(tmp_path / "again")[k])
    # as the file says: `--config config.toml` alone starts a new run (its own directory)
    assert "# run_dir = " in saved and "\n[machine]\nthreads = " in saved
    monkeypatch.chdir(tmp_path)
    code, _, err = tbptt(capsys, "train", "--config", run / "config.toml", "--no-progress")
    assert code == 0, err
    (new,) = (tmp_path / "runs").iterdir()
    for k, v in params(run).items():
        np.testing.assert_array_equal(v, params(new)[k])


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("hidden = 'big'\n", ["hidden must be an integer", "'big'"]),
        ("lr = true\n", ["lr must be a number"]),
        ("hiden = 3\n", ["unknown setting 'hiden'"]),
        ("hidden = \n", ["not valid TOML"]),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, text, capsys, toml, words):
    """A wrong type, an unknown key or broken TOML: one line naming it, exit 2, no run."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    run = tmp_path / "run"
    code, _, err = tbptt(capsys, "train", "--config", cfg, "--data", text, "--run-dir", run)
    assert_one_line_error(code, err, *words)
    assert not run.exists()


TORCH_LSTM = ["--cell", "lstm", "--engine", "torch"]


@pytest.mark.parametrize(
    ("make", "extra", "words"),
    [
        (None, [], ["no such file", "missing.txt"]),
        (b"", [], ["is empty"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", [], ["not a text file"]),
        (b"caf\xe9 latin-1", [], ["not UTF-8 text"]),
        (TEXT.encode(), ["--k1", "8", "--k2", "4"], ["--k2 4 < --k1 8", "--inject new"]),
        (TEXT.encode(), ["--bogus", "1"], ["unrecognized arguments: --bogus"]),
        (TEXT.encode(), ["--hidden", "big"], ["--hidden", "invalid int value"]),
        (TEXT.encode(), ["--engine", "jax"], ["--engine", "invalid choice"]),
        (TEXT.encode(), ["--cell", "lstm"], ["--cell lstm needs --engine torch"]),
        (TEXT.encode(), ["--batch", "5000"], ["smaller --batch"]),
        (TEXT.encode(), TORCH_LSTM + ["--no-bias"], ["--no-bias applies to --cell elman"]),
        (TEXT.encode(), TORCH_LSTM + ["--spectral-radius", "0.9"], ["--spectral-radius applies"]),
        (TEXT.encode(), ["--cell", "gru", "--engine", "torch", "--activation", "relu"], ["gru"]),
        (TEXT.encode(), ["--layers", "2", "--engine", "torch"], ["--layers 2 needs --cell rnn"]),
        (TEXT.encode(), ["--adapt-every", "50"], ["--adapt-every applies with --adapt-k2"]),
        (TEXT.encode(), ["--adapt-max", "64"], ["--adapt-max applies with --adapt-k2"]),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, make, extra, words):
    """Missing, empty, binary data, bad options: one line, exit 2, no run directory."""
    path = tmp_path / ("missing.txt" if make is None else "data.txt")
    if make is not None:
        path.write_bytes(make)
    run = tmp_path / "run"
    with (
        pytest.raises(SystemExit)
        if extra[:1] in (["--bogus"], ["--hidden"], ["--engine"])
        else (_nothing()) as info
    ):
        code, _, err = tbptt(
            capsys, "train", "--data", path, "--run-dir", run, "--max-updates", 2, *extra
        )
    if info is not None:
        code, err = info.value.code, capsys.readouterr().err
    assert_one_line_error(code, err, *words)
    assert not run.exists() and not list(tmp_path.glob(".tmp*"))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_run_dir_in_use_is_refused(tmp_path, text, capsys):
    """A second run never overwrites a first one."""
    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    code, _, err = tbptt(
        capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run
    )
    assert_one_line_error(code, err, "already holds files", "--resume")


def test_resume_before_the_first_checkpoint_starts_the_run(tmp_path, text, capsys):
    """A run killed before its first checkpoint (only config.toml and vocab.json) is resumed from
    update 0: the same parameters as a run that was never interrupted."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    code, _, err = tbptt(
        capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", whole
    )
    assert code == 0, err
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    for p in run.iterdir():  # as if killed before the first checkpoint
        if p.name not in ("config.toml", "vocab.json"):
            p.unlink()
    code, out, err = tbptt(capsys, "train", "--resume", run)
    assert code == 0 and "no checkpoint yet" in out, err
    for k, v in params(whole).items():
        np.testing.assert_array_equal(v, params(run)[k])


@pytest.mark.parametrize("damage", ["truncate", "garbage-json", "foreign-json", "other-shapes"])
def test_corrupted_or_foreign_checkpoint_is_one_line(tmp_path, text, capsys, damage):
    """A damaged state file, a broken or foreign checkpoint.json, another model's state."""
    from test_run_dir import record_as_intact

    run = tmp_path / "run"
    tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)
    state = run / "state-00000010.npz"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:300])
    elif damage == "garbage-json":
        (run / "checkpoint.json").write_text("{not json")
    elif damage == "foreign-json":
        (run / "checkpoint.json").write_text('{"format": "something-else", "state": "x"}')
    else:
        other = tmp_path / "other"
        tbptt(
            capsys,
            "train",
            "--data",
            text,
            *TINY,
            "--hidden",
            9,
            "--max-updates",
            10,
            "--run-dir",
            other,
        )
        state.write_bytes((other / "state-00000010.npz").read_bytes())
        record_as_intact(run, state)  # as if saved so: the engine's load names the shapes
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert_one_line_error(code, err)
    assert {
        "truncate": "corrupted",
        "garbage-json": "corrupted",
        "foreign-json": "not a tbptt",
        "other-shapes": "shapes",
    }[damage] in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    code, _, err = tbptt(capsys, "sample", run)
    assert_one_line_error(code, err)


def test_numbers_from_npy_and_csv_train_with_the_l2_loss(tmp_path, capsys):
    """A .npy or .csv sequence trains a regression and reports its L2 loss."""
    t = np.arange(400) / 10
    values = np.stack([np.sin(t), np.cos(t)], axis=1)
    np.save(tmp_path / "s.npy", values)
    np.savetxt(tmp_path / "s.csv", values, delimiter=",", header="sin,cos", comments="")
    for name in ("s.npy", "s.csv"):
        code, out, err = tbptt(
            capsys,
            "train",
            "--data",
            tmp_path / name,
            *TINY,
            "--max-updates",
            10,
            "--run-dir",
            tmp_path / name[2:],
        )
        assert code == 0, err
        assert "L2 loss/step" in out and "sample" not in out


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_synthetic_tasks_train(tmp_path, capsys, task):
    """The adding problem and copy memory run as streams of sequences with resets."""
    length = 22 if task == "adding" else 5
    code, out, err = tbptt(
        capsys,
        "train",
        "--task",
        task,
        "--length",
        length,
        *TINY,
        "--max-updates",
        10,
        "--run-dir",
        tmp_path / task,
    )
    assert code == 0, err
    assert "validation" in out


def test_torch_engine_trains_an_lstm_and_resumes(tmp_path, text, capsys):
    """--engine torch --cell lstm trains, checkpoints and resumes."""
    pytest.importorskip("torch")
    try:
        import tbptt.torch as tt
    except ImportError:
        pytest.skip("tbptt.torch is not installed")
    if not hasattr(tt, "TBPTT"):
        pytest.skip("tbptt.torch has no TBPTT driver yet")
    import torch

    common = ["--engine", "torch", "--cell", "lstm", "--data", text, *TINY, "--lr-decay", "none"]
    run, whole = tmp_path / "run", tmp_path / "whole"
    code, out, err = tbptt(capsys, "train", *common, "--max-updates", 10, "--run-dir", run)
    assert code == 0, err
    assert "nats/char" in out and (run / "state-00000010.pt").exists()
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert code == 0, err
    assert tbptt(capsys, "train", *common, "--max-updates", 20, "--run-dir", whole)[0] == 0

    def tensors(obj):  # every tensor of a saved driver state, in a fixed order
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, dict):
            return [t for k in sorted(obj, key=str) for t in tensors(obj[k])]
        if isinstance(obj, list | tuple):
            return [t for v in obj for t in tensors(v)]
        return []

    a = tensors(torch.load(whole / "state-00000020.pt", weights_only=True)["model"])
    b = tensors(torch.load(run / "state-00000020.pt", weights_only=True)["model"])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)  # resumed = uninterrupted, bit for bit
    code, out, err = tbptt(capsys, "sample", run, "--length", 20)
    assert code == 0 and len(out) == 21, err


def test_demo_defaults_are_the_seeds_model_on_shakespeare():
    """No arguments: numpy engine, elman cell (tanh, softmax), Shakespeare, two minutes."""
    from tbptt.app.config import Config, check, default_run_dir

    cfg = check(Config())
    assert (cfg.task, cfg.engine, cfg.cell, cfg.activation) == (
        "shakespeare",
        "numpy",
        "elman",
        "tanh",
    )
    assert cfg.time_budget == 120 and cfg.max_updates is None
    assert (cfg.hidden, cfg.batch, cfg.k1, cfg.k2) == (256, 64, 32, 32)
    assert (cfg.optimizer, cfg.lr, cfg.lr_decay) == ("adam", 6e-3, "cosine")
    lstm = check(Config(engine="torch", cell="lstm"))
    assert (lstm.lr, lstm.batch) == (4e-3, 32)
    assert check(Config(batch=16)).batch == 16
    assert Path(default_run_dir(cfg)).parts[0] == "runs"
    assert os.sep not in default_run_dir(cfg).name


def test_threads_default_to_omp_else_one_for_numpy_and_the_idle_cpus_for_torch(monkeypatch):
    """--threads unset: $OMP_NUM_THREADS; else numpy 2 when two CPUs are left by the load
    average's whole jobs, else 1; torch half this process's idle CPUs (at most 4), divided among
    a torchrun job's local processes. An explicit --threads wins."""
    from tbptt.app.config import Config, check

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert check(Config()).threads == 3 and check(Config(engine="torch")).threads == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert check(Config()).threads == 2
    assert check(Config(engine="torch")).threads == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.9, 0.0, 0.0))  # 2 cores, neither taken
    assert check(Config()).threads == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))  # one taken by another job
    assert check(Config()).threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert check(Config(engine="torch")).threads == 1
    assert check(Config(engine="torch", threads=2)).threads == 2


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """An InputError is one line and exit 2; any other exception (a bug, here injected into
    explain's renderer) propagates with its traceback instead of becoming a one-line exit."""
    code, _, err = tbptt(capsys, "explain", "--k1", 0, "--k2", 2, "--steps", 5)
    assert_one_line_error(code, err, "k1 must be an integer >= 1")
    from tbptt.app import explain_command

    def bug(*args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(explain_command, "render", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["explain", "--k1", "2", "--k2", "2", "--steps", "5"])


METHOD_RUN = ["--task", "adding", "--length", 22, "--hidden", 6, "--batch", 2, "--k1", 5]
METHOD_RUN += ["--eval-every", 10, "--checkpoint-every", 10, "--no-progress", "--lr-decay", "none"]


@pytest.mark.parametrize(
    "method", [["rtrl"], ["uoro"], ["artbp", "--cut", 0.2, "--cut-every", 2, "--max-segment", 12]]
)
def test_train_with_each_method_resumes_exactly(tmp_path, capsys, method):
    """--method rtrl, uoro, artbp train, record the method in config.toml, and a resumed run
    (the random state included) ends with the parameters of an uninterrupted one."""
    whole, _ = split_and_whole(tmp_path, capsys, [*METHOD_RUN, "--method", *method])
    assert f'method = "{method[0]}"' in (whole / "config.toml").read_text()


@pytest.mark.parametrize(
    "method", [["rtrl"], ["uoro"], ["artbp", "--cut", 0.2, "--cut-every", 2, "--max-segment", 12]]
)
def test_each_method_trains_on_text(tmp_path, text, capsys, method):
    """On a text task (characters as tbptt.OneHot ids) every method trains and resumes exactly,
    as on the numeric tasks."""
    tiny = ["--hidden", 6, "--batch", 3, "--k1", 5, "--eval-every", 10, "--checkpoint-every", 10]
    common = ["--data", text, *tiny, "--no-progress", "--lr-decay", "none", "--method", *method]
    split_and_whole(tmp_path, capsys, common)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "rtrl", "--k2", 8], "--k2 applies to --method tbptt, not --method rtrl"),
        (["--method", "tbptt", "--cut", 0.1], "--cut applies to --method artbp"),
        (["--method", "artbp"], "--method artbp needs --cut"),
        (["--method", "artbp", "--cut", 1.5], "a probability in [0, 1]"),
        (["--method", "rtrl", "--engine", "torch", "--cell", "lstm", "--hidden", 400], "entries"),
        (["--method", "rtrl", "--hidden", 400, "--task", "copy"], "entries"),
    ],
)
def test_methods_mixed_with_options_they_do_not_take_are_one_line(tmp_path, capsys, args, words):
    """A method's flag given to another method, a missing or out-of-range --cut, RTRL on a model
    whose influence matrix cannot fit: one line, nothing written."""
    run = tmp_path / "run"
    code, _, err = tbptt(capsys, "train", "--max-updates", 2, "--run-dir", run, *args)
    assert_one_line_error(code, err, words)
    assert not run.exists()


def test_bias_method_reports_bias_variance_and_cost(tmp_path, capsys):
    """tbptt bias --method: a row per method in the table and methods.csv; RTRL is exact, the
    truncation's bias stands far above its (zero) noise, ARTBP's bias lies within its noise."""
    out = tmp_path / "out"
    args = ["bias", "--method", "tbptt", "rtrl", "artbp", "--k2", 3, "--cut", 0.3, "--draws", 400]
    code, printed, err = tbptt(
        capsys, *args, "--hidden", 6, "--steps", 40, "--batch", 2, "--out-dir", out
    )
    assert code == 0, err
    with open(out / "methods.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["tbptt(k1=1, k2=3)", "rtrl", "artbp(c=0.3, b=1)"]  # --k1 default: 1
    assert float(rows["rtrl"]["bias"]) < 1e-10
    assert float(rows["tbptt(k1=1, k2=3)"]["bias"]) > 1e-2
    artbp = rows["artbp(c=0.3, b=1)"]
    assert float(artbp["bias"]) < 4 * float(artbp["noise"])  # about 4 sigma: a rare false alarm
    assert (out / "methods.png").read_bytes()[:4] == b"\x89PNG" and "artbp(c=0.3" in printed


# -- faults of the audit (issue 13) -------------------------------------------------------------
@pytest.mark.parametrize(
    "toml",
    [
        'optimizer = "Adam"\n',
        'lr_decay = "linear"\n',
        'engine = "jax"\n',
        'engine = "torch"\ncell = "transformer"\n',
        'dtype = "float16"\n',
    ],
)
def test_a_toml_choice_value_is_checked(tmp_path, text, capsys, toml):
    """A value a flag's choices would refuse is refused in a TOML file too: one line naming the
    file, the key, the value and the choices; no run."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    key, value = toml.splitlines()[-1].split(" = ")
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys,
        "train",
        "--config",
        cfg,
        "--data",
        text,
        *TINY,
        "--max-updates",
        5,
        "--run-dir",
        run,
    )
    assert_one_line_error(code, err, str(cfg), key, value.strip('"'), "one of")
    assert not run.exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--hidden", "1000000"],
        ["--task", "adding", "--length", "100", "--batch", "1000000000"],
        ["--k1", "10000000", "--k2", "10000000"],
        ["--k1", "5", "--k2", "1000000000", "--time-budget", "60"],
        ["--task", "copy", "--length", "1000000000"],
        ["--task", "adding", "--length", "1000000000"],
    ],
    ids=["hidden", "batch", "k1", "k2", "copy-length", "adding-length"],
)
def test_sizes_that_cannot_fit_are_refused_with_the_estimate(tmp_path, text, capsys, extra):
    """Sizes needing terabytes (more than any machine running the suite has) are refused before
    anything is allocated or written: one line with the estimate in GiB, exit 2, no run."""
    from tbptt.app.train import available_memory

    if available_memory() is None:
        pytest.skip("no /proc/meminfo here: the memory check cannot know what is available")
    data = [] if "--task" in extra else ["--data", text]
    budget = [] if "--time-budget" in extra else ["--max-updates", 10]
    run = tmp_path / "run"
    code, _, err = tbptt(capsys, "train", *data, *TINY, *extra, *budget, "--run-dir", run)
    assert_one_line_error(code, err, "GiB", "memory")
    assert not run.exists()


def test_a_huge_k2_on_a_short_run_is_not_refused(tmp_path, text, capsys):
    """A run of 10 updates keeps at most its 50 steps, whatever k2 says: the estimate is a lower
    bound, and the run trains."""
    extra = ["--k1", 5, "--k2", 1000000000, "--max-updates", 10]
    code, _, err = tbptt(
        capsys, "train", "--data", text, *TINY, *extra, "--run-dir", tmp_path / "r"
    )
    assert code == 0, err


def test_adding_length_below_its_minimum_names_the_flag(tmp_path, capsys):
    """--task adding --length 20: one line naming --length and its minimum, 22; no directory."""
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys, "train", "--task", "adding", "--length", 20, *TINY, "--run-dir", run
    )
    assert_one_line_error(code, err, "--length", ">= 22", "20")
    assert not run.exists() and not list(tmp_path.iterdir())


def test_a_negative_seed_names_the_flag(tmp_path, text, capsys):
    """--seed -1: one line naming --seed; no run."""
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys, "train", "--data", text, *TINY, "--seed", -1, "--max-updates", 5, "--run-dir", run
    )
    assert_one_line_error(code, err, "--seed", "-1")
    assert not run.exists()


def numbers_file(tmp_path, kind):
    """A numeric --data file the audit found mishandled."""
    if kind == "csv-nan-first":  # a first row of numbers ('nan' is one), not a header
        path = tmp_path / "s.csv"
        path.write_text("nan,1\n" + "".join(f"{t},{t + 1}\n" for t in range(40)))
    else:
        path = tmp_path / "s.npy"
        shape = (100, 0) if kind == "npy-no-columns" else (100, 2)
        np.save(path, np.full(shape, 1e30))
    return path


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("csv-nan-first", ["NaN"]),
        ("npy-no-columns", ["at least one feature", "(100, 0)"]),
        ("npy-huge", ["1e+30", "standardize"]),
    ],
)
def test_bad_numbers_are_one_line_naming_the_file(tmp_path, capsys, kind, words):
    """A CSV whose first row holds a NaN (not a header), an .npy without columns, an .npy of
    1e30 values (not "diverged"): one line naming --data and the file; no run."""
    path = numbers_file(tmp_path, kind)
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys, "train", "--data", path, *TINY, "--max-updates", 5, "--run-dir", run
    )
    assert_one_line_error(code, err, "--data", str(path), *words)
    assert "diverged" not in err and not run.exists()


def test_bias_refuses_what_it_cannot_read_and_writes_all_or_nothing(tmp_path, capsys):
    """`bias --data x.npy` names --data and the .npz it needs; `--spectral-radius 0` names the
    flag and writes nothing; a spectral radius so small that every gradient is exact (nothing to
    draw on a log scale) still writes all four files."""
    np.save(tmp_path / "x.npy", np.zeros((10, 3)))
    out = tmp_path / "out"
    common = ["bias", "--steps", 40, "--batch", 2, "--hidden", 6, "--k2", 1, 4, "--out-dir", out]
    code, _, err = tbptt(capsys, *common, "--data", tmp_path / "x.npy")
    assert_one_line_error(code, err, "--data", "x.npy", ".npz")
    code, _, err = tbptt(capsys, *common, "--spectral-radius", 0)
    assert_one_line_error(code, err, "--spectral-radius", "positive")
    assert not out.exists()
    code, _, err = tbptt(capsys, *common, "--spectral-radius", 1e-30)
    assert code == 0, err
    names = ["bias.csv", "bias.png", "lags.csv", "lags.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    errors = [line.split(",")[6] for line in (out / "bias.csv").read_text().splitlines()[1:]]
    assert all(float(e) < 1e-12 for e in errors)  # A ~ 0: truncation is exact (invariant 4)


def test_flush_is_not_an_option_of_train(capsys):
    """`tbptt train` streams never end, so a flush would never happen: no --flush in --help,
    and the flag is refused."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--flush" not in capsys.readouterr().out
    from tbptt.app.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--flush"])
    assert info.value.code == 2 and "--flush" in capsys.readouterr().err


def test_numeric_tasks_count_steps_not_characters(tmp_path, capsys):
    """The progress bar and the final report of a numeric task speak of steps, not chars."""
    t = np.arange(400) / 10
    np.save(tmp_path / "s.npy", np.stack([np.sin(t), np.cos(t)], axis=1))
    code, out, err = tbptt(
        capsys,
        "train",
        "--data",
        tmp_path / "s.npy",
        *TINY,
        "--max-updates",
        20,
        "--progress",
        "--run-dir",
        tmp_path / "run",
    )
    assert code == 0, err
    assert "steps/s" in err and "steps x streams/s" in err  # the bar was drawn
    assert "steps/s" in out
    assert "char" not in err and "char" not in out


@pytest.mark.parametrize("body", [TEXT, TEXT.replace("question", "qüestion")])
def test_a_byte_order_mark_is_not_learned(tmp_path, capsys, body):
    """A UTF-8 byte-order mark at the start of an ASCII or a non-ASCII file is not a character
    of the vocabulary."""
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys, "train", "--data", path, *TINY, "--max-updates", 5, "--run-dir", run
    )
    assert code == 0, err
    assert json.loads((run / "vocab.json").read_text()) == sorted(set(body))


def test_loss_png_is_not_redrawn_at_every_checkpoint(tmp_path, text, capsys, monkeypatch):
    """A checkpoint after every update redraws loss.png at most every 30 s, and once at the end."""
    from matplotlib.figure import Figure

    drawn = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: drawn.append(1) or savefig(*a, **k))
    run = tmp_path / "run"
    start = time.perf_counter()
    code, _, err = tbptt(
        capsys,
        "train",
        "--data",
        text,
        *TINY,
        "--checkpoint-every",
        1,
        "--max-updates",
        30,
        "--run-dir",
        run,
    )
    assert code == 0, err
    assert 1 <= len(drawn) <= 1 + (time.perf_counter() - start) // 30
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_text_is_fed_as_onehot_ids_with_the_numbers_of_one_hot_rows(tmp_path, text, engine):
    """tbptt train's characters reach the elman cell as tbptt.OneHot ids: ten updates give the
    parameters the dense one-hot rows give (float64, 1e-12), on both engines."""
    from tbptt.app.config import Config, check
    from tbptt.app.data import load_problem
    from tbptt.app.engines import make_engine

    cfg = check(
        Config(data=str(text), engine=engine, hidden=8, batch=3, k1=5, k2=7, dtype="float64")
    )
    problem = load_problem(cfg)
    ids, dense = make_engine(cfg, problem), make_engine(cfg, problem)
    for u in range(10):
        x, y, mask, reset = problem.train(u * cfg.k1, cfg.k1)
        assert isinstance(x, tbptt_.OneHot)
        ids.train(x, y, mask, reset)
        dense.train(x.dense(np.float64), y, mask, reset)
    for k, v in state_of(dense).items():
        assert rel_err(state_of(ids)[k], v) < 1e-12, k


def state_of(engine) -> dict:
    """An engine's parameters as numpy arrays."""
    from tbptt.app.engines import NumpyEngine

    if isinstance(engine, NumpyEngine):
        return dict(engine.driver.model.params)
    return {k: v.detach().numpy() for k, v in engine.model.state_dict().items()}


@pytest.fixture
def without(monkeypatch):
    """Pretend some extras are not installed (a core-only install: numpy alone)."""

    def hide(*names):
        real = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            return None if name.split(".")[0] in names else real(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return hide


def test_a_core_install_trains_without_matplotlib(tmp_path, text, capsys, without):
    """Without the plot extra, train trains and checkpoints and says once that loss.png is not
    drawn; explain --out and bias are one line each, naming the extra, nothing written."""
    without("matplotlib")
    run = tmp_path / "run"
    code, out, err = tbptt(
        capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run
    )
    assert code == 0, err
    assert out.count("loss.png is not drawn") == 1 and "tbptt[plot]" in out
    assert (run / "checkpoint.json").exists() and not (run / "loss.png").exists()
    fig = tmp_path / "s.png"
    code, _, err = tbptt(capsys, "explain", "--k1", 2, "--k2", 4, "--steps", 8, "--out", fig)
    assert_one_line_error(code, err, "--out", "tbptt[plot]")
    assert not fig.exists()
    code, _, err = tbptt(capsys, "bias", "--out-dir", tmp_path / "b")
    assert_one_line_error(code, err, "matplotlib", "tbptt[plot]")
    assert not (tmp_path / "b").exists()


def test_engine_torch_without_torch_is_one_line(tmp_path, text, capsys, without):
    """--engine torch on an install without the torch extra: one line naming it, no run dir."""
    without("torch")
    run = tmp_path / "run"
    code, _, err = tbptt(
        capsys,
        "train",
        "--engine",
        "torch",
        "--data",
        text,
        *TINY,
        "--max-updates",
        2,
        "--run-dir",
        run,
    )
    assert_one_line_error(code, err, "--engine torch", "tbptt[torch]")
    assert not run.exists()


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path, text, capsys):
    """--resume of a run that has used its budget trains nothing, rewrites nothing, says so."""
    run = tmp_path / "run"
    assert (
        tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 10, "--run-dir", run)[0] == 0
    )
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "lock"}
    code, out, err = tbptt(capsys, "train", "--resume", run)
    assert code == 0 and out == "", out
    assert "nothing to do" in err and "--max-updates" in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "lock"}
    assert after == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["suggest-k", "--max-lag", 0], ["--max-lag must be"]),
        (["suggest-k", "--steps", 3], ["--fit-from must be", "for the T = 3 steps given"]),
        (["suggest-k", "--k-max", 0], ["--k-max must be"]),
        (["bias", "--method", "artbp", "--cut-every", 0], ["--cut-every must be"]),
        (["bias", "--method", "artbp", "--cut", 2], ["--cut must be a probability"]),
        (["bias", "--method", "uoro", "--draws", 0], ["--draws must be"]),
        (["train", "--method", "artbp", "--cut", 0.1, "--cut-every", 0], ["--cut-every must be"]),
    ],
)
def test_analysis_errors_name_the_flag(tmp_path, capsys, args, words):
    """The library's argument names (max_lag, b, c, draws) reach the user as the flags."""
    out = ["--out-dir", tmp_path / "b"] if args[0] == "bias" else []
    out += ["--run-dir", tmp_path / "r"] if args[0] == "train" else []
    code, _, err = tbptt(capsys, *args, *out)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()


def test_suggest_k_says_why_no_k_is_found(capsys):
    """Too short a stretch to bound the gradient's norm: the biases print as inf (not nan) and
    the sentence gives that reason, not "no geometric decay" beside a fitted beta < 1."""
    code, out, err = tbptt(capsys, "suggest-k", "--steps", 16)
    assert code == 0, err
    assert "nan" not in out and "  inf" in out
    assert "no lower bound on its norm" in out and "no geometric decay" not in out


def test_messages_say_which_thing_is_wrong(tmp_path, text, capsys):
    """A text file named .npy (no advice to load unsafely), a --model that does not exist, and
    sample's --length and --temperature told apart."""
    fake = tmp_path / "x.npy"
    fake.write_text("hello world, this is text\n")
    code, _, err = tbptt(capsys, "train", "--data", fake, "--run-dir", tmp_path / "r")
    assert_one_line_error(code, err, "not in numpy's .npy format")
    assert "allow_pickle" not in err and "unsafe" not in err
    code, _, err = tbptt(capsys, "bias", "--model", tmp_path / "nothing")
    assert_one_line_error(code, err, "no such file or run directory")
    run = tmp_path / "run"
    assert (
        tbptt(capsys, "train", "--data", text, *TINY, "--max-updates", 2, "--run-dir", run)[0] == 0
    )
    code, _, err = tbptt(capsys, "sample", run, "--temperature", 0)
    assert_one_line_error(code, err, "--temperature must be a positive number, got 0")
    code, _, err = tbptt(capsys, "sample", run, "--length", -1)
    assert_one_line_error(code, err, "--length must be an integer >= 0, got -1")


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_rtrl_too_large_names_the_flags(tmp_path, text, capsys, engine):
    """--method rtrl whose influence matrix would not fit: one line giving its size and naming
    --method, --hidden and --batch (the flags a user can change), not the library's max_bytes;
    no run directory."""
    if engine == "torch":
        pytest.importorskip("torch")
    run = tmp_path / "run"
    args = ["--data", text, "--engine", engine, "--method", "rtrl", "--hidden", 300]
    code, _, err = tbptt(capsys, "train", *args, "--max-updates", 2, "--run-dir", run)
    assert_one_line_error(code, err, "--method rtrl", "--hidden 300", "--batch 64", "GiB")
    assert "max_bytes" not in err and not run.exists()


def test_bias_refuses_a_negative_seed_in_one_line(capsys):
    """`tbptt bias --seed -1` and `--data-seed -1` (numpy's seeds are >= 0): one line naming
    the flag, not numpy's ValueError traceback."""
    for flag in ("--seed", "--data-seed"):
        for command in ("bias", "suggest-k"):
            code, _, err = tbptt(capsys, command, flag, -1)
            assert_one_line_error(code, err, f"{flag} must be an integer >= 0, got -1")


def test_suggest_k_says_what_its_estimate_means(capsys):
    """suggest-k prints each K's estimated relative bias as a percentage of the gradient's norm,
    in words a user can act on (a bound of 79.6 is 7,960%: the truncation may miss all of the
    gradient), never as a bare ratio that reads like a bug."""
    import re

    from tbptt.app.bias_commands import percent

    code, out, err = tbptt(capsys, "suggest-k")
    assert code == 0, err
    rows = [line for line in out.splitlines() if re.match(r"^\s*\d+\s+\S+%", line)]
    assert len(rows) >= 5
    for line in rows:
        k, value, words = re.match(r"^\s*(\d+)\s+([\d,.e+-]+)%\s+(.+)$", line).groups()
        r = float(value.replace(",", "")) / 100
        assert ("may miss all" in words) == (r >= 1), line
        assert ("negligible" in words) == (r < 0.01), line
    assert "may miss all" in rows[0] and percent(79.6) == "7,960%"
    assert re.search(r"K = \d+, whose truncation's bias is estimated at most [\d.]+%", out)


def test_copy_task_prints_the_memoryless_baseline_beside_its_loss(tmp_path, capsys):
    """The copy task's validation line gives the memoryless baseline, 10 log 8 / (T + 20) nats
    per step (blanks, then a uniform guess among the 8 symbols), and says what it is."""
    code, out, err = tbptt(
        capsys, "train", "--task", "copy", "--length", 5, *TINY, "--max-updates", 10,
        "--run-dir", tmp_path / "copy",
    )  # fmt: skip
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("validation:"))
    assert f"{10 * np.log(8) / (5 + 20):.4f} nats/step" in line.split("baseline")[1]
    assert "memoryless baseline" in line and "uniform guess among the 8 symbols" in line


def test_a_finished_run_says_where_its_plot_is_and_how_to_go_on(tmp_path, text, capsys):
    """The last lines of `tbptt train` name loss.png and give the exact commands to sample and to
    resume; both commands, run as printed, work (the resumed run trains on to the new budget)."""
    import shlex

    run = tmp_path / "my run"
    code, out, err = tbptt(
        capsys, "train", "--data", text, *TINY, "--max-updates", 20, "--run-dir", run
    )
    assert code == 0, err
    tail = out.splitlines()[-3:]
    assert str(run / "loss.png") in tail[0] and (run / "loss.png").is_file()
    commands = [line.split(": ", 1)[1] for line in tail[1:]]
    assert [shlex.split(c)[:2] for c in commands] == [["tbptt", "sample"], ["tbptt", "train"]]
    for command in commands:
        code, _, err = tbptt(capsys, *shlex.split(command)[1:])
        assert code == 0, err
    assert json.loads((run / "checkpoint.json").read_text())["updates"] == 40


def test_unscaled_numbers_get_a_hint_to_standardize(tmp_path, capsys):
    """An .npy of unscaled values (np.arange(500): mean 249.5) trains, and the output says that
    their scale makes the L2 loss large and how to standardize them; values of order 1 (a sine)
    get no such note."""
    np.save(tmp_path / "ramp.npy", np.arange(500))
    np.save(tmp_path / "sine.npy", np.sin(np.arange(500) / 10))
    for name, hinted in (("ramp.npy", True), ("sine.npy", False)):
        code, out, err = tbptt(
            capsys, "train", "--data", tmp_path / name, *TINY, "--max-updates", 10,
            "--run-dir", tmp_path / name[:4],
        )  # fmt: skip
        assert code == 0, err
        assert ("standardize" in out) == hinted, out
        if hinted:
            assert "249.5" in out and "(x - x.mean(axis=0)) / x.std(axis=0)" in out
