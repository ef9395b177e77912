"""`tbptt train --engine torch --method artbp|uoro|rtrl` for every --cell: trains, records the
method, and a resumed run (the random draws included) ends with an uninterrupted run's values."""

from __future__ import annotations

import json

import pytest
import torch

from tbptt.app.cli import main

RUN = ["--engine", "torch", "--dtype", "float64", "--task", "adding", "--length", 22]
RUN += ["--hidden", 5, "--batch", 2, "--k1", 5, "--eval-every", 10, "--checkpoint-every", 10]
RUN += ["--no-progress", "--lr-decay", "none"]


def tbptt(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def final_state(run) -> dict:
    info = json.loads((run / "checkpoint.json").read_text())
    return torch.load(run / info["state"], weights_only=True)


@pytest.mark.parametrize(
    "cell, method",
    [
        ("lstm", ["artbp", "--cut", 0.2, "--cut-every", 2, "--max-segment", 12]),
        ("rnn", ["artbp", "--cut", 0.3]),
        ("gru", ["uoro"]),
        ("elman", ["rtrl"]),
    ],
    ids=["lstm-artbp", "rnn-artbp", "gru-uoro", "elman-rtrl"],
)
def test_torch_engine_trains_each_method_and_resumes_exactly(tmp_path, capsys, cell, method):
    """8 updates (ARTBP: 8 chunks of --k1 steps) in one go equal 4, then 4 more with --resume,
    exactly."""
    common = [*RUN, "--cell", cell, "--method", *method]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert tbptt(capsys, "train", *common, "--max-updates", 8, "--run-dir", whole) == (0, "")
    assert tbptt(capsys, "train", *common, "--max-updates", 4, "--run-dir", split)[0] == 0
    code, err = tbptt(capsys, "train", "--resume", split, "--max-updates", 8, "--no-progress")
    assert code == 0, err
    a, b = final_state(whole), final_state(split)
    assert a["format"] == b["format"] == f"tbptt.torch.{method[0].upper()}/1"
    assert a["updates"] == b["updates"] > 0 and a["t"] == b["t"] == 8 * 5  # 8 chunks of --k1
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert f'method = "{method[0]}"' in (whole / "config.toml").read_text()
