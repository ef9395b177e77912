"""A run directory's config.toml: valid TOML for any path, read back exactly, and what a resumed
run may and may not take from it."""

import os
import subprocess
import sys

import pytest
from test_cli import TEXT, TINY

from tbptt.app import config as cf

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
