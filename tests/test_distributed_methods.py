"""ARTBP, UORO and RTRL under torchrun: 2 processes (gloo, loopback) against 1 (float64, CPU).

The reference is the same model, data, chunks, optimizer and draws on one process with all
streams (tests/ddp_methods_worker.py). Two ranks with half the streams each must end with the
same parameters and carried state, to 1e-6 (the sums over streams are only ordered differently):
ARTBP's cuts are drawn by every process from the same generator state, UORO's signs for every
stream of every process (each takes its own), and each update is one all-reduce. Checkpoints
move between 1 and 2 processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ddp_methods_worker as w
import pytest
import torch

from tbptt.torch.state import leaves

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = dict(rtol=1e-6, atol=1e-6)
ENV = {
    "OMP_NUM_THREADS": "1",
    **({"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}),
}


def single(name: str, chunks=w.CHUNKS, finish: bool = True):
    d = w.make(name)
    w.feed(d, chunks)
    if finish:
        d.finish()
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One torchrun of the worker; the single-process checkpoints it resumes are written first."""
    out = tmp_path_factory.mktemp("methods")
    for name in w.SCENARIOS:
        single(name, w.CHUNKS[: w.CUT], finish=False).save(out / f"{name}-single-mid.pt")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--monitor-interval=0.2",
        os.path.join(HERE, "ddp_methods_worker.py"),
        str(out),
    ]
    res = subprocess.run(
        cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def assert_same_run(sd: dict, ref) -> None:
    """A checkpoint's parameters, counters and carried state against a trainer of all streams."""
    assert (sd["t"], sd["updates"], sd["batch"]) == (ref.t, ref.updates, ref.batch)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(sd["model"][k], v, **TOL)
    state = sd["state"]["h"] if sd["format"] != "tbptt.torch.ARTBP/1" else sd["state"]
    for a, b in zip(leaves(state), leaves(ref.state), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.SCENARIOS))
def test_two_processes_equal_one_with_all_streams(name: str, run) -> None:
    """2 ranks x 2 streams end with the parameters and state of 1 process x 4 streams, with one
    all-reduce per update (and one per chunk that ends between updates)."""
    assert_same_run(torch.load(run / f"{name}-end.pt", weights_only=True), single(name))
    for r in (0, 1):
        updates, grad_reduces, between = json.loads((run / f"calls-{r}.json").read_text())["calls"][
            name
        ]
        assert updates == single(name).updates > 2
        assert grad_reduces == updates + between


@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.SCENARIOS))
def test_checkpoints_move_between_one_and_two_processes(name: str, run) -> None:
    """The mid-run file of 2 ranks (all streams in it) continues on 1 process to the same end,
    and 1 process's file continues on 2."""
    sd = torch.load(run / f"{name}-mid.pt", weights_only=True)
    assert len(sd["ranks"]) == 2 and sd["batch"] == w.BATCH
    d = w.make(name)
    d.load(run / f"{name}-mid.pt")
    w.feed(d, w.CHUNKS[w.CUT :])
    d.finish()
    ref = single(name)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(d.model.state_dict()[k], v, **TOL)
    assert_same_run(torch.load(run / f"{name}-resumed.pt", weights_only=True), ref)


@pytest.mark.slow
def test_fresh_entropy_gives_every_process_the_same_cuts(run) -> None:
    """ARTBP with rng=None: rank 0's generator state is sent once, so both ranks cut alike."""
    cuts = [json.loads((run / f"calls-{r}.json").read_text())["fresh cuts"] for r in (0, 1)]
    assert cuts[0] == cuts[1] and len(set(cuts[0])) > 2
