"""examples/ppo_recurrent.py: its agent trains, and the rollouts it collects are trained as the
per-step references of SEMANTICS.md 9 say (float64, 1e-10).

ref_segments walks each environment's starts for the segments of 9(b) (cut at episode starts and
every L steps of an episode) and runs each one step per call of the example's agent, from zeros
(h_init) at an episode start or from the state the collector stored before its first step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from tbptt.torch import rl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import ppo_recurrent as ppo  # noqa: E402  (the example, importable: main() runs only as a script)


def small_args(*flags: str):
    """The example's flags for a small rollout: 3 CartPole environments x 40 steps."""
    base = ["--num-envs", "3", "--num-steps", "40", "--threads", "0", "--plot", ""]
    return ppo.parse_args([*base, *flags])


def ref_segments(starts: torch.Tensor, length: int) -> list[tuple[int, int, int]]:
    """9(b)'s segments (n, t0, t1), environment by environment, in time order."""
    T, N = starts.shape
    out = []
    for n in range(N):
        bounds, e = [], 0
        for t in range(T):
            if starts[t, n]:
                e = t
            if t == 0 or starts[t, n] or (t - e) % length == 0:
                bounds.append(t)
        out += [(n, t0, t1 - 1) for t0, t1 in zip(bounds, [*bounds[1:], T], strict=True)]
    return out


def ref_run(agent, ro, segments: list[tuple[int, int, int]], L: int) -> torch.Tensor:
    """The segments' outputs (L, S', actions + 1), one step per call, zeros on the padding."""
    H = agent.hidden
    out = torch.zeros(L, len(segments), agent.n_actions + 1, dtype=torch.float64)
    cols = []
    for n, t0, t1 in segments:
        if ro.starts[t0, n]:
            h = (
                torch.zeros(1, 1, H, dtype=torch.float64),
                torch.zeros(1, 1, H, dtype=torch.float64),
            )
        else:
            h = tuple(s[t0][:, n : n + 1] for s in ro.states)  # stored before step t0
        ys = []
        for t in range(t0, t1 + 1):
            y, h = agent(ro.obs[t : t + 1, n : n + 1], h)
            ys.append(y[0, 0])
        cols.append(torch.cat([torch.stack(ys), out[: L - len(ys), 0]]))
    return torch.stack(cols, 1)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> None:
    assert a.shape == b.shape
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= rel * scale


def test_agent_trains_a_few_updates() -> None:
    """Three rollouts and updates of the example's PPO: every loss finite, every parameter moved."""
    args = small_args("--update-epochs", "2", "--num-minibatches", "2")
    envs, agent, opt, carry = ppo.setup(args)
    before = [p.detach().clone() for p in agent.parameters()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ro, carry = ppo.collect(agent, envs, carry, args)
        stats = ppo.update(agent, opt, ro, args, gen)
        assert set(stats) == {"pg", "v", "entropy"}
        assert all(math.isfinite(v) for v in stats.values())
    assert ro.obs.shape == (40, 3, 2) and ro.starts[0].sum() < 3  # carried on, not restarted
    for p, b in zip(agent.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), b)


def test_collected_rollout_matches_the_per_step_reference() -> None:
    """The example's second rollout (float64, episodes starting inside it, segments of 16 steps):
    one minibatch of segs.run gives the per-step reference's outputs, the collector's
    log-probabilities and values, and the same PPO loss gradient for every parameter."""
    args = small_args("--segment-length", "16")
    envs, agent, opt, carry = ppo.setup(args)
    agent.double()
    _, carry = ppo.collect(agent, envs, carry, args)
    ro, _ = ppo.collect(agent, envs, carry, args)
    assert ro.starts[1:].any() and not ro.starts[0].all()  # starts inside; stored states at t = 0
    segs = rl.Segments(ro.starts, length=16)
    plan = ref_segments(ro.starts, 16)
    t1 = segs.t0 + segs.lengths - 1
    got = list(zip(segs.env.tolist(), segs.t0.tolist(), t1.tolist(), strict=True))
    assert got == plan
    index = next(segs.minibatches(math.ceil(len(segs) / 2), torch.Generator().manual_seed(3)))
    chosen = [plan[i] for i in index.tolist()]
    assert any(not ro.starts[t0, n] for n, t0, _ in chosen)  # some start from a stored state

    out = segs.run(agent, ro.obs, ro.states, index)  # (L, S', 3)
    ref = ref_run(agent, ro, chosen, segs.L)
    close(out, ref)
    mask = segs.mask[:, index]
    for j, (n, t0, t1) in enumerate(chosen):  # what the collector saw and did at those steps
        steps = torch.arange(t0, t1 + 1)
        logp = ref[: t1 - t0 + 1, j, :-1].log_softmax(-1)
        logp = logp.gather(1, ro.actions[steps, n].long()[:, None])[:, 0]
        close(logp, ro.logprobs[steps, n])
        close(ref[: t1 - t0 + 1, j, -1], ro.values[steps, n])

    bufs = [segs.gather(b, index) for b in (ro.actions, ro.logprobs, ro.advantages, ro.returns)]
    params = list(agent.parameters())
    g_rl = torch.autograd.grad(ppo.ppo_loss(out, mask, *bufs, args)[0], params)
    g_ref = torch.autograd.grad(ppo.ppo_loss(ref, mask, *bufs, args)[0], params)
    for a, b in zip(g_rl, g_ref, strict=True):
        close(a, b)
    assert max(g.abs().max().item() for g in g_ref) > 1e-6  # a gradient worth comparing


def test_collected_states_are_the_contiguous_reference() -> None:
    """The states the collector stores (rl.restart at every episode start, 9(c)) are those 9(a)
    computes from the rollout's state0 with the same parameters (rl.states), to 1e-10."""
    args = small_args()
    envs, agent, opt, carry = ppo.setup(args)
    agent.double()
    _, carry = ppo.collect(agent, envs, carry, args)
    ro, _ = ppo.collect(agent, envs, carry, args)
    again = rl.states(agent, ro.obs, ro.starts, tuple(s[0] for s in ro.states))
    for a, b in zip(again, ro.states, strict=True):
        close(a, b)
    assert ro.starts[1:].any()


def test_recall_task() -> None:
    """Recall of lag D: D steps, the cue at step 0 only, the question at step D - 1 only, +1 for
    naming the cue there and -1 otherwise, 0 elsewhere."""
    env = ppo.Recall(5)
    for seed, answer in [(0, 0), (1, 1), (2, 0)]:
        obs, _ = env.reset(seed=seed)
        cue = int(obs[:2].argmax())
        seen, rewards, ends = [obs], [], []
        for _ in range(5):
            obs, r, terminated, truncated, _ = env.step(answer)
            seen.append(obs)
            rewards.append(r)
            ends.append(terminated or truncated)
        seen = np.array(seen[:5])
        assert seen[0, cue] == 1 and seen[1:, :2].sum() == 0
        assert seen[:4, 2].sum() == 0 and seen[4, 2] == 1
        assert rewards[:4] == [0.0] * 4 and rewards[4] == (1.0 if answer == cue else -1.0)
        assert ends[:4] == [False] * 4 and ends[4]
