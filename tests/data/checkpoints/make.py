"""Write the checkpoint fixtures of tests/test_checkpoint_formats.py (run once, at commit 7e7ccd9).

Each case trains a small float64 model on a fixed stream: the first CUT chunks, then save (the
checkpoint committed here), then the remaining chunks and finish(); the parameters at the end are
committed beside the checkpoint as the expected values of a resumed run. The test loads each
checkpoint with today's code, feeds the same remaining chunks and compares.

    python tests/data/checkpoints/make.py      # from the repository's root, at commit 7e7ccd9
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from checkpoint_cases import CASES, CUT, build, feed  # noqa: E402


def main() -> None:
    for name in CASES:
        trainer, chunks = build(name)
        feed(trainer, chunks[:CUT])
        suffix = "pt" if name.startswith("torch") else "npz"
        trainer.save(HERE / f"{name}.{suffix}")
        feed(trainer, chunks[CUT:])
        trainer.finish()
        params = trainer_params(trainer)
        np.savez(HERE / f"{name}.expected.npz", **params)
        print(name, trainer.updates, {k: v.shape for k, v in params.items()})


def trainer_params(trainer) -> dict[str, np.ndarray]:
    model = trainer.model
    if hasattr(model, "named_parameters"):
        return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    return {k: np.array(v) for k, v in model.params.items()}


if __name__ == "__main__":
    main()
