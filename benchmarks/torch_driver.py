"""The PyTorch engine's driver against hand-written loops and its cost model (issue 6, targets 2,
3).

Model: Recurrent(nn.LSTM(m, n), nn.Linear(n, p)) with l2_loss, SGD, on a stream of random data
fed in chunks of 4 k1 steps (so the driver makes the same module calls as the hand-written loop;
a row with chunks of 100 steps, not aligned with k1, shows the cost of the extra calls at chunk
ends). Every loop sums the injected losses over steps and streams, as the contract's L does, and
steps the same optimizer.

    hand        the detach-every-k loop of word_language_model: one module call per k steps,
                backward, step, state.detach()            (k1 = k2 = k)
    driver      tbptt.torch.TBPTT(module, Truncation(k1, k2, inject), optimizer, loss_fn=l2_loss)
    forum       the PyTorch forum's TBPTT snippet: one module call per step, a list of
                (state_in, state_out) for the last k2 steps; every k1 steps backward the last
                loss, then chain the state gradient back step by step with retain_graph
                (inject="last": it uses only the loss of the update step). Its update is applied
                through .data, as torch.optim did when the snippet was written; a torch.optim
                step in place would invalidate the kept graphs (the driver keeps parameter
                copies for that, SEMANTICS.md 5).

Cost model (as for the numpy engine): f and b per step from one module call over the whole
stream, forward (with the graph) and forward + backward; model = f T + b backward_steps(T).
"""

from __future__ import annotations

from dataclasses import dataclass

from common import Group, Row, Timings, interleave, load


def import_engine():
    """tbptt.torch's agreed API, or the reason it is not there."""
    try:
        from tbptt.torch import TBPTT, Recurrent, l2_loss

        return (TBPTT, Recurrent, l2_loss), None
    except ImportError as exc:
        return None, f"tbptt.torch is not available ({exc})"


M, N, P, BATCH = 32, 128, 32, 32
K1 = 32
STREAM, CHUNK, ODD_CHUNK = 512, 4 * 32, 100
OVERHEAD_TARGET, FORUM_TARGET, COST_TARGET, COST4_TARGET = 1.03, 3.0, 1.15, 1.3  # issue 17: 1.03


@dataclass
class Setup:
    """What every case shares: the engine, the stream on its device, the sizes.

    The default sizes are this group's; the gpu group (gpu.py) passes its device, and its test
    tiny sizes.
    """

    engine: tuple
    xs: object  # (T, batch, m) tensor
    ys: object  # (T, batch, p) tensor
    n: int = N
    k1: int = K1
    chunk: int = CHUNK
    device: str = "cpu"

    @property
    def stream(self) -> int:
        return self.xs.shape[0]


def setup(engine: tuple, stream: int, device: str = "cpu", **sizes) -> Setup:
    """Random streams of `stream` steps (batch, m, p in sizes, default BATCH, M, P) on device."""
    import torch

    batch, m, p = sizes.pop("batch", BATCH), sizes.pop("m", M), sizes.pop("p", P)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(stream, batch, m, generator=gen)  # (T, batch, m)
    ys = torch.randn(stream, batch, p, generator=gen)
    return Setup(engine, xs.to(device), ys.to(device), device=device, **sizes)


def module(s: Setup):
    """Recurrent(nn.LSTM(m, n), nn.Linear(n, p)), the same initial values on every device."""
    import torch

    Recurrent = s.engine[1]
    torch.manual_seed(0)
    m, p = s.xs.shape[-1], s.ys.shape[-1]
    return Recurrent(torch.nn.LSTM(m, s.n), torch.nn.Linear(s.n, p)).to(s.device)


def driver_case(s: Setup, k2: int, inject: str = "new", chunk: int | None = None):
    """tbptt.torch.TBPTT with Truncation(k1, k2, inject), fed the stream in chunks."""
    import torch

    from tbptt import Truncation

    TBPTT, _, l2_loss = s.engine
    chunk = chunk or s.chunk

    def go():
        net = module(s)
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        d = TBPTT(net, Truncation(s.k1, k2, inject=inject), opt, loss_fn=l2_loss)
        for i in range(0, s.stream, chunk):
            d.feed(s.xs[i : i + chunk], s.ys[i : i + chunk])

    return go


def hand_case(s: Setup, k: int | None = None):
    """The detach-every-k loop (k = k1 by default; k = 1 is a plain per-step loop)."""
    import torch

    l2_loss, k = s.engine[2], k or s.k1

    def go():
        net = module(s)
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        state = None
        for i in range(0, s.stream - s.stream % k, k):
            out, state = net(s.xs[i : i + k], state)
            loss = l2_loss(out, s.ys[i : i + k]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            state = tuple(st.detach() for st in state)  # repackage_hidden: cut the graph here

    return go


def forum_case(s: Setup, k2: int):
    """The PyTorch forum's snippet: one call per step, the state gradient chained back by hand."""
    import torch

    l2_loss, xs, ys, lr = s.engine[2], s.xs, s.ys, 1e-4

    def go():
        net = module(s)
        params = list(net.parameters())
        states = [(None, None)]  # (state_in, state_out) of the last k2 steps
        for j in range(s.stream):
            prev = states[-1][1]
            state = None if prev is None else tuple(h.detach().requires_grad_() for h in prev)
            out, new_state = net(xs[j : j + 1], state)
            states.append((state, new_state))
            while len(states) > k2:
                del states[0]
            if (j + 1) % s.k1 == 0:
                loss = l2_loss(out, ys[j : j + 1]).sum()
                for q in params:
                    q.grad = None
                loss.backward(retain_graph=True)
                for i in range(k2 - 1):
                    if states[-i - 2][0] is None:
                        break
                    grads = [h.grad for h in states[-i - 1][0]]
                    torch.autograd.backward(states[-i - 2][1], grads, retain_graph=True)
                for q in params:
                    q.data.add_(q.grad, alpha=-lr)

    return go


def whole_case(s: Setup, backward: bool):
    """One module call over the whole stream: forward (with the graph), and backward too."""
    l2_loss = s.engine[2]
    net = module(s)

    def go():
        out, _ = net(s.xs, None)
        loss = l2_loss(out, s.ys).sum()
        if backward:
            loss.backward()

    return go


def cases(s: Setup) -> dict:
    """The group's nine cases."""
    k1 = s.k1
    return {
        "forward": whole_case(s, False),
        "exact": whole_case(s, True),
        "hand k1=k2": hand_case(s),
        "driver k2=1k1": driver_case(s, k1),
        "driver k2=1k1 odd chunks": driver_case(s, k1, chunk=ODD_CHUNK),
        "driver k2=2k1": driver_case(s, 2 * k1),
        "driver k2=4k1": driver_case(s, 4 * k1),
        "driver last k2=4k1": driver_case(s, 4 * k1, "last"),
        "forum last k2=4k1": forum_case(s, 4 * k1),
    }


def ratio_row(t: Timings, name: str, slow: str, fast: str, target: str, met, note: str = ""):
    """slow / fast, its per-repetition range first in the note."""
    r = t.ratio(slow, fast)
    lo, hi = t.spread(slow, fast)
    ok = None if met is None else met(r)
    return Row(name, r, "x", target, ok, f"per-repetition range {lo:.2f}-{hi:.2f}{note}")


def ratio_rows(t: Timings) -> list[Row]:
    """The driver against the hand-written loops."""
    return [
        ratio_row(
            t,
            f"k1=k2={K1}: driver time / hand-written detach loop time",
            "driver k2=1k1",
            "hand k1=k2",
            f"<= {OVERHEAD_TARGET}x",
            lambda r: r <= OVERHEAD_TARGET,
        ),
        ratio_row(
            t,
            f"k1=k2={K1}, chunks of {ODD_CHUNK} steps: driver time / hand-written loop time",
            "driver k2=1k1 odd chunks",
            "hand k1=k2",
            "",
            None,
            "; a chunk end inside a k1 interval costs one more module call",
        ),
        ratio_row(
            t,
            f"k1={K1}, k2={4 * K1}, inject=last: forum snippet time / driver time",
            "forum last k2=4k1",
            "driver last k2=4k1",
            f">= {FORUM_TARGET:g}x",
            lambda r: r >= FORUM_TARGET,
        ),
    ]


def cost_rows(t: Timings, stream: int) -> list[Row]:
    """The driver against its cost model, f T + b backward_steps(T)."""
    from tbptt import Truncation

    f = t.median("forward") / stream
    b = (t.median("exact") - t.median("forward")) / stream
    rows = []
    for ratio, target, which in (
        (1, COST_TARGET, 2),
        (2, COST_TARGET, 2),
        (4, COST_TARGET, 2),
        (4, COST4_TARGET, 3),
    ):
        back = Truncation(K1, ratio * K1).backward_steps(stream)
        cost = f * stream + b * back

        def model_time(rep: dict[str, float], back=back) -> float:
            return rep["forward"] + (rep["exact"] - rep["forward"]) / stream * back

        got = t.paired(lambda rep, ratio=ratio: rep[f"driver k2={ratio}k1"] / model_time(rep))
        rows.append(
            Row(
                f"k1={K1}, k2={ratio * K1}: driver time / cost model (target {which})",
                got,
                "x",
                f"<= {target}x",
                got <= target,
                f"medians: measured {1e3 * t.median(f'driver k2={ratio}k1'):.0f} ms, "
                f"model {1e3 * cost:.0f} ms",
            )
        )
    return rows


def describe(t: Timings, stream: int) -> str:
    f = t.median("forward") / stream
    b = (t.median("exact") - t.median("forward")) / stream
    return (
        f"Recurrent(nn.LSTM({M}, {N}), nn.Linear({N}, {P})), batch {BATCH}, k1={K1}, stream of "
        f"{stream} steps in chunks of {CHUNK}; forward {1e6 * f:.0f} us/step, backward "
        f"{1e6 * b:.0f} us/step (one module call over the whole stream); {t.contention()}."
    )


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group(
        "PyTorch engine: driver overhead and cost model (targets 2, 3)", load_before=load()
    )
    engine, why = import_engine()
    if engine is None:
        group.skipped = why + "; the torch-engine benchmarks were not run."
        group.load_after = load()
        return group
    import torch

    torch.set_num_threads(threads)
    reps = reps or (3 if quick else 15)  # issue 17: the median of at least 15 repetitions
    stream = STREAM // 2 if quick else STREAM
    try:
        t = interleave(cases(setup(engine, stream)), reps=reps)
    except Exception as exc:  # the engine is being written: report, do not crash the suite
        group.skipped = f"the torch-engine benchmarks failed: {type(exc).__name__}: {exc}"
        group.load_after = load()
        return group
    group.notes.append(describe(t, stream))
    group.rows += ratio_rows(t) + cost_rows(t, stream)
    group.load_after = load()
    return group
