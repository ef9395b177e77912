"""examples/ppo_recurrent.py beside sb3-contrib's RecurrentPPO on CartPoleNoVel-v1 (issue 26).

    python benchmarks/rl_ppo.py --seeds 1 2 3                 both sides, about 40 minutes
    python benchmarks/rl_ppo.py --seeds 1 --sides ours        one side only

Each run is its own process, the command a user types (python examples/ppo_recurrent.py --seed
S; python benchmarks/sb3_recurrent_ppo.py --seed S), both with one torch thread: on 2 shared
cores a second thread mostly waits for the other jobs. The sides alternate seed by seed, so both
see the same conditions. For each run: the environment steps and the eval return (the mean of the
same 100 greedy episodes, reset with seeds 10**6 + 1000 S + i) from the run's last two lines, the
wall time of the whole process (imports, training, the 100 episodes), its CPU time (what the
process itself used: less disturbed by other jobs), and the 1-minute load average before and
after. Prints a line per run as it ends, then a Markdown table. Needs the bench extra.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIDES = {
    "ours": (os.path.join(ROOT, "examples", "ppo_recurrent.py"), ["--plot", ""]),
    "sb3": (os.path.join(HERE, "sb3_recurrent_ppo.py"), []),
}
NAMES = {"ours": "examples/ppo_recurrent.py", "sb3": "sb3-contrib RecurrentPPO (zoo settings)"}


def run(side: str, seed: int) -> dict:
    script, extra = SIDES[side]
    cmd = [sys.executable, script, "--seed", str(seed), "--threads", "1", *extra]
    load0, cpu0 = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = proc.stdout.strip().splitlines()
    steps = int(lines[-2].split(":")[1]) if len(lines) >= 2 else -1
    ret = float(lines[-1].split(":")[1]) if len(lines) >= 2 else float("nan")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "side": side, "seed": seed, "steps": steps, "return": ret, "wall": wall, "cpu": cpu,
        "load": (load0, os.getloadavg()[0]), "status": proc.returncode,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (1 2 3)")
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES), help="who")
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for side in args.sides:
            r = run(side, seed)
            rows.append(r)
            print(
                f"{side} seed {seed}: env steps {r['steps']}, eval return {r['return']:.1f}, "
                f"{r['wall']:.0f} s wall, {r['cpu']:.0f} s CPU, load {r['load'][0]:.1f} -> "
                f"{r['load'][1]:.1f}, exit status {r['status']}",
                flush=True,
            )
    print()
    print("| run | seed | env steps | eval return | wall s | CPU s | load before, after | exit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {NAMES[r['side']]} | {r['seed']} | {r['steps']:,} | {r['return']:.1f} | "
            f"{r['wall']:.0f} | {r['cpu']:.0f} | {r['load'][0]:.1f}, {r['load'][1]:.1f} | "
            f"{r['status']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
