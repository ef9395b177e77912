"""Checkpoints saved by an earlier version resume bit for bit (tests/data/checkpoints, written by
tests/data/checkpoints/make.py at commit 7e7ccd9): one per method and engine, each loaded into a
fresh trainer of today's code and continued on the same chunks.

The expected parameters were computed on the machine that wrote the files. Where this machine's
kernels reproduce the first part of the run bit for bit (the same BLAS and ATen code paths), the
resumed run must equal the expected values exactly; elsewhere (another CPU's kernels round the
last bits differently) to 1e-12 relative, and the test says which it checked. The chunks have
resets, which today's driver runs packed (call.py) where the earlier version split its calls: the
packed calls round differently, so each torch case runs again with the split (packable = False),
which must reproduce the earlier numbers exactly on the same kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from checkpoint_cases import CASES, CUT, build, feed

DATA = Path(__file__).parent / "data" / "checkpoints"


def params(trainer) -> dict[str, np.ndarray]:
    model = trainer.model
    if hasattr(model, "named_parameters"):
        return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    return {k: np.array(v) for k, v in model.params.items()}


def saved_params(name: str, path: Path) -> dict[str, np.ndarray]:
    if name.startswith("torch"):
        import torch

        sd = torch.load(path, weights_only=True)
        return {k: v.numpy() for k, v in sd["model"].items()}
    with np.load(path) as data:
        return {k[6:]: data[k] for k in data.files if k.startswith("model.")}


@pytest.mark.parametrize("name", CASES)
def test_an_earlier_checkpoint_resumes_bit_for_bit(name: str) -> None:
    """Load the earlier version's checkpoint, continue, finish: its expected parameters."""
    resume(name, split=False)


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("torch")])
def test_the_per_reset_split_resumes_an_earlier_checkpoint_bit_for_bit(name: str) -> None:
    """The module marked packable = False: the driver calls it as the earlier version did (split
    at every step where a stream resets; packed calls round differently), so the same kernels
    give the expected parameters exactly."""
    resume(name, split=True)


def resume(name: str, split: bool) -> None:
    """The test above; split: the module's calls split at the resets, not packed (call.py)."""
    if name.startswith("torch"):
        pytest.importorskip("torch")
    path = DATA / f"{name}.{'pt' if name.startswith('torch') else 'npz'}"
    with np.load(DATA / f"{name}.expected.npz") as data:
        expected = {k: data[k] for k in data.files}

    replay, chunks = build(name)  # the first part again: do this machine's kernels round alike?
    if split:
        replay.model.packable = False
    feed(replay, chunks[:CUT])
    before = saved_params(name, path)
    same_kernels = all(np.array_equal(params(replay)[k], before[k]) for k in before)

    trainer, chunks = build(name)
    if split:
        trainer.model.packable = False
    trainer.load(path)
    feed(trainer, chunks[CUT:])
    trainer.finish()
    got = params(trainer)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        if same_kernels:
            assert np.array_equal(got[k], v), f"{name}: {k} differs from the earlier version"
        else:
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-14, err_msg=f"{name}: {k}")
