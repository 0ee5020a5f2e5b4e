"""Locomotion data without a scripted expert: a compact PPO teacher trained on the CPU, rolled out into D4RL's layout.

    python collect_demos.py --task hopper          # what runs this module: teacher -> 200k "medium" transitions

Hopper/Walker2d have no scripted expert. A compact CleanRL-style PPO (ppo_continuous_action: 4 envs x 512
steps, 10 epochs of 64-sample minibatches, observation and reward normalisation) trains a teacher on the
CPU; a checkpoint (weights + obs-normalisation stats) is saved every ckpt_every env steps and scored by
the return of its *stochastic* policy, which is what the dataset contains (often far below the
deterministic return). The checkpoint closest to a D4RL-"medium" target is rolled out into a D4RL-layout
hdf5 file. Observations are stored raw (the teacher's normalisation stays in its checkpoint).
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributions import Normal
from tqdm import tqdm

import tasks
from tasks import RewardScaler, RunningMeanStd, standardize, write_d4rl_hdf5


@dataclass(frozen=True)
class TeacherSpec:
    target: float  # stochastic return of the "medium" teacher (D4RL medium ~ 1/3-1/2 of expert return)
    max_steps: int  # PPO env steps at most; training stops once a checkpoint is within TARGET_TOL of target


TEACHERS = {"hopper": TeacherSpec(target=1500.0, max_steps=1_000_000),
            "walker2d": TeacherSpec(target=2500.0, max_steps=1_500_000)}
TARGET_TOL = 0.1  # stop training at the first checkpoint whose stochastic return is within 10% of target
GAMMA_ENV = 0.99  # PPO's per-step discount (tasks' gamma is per action chunk)


def _layer(n_in: int, n_out: int, std: float = np.sqrt(2)) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


class TeacherAgent(nn.Module):
    """CleanRL's Gaussian actor-critic: 64-64 tanh MLPs, state-independent log-std. The obs_mean/obs_var
    buffers hold the observation-normalisation stats, so one state_dict is a complete teacher."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 64):
        super().__init__()

        def mlp(n_out, std):
            return nn.Sequential(_layer(obs_dim, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh(),
                                 _layer(hidden, n_out, std))

        self.critic, self.actor = mlp(1, 1.0), mlp(act_dim, 0.01)
        self.logstd = nn.Parameter(torch.zeros(act_dim))
        self.register_buffer("obs_mean", torch.zeros(obs_dim, dtype=torch.float64))
        self.register_buffer("obs_var", torch.ones(obs_dim, dtype=torch.float64))

    def normalize(self, obs: np.ndarray) -> torch.Tensor:
        """Raw observations -> normalised float32 tensor with the stored stats (clipped to +-10)."""
        return torch.as_tensor(standardize(obs, self.obs_mean.numpy(), self.obs_var.numpy()), dtype=torch.float32)

    @torch.inference_mode()
    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Action for one raw observation: the mean, plus Gaussian noise when rng is given (unclipped)."""
        mean = self.actor(self.normalize(obs)).numpy().astype(np.float64)
        return mean if rng is None else mean + np.exp(self.logstd.numpy()) * rng.standard_normal(mean.shape)


def load_teacher(path, task) -> TeacherAgent:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    agent = TeacherAgent(task.obs_dim, task.act_dim)
    agent.load_state_dict(ckpt["agent"])
    return agent.eval()


def train_teacher(task, total_steps: int, seed: int, ckpt_dir, ckpt_every: int, on_checkpoint=None,
                  n_envs=4, n_steps=512, epochs=10, minibatch=64, lr=3e-4, lam=0.95, clip=0.2, progress=True):
    """PPO on task's env. Every ckpt_every env steps: save ckpt_dir/step_XXXXXXX.pt and call
    on_checkpoint(path, step) -> stop?  Returns the list of (step, path) saved."""
    gamma = GAMMA_ENV
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    envs = [tasks.make_env(task, seed=seed + i) for i in range(n_envs)]
    agent = TeacherAgent(task.obs_dim, task.act_dim)
    opt = torch.optim.Adam(agent.parameters(), lr=lr, eps=1e-5, foreach=True)
    obs_rms, reward_scaler = RunningMeanStd(task.obs_dim), RewardScaler(n_envs, gamma)
    obs = np.stack([env.reset()["state"] for env in envs]).astype(np.float64)
    obs_rms.update(obs)

    def norm(o):
        return obs_rms.normalize(o).astype(np.float32)

    buf_obs = np.zeros((n_steps, n_envs, task.obs_dim), np.float32)
    buf_act = np.zeros((n_steps, n_envs, task.act_dim), np.float32)
    buf_logp, buf_val, buf_rew, buf_done = (np.zeros((n_steps, n_envs), np.float32) for _ in range(4))
    ep_ret, recent = np.zeros(n_envs), deque(maxlen=20)
    n_updates = -(-total_steps // (n_envs * n_steps))
    step, next_ckpt, saved = 0, ckpt_every, []
    bar = tqdm(total=n_updates * n_envs * n_steps, desc=f"{task.name} PPO teacher", unit="step",
               dynamic_ncols=True, disable=not progress)
    for update in range(n_updates):
        opt.param_groups[0]["lr"] = lr * (1 - update / n_updates)  # linear annealing
        for t in range(n_steps):  # ---- rollout
            x = norm(obs)
            with torch.no_grad():
                xt = torch.from_numpy(x)
                dist = Normal(agent.actor(xt), agent.logstd.exp(), validate_args=False)
                action = dist.sample()
                buf_logp[t], buf_val[t] = dist.log_prob(action).sum(-1), agent.critic(xt).squeeze(-1)
            buf_obs[t], buf_act[t] = x, action
            rew, done, final = np.zeros(n_envs), np.zeros(n_envs, bool), {}
            for i, env in enumerate(envs):
                o, rew[i], term, trunc, _ = env.step(action[i].numpy())  # make_env clips the action
                o = o["state"]
                ep_ret[i] += rew[i]
                done[i] = term or trunc
                if trunc and not term:
                    final[i] = o  # time limit: bootstrap from the value of the final observation
                if done[i]:
                    recent.append(ep_ret[i])
                    ep_ret[i] = 0.0
                    o = env.reset()["state"]
                obs[i] = o
            obs_rms.update(obs)
            buf_rew[t] = reward_scaler(rew, done)  # divide by the std of the running discounted return
            if final:
                with torch.no_grad():
                    v = agent.critic(torch.from_numpy(norm(np.stack(list(final.values()))))).squeeze(-1)
                buf_rew[t, list(final)] += gamma * v.numpy()
            buf_done[t] = done
        with torch.no_grad():  # ---- GAE
            next_val = agent.critic(torch.from_numpy(norm(obs))).squeeze(-1).numpy()
        adv, last = np.zeros_like(buf_rew), 0.0
        for t in reversed(range(n_steps)):
            nxt = next_val if t == n_steps - 1 else buf_val[t + 1]
            delta = buf_rew[t] + gamma * nxt * (1 - buf_done[t]) - buf_val[t]
            adv[t] = last = delta + gamma * lam * (1 - buf_done[t]) * last
        b_obs, b_act = torch.from_numpy(buf_obs.reshape(-1, task.obs_dim)), torch.from_numpy(buf_act.reshape(-1, task.act_dim))
        b_logp, b_val, b_adv = (torch.from_numpy(a.reshape(-1)) for a in (buf_logp, buf_val, adv))
        b_ret = b_adv + b_val
        n = len(b_obs)
        for _ in range(epochs):  # ---- clipped-surrogate updates
            for idx in np.split(rng.permutation(n), n // minibatch):
                dist = Normal(agent.actor(b_obs[idx]), agent.logstd.exp(), validate_args=False)
                ratio = (dist.log_prob(b_act[idx]).sum(-1) - b_logp[idx]).exp()
                a = (b_adv[idx] - b_adv[idx].mean()) / (b_adv[idx].std() + 1e-8)
                pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip)).mean()
                v = agent.critic(b_obs[idx]).squeeze(-1)
                v_clipped = b_val[idx] + (v - b_val[idx]).clamp(-clip, clip)
                v_loss = 0.5 * torch.max((v - b_ret[idx]) ** 2, (v_clipped - b_ret[idx]) ** 2).mean()
                opt.zero_grad()
                (pg_loss + 0.5 * v_loss).backward()
                nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                opt.step()
        step += n_envs * n_steps
        bar.update(n_envs * n_steps)
        if recent:
            bar.set_postfix(train_return=f"{np.mean(recent):.0f}", refresh=False)
        if step >= next_ckpt or update == n_updates - 1:
            next_ckpt += ckpt_every
            agent.obs_mean.copy_(torch.from_numpy(obs_rms.mean))
            agent.obs_var.copy_(torch.from_numpy(obs_rms.var))
            path = ckpt_dir / f"step_{step:07d}.pt"
            torch.save({"agent": agent.state_dict(), "step": step, "task": task.name, "seed": seed}, path)
            saved.append((step, path))
            if on_checkpoint is not None and on_checkpoint(path, step):
                break
    bar.close()
    for env in envs:
        env.close()
    return saved


def rollout(agent: TeacherAgent, task, seed: int, stochastic=True, transitions=None, episodes=None,
            progress=False) -> dict:
    """Run a teacher for `transitions` steps (recorded in D4RL layout) or for `episodes` episodes (returns
    only). Observations are the raw env observations; actions the clipped actions the env executed."""
    env = tasks.make_env(task, seed=seed)
    rng = np.random.default_rng(seed) if stochastic else None
    n = transitions or episodes * task.max_episode_steps
    rec = transitions is not None
    if rec:
        data = {"observations": np.zeros((n, task.obs_dim), np.float32),
                "actions": np.zeros((n, task.act_dim), np.float32), "rewards": np.zeros(n, np.float32),
                "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}
    returns, lengths, ep_ret, ep_len = [], [], 0.0, 0
    obs = env.reset()["state"]
    bar = tqdm(total=n, desc=f"{task.name} rollout", unit="step", dynamic_ncols=True, disable=not progress)
    t = 0
    for t in range(n):
        # float32, like the file: the stored action is then exactly the one the env executed
        action = np.clip(agent.act(obs, rng), env.low, env.high).astype(np.float32)
        next_obs, reward, term, trunc, _ = env.step(action)
        next_obs = next_obs["state"]
        if rec:
            data["observations"][t], data["actions"][t], data["rewards"][t] = obs, action, reward
            data["terminals"][t], data["timeouts"][t] = term, trunc and not term
        ep_ret, ep_len = ep_ret + reward, ep_len + 1
        obs = next_obs
        if term or trunc:
            returns.append(ep_ret)
            lengths.append(ep_len)
            ep_ret, ep_len = 0.0, 0
            obs = env.reset()["state"]
            if not rec and len(returns) >= episodes:
                break
        if t % 1000 == 999:
            bar.update(1000)
    bar.update(t + 1 - bar.n)
    bar.close()
    env.close()
    out = {"returns": np.array(returns), "lengths": np.array(lengths, dtype=np.int64)}
    if rec:
        if ep_len:  # the buffer ends mid-episode: a time-out, not a termination
            data["timeouts"][-1] = True
        out["data"], out["tail_length"] = data, ep_len
    return out


def collect_locomotion(task_name, out=None, seed=0, transitions=200_000, teacher_steps=None,
                       ckpt_every=25_000, target_return=None, teacher_dir=None, teacher=None,
                       eval_episodes=10, progress=True) -> dict:
    """Train a PPO teacher (or load `teacher`, a checkpoint path), pick the checkpoint whose stochastic
    return is closest to the medium target, and write `transitions` of its stochastic rollouts to `out`."""
    task = tasks.TASKS[task_name]
    spec = TEACHERS[task_name]
    out = out or task.default_dataset
    target = float(target_return or spec.target)
    teacher_steps = int(teacher_steps or spec.max_steps)
    if transitions < 1 or teacher_steps < 1 or ckpt_every < 1 or eval_episodes < 1:
        raise tasks.TaskError("--transitions, --teacher-steps, --ckpt-every and --eval-episodes must be >= 1")
    if teacher is not None and not Path(teacher).is_file():
        raise tasks.TaskError(f"{teacher}: teacher checkpoint not found")
    if teacher is not None and (other := torch.load(teacher, map_location="cpu", weights_only=True)["task"]) != task_name:
        raise tasks.TaskError(f"{teacher}: a {other} teacher, not {task_name}")
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small MLPs: one thread is fastest and leaves the other core free
    try:
        scores = {}  # checkpoint path -> (step, stochastic return)

        def score(path, step):
            """Stochastic return of a checkpoint; True (stop training) if it is within tolerance of the
            target. A hit is confirmed on 2x more fresh episodes (pooled mean), since stopping at the
            first lucky 10-episode estimate would overrate the teacher (walker2d: std ~900 per episode)."""
            agent = load_teacher(path, task)
            ret = rollout(agent, task, seed + 10_000, episodes=eval_episodes)["returns"]
            hit = abs(ret.mean() - target) <= TARGET_TOL * target
            if hit:
                ret = np.r_[ret, rollout(agent, task, seed + 15_000, episodes=2 * eval_episodes)["returns"]]
                hit = abs(ret.mean() - target) <= TARGET_TOL * target
            scores[path] = (step, float(ret.mean()))
            if progress:
                tqdm.write(f"  checkpoint {step:>8d} steps: stochastic return {ret.mean():7.1f} +- {ret.std():5.1f} "
                           f"over {len(ret)} episodes (target {target:.0f}{', hit' if hit else ''})")
            return hit

        if teacher is None:
            teacher_dir = teacher_dir or f"runs/teacher/{task_name}_seed{seed}"
            train_teacher(task, teacher_steps, seed, teacher_dir, ckpt_every, score, progress=progress)
            teacher = min(scores, key=lambda p: abs(scores[p][1] - target))
        else:
            score(teacher, int(torch.load(teacher, map_location="cpu", weights_only=True)["step"]))
        teacher_minutes = (time.time() - t0) / 60
        step, _ = scores[teacher]
        agent = load_teacher(teacher, task)
        stoch = rollout(agent, task, seed + 20_000, episodes=eval_episodes)["returns"]
        det = rollout(agent, task, seed + 20_000, stochastic=False, episodes=eval_episodes)["returns"]
        res = rollout(agent, task, seed + 30_000, transitions=transitions, progress=progress)
    finally:
        torch.set_num_threads(threads)
    import gymnasium
    import mujoco

    data, ret = res["data"], res["returns"]
    metadata = {"task": task_name, "env_id": task.env_id, "seed": seed, "policy": "PPO teacher (collect_demos.py)",
                "teacher_checkpoint": str(teacher), "teacher_steps": step, "target_return": target,
                "teacher_return_stochastic": float(stoch.mean()), "teacher_return_deterministic": float(det.mean()),
                "actions": "sampled from the Gaussian policy, clipped to the action space (as executed)",
                "gymnasium_version": gymnasium.__version__, "mujoco_version": mujoco.__version__}
    write_d4rl_hdf5(out, data, metadata)
    stats = ret if len(ret) else np.zeros(1)
    return {
        "task": task_name, "out": str(out), "seed": seed, "teacher_checkpoint": str(teacher),
        "teacher_steps": step, "teacher_minutes": teacher_minutes, "target_return": target,
        "checkpoints": {int(s): round(r, 1) for s, r in sorted(scores.values())},  # step -> stochastic return
        "teacher_return_stochastic": float(stoch.mean()), "teacher_return_stochastic_std": float(stoch.std()),
        "teacher_return_deterministic": float(det.mean()), "transitions": int(len(data["actions"])),
        "episodes": int(len(ret)), "tail_length": int(res["tail_length"]),
        "return_mean": float(stats.mean()), "return_std": float(stats.std()),
        "return_min": float(stats.min()), "return_max": float(stats.max()),
        "mean_length": float(res["lengths"].mean()) if len(ret) else 0.0,
        "terminals": int(data["terminals"].sum()), "timeouts": int(data["timeouts"].sum()),
        "file_size_mb": os.path.getsize(out) / 2**20, "minutes": (time.time() - t0) / 60,
    }
