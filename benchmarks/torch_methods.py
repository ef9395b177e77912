"""ARTBP, UORO and RTRL in the PyTorch engine against its TBPTT, time per step (issue 15).

Model: the LSTM benchmark size of torch_driver.py, Recurrent(nn.LSTM(m, n), nn.Linear(n, p)) with
l2_loss and SGD, on a stream of random data fed in chunks of 4 k1 steps. Per repetition:

    tbptt       tbptt.torch.TBPTT with Truncation(k, k), k = 32: windows of k steps, one module
                call each; also with 2k (tbptt 2k) and k / 2 (tbptt k/2)
    artbp       tbptt.torch.ARTBP with b = k, c = 1/2: windows of mean length b / c = 2k, made of
                segments of b steps (one module call each: the compensation 1 / (1 - c) is
                applied to the state between two calls)
    artbp k/2   b = k / 2, c = 1/2: windows of mean length k, segments of k / 2 steps
    uoro        tbptt.torch.UORO with k1 = k, on a shorter stream (UORO steps one at a time)
    hand step   the per-step hand-written loop of the same module on the same stream: forward of
                one step, loss, backward, SGD step, the state detached after every step (what
                UORO is priced against: issue 28, goal UORO <= 3x; UORO needs one forward-mode
                pass more than this loop, so about 2x is its limit)
    rtrl        tbptt.torch.RTRL with k1 = k on a small LSTM (n = 16, batch 8), against TBPTT on
                the same small model; at the benchmark size RTRL's J (batch x 2n x |theta|)
                would need gigabytes and is refused
    rtrl model  RTRL's cost model: the influence update (8.3) J_t = (dF/dh) J_{t-1} + dF/dtheta
                is a batched GEMM of 2 B n^2 |theta| flops, plus 2 B n |theta| for dF/dtheta's
                outer products and 2 B n |theta| for (dl/dh) J_{t-1}; the case times that GEMM
                (torch.bmm into a kept buffer, J's shapes) once per step, giving the GEMM rate
                measured at these shapes, and the model is the flops at that rate (issue 28,
                goal RTRL <= 1.5x its model)

Each figure is a ratio of times per step measured side by side (common.interleave). Targets:
ARTBP within 1.2x of TBPTT with the same mean window length, and of TBPTT with the same segments
(its backward covers every step once, as TBPTT(k, k)'s does; it adds the draws, the compensation
at the uncut boundaries and, against TBPTT of its mean window, more module calls). A module call
has a fixed cost (oneDNN's LSTM prepares its weights at every call), so ARTBP with segments
shorter than its windows pays what TBPTT with windows that short pays: the row "artbp k/2" and
its note show it.
"""

from __future__ import annotations

from common import Group, Row, fmt_ms, interleave, load
from torch_driver import BATCH, K1, M, N, P

ARTBP_TARGET, UORO_TARGET, RTRL_TARGET = 1.2, 3.0, 1.5
STREAM, UORO_STREAM, SMALL_N, SMALL_BATCH = 512, 64, 16, 8


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group(
        "PyTorch engine: ARTBP, UORO and RTRL against TBPTT, time per step (issue 15)",
        load_before=load(),
    )
    try:
        import torch

        from tbptt.torch import Recurrent, l2_loss
        from tbptt.torch.methods import make_trainer
    except ImportError as exc:
        group.skipped = f"tbptt.torch is not available ({exc})"
        group.load_after = load()
        return group
    torch.set_num_threads(threads)
    reps = reps or (3 if quick else 5)
    stream = STREAM // 2 if quick else STREAM
    uoro_stream = UORO_STREAM // 2 if quick else UORO_STREAM
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(stream, BATCH, M, generator=gen)  # (T, batch, m)
    ys = torch.randn(stream, BATCH, P, generator=gen)
    chunk = 4 * K1

    def case(method: str, steps: int, n: int = N, batch: int = BATCH, **options):
        def go():
            torch.manual_seed(0)
            net = Recurrent(torch.nn.LSTM(M, n), torch.nn.Linear(n, P))
            opt = torch.optim.SGD(net.parameters(), lr=1e-4)
            d = make_trainer(method, net, opt, **options)
            for i in range(0, steps, chunk):
                d.feed(xs[i : min(i + chunk, steps), :batch], ys[i : min(i + chunk, steps), :batch])
            d.finish()

        return go

    def hand_step(steps: int, n: int = N, batch: int = BATCH):
        def go():
            torch.manual_seed(0)
            net = Recurrent(torch.nn.LSTM(M, n), torch.nn.Linear(n, P))
            opt = torch.optim.SGD(net.parameters(), lr=1e-4)
            state = None
            for i in range(steps):
                out, state = net(xs[i : i + 1, :batch], state)
                loss = l2_loss(out, ys[i : i + 1, :batch]).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                state = tuple(s.detach() for s in state)

        return go

    n_small, theta_small = 2 * SMALL_N, 4 * SMALL_N * (M + SMALL_N + 2)  # J: (batch, n, |theta|)
    Jh = torch.randn(SMALL_BATCH, n_small, n_small, generator=gen)
    J = torch.randn(SMALL_BATCH, n_small, theta_small, generator=gen)
    spare = torch.empty_like(J)

    def rtrl_model():
        for _ in range(uoro_stream):
            torch.bmm(Jh, J, out=spare)

    steps = {
        "tbptt": stream,
        "tbptt 2k": stream,
        "tbptt k/2": stream,
        "artbp": stream,
        "artbp k/2": stream,
        "uoro": uoro_stream,
        "hand step": uoro_stream,
        "tbptt small": stream,
        "rtrl small": uoro_stream,
        "rtrl model": uoro_stream,
    }
    small = {"n": SMALL_N, "batch": SMALL_BATCH}
    cases = {
        "tbptt": case("tbptt", stream, k1=K1),
        "tbptt 2k": case("tbptt", stream, k1=2 * K1),
        "tbptt k/2": case("tbptt", stream, k1=K1 // 2),
        "artbp": case("artbp", stream, c=0.5, b=K1, rng=0),
        "artbp k/2": case("artbp", stream, c=0.5, b=K1 // 2, rng=0),
        "uoro": case("uoro", uoro_stream, k1=K1, rng=0),
        "hand step": hand_step(uoro_stream),
        "tbptt small": case("tbptt", stream, k1=K1, **small),
        "rtrl small": case("rtrl", uoro_stream, k1=K1, **small),
        "rtrl model": rtrl_model,
    }
    try:
        t = interleave(cases, reps=reps)
    except Exception as exc:  # the engine is being written: report, do not crash the suite
        group.skipped = f"the torch methods' benchmarks failed: {type(exc).__name__}: {exc}"
        group.load_after = load()
        return group

    def per_step(a: str, b: str) -> tuple[float, float, float]:
        """The median over repetitions of (a's time per step) / (b's), and its range."""
        r = [
            (ta / steps[a]) / (tb / steps[b]) for ta, tb in zip(t.times[a], t.times[b], strict=True)
        ]
        return t.paired(lambda rep: rep[a] / steps[a] / (rep[b] / steps[b])), min(r), max(r)

    def ms(name: str) -> str:
        return fmt_ms(t.median(name) / steps[name]) + " per step"

    size = f"LSTM({M}, {N}) + Linear({N}, {P}), batch {BATCH}"
    gemm = 2 * SMALL_BATCH * n_small**2 * theta_small  # flops of the influence GEMM per step
    flops = gemm + 4 * SMALL_BATCH * n_small * theta_small  # + dF/dtheta, + (dl/dh) J
    rate = gemm / (t.median("rtrl model") / steps["rtrl model"]) / 1e9
    group.notes.append(
        f"{size}, chunks of {chunk} steps; TBPTT({K1}, {K1}) {ms('tbptt')}, ARTBP(c=1/2, "
        f"b={K1}) {ms('artbp')}, "
        f"UORO {ms('uoro')}, the per-step hand loop {ms('hand step')} (streams of {uoro_stream} "
        f"steps); small model LSTM({M}, {SMALL_N}), batch {SMALL_BATCH}: TBPTT "
        f"{ms('tbptt small')}, RTRL {ms('rtrl small')}, its influence GEMM {ms('rtrl model')} "
        f"({rate:.1f} GFLOP/s); {threads} thread(s); "
        f"{t.contention()}."
    )
    for name, ref, what in (
        ("artbp", "tbptt 2k", f"TBPTT({2 * K1}, {2 * K1}), the same mean window {2 * K1}"),
        ("artbp", "tbptt", f"TBPTT({K1}, {K1}), the same segments of {K1} steps"),
    ):
        r, lo, hi = per_step(name, ref)
        group.rows.append(
            Row(
                f"ARTBP(c=1/2, b={K1}) / {what}, time per step",
                r,
                "x",
                f"<= {ARTBP_TARGET}x",
                r <= ARTBP_TARGET,
                f"per-repetition range {lo:.2f}-{hi:.2f}",
            )
        )
    r, lo, hi = per_step("artbp k/2", "tbptt")
    calls, _, _ = per_step("tbptt k/2", "tbptt")
    group.rows.append(
        Row(
            f"ARTBP(c=1/2, b={K1 // 2}) / TBPTT({K1}, {K1}), time per step, the same mean "
            f"window {K1}",
            r,
            "x",
            "",
            None,
            f"per-repetition range {lo:.2f}-{hi:.2f}; segments of {K1 // 2} steps: TBPTT"
            f"({K1 // 2}, {K1 // 2}) / TBPTT({K1}, {K1}) is {calls:.2f}x",
        )
    )
    r, lo, hi = per_step("uoro", "hand step")
    group.rows.append(
        Row(
            f"UORO (k1={K1}) / the per-step hand loop (forward, loss, backward, SGD step, "
            "state detached every step), time per step",
            r,
            "x",
            f"<= {UORO_TARGET}x",
            r <= UORO_TARGET,
            f"per-repetition range {lo:.2f}-{hi:.2f}; the step once with its tangent, one "
            f"backward pass for both cotangents, three passes over theta~ ({BATCH} x |theta| "
            "entries) per step",
        )
    )
    r, lo, hi = per_step("uoro", "tbptt")
    group.rows.append(
        Row(
            f"UORO (k1={K1}) / TBPTT({K1}, {K1}), time per step",
            r,
            "x",
            "",
            None,
            f"per-repetition range {lo:.2f}-{hi:.2f}; no target: TBPTT runs a window of "
            f"{K1} steps in one module call",
        )
    )
    model = (t.median("rtrl model") / steps["rtrl model"]) * flops / gemm  # seconds per step
    r = t.paired(lambda rep: rep["rtrl small"] / steps["rtrl small"] / model)
    each = [a / steps["rtrl small"] / model for a in t.times["rtrl small"]]
    group.rows.append(
        Row(
            f"RTRL (k1={K1}) / its cost model (the influence update's flops at the GEMM rate "
            f"measured at J's shapes), time per step, LSTM({M}, {SMALL_N}), batch {SMALL_BATCH}",
            r,
            "x",
            f"<= {RTRL_TARGET}x",
            r <= RTRL_TARGET,
            f"per-repetition range {min(each):.2f}-{max(each):.2f}; {flops / 1e6:.1f} MFLOP per "
            f"step at {rate:.1f} GFLOP/s: {fmt_ms(model)} per step",
        )
    )
    r, lo, hi = per_step("rtrl small", "tbptt small")
    n_state, theta = 2 * N, 4 * N * (M + N + 2)
    need = 3 * BATCH * n_state * theta * 4 / 2**30
    group.rows.append(
        Row(
            f"RTRL (k1={K1}) / TBPTT({K1}, {K1}), time per step, LSTM({M}, {SMALL_N}), batch "
            f"{SMALL_BATCH}",
            r,
            "x",
            "",
            None,
            f"per-repetition range {lo:.2f}-{hi:.2f}; no target (TBPTT runs a window in one "
            f"call); at the benchmark size J would need "
            f"{need:.1f} GiB (refused)",
        )
    )
    group.load_after = load()
    return group
