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

from common import Group, Row, interleave, load


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
    TBPTT, Recurrent, l2_loss = engine
    from tbptt import Truncation

    reps = reps or (3 if quick else 15)  # issue 17: the median of at least 15 repetitions
    stream = STREAM // 2 if quick else STREAM
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(stream, BATCH, M, generator=gen)  # (T, batch, m)
    ys = torch.randn(stream, BATCH, P, generator=gen)

    def module():
        torch.manual_seed(0)
        return Recurrent(torch.nn.LSTM(M, N), torch.nn.Linear(N, P))

    def driver(k2: int, inject: str = "new", chunk: int = CHUNK):
        def go():
            net = module()
            opt = torch.optim.SGD(net.parameters(), lr=1e-4)
            d = TBPTT(net, Truncation(K1, k2, inject=inject), opt, loss_fn=l2_loss)
            for i in range(0, stream, chunk):
                d.feed(xs[i : i + chunk], ys[i : i + chunk])

        return go

    def hand():
        net = module()
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        state = None
        for i in range(0, stream - stream % K1, K1):
            out, state = net(xs[i : i + K1], state)
            loss = l2_loss(out, ys[i : i + K1]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            state = tuple(s.detach() for s in state)  # repackage_hidden: cut the graph here

    def forum(k2: int):
        lr = 1e-4

        def go():
            net = module()
            params = list(net.parameters())
            states = [(None, None)]  # (state_in, state_out) of the last k2 steps
            for j in range(stream):
                prev = states[-1][1]
                state = None if prev is None else tuple(s.detach().requires_grad_() for s in prev)
                out, new_state = net(xs[j : j + 1], state)
                states.append((state, new_state))
                while len(states) > k2:
                    del states[0]
                if (j + 1) % K1 == 0:
                    loss = l2_loss(out, ys[j : j + 1]).sum()
                    for q in params:
                        q.grad = None
                    loss.backward(retain_graph=True)
                    for i in range(k2 - 1):
                        if states[-i - 2][0] is None:
                            break
                        grads = [s.grad for s in states[-i - 1][0]]
                        torch.autograd.backward(states[-i - 2][1], grads, retain_graph=True)
                    for q in params:
                        q.data.add_(q.grad, alpha=-lr)

        return go

    def whole(backward: bool):
        net = module()

        def go():
            out, _ = net(xs, None)
            loss = l2_loss(out, ys).sum()
            if backward:
                loss.backward()

        return go

    cases = {
        "forward": whole(False),
        "exact": whole(True),
        "hand k1=k2": hand,
        "driver k2=1k1": driver(K1),
        "driver k2=1k1 odd chunks": driver(K1, chunk=ODD_CHUNK),
        "driver k2=2k1": driver(2 * K1),
        "driver k2=4k1": driver(4 * K1),
        "driver last k2=4k1": driver(4 * K1, "last"),
        "forum last k2=4k1": forum(4 * K1),
    }
    try:
        t = interleave(cases, reps=reps)
    except Exception as exc:  # the engine is being written: report, do not crash the suite
        group.skipped = f"the torch-engine benchmarks failed: {type(exc).__name__}: {exc}"
        group.load_after = load()
        return group
    f = t.median("forward") / stream
    b = (t.median("exact") - t.median("forward")) / stream
    group.notes.append(
        f"Recurrent(nn.LSTM({M}, {N}), nn.Linear({N}, {P})), batch {BATCH}, k1={K1}, stream of "
        f"{stream} steps in chunks of {CHUNK}; forward {1e6 * f:.0f} us/step, backward "
        f"{1e6 * b:.0f} us/step (one module call over the whole stream); {t.contention()}."
    )
    r = t.ratio("driver k2=1k1", "hand k1=k2")
    lo, hi = t.spread("driver k2=1k1", "hand k1=k2")
    group.rows.append(
        Row(
            f"k1=k2={K1}: driver time / hand-written detach loop time",
            r,
            "x",
            f"<= {OVERHEAD_TARGET}x",
            r <= OVERHEAD_TARGET,
            f"per-repetition range {lo:.2f}-{hi:.2f}",
        )
    )
    r = t.ratio("driver k2=1k1 odd chunks", "hand k1=k2")
    lo, hi = t.spread("driver k2=1k1 odd chunks", "hand k1=k2")
    group.rows.append(
        Row(
            f"k1=k2={K1}, chunks of {ODD_CHUNK} steps: driver time / hand-written loop time",
            r,
            "x",
            "",
            None,
            f"per-repetition range {lo:.2f}-{hi:.2f}; a chunk end inside a k1 interval costs "
            "one more module call",
        )
    )
    r = t.ratio("forum last k2=4k1", "driver last k2=4k1")
    lo, hi = t.spread("forum last k2=4k1", "driver last k2=4k1")
    group.rows.append(
        Row(
            f"k1={K1}, k2={4 * K1}, inject=last: forum snippet time / driver time",
            r,
            "x",
            f">= {FORUM_TARGET:g}x",
            r >= FORUM_TARGET,
            f"per-repetition range {lo:.2f}-{hi:.2f}",
        )
    )
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
        group.rows.append(
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
    group.load_after = load()
    return group
