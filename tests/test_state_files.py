"""A run's state files through the command line, on both engines: a damaged or foreign file is one
line naming the file (and the setting, where the file is another model's), and is never loaded."""

import json

import numpy as np
import pytest
from test_cli import TEXT, TINY, assert_one_line_error, tbptt
from test_run_dir import flip_inside_the_largest_record


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(TEXT)
    return path


def latest(run):
    return run / json.loads((run / "checkpoint.json").read_text())["state"]


def loads_of(monkeypatch, engine):
    """The paths the engine's reader (torch.load or np.load) is called with, from now on."""
    seen = []
    if engine == "torch":
        import torch as module
    else:
        module = np
    real = module.load

    def load(f, *args, **kwargs):
        seen.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(module, "load", load)
    return seen


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_a_damaged_state_file_is_refused_before_it_is_loaded(
    tmp_path, text, capsys, monkeypatch, engine, damage
):
    """A state file with flipped bytes, cut short, or replaced by another run's (another hidden
    size): `--resume` and `sample` check its size and SHA-256 against checkpoint.json before
    reading it, say it is corrupted in one line naming it, and never unpickle it."""
    if engine == "torch":
        pytest.importorskip("torch")
    common = ["--data", text, *TINY, "--engine", engine, "--max-updates", 10]
    run = tmp_path / "run"
    assert tbptt(capsys, "train", *common, "--run-dir", run)[0] == 0
    state = latest(run)
    if damage == "flip":
        flip_inside_the_largest_record(state)
    elif damage == "truncate":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        other = tmp_path / "other"
        assert tbptt(capsys, "train", *common, "--hidden", 9, "--run-dir", other)[0] == 0
        state.write_bytes(latest(other).read_bytes())
    seen = loads_of(monkeypatch, engine)
    for command in (["train", "--resume", run, "--max-updates", 20], ["sample", run]):
        code, _, err = tbptt(capsys, *command)
        assert_one_line_error(code, err, str(state), "corrupted", "not loaded")
    assert str(state) not in seen


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_a_message_about_a_state_file_names_it_once(tmp_path, text, capsys, engine):
    """A state file the reader refuses (bytes flipped under a zip checksum, cut short, or Python
    objects, in a file checkpoint.json records as intact): the one line names the file once, not
    "checkpoint X is corrupted...: checkpoint X is damaged..."."""
    if engine == "torch":
        torch = pytest.importorskip("torch")
    from fractions import Fraction

    from test_run_dir import record_as_intact

    common = ["--data", text, *TINY, "--engine", engine, "--max-updates", 10]
    run = tmp_path / "run"
    assert tbptt(capsys, "train", *common, "--run-dir", run)[0] == 0
    state = latest(run)
    for damage in ("flip" if engine == "numpy" else "truncate", "objects"):
        if damage == "flip":
            flip_inside_the_largest_record(state)
        elif damage == "truncate":
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        elif engine == "numpy":
            with open(state, "wb") as fh:
                np.savez(fh, **{"model.A": np.array([Fraction(1, 3)], dtype=object)})
        else:
            torch.save({"format": "tbptt.torch.TBPTT/2", "lr": Fraction(1, 3)}, state)
        record_as_intact(run, state)
        for command in (["train", "--resume", run, "--max-updates", 20], ["sample", run]):
            code, _, err = tbptt(capsys, *command)
            assert_one_line_error(code, err, "corrupted")
            assert err.count(state.name) == 1, err


@pytest.mark.parametrize("damage", ["truncate", "hidden", "cell", "layers"])
def test_a_torch_state_file_recorded_as_intact_is_still_checked(tmp_path, text, capsys, damage):
    """A .pt that checkpoint.json records as intact, as an earlier tbptt's did (no settings
    recorded), but cut short, or holding a model of another hidden size, cell or layer count:
    `--resume` and `sample` say so in one line naming the file (and the setting of config.toml),
    never a traceback of torch's."""
    pytest.importorskip("torch")
    from test_run_dir import record_as_intact

    common = ["--data", text, *TINY, "--engine", "torch", "--max-updates", 10]
    run = tmp_path / "run"
    assert tbptt(capsys, "train", *common, "--cell", "lstm", "--run-dir", run)[0] == 0
    state = latest(run)
    words = [str(state)]
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        words.append("corrupted")
    else:
        other, setting = (
            tmp_path / "other",
            {
                "hidden": ["--cell", "lstm", "--hidden", 9],
                "cell": ["--cell", "gru"],
                "layers": ["--cell", "lstm", "--layers", 2],
            }[damage],
        )
        assert tbptt(capsys, "train", *common, *setting, "--run-dir", other)[0] == 0
        state.write_bytes(latest(other).read_bytes())
        words += [f"{damage} = ", str(run / "config.toml")]
    record_as_intact(run, state)
    meta = json.loads((run / "checkpoint.json").read_text())
    del meta["settings"]
    (run / "checkpoint.json").write_text(json.dumps(meta))
    for command in (["train", "--resume", run, "--max-updates", 20], ["sample", run]):
        code, _, err = tbptt(capsys, *command)
        assert_one_line_error(code, err, *words)
