"""tbptt.torch.rl's layouts against the per-step masked loop and the limit (issue 25).

A rollout of T = 128 steps of N environments (8 and 64), episodes starting at random with mean
length 20 and 200 (starts[t, n] ~ Bernoulli(1 / mean), a fixed seed), inputs of 4 features, an
nn.LSTM or nn.GRU of 64 units and a linear head of 2 outputs applied once to all outputs. Every
case times one forward and backward of the same loss, sum(W * head(out)) with fixed random W:

    limit   one call over the whole (T, N) rollout as if no episode started in it
    loop    the per-step masked loop of CleanRL's ppo_atari_lstm.py (Agent.get_states) and
            sb3-contrib's RecurrentActorCriticPolicy._process_sequence: one call of the recurrent
            module per step, its state multiplied by (1 - start) first; the head once
    unroll  rl.unroll(rnn, x, starts, state0): layout 9(a), k = None
    segs    Segments(starts).run(rnn, x, states) over all segments: layout 9(b), no length cap,
            no burn-in, the stored states from rl.states(..., at=segs.stored) (not timed)

The driver with resets (issue 25, item 4): tbptt.torch.TBPTT(Recurrent(nn.LSTM(4, 64),
Linear(64, 2)), Truncation(32, 32), SGD, reduction="mean") fed one chunk of T = 128 steps of N
streams (8 and 64) with resets ~ Bernoulli(1 / 20), so one feed is four updates. Three drivers,
side by side:

    split     the module marked packable = False: the call before packing, split at every step
              where some stream resets, all streams in every call (what the driver did before)
    packed    the driver as it is: each stream cut at its resets, the pieces packed (call.py)
    none      the same chunk fed without resets: one call per piece, the floor

Target: packed faster than split (split / packed > 1) in both settings.

Targets (issue 25): unroll and segs within 2.5x of the limit in every setting; at least 5x faster
than the loop with 8 environments and 1.5x with 64. Memory: the bytes the autograd graph holds
after the forward (the distinct storages of the tensors saved for backward, counted with
torch.autograd.graph.saved_tensors_hooks), the part of the peak that depends on the method; the
parameters and the inputs are the same in every case. tracemalloc does not see torch's CPU
allocations.
"""

from __future__ import annotations

from common import Group, Row, fmt_ms, interleave, load
from torch_driver import import_engine

T, M, H, P = 128, 4, 64, 2
LIMIT_TARGET, LOOP_TARGET = 2.5, {8: 5.0, 64: 1.5}
SETTINGS = [(cell, n, mean) for cell in ("LSTM", "GRU") for n in (8, 64) for mean in (20, 200)]


def masked_loop(rnn, x, starts, state):
    """The loop as CleanRL and sb3-contrib write it: per step, state * (1 - start), one call."""
    import torch

    outs = []
    for xt, d in zip(x, starts.to(x.dtype), strict=True):  # (N, m), (N,)
        keep = (1.0 - d).view(1, -1, 1)
        state = tuple(keep * s for s in state) if isinstance(state, tuple) else keep * state
        out, state = rnn(xt.unsqueeze(0), state)
        outs.append(out)
    return torch.cat(outs), state


def graph_bytes(forward) -> int:
    """Bytes of the distinct storages saved for backward while forward() builds its graph."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(seen.values())


def setting(
    cell: str, N: int, mean: int, device: str = "cpu", steps: int = T, hidden: int = H
) -> tuple[dict, str]:
    """The four cases' forwards (each returns the loss) for one setting, and what it holds.

    The module and the rollout are made on the CPU (the same values on every device), then moved
    to `device`; the gpu group (gpu.py) passes its device, and its test fewer steps and units.
    """
    import torch
    from torch import nn

    from tbptt.torch import rl

    torch.manual_seed(0)
    rnn = getattr(nn, cell)(M, hidden).to(device)
    head = nn.Linear(hidden, P).to(device)
    g = torch.Generator().manual_seed(N + mean)
    x = torch.randn(steps, N, M, generator=g).to(device)  # (T, N, m)
    starts = (torch.rand(steps, N, generator=g) < 1.0 / mean).to(device)  # (T, N)
    W = torch.randn(steps, N, P, generator=g).to(device)
    z = torch.zeros(1, N, hidden, device=device)
    state0 = (z, z.clone()) if cell == "LSTM" else z
    segs = rl.Segments(starts)
    states = rl.states(rnn, x, starts, state0, at=segs.stored)
    Wb = segs.gather(W)  # (L, S, P)
    forwards = {
        "limit": lambda: (W * head(rnn(x, state0)[0])).sum(),
        "loop": lambda: (W * head(masked_loop(rnn, x, starts, state0)[0])).sum(),
        "unroll": lambda: (W * head(rl.unroll(rnn, x, starts, state0)[0])).sum(),
        "segs": lambda: (Wb * head(segs.run(rnn, x, states))).sum(),
    }
    return forwards, f"{int(starts.sum())} starts, {len(segs)} segments"


DRIVER_K, DRIVER_MEAN = 32, 20


def driver_setting(N: int) -> tuple[dict, str]:
    """The driver's three cases (each one feed of a 128-step chunk) for N streams."""
    import torch
    from torch import nn

    import tbptt
    from tbptt.torch import TBPTT, Recurrent

    g = torch.Generator().manual_seed(N)
    x = torch.randn(T, N, M, generator=g)  # (T, N, m)
    y = torch.randn(T, N, P, generator=g)
    reset = torch.rand(T, N, generator=g) < 1.0 / DRIVER_MEAN  # (T, N)
    cases = {}
    for name in ("split", "packed", "none"):
        torch.manual_seed(0)
        model = Recurrent(nn.LSTM(M, H), nn.Linear(H, P))
        if name == "split":
            model.packable = False  # call.py: the per-reset split, as before packing
        trunc = tbptt.Truncation(DRIVER_K, DRIVER_K)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # the mean: stable over many feeds
        driver = TBPTT(model, trunc, opt, reduction="mean")
        r = None if name == "none" else reset
        cases[name] = lambda d=driver, r=r: d.feed(x, y, reset=r)
    rows = int(reset.any(1).sum())
    return cases, f"{int(reset.sum())} resets on {rows} of {T} steps"


def ratio_row(t, name: str, slow: str, fast: str, target: float, sense: str, note: str) -> Row:
    """The median ratio slow / fast against its target (<= or >=), the range in the note."""
    r = t.ratio(slow, fast)
    lo, hi = t.spread(slow, fast)
    met = r <= target if sense == "<=" else r >= target
    return Row(name, r, "x", f"{sense} {target}x", met, f"range {lo:.2f}-{hi:.2f}; {note}")


def run(quick: bool, reps: int | None, threads: int) -> Group:
    group = Group("Recurrent RL rollouts: tbptt.torch.rl (issue 25)", load_before=load())
    engine, why = import_engine()  # tbptt.torch, or why it is not there
    if engine is None:
        group.skipped, group.load_after = why, load()
        return group
    import torch

    torch.set_num_threads(threads)
    reps = reps or (3 if quick else 9)
    group.notes.append(
        f"T={T} steps, nn.LSTM / nn.GRU({M}, {H}) and a Linear({H}, {P}) head, float32, "
        f"{threads} threads; {reps} interleaved repetitions per setting. Memory: bytes held by "
        "the autograd graph after the forward (saved tensors' distinct storages)."
    )
    for cell, N, mean in SETTINGS:
        forwards, info = setting(cell, N, mean)
        cases = {name: (lambda f=f: f().backward()) for name, f in forwards.items()}
        try:
            t = interleave(cases, reps=reps)
        except Exception as exc:  # the code under test is moving: report, do not crash the suite
            group.skipped = f"{cell} N={N}: {type(exc).__name__}: {exc}"
            break
        mem = {name: graph_bytes(f) / 2**20 for name, f in forwards.items()}
        label = f"{cell} N={N} mean episode {mean} ({info})"
        for layout in ("unroll", "segs"):
            note = f"graph {mem[layout]:.2f} MB, limit {mem['limit']:.2f} MB, loop "
            note += f"{mem['loop']:.2f} MB; medians {layout} {fmt_ms(t.median(layout))}"
            target = LOOP_TARGET[N]
            group.rows += [
                ratio_row(
                    t, f"{label}: {layout} / limit", layout, "limit", LIMIT_TARGET, "<=", note
                ),
                ratio_row(t, f"{label}: loop / {layout}", "loop", layout, target, ">=", note),
            ]
        group.notes.append(
            f"{label}: limit / loop {t.ratio('limit', 'loop'):.2f}; {t.contention()}"
        )
    for N in (8, 64):
        cases, info = driver_setting(N)
        try:
            t = interleave(cases, reps=reps)
        except Exception as exc:  # the code under test is moving: report, do not crash the suite
            group.notes.append(f"driver N={N}: {type(exc).__name__}: {exc}")
            continue
        label = f"driver LSTM N={N} mean episode {DRIVER_MEAN}, TBPTT({DRIVER_K}, {DRIVER_K})"
        note = f"{info}; medians split {fmt_ms(t.median('split'))}, packed "
        note += f"{fmt_ms(t.median('packed'))}, no resets {fmt_ms(t.median('none'))}"
        group.rows.append(
            ratio_row(t, f"{label}: split / packed", "split", "packed", 1.0, ">=", note)
        )
        group.notes.append(
            f"{label}: packed / no resets {t.ratio('packed', 'none'):.2f}; {t.contention()}"
        )
    group.load_after = load()
    return group
