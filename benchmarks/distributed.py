"""Data-parallel scaling of the torch driver: 2 processes against 1 on this machine (issue 7).

    .venv/bin/python benchmarks/distributed.py                  # prints a table and the ratios
    .venv/bin/python benchmarks/distributed.py --reps 5 --hidden 256

The model is Recurrent(nn.LSTM(m, n), nn.Linear(n, p)) with l2_loss, SGD and clipping, float32,
on random chunks of k1 steps; every process uses one thread (torchrun's default OMP_NUM_THREADS=1).
"comm" is the time per update inside the driver's collectives (the step check and the gradient
all-reduce, waiting for the other rank included).

    1 x B       one process, all B streams
    1 x B/2     one process, half of them: what each of 2 processes computes, without the others
    2 x B/2     strong scaling: torchrun, 2 processes (gloo), B/2 streams each: the same updates
    2 x B       weak scaling: 2 processes with B streams each (twice the streams per update)

Each case runs `warmup` updates, then `updates` timed ones (the slowest rank's time; process start
and the rendezvous are not counted). The cases of a repetition run one after another, in an order
rotated from one repetition to the next, and the medians are reported: other engineers share the
machine, so only the ratios of figures measured side by side mean something. Not a test.

    strong speed-up   = time per update (1 x B) / time per update (2 x B/2)      (2.0: perfect)
    weak efficiency   = time per update (1 x B) / time per update (2 x B)        (1.0: perfect)

The ceiling of the strong speed-up is 1 x B / 1 x B/2 (half the streams is less than half the
work for small products); the rest of the gap is the all-reduces and the two processes competing
for the cores (and for the memory bandwidth) with each other and with everything else running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def worker(a: argparse.Namespace) -> None:
    """One process of a case: time `updates` updates after `warmup`; rank 0 prints JSON."""
    import torch
    from torch import nn

    import tbptt
    from tbptt.torch import TBPTT, Recurrent, l2_loss
    from tbptt.torch.distributed import Comm, init_from_env

    torch.set_num_threads(1)
    launch = init_from_env("cpu")
    comm = [0.0]

    def timed(fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                comm[0] += time.perf_counter() - t

        return wrapper

    Comm.reduce = timed(Comm.reduce)  # the update's one collective (and the chunk-end check)
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM(a.features, a.hidden), nn.Linear(a.hidden, a.features))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    driver = TBPTT(model, tbptt.Truncation(a.k1, a.k2), opt, loss_fn=l2_loss, clip=1.0)
    g = torch.Generator().manual_seed(launch.rank)
    x = torch.randn(
        a.k1, a.streams, a.features, generator=g
    )  # (k1, streams, m): one update's chunk
    y = torch.randn(a.k1, a.streams, a.features, generator=g)
    for _ in range(a.warmup):
        driver.feed(x, y)
    start, comm[0] = time.perf_counter(), 0.0
    for _ in range(a.updates):
        driver.feed(x, y)
    seconds = launch.agree(time.perf_counter() - start, False)[0]  # the slowest rank's
    if launch.rank == 0:
        params = sum(p.numel() for p in model.parameters())
        out = {"per_update": seconds / a.updates, "comm": comm[0] / a.updates, "params": params}
        print(json.dumps(out), flush=True)


def run_case(a: argparse.Namespace, nproc: int, streams: int) -> dict:
    args = [
        HERE,
        "--worker",
        "--streams",
        str(streams),
        "--hidden",
        str(a.hidden),
        "--features",
        str(a.features),
        "--k1",
        str(a.k1),
        "--k2",
        str(a.k2),
        "--updates",
        str(a.updates),
        "--warmup",
        str(a.warmup),
    ]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):  # gloo on the loopback interface
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--streams", type=int, default=32, help="B, the global batch (default 32)")
    p.add_argument("--hidden", type=int, default=128, help="LSTM units (default 128)")
    p.add_argument(
        "--features", type=int, default=32, help="m = p, inputs and outputs (default 32)"
    )
    p.add_argument("--k1", type=int, default=32, help="steps per update (default 32)")
    p.add_argument("--k2", type=int, default=32, help="steps backpropagated (default 32)")
    p.add_argument("--updates", type=int, default=40, help="timed updates per case (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="updates before timing (default 5)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every case (default 3)")
    return p


CASES = ("1 x B", "1 x B/2", "2 x B/2", "2 x B")


def measure(a: argparse.Namespace) -> dict:
    """Every case `reps` times, interleaved: median time and comm per update, parameters, loads."""
    B = a.streams
    cases = {"1 x B": (1, B), "1 x B/2": (1, B // 2), "2 x B/2": (2, B // 2), "2 x B": (2, B)}
    times: dict[str, list[float]] = {c: [] for c in cases}
    comms: dict[str, list[float]] = {c: [] for c in cases}
    names = list(cases)
    params, loads = 0, []
    for r in range(a.reps):
        for c in names[r % len(names) :] + names[: r % len(names)]:
            out = run_case(a, *cases[c])
            times[c].append(out["per_update"])
            comms[c].append(out["comm"])
            params = out["params"]
        loads.append(os.getloadavg()[0])
    med = {c: statistics.median(v) for c, v in times.items()}
    return {
        "cases": cases,
        "med": med,
        "comm": {c: statistics.median(v) for c, v in comms.items()},
        "params": params,
        "loads": loads,
        "strong": med["1 x B"] / med["2 x B/2"],  # (2.0: perfect)
        "weak": med["1 x B"] / med["2 x B"],  # (1.0: perfect)
        "ideal": med["1 x B"] / med["1 x B/2"],  # the strong speed-up's ceiling here
    }


def describe(a: argparse.Namespace, m: dict) -> str:
    return (
        f"LSTM {a.features}-{a.hidden}-{a.features} ({m['params']:,} parameters), "
        f"TBPTT({a.k1}, {a.k2}), B = {a.streams} streams, float32, 1 thread per process, "
        f"{a.reps} repetitions, load average {min(m['loads']):.1f}-{max(m['loads']):.1f} "
        f"on {os.cpu_count()} cores"
    )


def run(quick: bool, reps: int | None, threads: int):
    """The group for benchmarks/run.py (every process uses one thread whatever `threads` says)."""
    from common import Group, Row, load

    a = parser().parse_args([])
    a.reps = reps or (1 if quick else 3)
    if quick:
        a.updates = 20
    group = Group("Data-parallel torch driver: 2 processes against 1", load_before=load())
    m = measure(a)
    ms = {c: f"{1e3 * m['med'][c]:.1f} ms" for c in CASES}
    group.rows.append(
        Row(
            "strong scaling: time per update, 1 process x B streams / 2 processes x B/2",
            m["strong"],
            "x",
            ">= 1.1x",  # issue 17, on a 2-core machine, with one collective per update
            m["strong"] >= 1.1,
            f"{ms['1 x B']} against {ms['2 x B/2']} (comm {1e3 * m['comm']['2 x B/2']:.1f} ms, "
            f"{100 * m['comm']['2 x B/2'] / m['med']['2 x B/2']:.0f}% of an update: the one "
            f"all-reduce of gradients, loss and checks); "
            f"ceiling 1 x B / 1 x B/2 = {m['ideal']:.2f}x",
        )
    )
    group.rows.append(
        Row(
            "weak scaling: time per update, 1 process x B / 2 processes x B each",
            m["weak"],
            "x",
            "-",
            None,
            f"{ms['1 x B']} against {ms['2 x B']} (comm {1e3 * m['comm']['2 x B']:.1f} ms)",
        )
    )
    group.notes.append(describe(a, m) + "; python benchmarks/distributed.py --help for the cases.")
    group.load_after = load()
    return group


def main() -> None:
    a = parser().parse_args()
    if a.worker:
        return worker(a)
    m = measure(a)
    print(describe(a, m))
    print(f"{'case':10s} {'ms/update':>10s} {'comm ms':>8s} {'streams x steps/s':>18s}")
    for c, (nproc, streams) in m["cases"].items():
        rate = nproc * streams * a.k1 / m["med"][c]
        comm = f"{1e3 * m['comm'][c]:8.2f}" if nproc > 1 else f"{'-':>8s}"
        print(f"{c:10s} {1e3 * m['med'][c]:10.2f} {comm} {rate:18,.0f}")
    print(
        f"strong speed-up (1 x B / 2 x B/2): {m['strong']:.2f} (with no cost of running together: "
        f"{m['ideal']:.2f} = 1 x B / 1 x B/2)   weak efficiency (1 x B / 2 x B): {m['weak']:.2f}"
    )


if __name__ == "__main__":
    main()
