"""minGRU and LRU scans against their floors, nn.GRU and their own step loops (issue 27).

One chunk of T = 256 steps, batch 32, width H = 256 (the LRU: m = H = 256), float32 on the CPU;
each case is forward + backward of the chunk from a materialized upstream gradient (as a layer
above would pass it), input gradient included. Per repetition, interleaved (common.interleave):

    scan        tbptt.torch.MinGRU / LRU over the whole chunk (one scan per direction)
    floor       the same input projections and gates with no recurrence: MinGRU's
                z * linear_h(x), z = sigmoid(linear_z(x)); the LRU's gamma B x (one real product
                into (re, im) pairs) read out through C (one real product) and D
    step loop   the same layer called once per step, layer(x[t:t+1], state), a Python loop
    nn.GRU      torch's GRU of the same width (oneDNN's fused kernel)

Targets: MinGRU within 1.5x of its floor and at least 3x faster than nn.GRU; the LRU within 1.5x
of its floor. Peak memory: torch's CPU allocations during one forward + backward, from the
profiler's allocation events (torch.profiler, profile_memory=True): the largest sum of bytes
allocated and not yet freed, counted from the call's start (parameters, inputs and their
existing .grad excluded); measured once per case, outside the timed repetitions.
"""

from __future__ import annotations

from common import Group, Row, fmt_ms, interleave, load

T, BATCH, H = 256, 32, 256
FLOOR_TARGET, GRU_TARGET = 1.5, 3.0


def peak_bytes(fn) -> int:
    """Peak bytes torch allocates while fn runs, beyond what was live when it started."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cases(
    torch, F, layers, device: str = "cpu", steps: int = T, batch: int = BATCH, width: int = H
) -> dict:
    """The seven cases, each forward + backward of one chunk.

    The layers and the chunk are made on the CPU (the same values on every device), then moved
    to `device`; the gpu group (gpu.py) passes its device, and its test smaller sizes.
    """
    MinGRU, LRU = layers
    T, H = steps, width
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, batch, H, generator=gen).to(device).requires_grad_()  # (T, batch, H)
    gy = torch.randn(T, batch, H, generator=gen).to(device)  # what a layer above passes down
    torch.manual_seed(0)
    mingru, lru, gru = (layer.to(device) for layer in (MinGRU(H, H), LRU(H, H), torch.nn.GRU(H, H)))

    def run(layer):
        return lambda: layer(x)[0].backward(gy)

    def loop(layer):
        def go():
            state, outs = None, []
            for t in range(T):
                out, state = layer(x[t : t + 1], state)
                outs.append(out)
            torch.cat(outs).backward(gy)

        return go

    def mingru_floor():
        z = torch.sigmoid(mingru.linear_z(x))  # (T, batch, H)
        (z * mingru.linear_h(x)).backward(gy)

    def lru_floor():
        g = torch.exp(lru.gamma_log)[:, None]  # (H, 1)
        WB = torch.stack((g * lru.B_re, g * lru.B_im), 1).reshape(2 * H, H)
        WC = torch.stack((lru.C_re, -lru.C_im), 2).reshape(H, 2 * H)
        torch.addcmul(F.linear(F.linear(x, WB), WC), x, lru.D).backward(gy)  # (T, batch, H)

    return {
        "mingru": run(mingru),
        "mingru floor": mingru_floor,
        "nn.GRU": run(gru),
        "mingru loop": loop(mingru),
        "lru": run(lru),
        "lru floor": lru_floor,
        "lru loop": loop(lru),
    }


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group(
        f"Scans: minGRU and LRU against their floors, nn.GRU and step loops (T={T}, batch "
        f"{BATCH}, H={H}; issue 27)",
        load_before=load(),
    )
    import torch  # run.py reports a group whose imports fail as skipped, with the reason
    import torch.nn.functional as F

    from tbptt.torch import LRU, MinGRU

    torch.set_num_threads(threads)
    reps = reps or (3 if quick else 9)
    fns = cases(torch, F, (MinGRU, LRU))
    memory = {name: peak_bytes(fn) / 2**20 for name, fn in fns.items()}
    t = interleave(fns, reps=reps)

    def ratio(slow: str, fast: str) -> tuple[float, str]:
        lo, hi = t.spread(slow, fast)
        mem = f"peak memory {memory[slow]:.0f} MiB against {memory[fast]:.0f} MiB"
        medians = f"medians {fmt_ms(t.median(slow))} and {fmt_ms(t.median(fast))}"
        return t.ratio(slow, fast), f"per-repetition range {lo:.2f}-{hi:.2f}; {medians}; {mem}"

    for name, slow, fast, target in (
        ("MinGRU scan / its floor", "mingru", "mingru floor", FLOOR_TARGET),
        ("nn.GRU / MinGRU scan", "nn.GRU", "mingru", GRU_TARGET),
        ("MinGRU step loop / scan", "mingru loop", "mingru", None),
        ("LRU scan / its floor", "lru", "lru floor", FLOOR_TARGET),
        ("LRU step loop / scan", "lru loop", "lru", None),
    ):
        r, note = ratio(slow, fast)
        if target is None:
            row = Row(f"{name}, forward + backward", r, "x", "", None, note)
        elif slow == "nn.GRU":
            row = Row(f"{name}, forward + backward", r, "x", f">= {target:g}x", r >= target, note)
        else:
            row = Row(f"{name}, forward + backward", r, "x", f"<= {target:g}x", r <= target, note)
        group.rows.append(row)
    group.notes.append(
        f"float32, {threads} threads; {t.contention()}. Peak memory: torch's CPU allocations "
        "during one forward + backward (profiler allocation events, profile_memory=True), beyond "
        "what was live before the call."
    )
    group.load_after = load()
    return group
