"""`tbptt train --engine torch --cell mingru|lru`: a ScanLM of --layers residual blocks on text
(token ids into its embedding) and numeric tasks (an input projection), resumed exactly, sampled;
its settings checked, its size as the model counts it."""

from __future__ import annotations

import pytest
import torch

from tbptt.app.cli import main
from tbptt.app.config import Config, check
from tbptt.app.engines import memory_needed, model_settings, scan_sizes
from tbptt.torch import ScanLM

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6
TINY = ["--engine", "torch", "--hidden", 8, "--batch", 3, "--k1", 5, "--k2", 5, "--no-progress"]
TINY += ["--eval-every", 10, "--checkpoint-every", 10, "--lr-decay", "none", "--threads", 1]


def tbptt(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def model_of(run, updates: int) -> dict[str, torch.Tensor]:
    return torch.load(run / f"state-{updates:08d}.pt", weights_only=True)["model"]


@pytest.mark.parametrize("cell", ["mingru", "lru"])
@pytest.mark.parametrize("task", ["text", "adding"])
def test_a_scan_cell_trains_resumes_exactly_and_samples(tmp_path, capsys, cell, task) -> None:
    """4 updates, then 4 more with --resume, equal 8 in one go bit for bit; two blocks by
    default; tbptt sample reads the text run."""
    if task == "text":
        data = tmp_path / "play.txt"
        data.write_text(TEXT)
        where = ["--data", data]
    else:
        where = ["--task", "adding", "--length", 22]
    common = [*TINY, "--cell", cell, *where]
    run, whole = tmp_path / "run", tmp_path / "whole"
    code, _, err = tbptt(capsys, "train", *common, "--max-updates", 4, "--run-dir", run)
    assert code == 0, err
    code, _, err = tbptt(capsys, "train", "--resume", run, "--max-updates", 8, "--no-progress")
    assert code == 0, err
    assert tbptt(capsys, "train", *common, "--max-updates", 8, "--run-dir", whole)[0] == 0
    a, b = model_of(whole, 8), model_of(run, 8)
    assert a.keys() == b.keys() and "blocks.1.norm.weight" in a and "blocks.2.norm.weight" not in a
    for k, v in a.items():
        assert torch.equal(v, b[k]), k  # resumed = uninterrupted, bit for bit
    assert ("embed.weight" in a) and (a["embed.weight"].dim() == 2)
    assert (a["embed.weight"].shape[0] == len(set(TEXT))) == (task == "text")  # ids: the table
    assert "layers = 2" in (run / "config.toml").read_text()
    assert model_settings(a) == {"cell": cell, "hidden": 8, "layers": 2, "dtype": "float32"}
    if task == "text":
        code, out, err = tbptt(capsys, "sample", run, "--length", 20)
        assert code == 0 and len(out) == 21, err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--cell", "mingru"], "--cell mingru needs --engine torch"),
        (["--cell", "lru", "--engine", "torch", "--activation", "relu"], "--activation applies"),
        (["--cell", "lru", "--engine", "torch", "--method", "rtrl"], "--cell lru's state is"),
        (["--cell", "lru", "--engine", "torch", "--method", "uoro"], "--method uoro carries"),
        (["--cell", "mingru", "--engine", "torch", "--layers", 0], "--layers must be an integer"),
        (["--layers", 2, "--engine", "torch"], "--layers 2 needs --cell rnn, gru, lstm, mingru"),
    ],
)
def test_scan_cells_bad_settings_are_one_line(tmp_path, capsys, args, words) -> None:
    """The numpy engine, the elman cell's flags, RTRL and UORO on the LRU's complex state, bad
    --layers: one line, exit status 2, no run directory."""
    data = tmp_path / "play.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    code, _, err = tbptt(capsys, "train", "--data", data, "--run-dir", run, *args)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_layers_default_to_two_blocks_for_scan_cells_and_one_layer_otherwise() -> None:
    """--layers unset: 2 for mingru and lru, 1 for the other cells."""
    layers = {c: check(Config(engine="torch", cell=c)).layers for c in ("mingru", "lru", "gru")}
    assert layers == {"mingru": 2, "lru": 2, "gru": 1}
    assert check(Config()).layers == 1


@pytest.mark.parametrize("cell", ["mingru", "lru"])
@pytest.mark.parametrize("tokens", [True, False])
def test_scan_sizes_count_the_models_parameters_and_state(cell, tokens) -> None:
    """scan_sizes (what --method rtrl's and the memory check's estimates use) against the model's
    own parameters and the state it returns; memory_needed counts at least the parameters."""
    model = ScanLM(cell, 7, 6, 5, num_layers=3, tokens=tokens, dtype=torch.float64)
    x = torch.randint(0, 7, (2, 4)) if tokens else torch.randn(2, 4, 7, dtype=torch.float64)
    _, state = model(x)
    entries = sum(t.numel() * (2 if t.is_complex() else 1) for t in state) // 4  # per stream
    assert scan_sizes(cell, 7, 5, 6, 3, tokens) == (
        sum(p.numel() for p in model.parameters()),
        entries,
    )
    cfg = check(Config(engine="torch", cell=cell, hidden=6, layers=3, batch=4))
    params = scan_sizes(cell, 7, 5, 6, 3, True)[0]
    assert memory_needed(cfg, 7, 5)[0] >= 4 * params * 4  # float32 parameters and Adam's moments
