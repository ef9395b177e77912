"""A run directory's config.toml: valid TOML for any path, read back exactly, and what a resumed
run may and may not take from it."""

import os
import subprocess
import sys

import pytest
from test_cli import TEXT, TINY, assert_one_line_error, tbptt

from tbptt.app import config as cf

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(TEXT)
    return path


def cli(*args, env=None):
    """Run the command in a process of its own (arguments as bytes where a path is not UTF-8)."""
    argv = [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]
    return subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"tbptt.app.cli", *argv],
        capture_output=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [b"play-\xf0\x9f\x8e\xad.txt", b"play-caf\xe9-\xff.txt"],
    ids=["outside-the-bmp", "not-utf8"],
)
def test_any_data_path_round_trips_through_config_toml(tmp_path, name):
    """A --data path with a character outside the Basic Multilingual Plane, or with bytes that are
    not UTF-8, in a run directory named alike: config.toml is valid TOML (UTF-8), names the same
    bytes, and `--resume` and `sample` read it back (stdout strict about its encoding)."""
    folder = os.fsencode(tmp_path)
    data, run = folder + b"/" + name, folder + b"/run-" + name
    with open(data, "wb") as fh:
        fh.write(TEXT.encode())
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    res = cli("train", "--data", data, *TINY, "--max-updates", 10, "--run-dir", run, env=strict)
    assert res.returncode == 0, res.stderr.decode()
    with open(run + b"/config.toml", "rb") as fh:
        raw = fh.read()
    tomllib.loads(raw.decode("utf-8"))  # valid TOML, valid UTF-8
    assert os.fsencode(cf.read_toml(os.fsdecode(run + b"/config.toml"))["data"]) == data
    res = cli("train", "--resume", run, "--max-updates", 20, env=strict)
    assert res.returncode == 0, res.stderr.decode()
    res = cli("sample", run, "--length", 10, env=strict)
    assert res.returncode == 0 and len(res.stdout) == 11, res.stderr.decode()


EDITS = [
    ("numpy", "lr = 0.006", "lr = 0.01"),
    ("numpy", "clip = 5.0", "clip = 1.0"),
    ("numpy", "seed = 0", "seed = 3"),
    ("numpy", "batch = 3", "batch = 4"),
    ("numpy", 'optimizer = "adam"', 'optimizer = "sgd"'),
    ("torch", "hidden = 12", "hidden = 10"),
    ("torch", 'cell = "elman"', 'cell = "gru"'),
    ("torch", 'dtype = "float32"', 'dtype = "float64"'),
    ("torch", 'optimizer = "adam"', 'optimizer = "sgd"'),
    ("torch", "batch = 3", "batch = 8"),
]


@pytest.mark.parametrize(("engine", "before", "after"), EDITS)
def test_a_setting_edited_in_config_toml_is_refused(tmp_path, text, capsys, engine, before, after):
    """lr, clip, seed, batch, optimizer, hidden, cell or dtype edited in a run's config.toml:
    `--resume` and `sample` refuse in one line naming the setting, config.toml and the value the
    run was trained with, and change nothing."""
    if engine == "torch":
        pytest.importorskip("torch")
    run = tmp_path / "run"
    common = ["--data", text, *TINY, "--engine", engine, "--max-updates", 10]
    assert tbptt(capsys, "train", *common, "--run-dir", run)[0] == 0
    config = (run / "config.toml").read_text()
    assert before + "\n" in config
    (run / "config.toml").write_text(config.replace(before + "\n", after + "\n"))
    name, old = (s.strip() for s in before.split("="))
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    for command in (["train", "--resume", run, "--max-updates", 20], ["sample", run]):
        code, _, err = tbptt(capsys, *command)
        assert_one_line_error(code, err, f"{name} = ", str(run / "config.toml"), old)
        assert "streams" not in err and "max_bytes" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files


def test_torch_threads_default_to_one_unless_cpus_are_idle(monkeypatch):
    """--threads unset (no $OMP_NUM_THREADS): torch takes half the CPUs idle by the load average
    (at most 4, shared by a torchrun job's local processes), so 1 on a busy machine or on two
    cores, where a second thread made an LSTM 12 times slower; numpy 2 when two CPUs are left by
    the load average's whole jobs, else 1. --threads wins."""
    from tbptt.app.config import Config, check

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cases = [(2, 0.0, 1, 2), (2, 3.5, 1, 1), (6, 0.0, 3, 2), (6, 4.0, 1, 2), (16, 1.0, 4, 2)]
    for cpus, load, threads, numpy_threads in cases:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cpus: set(range(c)))
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert check(Config(engine="torch")).threads == threads, (cpus, load)
        assert check(Config()).threads == numpy_threads, (cpus, load)
        assert check(Config(engine="torch", threads=2)).threads == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 16 CPUs, 15 idle, two processes
    assert check(Config(engine="torch")).threads == 3


def test_resume_keeps_the_runs_thread_count_and_says_it(tmp_path, text, capsys):
    """A run says at its start how many threads it uses; config.toml records them apart from the
    settings (a [machine] table that --config ignores); `--resume` keeps them unless --threads is
    given again, which the file then records."""
    run = tmp_path / "run"
    args = ["--data", text, *TINY, "--threads", 2, "--max-updates", 10, "--run-dir", run]
    code, out, err = tbptt(capsys, "train", *args)
    assert code == 0 and out.startswith("training with 2 CPU threads"), err

    def recorded():
        return tomllib.loads((run / "config.toml").read_text())["machine"]["threads"]

    assert recorded() == 2
    code, out, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 20)
    assert code == 0 and out.startswith("training with 2 CPU threads"), err
    assert recorded() == 2
    code, out, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 30, "--threads", 1)
    assert code == 0 and out.startswith("training with 1 CPU thread "), err
    assert recorded() == 1
    again = tmp_path / "again"  # a new run from the file picks its own (the suite's $OMP: 1)
    code, out, err = tbptt(capsys, "train", "--config", run / "config.toml", "--run-dir", again)
    assert code == 0 and out.startswith("training with 1 CPU thread "), err
