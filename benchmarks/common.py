"""Timing utilities shared by the benchmarks: interleaved repetitions, medians, thread control.

Other engineers share the machine, so no absolute time is a result. Every figure is a ratio
measured side by side in the same run: each repetition runs every case once, in an order rotated
from one repetition to the next, so a burst of load hits all cases alike, and gives one ratio of
two times taken moments apart; the figure is the median of these ratios over the repetitions.
The load average is recorded with every group.

Thread counts are kept equal across libraries: OpenBLAS (numpy) through its own C API (or
threadpoolctl when installed), torch through torch.set_num_threads, JAX through XLA_FLAGS set
before jax is first imported. OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are reported, never changed.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# -- threads and the BLAS kernel ----------------------------------------------------------------


def _openblas_lib() -> tuple[ctypes.CDLL, str, str] | None:
    """numpy's bundled OpenBLAS and its symbol prefix/suffix (scipy_openblas64 renames them)."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
    libs += glob.glob(os.path.join(os.path.dirname(np.__file__), ".libs", "*openblas*.so*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (
            ("scipy_openblas_", "64_"),
            ("scipy_openblas_", ""),
            ("openblas_", ""),
        ):
            if hasattr(lib, f"{prefix}get_corename{suffix}"):
                return lib, prefix, suffix
    return None


def set_blas_threads(n: int) -> None:
    """Set numpy's BLAS thread count (threadpoolctl when available, else OpenBLAS's C API)."""
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(n, user_api="blas")
        return
    except ImportError:
        pass
    found = _openblas_lib()
    if found is None:
        raise RuntimeError("cannot find numpy's OpenBLAS to set its thread count")
    lib, prefix, suffix = found
    getattr(lib, f"{prefix}set_num_threads{suffix}")(ctypes.c_int(n))


def blas_info() -> dict[str, str]:
    """Which BLAS numpy uses, its kernel (core type), thread count, and the OpenBLAS variables."""
    info = {
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
    }
    try:
        import threadpoolctl

        for pool in threadpoolctl.threadpool_info():
            if pool.get("user_api") == "blas":
                info["blas"] = f"{pool.get('internal_api')} {pool.get('version')}"
                info["kernel"] = str(pool.get("architecture"))
                info["threads"] = str(pool.get("num_threads"))
                return info
    except ImportError:
        pass
    found = _openblas_lib()
    if found is None:
        info["blas"] = "unknown (not OpenBLAS)"
        return info
    lib, prefix, suffix = found
    for key, name in (("kernel", "get_corename"), ("blas", "get_config")):
        fn = getattr(lib, f"{prefix}{name}{suffix}")
        fn.restype = ctypes.c_char_p
        info[key] = fn().decode().strip()
    info["threads"] = str(getattr(lib, f"{prefix}get_num_threads{suffix}")())
    return info


def numba_off(fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with tbptt's compiled loops switched off (TBPTT_NUMBA=0): the numpy reference."""

    def run() -> object:
        old = os.environ.get("TBPTT_NUMBA")
        os.environ["TBPTT_NUMBA"] = "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["TBPTT_NUMBA"]
            else:
                os.environ["TBPTT_NUMBA"] = old

    return run


def compiled_loops() -> str:
    """Whether tbptt's per-step loops run compiled here, for the notes."""
    from tbptt.numpy import fast

    if fast.compiled() is None:
        return "tbptt's compiled loops: off (numba not installed, or TBPTT_NUMBA=0)"
    import numba

    cpu = numba.config.CPU_NAME or "host"
    return f"tbptt's compiled loops: numba {numba.__version__} (NUMBA_CPU_NAME={cpu})"


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def prepare_jax(n: int) -> None:
    """XLA's CPU thread pool: multi-threaded Eigen when n > 1. Must run before jax is imported."""
    flag = f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def load() -> str:
    """The 1, 5, 15 minute load averages, as `uptime` prints them."""
    return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def git_state(root: str) -> str:
    """The commit of the work tree and whether it had uncommitted changes in src/."""
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + (" with uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


# -- interleaved repetitions --------------------------------------------------------------------


SETTLE = 0.15  # seconds of sleep before each sample: OpenBLAS's idle threads spin ~30 ms


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class Quiet:
    """Wait (boundedly) until the other processes on the machine leave the CPUs mostly idle.

    Two threads per library on two shared cores: when another job takes a core, every barrier
    of a multi-threaded BLAS or OpenMP region waits for a descheduled thread, and one library
    can be slowed ten times more than another. Before each sample we read /proc/stat over
    `window` seconds (our own process sleeps meanwhile) and wait while more than `max_busy` of
    the machine is in use, at most `timeout` seconds per sample and `budget` in all.
    """

    def __init__(
        self,
        max_busy: float = 0.3,
        window: float = SETTLE,
        timeout: float = 10.0,
        budget: float = 150,
    ) -> None:
        self.max_busy, self.window, self.timeout, self.budget = max_busy, window, timeout, budget
        self.waited = 0.0

    def busy(self) -> float:
        """Fraction of all CPUs used by others over the next `window` seconds."""
        try:
            b0, t0 = _cpu_ticks()
            time.sleep(self.window)
            b1, t1 = _cpu_ticks()
        except OSError:  # not Linux: no /proc/stat
            return 0.0
        return (b1 - b0) / max(t1 - t0, 1)

    def wait(self) -> float:
        """Wait for a quiet machine; returns the busy fraction seen last."""
        start = time.perf_counter()
        busy = self.busy()
        while busy > self.max_busy and self.waited + time.perf_counter() - start < self.budget:
            if time.perf_counter() - start > self.timeout:
                break
            busy = self.busy()
        self.waited += time.perf_counter() - start
        return busy


QUIET = Quiet()


@dataclass
class Timings:
    """Seconds per repetition for each case, all measured in the same interleaved run."""

    times: dict[str, list[float]]
    busy: list[float] = field(default_factory=list)  # others' CPU use just before each sample

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, slow: str, fast: str) -> float:
        """How many times faster `fast` is: the median over repetitions of slow / fast.

        Each repetition's two times were taken moments apart, so their ratio is paired against
        the load of that moment; the median over repetitions discards the disturbed ones.
        """
        return self.paired(lambda t: t[slow] / t[fast])

    def paired(self, fn: Callable[[dict[str, float]], float]) -> float:
        """The median over repetitions of fn({case: seconds in that repetition})."""
        names = list(self.times)
        reps = len(self.times[names[0]])
        return statistics.median(fn({k: self.times[k][i] for k in names}) for i in range(reps))

    def contention(self) -> str:
        """Other processes' CPU use sampled just before the samples."""
        if not self.busy:
            return ""
        b = sorted(self.busy)
        med, top = 100 * statistics.median(b), 100 * b[-1]
        return f"others' CPU use before samples: median {med:.0f}%, max {top:.0f}%"

    def spread_of(self, fn: Callable[[dict[str, float]], float]) -> tuple[float, float]:
        """Smallest and largest over repetitions of fn({case: seconds in that repetition})."""
        names = list(self.times)
        values = [
            fn({k: self.times[k][i] for k in names}) for i in range(len(self.times[names[0]]))
        ]
        return min(values), max(values)

    def spread(self, slow: str, fast: str) -> tuple[float, float]:
        """Smallest and largest per-repetition ratio slow/fast (paired within a repetition)."""
        r = [a / b for a, b in zip(self.times[slow], self.times[fast], strict=True)]
        return min(r), max(r)


def interleave(
    cases: dict[str, Callable[[], object]], reps: int, warmup: int = 1, inner: int = 1
) -> Timings:
    """Run every case `reps` times, interleaved, each repetition in a rotated order.

    Each case is called `warmup` times first (not timed). A timed sample is `inner` consecutive
    calls divided by `inner` (for calls too short to time alone). Before each sample the process
    sleeps SETTLE seconds: after a multi-threaded call, OpenBLAS's worker threads spin for tens of
    milliseconds (torch's OpenMP threads a few), and on two cores a spinning thread left by one
    library would slow the next case measured. The wait for a quiet machine (QUIET) samples the
    CPUs for that long before every sample. The garbage collector is off while timing.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    t = Timings({name: [] for name in names})
    times = t.times
    enabled = gc.isenabled()
    try:
        for r in range(reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn = cases[name]
                gc.collect()
                t.busy.append(QUIET.wait())  # sleeps at least SETTLE while it samples
                gc.disable()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - t0) / inner)
                gc.enable()
    finally:
        if enabled:
            gc.enable()
        else:
            gc.disable()
    return t


# -- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured figure against its target."""

    name: str  # what is compared
    value: float  # the measured ratio (or fraction)
    unit: str  # "x" for a ratio, "%" for a fraction shown as percent
    target: str  # the target in words, e.g. ">= 3x"
    met: bool | None  # None: no target for this row
    note: str = ""  # spread, medians, how it was measured

    def shown(self) -> str:
        if self.unit == "%":
            return f"{100 * self.value:.1f}%"
        if self.unit == "x":
            return f"{self.value:.2f}x"
        return f"{self.value:,.0f} {self.unit}"

    def verdict(self) -> str:
        if self.met is None:
            return "-"
        return "met" if self.met else "**missed**"


@dataclass
class Group:
    """What one benchmark group reports: rows against targets, free notes, the load around it."""

    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the whole group did not run
    load_before: str = ""
    load_after: str = ""
    seconds: float = 0.0


def fmt_ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def note_medians(t: Timings, *names: str) -> str:
    """'name median, ...' for the row's note."""
    return "; ".join(f"{n} {fmt_ms(t.median(n))}" for n in names)
