"""PPO with a GRU, trained through tbptt.torch.rl: CartPole-v1 without its velocities.

    pip install -e '.[rl]'
    python examples/ppo_recurrent.py --seed 1
    python examples/ppo_recurrent.py --env recall --lag 16 --segment-length 8 --seed 1

The task (--env cartpole): CartPole-v1 seeing only the cart's position x and the pole's angle
theta, scaled by the limits where an episode fails (2.4 and 12 degrees). The velocities must be
inferred from successive observations (issue 26 reports about 40 for a memoryless policy); a
solved one scores 500.
--env recall is a memory task of known length D (--lag): a cue shown at an episode's first step,
asked for at its last, step D - 1 (examples/ppo_truncation.py uses it).

The agent (CleanRL's PPO, its ppo_atari_lstm.py in shape, one file, every hyperparameter a flag):
a separate actor and critic, each tanh(Linear) -> GRU -> Linear, one module following the
library's protocol agent(x, state) -> (out, state), out the logits and then the value. Each
update collects a rollout of --num-steps steps of --num-envs environments, then trains on it
for --update-epochs epochs of --num-minibatches shuffled minibatches of segments:

    acting     rl.restart(state, starts[t], h_init): h_init where an episode starts; the state
               before every step is stored (SEMANTICS.md 9(c))
    training   rl.Segments(starts, length=--segment-length): each environment's rollout cut at
               its episode starts and every L steps of an episode, each segment run from
               h_init or from the stored state before its first step, the gradient never
               crossing a segment's start (9(b)); segs.run, segs.gather and segs.mask give the
               outputs, the buffers and the valid steps of a minibatch, laid out (L, S')

L is the BPTT length, free of the rollout's length. The default 16 is well above what CartPole
needs (a velocity is a difference of a few successive positions) and a quarter of the rollout:
a minibatch's sequential steps, what a GRU's backward costs on a CPU, are at most L.

Every --eval-every updates the greedy policy plays --eval-episodes episodes; once their mean
reaches --target, training stops, and --final-episodes fresh episodes confirm the policy. The last
two lines of standard output are `env steps: N` (the environment steps trained on) and
`eval return: R` (the mean over the confirming episodes). The exit status is 0 when both the
stopping evaluation and the confirmation reach the target within --total-steps, else 1 (the
two lines are printed all the same, R the confirmation of the policy training ended with: after
the whole budget, or after an evaluation that reached the target when the 100 episodes did not).
A plot of return against environment steps is written to --plot.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from tbptt.torch import rl

Tensor = torch.Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seed", type=int, default=1, help="seeds torch, the envs and evaluations")
    p.add_argument("--env", choices=["cartpole", "recall"], default="cartpole", help="the task")
    p.add_argument("--lag", type=int, default=16, help="recall: D, the episode's length")
    p.add_argument("--total-steps", type=int, default=50_000, help="budget of env steps")
    p.add_argument("--num-envs", type=int, default=8, help="environments N of a rollout")
    p.add_argument("--num-steps", type=int, default=64, help="steps T of a rollout")
    p.add_argument("--hidden", type=int, default=64, help="units of each GRU")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument(
        "--anneal-lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the learning rate falls linearly to 0 over the budget",
    )
    p.add_argument("--gamma", type=float, default=0.99, help="discount")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="GAE's lambda")
    p.add_argument("--num-minibatches", type=int, default=4, help="minibatches of segments")
    p.add_argument("--update-epochs", type=int, default=10, help="epochs over each rollout")
    p.add_argument("--clip-coef", type=float, default=0.2, help="PPO's ratio clip")
    p.add_argument("--ent-coef", type=float, default=0.01, help="entropy bonus")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient clip (norm)")
    p.add_argument(
        "--segment-length",
        type=int,
        default=16,
        help="the BPTT length: rl.Segments' L, the longest segment, so the gradient crosses at "
        "most L - 1 steps; 0: segments end only at episode starts and at the rollout's ends",
    )
    p.add_argument(
        "--refresh-states",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="segments that start inside an episode start from the states recomputed with the "
        "current parameters before each epoch (rl.states), not from those the collector stored",
    )
    p.add_argument("--eval-every", type=int, default=2, help="updates between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes of an evaluation")
    p.add_argument("--final-episodes", type=int, default=100, help="episodes of the confirmation")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="the mean evaluation return that stops training (default: 475 for cartpole, "
        "0.9 for recall, where a return is +1 or -1)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--plot", default="ppo_recurrent.png", help="the PNG written; '' for none")
    args = p.parse_args(argv)
    if args.target is None:
        args.target = 475.0 if args.env == "cartpole" else 0.9
    return args


# -- the tasks ---------------------------------------------------------------------------------
class NoVelocity(gym.ObservationWrapper):
    """CartPole's observation without the velocities: (x / 2.4, theta / 12 degrees)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        u = env.unwrapped
        self.scale = np.array([1 / u.x_threshold, 1 / u.theta_threshold_radians], np.float32)
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        return obs[::2] * self.scale  # (x, theta) of (x, dx/dt, theta, dtheta/dt)


class Recall(gym.Env):
    """A memory of D steps: step 0 shows a cue (one of 2), step D - 1 asks for it (a flag), the
    steps between show nothing. The action at step D - 1 earns +1 if it names the cue, else -1;
    the others earn 0; the episode ends there. The gradient that teaches the policy to keep the
    cue must cross the D - 1 steps from the cue to the question."""

    observation_space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)  # cue 0, cue 1, question
    action_space = gym.spaces.Discrete(2)

    def __init__(self, lag: int) -> None:
        self.lag = lag

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t, self.cue = 0, int(self.np_random.integers(2))
        return self._obs(), {}

    def step(self, action):
        asked = self.t == self.lag - 1
        reward = (1.0 if int(action) == self.cue else -1.0) if asked else 0.0
        self.t += 1
        return self._obs(), reward, asked, False, {}

    def _obs(self) -> np.ndarray:
        o = np.zeros(3, np.float32)
        o[self.cue] = self.t == 0
        o[2] = self.t == self.lag - 1
        return o


def make_env(args: argparse.Namespace):
    """A function that makes one environment of the task."""
    if args.env == "recall":
        return lambda: Recall(args.lag)
    return lambda: NoVelocity(gym.make("CartPole-v1"))


# -- the agent ---------------------------------------------------------------------------------
class Agent(nn.Module):
    """agent(x, state) -> (out, state): x (T, N, obs), out (T, N, actions + 1), the logits and
    then the value; state (h_actor, h_critic), each (1, N, hidden), None meaning zeros."""

    state_batch_dim = 1  # the batch axis of each state tensor, for rl

    def __init__(self, n_obs: int, n_actions: int, hidden: int) -> None:
        super().__init__()
        self.hidden, self.n_actions = hidden, n_actions
        self.actor_in, self.actor_rnn = nn.Linear(n_obs, hidden), nn.GRU(hidden, hidden)
        self.actor_out = nn.Linear(hidden, n_actions)
        self.critic_in, self.critic_rnn = nn.Linear(n_obs, hidden), nn.GRU(hidden, hidden)
        self.critic_out = nn.Linear(hidden, 1)
        with torch.no_grad():  # a near-uniform policy to start (CleanRL's std 0.01)
            self.actor_out.weight.mul_(0.01)
            self.actor_out.bias.zero_()

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        T, N = x.shape[:2]
        if state is None:  # h_init
            zero = x.new_zeros(1, N, self.hidden)
            state = (zero, zero)
        if T == 0:  # rl asks a module other than torch's RNNs for h_init with x[:0]
            return x.new_zeros(0, N, self.n_actions + 1), state
        a, ha = self.actor_rnn(torch.tanh(self.actor_in(x)), state[0])  # (T, N, hidden)
        c, hc = self.critic_rnn(torch.tanh(self.critic_in(x)), state[1])
        return torch.cat([self.actor_out(a), self.critic_out(c)], -1), (ha, hc)


# -- collecting a rollout ----------------------------------------------------------------------
@dataclass
class Rollout:
    """T steps of N environments, time-major; states[i][t] the state before step t."""

    obs: Tensor  # (T, N, obs)
    starts: Tensor  # (T, N) bool: step t is an episode's first step
    states: tuple[Tensor, Tensor]  # (T, 1, N, hidden) each: (h_actor, h_critic)
    actions: Tensor  # (T, N)
    logprobs: Tensor  # (T, N)
    values: Tensor  # (T, N)
    rewards: Tensor  # (T, N)
    advantages: Tensor  # (T, N)
    returns: Tensor  # (T, N)
    episodes: list[float]  # the returns of the episodes that ended in it


@dataclass
class Carry:
    """What one rollout hands the next: the next observation, whether it starts an episode, the
    state after the last step, and each environment's return so far."""

    obs: np.ndarray  # (N, obs)
    start: np.ndarray  # (N,) bool
    state: tuple[Tensor, Tensor] | None
    ret: np.ndarray  # (N,)


def collect(agent: Agent, envs: gym.vector.VectorEnv, carry: Carry, args) -> tuple[Rollout, Carry]:
    """One rollout of args.num_steps steps, acting with the current parameters; advantages by
    GAE. envs autoreset in the same step (gymnasium's AutoresetMode.SAME_STEP): the observation
    after a final step is the next episode's first, the final one in info["final_obs"]."""
    dt = next(agent.parameters()).dtype
    T, N = args.num_steps, envs.num_envs
    obs = torch.zeros(T, N, *envs.single_observation_space.shape, dtype=dt)
    starts = torch.zeros(T, N, dtype=torch.bool)
    actions, logprobs, values, rewards = (torch.zeros(T, N, dtype=dt) for _ in range(4))
    h_init = rl.h_init(agent, obs)  # zeros: (1, N, hidden) twice
    stored = [torch.zeros(T, *h.shape, dtype=dt) for h in h_init]
    state, episodes = carry.state, []
    o, start, ret = carry.obs, carry.start, carry.ret.copy()
    with torch.no_grad():
        for t in range(T):
            state = rl.restart(state, torch.as_tensor(start), h_init, module=agent)
            obs[t], starts[t] = torch.as_tensor(o, dtype=dt), torch.as_tensor(start)
            for s, h in zip(stored, state, strict=True):
                s[t] = h  # the state before step t
            out, state = agent(obs[t : t + 1], state)  # (1, N, actions + 1)
            dist = Categorical(logits=out[0, :, :-1])
            action = dist.sample()  # (N,)
            o, reward, terminated, truncated, info = envs.step(action.numpy())
            ret += reward
            if truncated.any():  # a time limit, not a failure: bootstrap from the last state
                final = zip(info["final_obs"], truncated, o, strict=True)
                last = np.stack([f if tr else x for f, tr, x in final])  # (N, obs)
                v_last = agent(torch.as_tensor(last, dtype=dt)[None], state)[0][0, :, -1]
                reward = reward + args.gamma * v_last.numpy() * (truncated & ~terminated)
            start = terminated | truncated
            episodes += ret[start].tolist()
            ret[start] = 0.0
            actions[t], logprobs[t], values[t] = action, dist.log_prob(action), out[0, :, -1]
            rewards[t] = torch.as_tensor(reward, dtype=dt)
        state_next = rl.restart(state, torch.as_tensor(start), h_init, module=agent)
        next_value = agent(torch.as_tensor(o, dtype=dt)[None], state_next)[0][0, :, -1]
    # GAE: step t's episode goes on at t + 1 unless t + 1 starts one
    going_on = torch.cat([~starts[1:], torch.as_tensor(~start)[None]]).to(dt)  # (T, N)
    next_values = torch.cat([values[1:], next_value[None]])  # (T, N)
    delta = rewards + args.gamma * next_values * going_on - values
    advantages, last = torch.zeros_like(values), torch.zeros(N, dtype=dt)
    for t in reversed(range(T)):
        last = delta[t] + args.gamma * args.gae_lambda * going_on[t] * last
        advantages[t] = last
    ro = Rollout(
        obs, starts, tuple(stored), actions, logprobs, values, rewards, advantages,
        advantages + values, episodes,
    )  # fmt: skip
    return ro, Carry(o, start, state, ret)


# -- training on it ----------------------------------------------------------------------------
def ppo_loss(out: Tensor, mask: Tensor, act, old_logp, adv, ret, args) -> tuple[Tensor, dict]:
    """PPO's clipped loss on the valid steps of a minibatch laid out (L, S', ...)."""
    logits, value = out[..., :-1][mask], out[..., -1][mask]  # (B, actions), (B,)
    act, old_logp, adv, ret = act[mask], old_logp[mask], adv[mask], ret[mask]
    dist = Categorical(logits=logits)
    logp, entropy = dist.log_prob(act.long()), dist.entropy().mean()
    ratio = (logp - old_logp).exp()
    adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef))
    v = 0.5 * (value - ret).square().mean()
    loss = pg.mean() - args.ent_coef * entropy + args.vf_coef * v
    stats = {"pg": pg.mean().item(), "v": v.item(), "entropy": entropy.item()}
    return loss, stats


def update(agent: Agent, opt: torch.optim.Optimizer, ro: Rollout, args, gen) -> dict:
    """args.update_epochs epochs of shuffled minibatches of segments; the last one's losses."""
    segs = rl.Segments(ro.starts, length=args.segment_length or None)
    size = math.ceil(len(segs) / args.num_minibatches)
    state0 = tuple(s[0] for s in ro.states)
    bufs = (ro.actions, ro.logprobs, ro.advantages, ro.returns)
    bufs = segs.gather(torch.stack(bufs, -1))  # (L, S, 4): every segment's, zeros on padding
    for _ in range(args.update_epochs):
        states = ro.states
        if args.refresh_states:
            states = rl.states(agent, ro.obs, ro.starts, state0, at=segs.stored)
        for index in segs.minibatches(size, generator=gen):
            out = segs.run(agent, ro.obs, states, index)  # (L, S', actions + 1)
            loss, stats = ppo_loss(out, segs.mask[:, index], *bufs[:, index].unbind(-1), args)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            opt.step()
    return stats


# -- evaluating --------------------------------------------------------------------------------
def evaluate(agent: Agent, args, episodes: int, seed: int) -> np.ndarray:
    """The returns of `episodes` greedy episodes played side by side, episode i reset with
    seed + i."""
    envs = [make_env(args)() for _ in range(episodes)]
    o = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    dt = next(agent.parameters()).dtype
    returns, done, state = np.zeros(episodes), np.zeros(episodes, bool), None
    with torch.no_grad():
        while not done.all():
            out, state = agent(torch.as_tensor(o, dtype=dt)[None], state)
            action = out[0, :, :-1].argmax(-1).numpy()
            for i in np.flatnonzero(~done):
                o[i], r, terminated, truncated, _ = envs[i].step(action[i])
                returns[i] += r
                done[i] = terminated or truncated
    return returns


# -- the run -----------------------------------------------------------------------------------
def setup(args) -> tuple[gym.vector.VectorEnv, Agent, torch.optim.Optimizer, Carry]:
    """The seeded environments, agent, optimizer and the carry before the first rollout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    envs = gym.vector.SyncVectorEnv(
        [make_env(args)] * args.num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    o, _ = envs.reset(seed=args.seed)  # environment i: seed + i
    n_actions = int(envs.single_action_space.n)
    agent = Agent(envs.single_observation_space.shape[0], n_actions, args.hidden)
    opt = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)
    return envs, agent, opt, Carry(o, np.ones(args.num_envs, bool), None, np.zeros(args.num_envs))


def train(args, log=print) -> dict:
    """Trains until the target or the budget; returns the agent, the history and the result."""
    envs, agent, opt, carry = setup(args)
    gen = torch.Generator().manual_seed(args.seed)  # the minibatches' shuffling
    batch = args.num_envs * args.num_steps
    updates = args.total_steps // batch
    hist = {"steps": [], "train": [], "eval_steps": [], "eval": []}
    steps, solved, start = 0, False, time.perf_counter()
    for u in range(1, updates + 1):
        if args.anneal_lr:
            opt.param_groups[0]["lr"] = args.lr * (1.0 - (u - 1) / updates)
        ro, carry = collect(agent, envs, carry, args)
        stats = update(agent, opt, ro, args, gen)
        steps += batch
        if ro.episodes:
            hist["steps"].append(steps)
            hist["train"].append(float(np.mean(ro.episodes)))
        if u % args.eval_every == 0 or u == updates:
            r = evaluate(agent, args, args.eval_episodes, 1000 * args.seed + 10 * u).mean()
            hist["eval_steps"].append(steps)
            hist["eval"].append(float(r))
            train_r = hist["train"][-1] if hist["train"] else float("nan")
            log(
                f"update {u:3d}  env steps {steps:6d}  {time.perf_counter() - start:5.1f} s  "
                f"train return {train_r:7.2f}  eval return {r:7.2f}  "
                f"pg {stats['pg']:+.3f}  v {stats['v']:.3f}  entropy {stats['entropy']:.3f}"
            )
            if r >= args.target:
                solved = True
                break
    final = evaluate(agent, args, args.final_episodes, 10**6 + 1000 * args.seed)
    seconds = time.perf_counter() - start
    log(
        f"{'solved' if solved else 'not solved'} after {steps} env steps, {seconds:.1f} s; "
        f"confirmation: {args.final_episodes} episodes, {final.mean():.2f} +- {final.std():.2f}"
    )
    ok = bool(solved and final.mean() >= args.target)
    return {"agent": agent, "hist": hist, "steps": steps, "final": final, "ok": ok, "s": seconds}


def plot(hist: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(hist["steps"], hist["train"], lw=1, alpha=0.6, label="training episodes (sampled)")
    ax.plot(hist["eval_steps"], hist["eval"], "o-", ms=3, label="evaluation (greedy)")
    ax.axhline(args.target, color="gray", ls=":", lw=1, label=f"target {args.target:g}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(f"recurrent PPO through tbptt.torch.rl, {args.env}, seed {args.seed}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = train(args)
    if args.plot:
        plot(res["hist"], args, args.plot)
    print(f"env steps: {res['steps']}")
    print(f"eval return: {res['final'].mean():.2f}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
