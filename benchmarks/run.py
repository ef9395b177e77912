"""Run the benchmark suite and write docs/performance.md (issue 6). `make bench` calls this.

    python benchmarks/run.py --out docs/performance.md          everything, about 10 minutes
    python benchmarks/run.py --quick                            fewer repetitions, shorter runs
    python benchmarks/run.py --groups bptt,tbptt_cost           some groups only, to stdout

Every figure is a ratio of medians over interleaved repetitions measured in the same run (see
common.py); no absolute time is compared with another run. The report records the load average
around each group and the other processes' CPU use sampled before each repetition.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

GROUPS = {  # name: (module, what it measures)
    "bptt": ("bptt", "exact BPTT: numpy engine against nn.RNN, an eager torch loop and JAX"),
    "tbptt_cost": ("tbptt_cost", "TBPTT(k1, k2) against its cost model, numpy engine"),
    "unbiased": ("unbiased_cost", "RTRL, UORO and ARTBP against their cost models, numpy engine"),
    "torch": ("torch_driver", "the PyTorch engine's driver against hand-written loops"),
    "torch_methods": ("torch_methods", "ARTBP, UORO and RTRL in the PyTorch engine against TBPTT"),
    "memory": ("memory", "peak memory of streaming training against stream length"),
    "demo": ("demo_throughput", "the default demo's characters per second"),
    "distributed": ("distributed", "the torch driver under torchrun: 2 processes against 1"),
    "lightning": ("lightning_overhead", "tbptt.lightning's time per update against the driver"),
    "rl": ("rl", "tbptt.torch.rl's rollout layouts against the per-step masked loop and the limit"),
    "scan": ("scan", "minGRU and LRU scans against their floors, nn.GRU and step loops"),
    "gpu": ("gpu", "the torch engine on CUDA: driver, rollouts, scans, UORO, engines (or skipped)"),
    "avx2": (
        "avx2",
        "issue 17's batch-1, integer-input and torch-engine rows with AVX2-only settings",
    ),
}

INTRO = """\
# Performance

What `make bench` (`python benchmarks/run.py --out docs/performance.md`) measured on this machine,
against the targets of issues 6 and 17. The machine has 2 cores shared with other jobs, so no
absolute time means anything from one run to the next: every figure below is a **ratio measured side
by side in the same run, the median over interleaved repetitions** (each repetition runs every case
once, in an order rotated from one repetition to the next, and gives one ratio of two times taken
moments apart; the table shows the median of these ratios, the details their range). numpy
(OpenBLAS), torch (`torch.set_num_threads`) and JAX (`XLA_FLAGS`) all use the same number of
threads. Absolute medians in the details are for orientation only.

Before each timed sample the suite waits, for a bounded time, until other processes leave the
CPUs mostly idle; the CPU use it saw and the load average around each group are recorded. With
two threads per library on two shared cores, a busy neighbour slows a multi-threaded library
far more than a single-threaded one, so rows measured while others were busy deserve less trust.
Known sensitivities: OpenBLAS's two-thread products of one recurrent step (batch 32 and 64) can
run several times slower while another job holds a core, and JAX much less so, so the
batch-32 "jax / numpy" and the batch-64 GEMM-efficiency rows swing from run to run on a busy
machine (a per-repetition range reaching far below the median shows it); the batch-1 rows,
the cost-model rows and the memory rows are stable. `python benchmarks/profile_numpy.py`
breaks the numpy engine's time into phases and audits the float32 path.

At batch 1 every numpy call handles one row of n numbers, so the numpy loops are a count of calls
more than of arithmetic. With numba installed (the `fast` extra, also in `bench`), a single
stream's forward and backward loops run compiled (`src/tbptt/compiled.py`); rows marked "numpy
loops" repeat a measurement with `TBPTT_NUMBA=0`, the numpy reference:

- Exact BPTT against JAX. The numpy loops cost three calls per step each way (the n x n
  matrix-vector product, about 1.1 us at n = 128, the add of B x_t and f, about 0.35 us each), a
  floor near 1.8 ms for 500 steps before the stacked products, where jax.jit compiles the whole
  loop into one call. The compiled loops do a step in about 1 us each way.
- Online TBPTT against its cost model. The model prices steps only. Each update also steps the
  optimizer, takes the gradient norm and checks the new parameters (a pass or two over all
  n^2 + 2 n m of them, about the work of one or two recurrent steps at batch 1), and does its
  stacked products over k1 = 20 rows, at a fraction of the rate the model measured over 500. The
  "us per update beyond the model" in the details is that fixed cost: at batch 1 a large
  fraction of the modelled work of an update, and larger still with the compiled loops, which
  make the modelled steps cheaper but not the per-update work; at batch 32 it is within the noise.
- The architecture of issue 23 (one trainer shell per engine, each method a rule it holds) at no
  cost in speed, measured side by side with the code before it (7e7ccd9, then main at a3fd5d5,
  alternating, 2026-12-07 11:58-12:11 UTC, the machine otherwise idle, load average 0.4-1.6).
  `python benchmarks/run.py --groups torch`, twice each: driver / hand-written detach loop
  1.03x and 1.03x before, 1.09x and 1.03x after (ranges 0.74-1.69 and 0.73-1.37); the forum
  snippet / driver at k2 = 128 3.67x, 3.63x before, 3.82x, 3.59x after. `python
  benchmarks/run.py --groups tbptt_cost --quick --reps 7`, three times each, the median of the
  three (numpy online, time / cost model): batch 1 with numba, k2 = 20, 40, 80: 2.50x, 2.30x,
  1.77x before, 2.07x, 1.61x, 1.43x after (issue 28's compiled update included); batch 1 with
  numpy loops: 1.74x, 1.53x, 1.15x before, 1.85x, 1.48x, 1.08x after; batch 32: 0.87x, 0.85x,
  0.79x before, 0.80x, 0.77x, 0.77x after.

The `avx2` group repeats issue 17's rows in a child process with every library held to AVX2
(`OPENBLAS_CORETYPE=Haswell`, `ATEN_CPU_CAPABILITY=avx2`, `XLA_FLAGS=--xla_cpu_max_isa=AVX2`,
`NUMBA_CPU_NAME=haswell` with `NUMBA_CPU_FEATURES=""`), so one machine covers both kinds of CPU.

Targets are checked here and reported, never asserted in tests. The benchmarks live in
`benchmarks/` (one file per group; `python benchmarks/run.py --help`).

## The GPU group

`python benchmarks/run.py --group gpu` measures the torch engine on a CUDA device
(`benchmarks/gpu.py`, issue 28): the driver against the hand-written loops on nn.LSTM (k1 = k2,
and the forum's snippet with k2 = 4 k1 > k1), rollouts packed by `tbptt.torch.rl` against the
per-step masked loop, `tbptt.torch.MinGRU` and `LRU` against `nn.GRU`, UORO against a plain
per-step loop, and the torch engine against the numpy engine at batch 64. It runs the CPU groups'
cases with the device as a parameter, each case followed by `torch.cuda.synchronize()`, and is
sized to finish within five minutes on a GPU. Its rows join the Results table with the CPU groups'
targets beside them; the issues set none for a GPU. Without CUDA the group says it is skipping
(so `make bench` here skips it). **No GPU figures exist yet**: no machine these figures came from
has had a GPU. `TBPTT_BENCH_DEVICE=cpu` runs the group on the CPU anyway, and
`TBPTT_BENCH_TINY=1` with tiny sizes, as its test does (tests/test_bench_gpu.py); those figures
are not GPU figures.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=(
            "Run tbptt's benchmarks (issue 6) and write a Markdown report of measured ratios "
            "against their targets. Groups: "
            + "; ".join(f"{k}: {v[1]}" for k, v in GROUPS.items())
            + "."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--groups",
        "--group",
        default=",".join(GROUPS),
        help="comma-separated groups to run, from: " + ", ".join(GROUPS) + " (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions and shorter streams (a few minutes; noisier figures)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions per case (default: each group's own, fewer with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads for numpy's BLAS, torch and JAX alike (default: 2)",
    )
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.3,
        help="before each repetition, wait (at most 10 s, 150 s in all) while other processes "
        "use more than "
        "this fraction of the CPUs; 1 disables the wait (default: 0.3)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="write the report here (atomically); default: print it to stdout",
    )
    args = parser.parse_args(argv)
    names = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in names if g not in GROUPS]
    if unknown or not names:
        parser.error(f"--groups: unknown {unknown or 'empty'}; choose from {', '.join(GROUPS)}")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.groups = names
    return args


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The vector instruction sets the CPU reports (what decides BLAS kernels and torch's paths)."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in wanted if f in have) or "none of " + " ".join(wanted)
    except OSError:
        pass
    return "unknown (no /proc/cpuinfo)"


def render(groups: list, env: dict[str, str]) -> str:
    from common import fmt_ms

    out = [INTRO]
    out.append("## Results\n")
    out.append(f"Produced by `{env['command']}` in {env['elapsed']}; {env['load']} at the start.\n")
    out.append("| group | comparison | measured | target | verdict | details |")
    out.append("|---|---|---|---|---|---|")
    for g in groups:
        short = g.title.split(":")[0].split(" (")[0]
        if g.skipped:
            out.append(f"| {short} | (not run) | - | - | skipped | {g.skipped} |")
        for r in g.rows:
            out.append(
                f"| {short} | {r.name} | {r.shown()} | {r.target or '-'} | {r.verdict()} | "
                f"{r.note} |"
            )
    out.append("")
    for g in groups:
        out.append(f"## {g.title}\n")
        if g.skipped:
            out.append(f"Skipped: {g.skipped}\n")
        for note in g.notes:
            if note:
                out.append(f"- {note}")
        out.append(f"- Ran {fmt_ms(g.seconds)}; {g.load_before} before, {g.load_after} after.\n")
    out.append("## Environment\n")
    for k, v in env.items():
        if k not in ("command", "elapsed"):
            out.append(f"- {k}: {v}")
    out.append("")
    return "\n".join(out)


def write_atomic(path: str, text: str) -> None:
    """The report, written whole or not at all (tbptt.files.atomic_write)."""
    from tbptt.files import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import common

    common.prepare_jax(args.threads)  # before anything imports jax
    common.set_blas_threads(args.threads)
    common.QUIET.max_busy = args.max_busy
    blas = common.blas_info()
    start, start_load = time.perf_counter(), common.load()
    groups = []
    for name in args.groups:
        module, what = GROUPS[name]
        print(f"[{name}] {what} ... ({common.load()})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            group = importlib.import_module(module).run(args.quick, args.reps, args.threads)
        except Exception as exc:  # the code under test is moving: report, run the other groups
            traceback.print_exc()
            group = common.Group(what, skipped=f"failed: {type(exc).__name__}: {exc}")
        group.seconds = time.perf_counter() - t0
        groups.append(group)
        for r in group.rows:
            print(f"  {r.name}: {r.shown()} {r.target} {r.verdict()}", file=sys.stderr)
        if group.skipped:
            print(f"  skipped: {group.skipped}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = {
        "command": cmd.strip(),
        "elapsed": common.fmt_ms(elapsed),
        "load": start_load,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}",
        "CPU flags": cpu_flags(),
        "code": common.git_state(ROOT),
        "python": platform.python_version(),
        "packages": ", ".join(
            f"{d} {version(d)}" for d in ("numpy", "torch", "jax", "jaxlib", "lightning", "tbptt")
        ),
        "numpy BLAS": f"{blas.get('blas', '?')}; kernel {blas.get('kernel', '?')}; "
        f"{blas.get('threads', '?')} threads",
        "OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE": f"{blas['OPENBLAS_CORETYPE']} / "
        f"{blas['OPENBLAS_L2_SIZE']} (reported, not changed)",
        "threads": f"{args.threads} for numpy, torch and JAX "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')})",
        "waiting for a quiet machine": f"{common.fmt_ms(common.QUIET.waited)} in all "
        f"(threshold {100 * args.max_busy:.0f}% of the CPUs)",
    }
    report = render(groups, env)
    if args.out:
        write_atomic(args.out, report)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
