"""benchmarks/gpu.py, the GPU group (issue 28, item 6), runs here without a GPU.

With its device forced to the CPU and tiny sizes, the group produces every row with a finite
ratio; with CUDA reported absent, it says it is skipping and run.py exits 0. No timing is
asserted: benchmarks report their ratios, tests never check them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/ importable, no wait for a quiet machine, the thread count put back after."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delenv("TBPTT_BENCH_DEVICE", raising=False)
    monkeypatch.delenv("TBPTT_BENCH_TINY", raising=False)
    import common
    import gpu

    monkeypatch.setattr(common.QUIET, "max_busy", 1.0)
    monkeypatch.setattr(common.QUIET, "window", 0.0)
    threads = torch.get_num_threads()
    yield gpu
    torch.set_num_threads(threads)


def test_every_row_on_the_cpu_with_tiny_sizes(bench):
    group = bench.run(quick=True, reps=1, threads=1, device="cpu", tiny=True)
    assert group.skipped is None
    assert not [n for n in group.notes if "failed" in n], group.notes
    sizes = bench.TINY
    expected = 2 + 4 * len(sizes.rl_settings) + 4 + 1 + 1  # driver, rollouts, scans, uoro, engines
    assert len(group.rows) == expected, [r.name for r in group.rows]
    assert len({r.name for r in group.rows}) == expected
    for r in group.rows:
        assert math.isfinite(r.value) and r.value > 0, (r.name, r.value)
        assert r.unit == "x"


def test_skips_without_cuda(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    group = bench.run(quick=True, reps=1, threads=1)
    assert group.skipped is not None and "no CUDA device" in group.skipped
    assert group.rows == []
    import run

    for var in ("XLA_FLAGS", "JAX_PLATFORMS"):  # run.main sets them; put them back after
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert run.main(["--group", "gpu", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped: no CUDA device here" in err
