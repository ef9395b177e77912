"""Data-parallel TBPTT under torchrun: 2 processes (gloo, loopback) against 1 process (float64,
CPU).

The reference is the same model, data, schedule and optimizer on one process with all streams
(tests/ddp_worker.py holds both sides' definitions). Two ranks with half the streams each must end
with the same parameters and carried state, to 1e-6 (the sums over streams are only ordered
differently), with k1 = k2 and k2 > k1, with and without DistributedDataParallel; checkpoints move
between 1 and 2 processes; a NaN or diverging chunks stop both ranks together; a rank that dies
or hangs ends the whole job with an error in bounded time and leaves the checkpoint whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ddp_worker as w
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = dict(rtol=1e-6, atol=1e-6)
# one thread per process, and gloo on the loopback interface only
ENV = {
    "OMP_NUM_THREADS": "1",
    **({"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}),
}


def torchrun(mode: str, out, timeout: float = 120, nproc: int = 2, **env: str):
    """Run tests/ddp_worker.py under torchrun on this machine only (loopback)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--monitor-interval=0.2",
        os.path.join(HERE, "ddp_worker.py"),
        mode,
        str(out),
    ]
    env = {**os.environ, **ENV, **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def single(name: str, chunks=w.CHUNKS, finish: bool = True) -> w.TBPTT:
    d = w.make(name)
    w.feed(d, chunks)
    if finish:
        d.finish()
    return d


@pytest.fixture(scope="module")
def equal_run(tmp_path_factory):
    """One torchrun of MODE equal; the single-process checkpoints it resumes are written first."""
    out = tmp_path_factory.mktemp("equal")
    for name in w.SCENARIOS:
        single(name, w.CHUNKS[: w.CUT], finish=False).save(out / f"{name}-single-mid.pt")
    res = torchrun("equal", out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_run(sd: dict, ref: w.TBPTT) -> None:
    """A checkpoint's parameters, counters and carried state against a driver over all streams."""
    assert (sd["t"], sd["updates"], sd["batch"]) == (ref.t, ref.updates, ref.batch)
    want = ref.model.state_dict()
    assert sorted(sd["model"]) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(sd["model"][k], v, **TOL)
    for a, b in zip(w.st_leaves(sd["state"]), w.st_leaves(ref.state), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.SCENARIOS))
def test_two_processes_equal_one_with_all_streams(name: str, equal_run) -> None:
    """2 ranks x 2 streams end with the parameters and state of 1 process x 4 streams."""
    assert_same_run(load(equal_run / f"{name}-end.pt"), single(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(w.SCENARIOS))
def test_checkpoint_of_two_processes_resumes_on_one(name: str, equal_run) -> None:
    """The mid-run file of 2 ranks holds all streams; 1 process continues it to the same end."""
    sd = load(equal_run / f"{name}-mid.pt")
    assert_same_run(sd, single(name, w.CHUNKS[: w.CUT], finish=False))
    assert len(sd["ranks"]) == 2 and sd["batch"] == w.BATCH
    d = w.make(name)
    d.load(equal_run / f"{name}-mid.pt")
    w.feed(d, w.CHUNKS[w.CUT :])
    d.finish()
    ref = single(name)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(d.model.state_dict()[k], v, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("src", ["single-mid", "mid"])
@pytest.mark.parametrize("name", list(w.SCENARIOS))
def test_checkpoint_of_one_or_two_processes_resumes_on_two(name: str, src: str, equal_run) -> None:
    """A mid-run file of 1 process (or of 2) loads on 2 ranks, each its streams: the same end."""
    assert_same_run(load(equal_run / f"{name}-{src}-resumed.pt"), single(name))


@pytest.mark.slow
def test_one_collective_per_update_and_none_from_ddp(equal_run) -> None:
    """Whatever the segments and backward calls of a window: one all-reduce per update (its
    gradient, checks and loss together), one more per chunk ending between updates (the loss
    check), one when the driver is made and one after the save; DDP's reducer never fires."""
    for r in (0, 1):
        calls = json.loads((equal_run / f"calls-{r}.json").read_text())
        for name, (updates, grad_reduces, between, total, ddp_reduces) in calls.items():
            assert updates == single(name).updates > 0
            assert (grad_reduces, ddp_reduces) == (updates + between, 0), name
            assert total == grad_reduces + 2, name


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_at_the_same_update(equal_run) -> None:
    """An infinite loss in rank 1's data: both ranks raise NonFiniteError before the same
    update."""
    e0, e1 = (json.loads((equal_run / f"errors-{r}.json").read_text()) for r in (0, 1))
    ref = w.make("lstm-k2-k5-flush")  # the same target on one process: the update it stops at
    x, y, mask, reset = w.data()
    y[9, w.BATCH // 2] = 1e200
    with pytest.raises(w.tbptt.NonFiniteError) as info:
        for a, b in w.CHUNKS:
            ref.feed(x[a:b], y[a:b], mask[a:b], reset[a:b])
    assert e0["nan"][1] == e1["nan"][1] == info.value.update
    assert e0["nan"][2] == e1["nan"][2] == ref.updates
    assert "in another process" in e0["nan"][0] and "(inf)" in e1["nan"][0]


@pytest.mark.slow
def test_chunks_of_different_lengths_raise_on_every_rank(equal_run) -> None:
    """Rank 0 feeds 4 + 4 steps, rank 1 3 + 5: both raise a ValueError naming the steps."""
    for r in (0, 1):
        msg = json.loads((equal_run / f"errors-{r}.json").read_text())["mismatch"][0]
        assert "different steps" in msg and "t from 3 to 4" in msg


@pytest.mark.slow
@pytest.mark.parametrize("how", ["die", "hang"])
def test_a_failing_rank_ends_the_job_and_the_checkpoint_resumes(how: str, tmp_path) -> None:
    """Rank 1 exits (or stops answering) mid-run: torchrun fails within 60 s, the file resumes."""
    res = torchrun(how, tmp_path, timeout=60)
    assert res.returncode != 0
    log = res.stdout + res.stderr
    if how == "die":
        assert re.search(r"exitcode\s*:\s*3", log), log[-3000:]
    else:  # rank 0's collective times out: our error, naming the update
        assert "DistributedError" in log and "did not answer" in log, log[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left
    sd = load(tmp_path / "checkpoint.pt")
    assert_same_run(sd, single("lstm-k2-k5-flush", w.CHUNKS[: w.CUT], finish=False))
    d = w.make("lstm-k2-k5-flush")
    d.load(tmp_path / "checkpoint.pt")
    w.feed(d, w.CHUNKS[w.CUT :])
    d.finish()
    for k, v in single("lstm-k2-k5-flush").model.state_dict().items():
        torch.testing.assert_close(d.model.state_dict()[k], v, **TOL)


CLI = [
    "--engine",
    "torch",
    "--cell",
    "lstm",
    "--task",
    "adding",
    "--length",
    "30",
    "--batch",
    "4",
    "--hidden",
    "8",
    "--k1",
    "5",
    "--k2",
    "10",
    "--dtype",
    "float64",
    "--checkpoint-every",
    "5",
    "--eval-every",
    "6",
    "--no-progress",
]


def cli_torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`tbptt train ARGS` under torchrun with 2 processes, as the README shows it."""
    tbptt_exe = os.path.join(os.path.dirname(sys.executable), "tbptt")
    tbptt_exe = tbptt_exe if os.path.exists(tbptt_exe) else shutil.which("tbptt")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--no-python",
        tbptt_exe,
        "train",
        *args,
    ]
    env = {**os.environ, **ENV}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def final_state(run) -> dict:
    info = json.loads((run / "checkpoint.json").read_text())
    return load(run / info["state"])


def assert_same_cli_runs(a, b) -> None:
    """Two run directories: the same parameters, position and logged losses."""
    sa, sb = final_state(a), final_state(b)
    assert (sa["t"], sa["updates"], sa["batch"]) == (sb["t"], sb["updates"], sb["batch"])
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, **TOL)
    rows = [
        [r.split(",")[i] for r in (run / "metrics.csv").read_text().splitlines()]
        for run in (a, b)
        for i in (0, 5, 6)
    ]
    assert rows[:3] == rows[3:]  # updates, training and validation loss


@pytest.mark.slow
def test_cli_under_torchrun_equals_one_process_and_resumes_across_sizes(tmp_path, capsys) -> None:
    """`tbptt train --engine torch` on 2 processes = on 1; each run resumes on the other size."""
    from tbptt.app.cli import main

    assert main(["train", *CLI, "--max-updates", "12", "--run-dir", str(tmp_path / "one")]) == 0
    res = cli_torchrun([*CLI, "--max-updates", "12", "--run-dir", "two"], tmp_path)
    assert res.stdout.count("trained 12 updates") == 1  # rank 0 alone reports
    assert_same_cli_runs(tmp_path / "one", tmp_path / "two")
    assert len(final_state(tmp_path / "two")["ranks"]) == 2
    assert main(["train", "--resume", str(tmp_path / "two"), "--max-updates", "20"]) == 0
    cli_torchrun(["--resume", "one", "--max-updates", "20"], tmp_path)
    assert_same_cli_runs(tmp_path / "one", tmp_path / "two")
    assert final_state(tmp_path / "one")["updates"] == 20
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.cpu_sensitive
def test_docs_script_under_torchrun_prints_what_the_page_says(equal_run) -> None:
    """docs/distributed.md's script on 2 ranks: rank 0 prints the page's lines, rank 1 nothing."""
    text = (Path(HERE).parent / "docs" / "distributed.md").read_text(encoding="utf-8")
    shown = re.search(r"\nprints, on 2 processes as on 1.*?\n\n((?:    .*\n)+)", text).group(1)
    assert (equal_run / "docs-0.txt").read_text() == "".join(
        line[4:] + "\n" for line in shown.splitlines()
    )
    assert (equal_run / "docs-1.txt").read_text() == ""
    sd = load(equal_run / "sine.pt")
    assert (sd["batch"], sd["t"], sd["updates"], len(sd["ranks"])) == (8, 400, 80, 2)


def test_bad_process_group_and_environment_are_clear_errors(monkeypatch) -> None:
    """process_group, torchrun's variables and the batch's divisibility are checked by name."""
    from tbptt.torch.distributed import Launch, init_from_env

    model = w.Recurrent(torch.nn.LSTM(w.M, w.H), torch.nn.Linear(w.H, w.P))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="process_group must be None"):
        w.TBPTT(model, w.tbptt.Truncation(2, 2), opt, process_group="gloo")
    assert w.TBPTT(model, w.tbptt.Truncation(2, 2), opt, process_group=False).comm is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK.* not set: start the processes with torchrun"):
        init_from_env("cpu")
    with pytest.raises(ValueError, match="--batch 5 must be divisible by the number of processes"):
        Launch(1, 2, 1, torch.device("cpu")).streams(5)
    assert Launch(1, 2, 1, torch.device("cpu")).streams(6) == slice(3, 6)


def test_numpy_engine_under_torchrun_is_refused(monkeypatch, tmp_path, capsys) -> None:
    """`tbptt train --engine numpy` with torchrun's WORLD_SIZE=2: one line, exit 2, no run dir."""
    from tbptt.app.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    assert main(["train", "--task", "adding", "--max-updates", "1", "--run-dir", str(run)]) == 2
    assert "under torchrun, use --engine torch" in capsys.readouterr().err
    assert not run.exists()


def test_checkpoint_splits_into_equal_shares_of_streams() -> None:
    """A 4-stream file split for 2 ranks gives each its half; 3 ranks cannot share 4 streams."""
    from tbptt.torch.distributed import split_streams

    d = single("lstm-k2-k5-flush", w.CHUNKS[: w.CUT], finish=False)
    sd = d.state_dict()
    dims = [1, 1]  # the stream axis of the LSTM's (h, c): (layers, batch, hidden)
    for r in (0, 1):
        part = split_streams(sd, r, 2, 1, dims)
        cols = slice(2 * r, 2 * r + 2)
        assert part["batch"] == 2 and part["t"] == sd["t"]
        for a, b in zip(w.st_leaves(part["state"]), w.st_leaves(sd["state"]), strict=True):
            assert torch.equal(a, b[:, cols])  # LSTM (h, c): (layers, batch, hidden)
        for p, q in zip(part["segments"], sd["segments"], strict=True):
            assert torch.equal(p["x"], q["x"][:, cols]) and torch.equal(p["y"], q["y"][:, cols])
    with pytest.raises(ValueError, match="holds 4 streams, which 3 processes cannot share"):
        split_streams(sd, 0, 3, 1, dims)
