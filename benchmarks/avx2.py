"""Issue 17's rows again as an AVX2-only CPU runs them: a child process with every library held
to AVX2, so that one machine covers both kinds of CPU.

    OPENBLAS_CORETYPE=Haswell          numpy's OpenBLAS kernels (read when numpy loads)
    ATEN_CPU_CAPABILITY=avx2           torch's kernels
    XLA_FLAGS=--xla_cpu_max_isa=AVX2   JAX's compiler (XLA CPU backend of jaxlib 0.10)
    NUMBA_CPU_NAME=haswell             tbptt's compiled loops (numba), with
    NUMBA_CPU_FEATURES=""              the CPU's own features: numba otherwise keeps the host's

The child runs exact BPTT at batch 1 against JAX (bptt.py), the demo's throughput rows
(demo_throughput.py: integer inputs, the torch engine against nn.RNN) and the online cost rows at
batch 1 (tbptt_cost.py), and prints its rows as JSON; the parent reports them marked "AVX2".

    python benchmarks/avx2.py          the child's rows, as run.py's avx2 group reports them
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from common import Group, Row, load

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {
    "OPENBLAS_CORETYPE": "Haswell",
    "ATEN_CPU_CAPABILITY": "avx2",
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "",  # unset, numba would add the host's features (AVX-512) to haswell
}


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group("Issue 17's rows with AVX2-only settings (a child process)", load_before=load())
    env = {**os.environ, **SETTINGS}
    args = ["--child", str(int(quick)), str(reps or 0), str(threads)]
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        group.skipped = f"the child failed ({out.returncode}): {out.stderr.strip()[-300:]}"
        return group
    result = json.loads(out.stdout.strip().splitlines()[-1])
    group.rows = [Row(**{**r, "name": "AVX2: " + r["name"]}) for r in result["rows"]]
    group.notes = [
        "Settings: " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()) + ".",
        *result["notes"],
    ]
    group.load_after = load()
    return group


def child(quick: bool, reps: int | None, threads: int) -> dict:
    import bptt
    import common
    import demo_throughput
    import tbptt_cost

    common.prepare_jax(threads)
    common.set_blas_threads(threads)
    import torch

    torch.set_num_threads(threads)
    group = Group("avx2")
    bptt.compare(group, bptt.CONFIGS[0], max(reps or 15, 15) if not quick else reps or 5)
    demo = demo_throughput.run(quick, reps, threads)
    cost = Group("cost")
    tbptt_cost.one_config(cost, tbptt_cost.CONFIGS[0], max(reps or 15, 15) if not quick else 5)
    rows = (
        group.rows
        + [r for r in demo.rows if r.target]
        + [r for r in cost.rows if "online" in r.name]
    )
    blas = common.blas_info()
    notes = [
        f"numpy BLAS kernel {blas.get('kernel', '?')}; torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {common.compiled_loops()}.",
        *group.notes,
        *demo.notes,
        *cost.notes,
    ]
    return {"rows": [r.__dict__ for r in rows], "notes": notes}


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        quick, reps, threads = bool(int(sys.argv[2])), int(sys.argv[3]) or None, int(sys.argv[4])
        print(json.dumps(child(quick, reps, threads)))
    else:
        g = run(False, None, 2)
        for r in g.rows:
            print(f"{r.name}: {r.shown()} {r.target} {r.verdict()} ({r.note})")
        print("\n".join(g.notes) or g.skipped)
