"""A process of a job that dies: the survivors raise the documented DistributedError in one line
(issue 24 D2), at torchrun's own collectives too (Launch.agree and Launch.mean, which the command
line runs between updates), and `tbptt train` exits non-zero with that one line.

The processes are started as torchrun would start them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT set), without torchrun, which would stop the survivors itself: gloo on
the loopback interface, one thread each.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ENV = {
    "OMP_NUM_THREADS": "1",
    **({"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}),
}

# rank 1 joins, takes part in one agree, then dies; rank 0 calls agree, then mean, each failure
# recorded as (exception class, its module, message)
WORKER = """
import json, os, sys, time
from tbptt.torch.distributed import init_from_env
launch = init_from_env("cpu", timeout=20)
assert launch.agree(1.0, False) == (1.0, False)
if launch.rank == 1:
    os._exit(3)
time.sleep(0.5)
out = {}
calls = (("agree", lambda: launch.agree(1.0, False)), ("mean", lambda: launch.mean(1.0, 2)))
for name, call in calls:
    try:
        call()
        out[name] = None
    except Exception as exc:
        out[name] = [type(exc).__name__, type(exc).__module__, str(exc)]
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(rank: int, port: int) -> dict[str, str]:
    return {
        **os.environ,
        **ENV,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def test_a_dead_rank_makes_agree_and_mean_raise_distributed_error() -> None:
    """Rank 1 exits after the first agree: rank 0's next agree and mean raise DistributedError
    naming the process and the collective, not gloo's RuntimeError."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=job_env(r, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert procs[1].returncode == 3, outs[1][1][-2000:]
    assert procs[0].returncode == 0, outs[0][1][-2000:]
    got = json.loads(outs[0][0].strip().splitlines()[-1])
    for name, what in (("agree", "agreeing on the time and on stopping"), ("mean", "averaging")):
        assert got[name] is not None, f"{name} did not fail"
        cls, module, msg = got[name]
        assert (cls, module) == ("DistributedError", "tbptt.errors"), got[name]
        assert msg.startswith(f"process 0 of 2: {what}"), msg
        assert "another process died" in msg and "\n" not in msg


@pytest.mark.slow
def test_a_killed_rank_makes_tbptt_train_exit_with_one_line(tmp_path) -> None:
    """`tbptt train` as two processes with RANK/WORLD_SIZE set; rank 1 killed (SIGKILL) once the
    run has a checkpoint: rank 0 exits non-zero, its stderr one line naming DistributedError's
    message, no traceback."""
    exe = os.path.join(os.path.dirname(sys.executable), "tbptt")
    args = [exe, "train", "--engine", "torch", "--cell", "gru", "--task", "adding"]
    args += ["--length", "30", "--batch", "4", "--hidden", "8", "--k1", "5", "--k2", "10"]
    args += ["--checkpoint-every", "2", "--max-updates", "100000", "--no-progress"]
    args += ["--run-dir", str(tmp_path / "run")]
    port = free_port()
    procs = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env={**job_env(r, port), "TBPTT_TIMEOUT": "30"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "run" / "checkpoint.json").exists():
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("tbptt train: error: process 0 of 2: "), lines[0]
    assert "another process died" in lines[0]
