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
