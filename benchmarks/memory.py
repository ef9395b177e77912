"""Peak memory of streaming training against stream length (issue 6, target 4).

Each measurement is a fresh subprocess that trains a tiny model online with TBPTT(k1, k2) on a
stream of random chunks generated as they are fed (the stream itself is never held), then reports
its peak resident set size (VmHWM of /proc/self/status; resource.getrusage's ru_maxrss elsewhere:
on Linux ru_maxrss survives execve and would report the parent's peak). An engine keeps only the
last k2 steps, so the peak must not grow with the stream: the target is < 10% between the shortest
and the longest stream. The children use one thread each: memory, not speed, is measured here.

    numpy   tbptt.TBPTT(ElmanRNN.init(16, 4, 4, float32), Truncation(50, 100), SGD)
    torch   tbptt.torch.TBPTT(Recurrent(nn.LSTM(4, 16), nn.Linear(16, 4)), Truncation(50, 100), SGD)

Run one child by hand:  python benchmarks/memory.py numpy 100000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

N, M, K1, K2, CHUNK = 16, 4, 50, 100, 1000
TARGET = 0.10


def child(engine: str, steps: int) -> dict:
    """Train on `steps` steps and return the peak RSS (bytes) and the time taken."""
    import numpy as np

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if engine == "numpy":
        import tbptt

        driver = tbptt.TBPTT(
            tbptt.ElmanRNN.init(n=N, m=M, p=M, dtype=np.float32),
            tbptt.Truncation(K1, K2),
            tbptt.SGD(lr=1e-3),
        )
        for _ in range(steps // CHUNK):
            x = rng.standard_normal((CHUNK, 1, M), dtype=np.float32)  # (T, batch, m)
            y = rng.standard_normal((CHUNK, 1, M), dtype=np.float32)
            driver.feed(x, y)
        kept = len(driver.rule.segments)
    else:
        import torch

        from tbptt import Truncation
        from tbptt.torch import TBPTT, Recurrent, l2_loss

        torch.set_num_threads(1)
        torch.manual_seed(0)
        net = Recurrent(torch.nn.LSTM(M, N), torch.nn.Linear(N, M))
        driver = TBPTT(
            net, Truncation(K1, K2), torch.optim.SGD(net.parameters(), lr=1e-3), loss_fn=l2_loss
        )
        for _ in range(steps // CHUNK):
            x = torch.from_numpy(rng.standard_normal((CHUNK, 1, M), dtype=np.float32))
            y = torch.from_numpy(rng.standard_normal((CHUNK, 1, M), dtype=np.float32))
            driver.feed(x, y)
        kept = len(getattr(driver, "_segments", ()))
    seconds = time.perf_counter() - t0
    return {
        "engine": engine,
        "steps": steps,
        "maxrss": peak_rss(),
        "seconds": seconds,
        "kept": kept,
    }


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    /proc/self/status VmHWM where it exists: Linux keeps ru_maxrss across execve, so a child
    started from a large parent (torch and JAX loaded) would report the parent's peak instead.
    """
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(engine: str, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), engine, str(steps)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} child with {steps} steps failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, reps: int | None, threads: int):
    from common import Group, Row, load
    from torch_driver import import_engine

    group = Group("Peak memory against stream length (target 4)", load_before=load())
    lengths = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    engines = ["numpy"]
    if import_engine()[0] is not None:
        engines.append("torch")
    else:
        group.notes.append(f"torch engine not measured: {import_engine()[1]}.")
    for engine in engines:
        try:
            results = [measure(engine, n) for n in lengths]
        except RuntimeError as exc:
            group.notes.append(str(exc))
            continue
        base, top = results[0], results[-1]
        growth = top["maxrss"] / base["maxrss"] - 1
        detail = ", ".join(
            f"{r['steps']:,} steps: {r['maxrss'] / 2**20:.1f} MiB in {r['seconds']:.0f} s"
            for r in results
        )
        group.rows.append(
            Row(
                f"{engine}: peak RSS growth from {lengths[0]:,} to {lengths[-1]:,} steps",
                growth,
                "%",
                f"< {100 * TARGET:.0f}%",
                growth < TARGET,
                f"{detail}; segments kept at the end: {top['kept']}",
            )
        )
    group.load_after = load()
    return group


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("numpy", "torch") or not sys.argv[2].isdigit():
        print("usage: python benchmarks/memory.py {numpy,torch} STEPS", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]))))
