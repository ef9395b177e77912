"""sb3-contrib's RecurrentPPO on CartPoleNoVel-v1 with rl-baselines3-zoo's settings (issue 26).

    python benchmarks/sb3_recurrent_ppo.py --seed 1        needs the bench extra (sb3-contrib)

The side of the comparison in docs/rl.md that examples/ppo_recurrent.py is measured against. It
builds what `python -m rl_zoo3.train --algo ppo_lstm --env CartPoleNoVel-v1 --seed S` builds, from
rl-zoo3 2.9.2's files (rl-zoo3 itself cannot be installed beside the project's pins: its
pytablewriter needs typepy[datetime], which needs python-dateutil < 3, and constraints.txt pins 4):

- hyperparams/ppo_lstm.yml, entry CartPoleNoVel-v1 ("# Tuned"): normalize True, n_envs 8,
  n_timesteps 1e5, MlpLstmPolicy, n_steps 32, batch_size 256, gae_lambda 0.8, gamma 0.98,
  n_epochs 20, ent_coef 0.0, learning_rate lin_0.001, clip_range lin_0.2, policy_kwargs
  dict(ortho_init=False, activation_fn=nn.ReLU, lstm_hidden_size=64, enable_critic_lstm=True,
  net_arch=dict(pi=[64], vf=[64])). Everything else is RecurrentPPO's default.
- wrappers.py, MaskVelocityWrapper: CartPole-v1's observation times the mask [1, 0, 1, 0] (the
  velocities zeroed, the shape kept); import_envs.py registers it as CartPoleNoVel-v1.
- exp_manager.py: make_vec_env (DummyVecEnv, each env in a Monitor, seeded seed + i), then
  VecNormalize(gamma=0.98) (observations and rewards) for "normalize: True"; "lin_X" is
  utils.linear_schedule, X times the progress remaining.

The zoo's evaluation callback (5 episodes every 25,000 steps by default) is left out: it does not
change the training and costs time. After the 1e5 steps, the final policy plays the same 100
deterministic episodes as the example's confirmation (episode i reset with seed 10**6 + 1000 S
+ i), the observations normalized with the training statistics, frozen. The last two lines of
standard output are `env steps: N` and `eval return: R`, as the example's.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
from torch import nn


class MaskVelocityWrapper(gym.ObservationWrapper):
    """rl_zoo3.wrappers.MaskVelocityWrapper for CartPole-v1: the velocities (1, 3) zeroed."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.mask = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation * self.mask


def make_env(render_mode: str | None = None) -> gym.Env:
    """rl_zoo3.import_envs.create_no_vel_env("CartPole-v1"): CartPoleNoVel-v1."""
    return MaskVelocityWrapper(gym.make("CartPole-v1", render_mode=render_mode))


def linear_schedule(initial: float):
    """rl_zoo3.utils.linear_schedule ("lin_X"): X times the progress remaining (1 -> 0)."""
    return lambda progress_remaining: progress_remaining * initial


def train(seed: int, timesteps: int) -> tuple[RecurrentPPO, VecNormalize]:
    env = make_vec_env(make_env, n_envs=8, seed=seed, vec_env_cls=DummyVecEnv)
    env = VecNormalize(env, gamma=0.98)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        env,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=linear_schedule(0.001),
        clip_range=linear_schedule(0.2),
        policy_kwargs=dict(
            ortho_init=False,
            activation_fn=nn.ReLU,
            lstm_hidden_size=64,
            enable_critic_lstm=True,
            net_arch=dict(pi=[64], vf=[64]),
        ),
        seed=seed,
        verbose=0,
        device="cpu",
    )
    model.learn(total_timesteps=timesteps)
    return model, env


def evaluate(model: RecurrentPPO, train_env: VecNormalize, episodes: int, seed: int) -> np.ndarray:
    """The returns of `episodes` deterministic episodes, episode i reset with seed + i."""
    venv = DummyVecEnv([make_env] * episodes)
    env = VecNormalize(venv, training=False, norm_reward=False, gamma=0.98)
    env.obs_rms = train_env.obs_rms
    env.seed(seed)  # env i: seed + i
    obs = env.reset()
    state, first = None, np.ones(episodes, dtype=bool)
    returns, done = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    while not done.all():
        action, state = model.predict(obs, state=state, episode_start=first, deterministic=True)
        obs, reward, ended, _ = env.step(action)
        returns += np.where(done, 0.0, reward)  # only each env's first episode counts
        done |= ended
        first = ended
    return returns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="the seed (default: 1)")
    parser.add_argument(
        "--timesteps", type=int, default=100_000, help="environment steps (zoo: 1e5)"
    )
    parser.add_argument(
        "--eval-episodes", type=int, default=100, help="episodes of the final evaluation"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0 leaves torch's default"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"RecurrentPPO, CartPoleNoVel-v1, seed {args.seed}: {args.timesteps} steps", flush=True)
    model, env = train(args.seed, args.timesteps)
    print(f"trained in {time.perf_counter() - start:.1f} s", flush=True)
    returns = evaluate(model, env, args.eval_episodes, 10**6 + 1000 * args.seed)
    print(f"final: {args.eval_episodes} episodes, {returns.mean():.1f} +- {returns.std():.1f}")
    print(f"seconds: {time.perf_counter() - start:.1f}")
    print(f"env steps: {model.num_timesteps}")
    print(f"eval return: {returns.mean():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
