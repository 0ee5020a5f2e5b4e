"""Demonstrations made offline: runs the scripted experts (experts.py) and locomotion PPO teachers, writes files.

robosuite lift / can / square / transport: each episode runs an expert in the real simulator; episodes stop a
few steps after the first success and only successful ones are kept (--keep-failures keeps the rest, with
robomimic's mask/successful and mask/failed). Output: robomimic's hdf5 layout (tasks.write_robomimic_hdf5).

    python collect_demos.py --task square --episodes 100            # low-dim
    python collect_demos.py --task lift --episodes 50 --images      # + 96x96 cameras
    python collect_demos.py --task transport --episodes 100         # two arms, 14-D actions

Franka Kitchen (kitchen-complete / -partial / -mixed): the IK expert; an episode counts only if every subtask
holds in its *final* state (the env latches a subtask the first time it is within reach of its goal). Output:
D4RL's layout with FrankaKitchen-v1's 59-D observations (tasks.py also reads D4RL's own 60-D kitchen files).

    python collect_demos.py --task kitchen-complete --episodes 200

Locomotion (hopper, walker2d) has no scripted expert: a compact PPO teacher is trained on the CPU
(checkpoint every 25k steps), the checkpoint whose *stochastic* return is closest to a D4RL-"medium"
target (hopper 1500, walker2d 2500) is chosen, and its stochastic rollouts are written in D4RL layout
(observations, clipped executed actions, rewards, terminals on true terminations only, timeouts on the
1000-step limit and on the last transition; metadata/ attrs describe the teacher):

    python collect_demos.py --task hopper                             # 200k transitions
    python collect_demos.py --task walker2d --transitions 1000000
    python collect_demos.py --task hopper --teacher runs/teacher/hopper_seed0/step_0176128.pt  # reuse one

`collect(...)` is the programmatic entry point (used when a default dataset is missing); for locomotion
its `episodes` argument is ignored (the size is `transitions`). To add a task, register an episode runner
in RUNNERS (or a TeacherSpec in TEACHERS for a gym task).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_lib
import sys
import time
import traceback

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torch.distributions import Normal
from tqdm import tqdm

import tasks
from experts import EXPERTS, KitchenExpert, sample_order, subtask_done
from finetune import RewardScaler, RunningMeanStd

# ----------------------------------------------------------------------------- episodes
def _robomimic_obs(env, task, images: bool, obs_rgb=None, force: bool = False) -> dict:
    """Raw robosuite obs under robomimic's key names (every robot0_* / robot1_* key except proprio-state,
    `object`, and `<camera>_image` HWC upright, taken from make_env's "rgb" so they match eval).
    Without `force` this reads robosuite's observable caches (filled by the last step: no re-render)."""
    raw = env.sim_env._get_observations(force_update=force)
    out = {}
    for k, v in raw.items():
        if k.startswith("robot") and not k.endswith(("_proprio-state", "_image")):
            out[k] = np.array(v, dtype=np.float64)
    out["object"] = np.array(raw["object-state"], dtype=np.float64)
    if images:
        for i, cam in enumerate(task.cameras):
            out[f"{cam}_image"] = np.ascontiguousarray(obs_rgb[3 * i : 3 * i + 3].transpose(1, 2, 0))
    return out


def run_arm_episode(env, task, rng, noise: float, images: bool, max_steps: int):
    """Run one scripted episode. Returns (episode dict, success)."""
    obs = env.reset()
    sim_env = env.sim_env
    model_file = sim_env.sim.model.get_xml()
    expert = EXPERTS[task.name](sim_env, rng, noise)
    post_success = int(rng.integers(2, 6))  # a few steps past the first success
    keys = ("actions", "states", "rewards", "dones")
    ep = {k: [] for k in keys}
    obs_seq = []
    success_at = None
    for t in range(max_steps):
        # t == 0 in image mode: make_env's reset skips the forced refresh, and PickPlaceCan's
        # object-state reads partly zero until one (it re-renders the same frame once per episode).
        obs_seq.append(_robomimic_obs(env, task, images, obs.get("rgb"), force=images and t == 0))
        ep["states"].append(sim_env.sim.get_state().flatten())
        action = expert()
        obs, reward, terminated, truncated, info = env.step(action)
        ok = bool(info.get("success", False))
        ep["actions"].append(action)
        ep["rewards"].append(float(reward))
        ep["dones"].append(int(ok))
        if ok and success_at is None:
            success_at = t
        if success_at is not None and t >= success_at + post_success:
            break
        if truncated or (terminated and not ok) or expert.phase == "give_up":
            break
    ep["dones"][-1] = 1
    out = {
        "actions": np.asarray(ep["actions"], dtype=np.float64),
        "states": np.asarray(ep["states"], dtype=np.float64),
        "rewards": np.asarray(ep["rewards"], dtype=np.float64),
        "dones": np.asarray(ep["dones"], dtype=np.int64),
        "obs": {k: np.stack([o[k] for o in obs_seq]) for k in obs_seq[0]},
        "model_file": model_file,
    }
    return out, success_at is not None


def run_kitchen_episode(env, task, rng, noise: float, images: bool, max_steps: int):
    """One scripted episode on a tasks.KitchenEnv. Returns (episode dict in D4RL columns, success).

    success = every subtask holds in the *final* state (the env latches a subtask the first time it is
    within 0.3 of its goal, so a kettle that passes the goal mid-carry and then drops would still count).
    The episode stops when the env terminates (all subtasks latched) or after max_steps.
    """
    if images:
        raise tasks.TaskError(f"task {task.name} is state-only: drop --images")
    obs = env.reset()
    order = sample_order(task.subtasks, rng)
    expert = KitchenExpert(env.sim_env, order, rng, noise)
    observations, actions, rewards = [], [], []
    terminated, info = False, {"completed": []}
    for _ in range(max_steps):
        action = expert()
        observations.append(obs["state"])
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    qpos = env.sim_env.unwrapped.data.qpos
    final = {name: subtask_done(qpos, name) for name in task.subtasks}
    n = len(actions)
    terminals = np.zeros(n, dtype=bool)
    terminals[-1] = terminated  # all subtasks done: nothing is left to earn
    ep = {"observations": np.asarray(observations, dtype=np.float32),
          "actions": np.asarray(actions, dtype=np.float32),
          "rewards": np.asarray(rewards, dtype=np.float32),
          "terminals": terminals, "timeouts": ~terminals & (np.arange(n) == n - 1),
          "order": order, "completed": list(info["completed"]), "final": final}
    return ep, all(final.values())


def kitchen_d4rl_columns(episodes: list) -> dict:
    """Concatenate episodes into D4RL's flat columns (observations, actions, rewards, terminals, timeouts)."""
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in keys}


def kitchen_metadata(task, seed: int, noise: float, stats: dict) -> dict:
    import gymnasium
    import gymnasium_robotics
    import mujoco

    return {"task": task.name, "env_id": task.env_id, "subtasks": json.dumps(list(task.subtasks)),
            "observation": "FrankaKitchen-v1 59-D: robot qpos 9, robot qvel 9, object qpos 21, object qvel 20",
            "policy": "scripted DLS-IK expert (experts.KitchenExpert)", "seed": seed, "action_noise": noise,
            "episodes": stats["episodes"], "attempts": stats["attempts"],
            "rewards": "subtasks newly completed at the step (env reward)",
            "filter": "kept episodes whose final state satisfies every subtask",
            "gymnasium_version": gymnasium.__version__, "gymnasium_robotics_version": gymnasium_robotics.__version__,
            "mujoco_version": mujoco.__version__}


# ----------------------------------------------------------------------------- locomotion teacher
# Hopper/Walker2d have no scripted expert. A compact CleanRL-style PPO (ppo_continuous_action: 4 envs x 512
# steps, 10 epochs of 64-sample minibatches, observation and reward normalisation) trains a teacher on the
# CPU; a checkpoint (weights + obs-normalisation stats) is saved every ckpt_every env steps and scored by
# the return of its *stochastic* policy, which is what the dataset contains (often far below the
# deterministic return). The checkpoint closest to a D4RL-"medium" target is rolled out into a D4RL-layout
# hdf5 file. Observations are stored raw (the teacher's normalisation stays in its checkpoint).
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
        mean, var = self.obs_mean.numpy(), self.obs_var.numpy()
        return torch.as_tensor(np.clip((obs - mean) / np.sqrt(var + 1e-8), -10, 10), dtype=torch.float32)

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
        return np.clip((o - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8), -10, 10).astype(np.float32)

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


def write_d4rl_hdf5(path, data: dict, metadata: dict):
    """D4RL layout (observations, actions, rewards float32; terminals, timeouts bool) plus metadata/ attrs;
    atomic: written to path + ".tmp", then renamed (the .tmp is removed if writing fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in data.items():
                f.create_dataset(key, data=value)
            meta = f.create_group("metadata")
            for key, value in metadata.items():
                meta.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


# What makes each task's data: arm tasks register an episode runner (run by the worker pool), locomotion
# tasks the PPO-teacher pipeline (collect() dispatches on TEACHERS). pretrain.py checks membership here.
RUNNERS = {"lift": run_arm_episode, "can": run_arm_episode, "square": run_arm_episode, "transport": run_arm_episode,
           **{name: collect_locomotion for name in TEACHERS},
           **{name: run_kitchen_episode for name, t in tasks.TASKS.items() if t.suite == "kitchen"}}
EPISODE_STEPS = {"lift": 200, "can": 400, "square": 400, "transport": 800}  # scripted-episode caps (steps)


# ----------------------------------------------------------------------------- collection
def _collect_worker(task_name, quota, max_attempts, seed, images, noise, keep_failures, emit):
    """Collect `quota` successful episodes with one env; report each through emit(kind, payload)."""
    task = tasks.TASKS[task_name]
    env = tasks.make_env(task, obs_mode="image" if images else "state", seed=seed)
    rng = np.random.default_rng(seed)
    max_steps = min(EPISODE_STEPS.get(task_name, task.max_episode_steps), task.max_episode_steps)
    successes = attempts = 0
    while successes < quota and attempts < max_attempts:
        ep, ok = RUNNERS[task_name](env, task, rng, noise, images, max_steps)
        attempts += 1
        successes += ok
        ep["success"] = ok
        emit("episode" if (ok or keep_failures) else "failure", ep if (ok or keep_failures) else len(ep["actions"]))
    env.close()
    emit("done", {"attempts": attempts, "successes": successes})


def _worker_main(worker, args, queue, parent_pid):
    def emit(kind, payload):
        if os.getppid() != parent_pid:  # parent killed: do not collect on as an orphan
            os._exit(1)
        queue.put((worker, kind, payload))

    try:
        _collect_worker(*args, emit=emit)
    except BaseException:  # noqa: BLE001 - forwarded to the parent
        queue.put((worker, "error", traceback.format_exc()))


def env_args_for(task, images: bool) -> dict:
    """robomimic `env_args`: how to rebuild the env that recorded the demos."""
    if task.suite != "robosuite":  # robomimic EnvType.GYM_TYPE
        return {"env_name": task.env_id, "type": 2, "env_kwargs": dict(task.env_kwargs)}
    import robosuite

    return {"env_name": task.env_id, "env_version": robosuite.__version__, "type": 1,
            "env_kwargs": tasks.robosuite_kwargs(task, "image" if images else "state")}


def _run_workers(jobs, handle):
    """One process per job; messages are handled as they arrive (progress), results are merged
    by the caller in worker order. A worker that dies without reporting raises instead of hanging."""
    # fork, not spawn: the caller's __main__ (e.g. pretrain.py) is not re-imported; workers never touch torch.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(w, job, queue, os.getpid()), daemon=True) for w, job in enumerate(jobs)]
    for p in procs:
        p.start()
    done = set()
    try:
        while len(done) < len(procs):
            try:
                w, kind, payload = queue.get(timeout=5.0)
            except queue_lib.Empty:
                dead = [(w, p.exitcode) for w, p in enumerate(procs) if w not in done and not p.is_alive()]
                if dead:
                    raise RuntimeError(f"collect worker(s) died without reporting (worker, exit code): {dead}")
                continue
            handle(w, kind, payload)
            if kind == "done":
                done.add(w)
        for p in procs:
            p.join()
    finally:
        for p in procs:  # only our own workers, on error or Ctrl-C
            if p.is_alive():
                p.terminate()
                p.join()


def _write(out, episodes, env_args, keep_failures):
    """Write via tasks.write_robomimic_hdf5 (atomic). With failures kept, also add mask/successful and
    mask/failed, still atomically: write to a side file, add the masks, then rename. A failed write
    leaves `out` as it was and removes its temporary files."""
    eps = [{k: v for k, v in ep.items() if k != "success"} for ep in episodes]
    side = str(out) + ".masks.tmp"
    try:
        if not keep_failures:
            tasks.write_robomimic_hdf5(out, eps, env_args=env_args, compress_images=True)
            return
        tasks.write_robomimic_hdf5(side, eps, env_args=env_args, compress_images=True)
        with h5py.File(side, "a") as f:
            for name, want in (("successful", True), ("failed", False)):
                names = [f"demo_{i}" for i, ep in enumerate(episodes) if ep["success"] == want]
                f.create_dataset(f"mask/{name}", data=np.array(names, dtype="S"))
        os.replace(side, out)
    except BaseException:
        for tmp in (str(out) + ".tmp", side, side + ".tmp"):  # write_robomimic_hdf5 writes path + ".tmp"
            Path(tmp).unlink(missing_ok=True)
        raise


def collect(task_name, episodes=100, images=False, out=None, workers=2, seed=0, noise=0.05,
            keep_failures=False, max_attempts=None, progress=True, **teacher_kwargs) -> dict:
    """Collect `episodes` successful scripted demos of `task_name` and write them to `out`.

    Worker w (seed + 1000*w) collects a fixed share of the episodes; results are merged in
    worker order, so the file is deterministic for (seed, workers). Returns a summary dict.

    Locomotion tasks (TEACHERS) go to collect_locomotion(task_name, out, seed, **teacher_kwargs) instead:
    their size is set by `transitions` (default 200k, like a D4RL file cut to a fifth), so `episodes`
    (pretrain.py passes --demos) is ignored there; noise/workers/keep_failures/max_attempts too.
    """
    if task_name not in RUNNERS:
        raise tasks.TaskError(f"no demo maker for task {task_name!r}; have {', '.join(sorted(RUNNERS))}")
    if task_name in TEACHERS:
        if images:
            raise tasks.TaskError(f"task {task_name} is state-only: drop --images")
        return collect_locomotion(task_name, out=out, seed=seed, progress=progress, **teacher_kwargs)
    if teacher_kwargs:
        raise TypeError(f"{', '.join(teacher_kwargs)}: only for locomotion tasks ({', '.join(TEACHERS)})")
    if episodes < 1:
        raise tasks.TaskError(f"--episodes must be >= 1, got {episodes}")
    task = tasks.TASKS[task_name]
    if task.suite == "kitchen" and (images or keep_failures):  # D4RL layout: no cameras, no success masks
        raise tasks.TaskError(f"task {task_name} writes state-only D4RL-layout data: drop --images/--keep-failures")
    out = out or str(tasks.default_dataset_path(task, "image" if images else "state"))
    workers = max(1, min(int(workers), episodes))
    max_attempts = max_attempts or 2 * episodes + 20
    quotas = [episodes // workers + (w < episodes % workers) for w in range(workers)]
    caps = [max(1, round(max_attempts * q / episodes)) for q in quotas]
    t0 = time.time()

    kept = [[] for _ in range(workers)]
    lengths = []
    stats = [None] * workers
    bar = None
    if progress:
        bar = tqdm(total=episodes, desc=f"{task_name} demos", unit="ep", dynamic_ncols=True)
    n_att = [0]

    def handle(w, kind, payload):
        if kind == "error":
            raise RuntimeError(f"collect worker {w} failed:\n{payload}")
        if kind == "done":
            stats[w] = payload
            return
        n_att[0] += 1
        if kind == "episode":
            kept[w].append(payload)
            if payload["success"]:
                lengths.append(len(payload["actions"]))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.set_postfix(attempts=n_att[0], refresh=False)

    jobs = [(task_name, quotas[w], caps[w], seed + 1000 * w, images, noise, keep_failures) for w in range(workers)]
    if images and task.suite == "robosuite":
        tasks.setup_rendering()  # pick MUJOCO_GL once here; the workers inherit it
    try:
        if workers == 1:
            _collect_worker(*jobs[0], emit=lambda kind, payload: handle(0, kind, payload))
        else:
            _run_workers(jobs, handle)
    finally:
        if bar is not None:
            bar.close()

    attempts = sum(s["attempts"] for s in stats)
    successes = sum(s["successes"] for s in stats)
    episodes_out = [ep for w in range(workers) for ep in kept[w]]
    if episodes_out and task.suite == "kitchen":  # D4RL layout, like the kitchen-*-v0 files tasks.py also reads
        meta = kitchen_metadata(task, seed, noise, {"episodes": len(episodes_out), "attempts": attempts})
        write_d4rl_hdf5(out, kitchen_d4rl_columns(episodes_out), meta)
    elif episodes_out:
        _write(out, episodes_out, env_args_for(task, images), keep_failures)
    minutes = (time.time() - t0) / 60.0
    return {
        "task": task_name,
        "out": out if episodes_out else None,
        "images": bool(images),
        "workers": workers,
        "seed": seed,
        "noise": noise,
        "successes": successes,
        "attempts": attempts,
        "success_rate": successes / max(attempts, 1),
        "episodes_written": len(episodes_out),
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "min_length": int(np.min(lengths)) if lengths else 0,
        "max_length": int(np.max(lengths)) if lengths else 0,
        "minutes": minutes,
        "episodes_per_minute": successes / max(minutes, 1e-9),
        "file_size_mb": os.path.getsize(out) / 2**20 if episodes_out else 0.0,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(RUNNERS), required=True, help="task to collect demos for")
    p.add_argument("--episodes", type=int, default=100,
                   help="number of successful demos wanted (arm tasks; locomotion uses --transitions)")
    p.add_argument("--images", action="store_true", help="also record 96x96 camera images of the task's cameras")
    p.add_argument("--out", default=None, help="output hdf5 path (default: the task's default_dataset, *_img.hdf5 with --images)")
    p.add_argument("--workers", type=int, default=2, help="parallel collection processes (one per core)")
    p.add_argument("--seed", type=int, default=0, help="base seed; worker w uses seed + 1000*w")
    p.add_argument("--noise", type=float, default=0.05, help="std of Gaussian action noise (x0.3 on rotation)")
    p.add_argument("--keep-failures", action="store_true", help="also write failed episodes")
    p.add_argument("--max-attempts", type=int, default=None, help="cap on attempts (default 2*episodes+20)")
    g = p.add_argument_group(f"locomotion teacher ({', '.join(TEACHERS)})")
    g.add_argument("--transitions", type=int, default=200_000, help="transitions in the dataset (default 200000)")
    g.add_argument("--teacher-steps", type=int, default=None,
                   help="max PPO env steps (default per task: " + ", ".join(f"{k} {v.max_steps}" for k, v in TEACHERS.items())
                   + "); training stops at the first checkpoint within 10%% of the target")
    g.add_argument("--ckpt-every", type=int, default=25_000, help="env steps between teacher checkpoints")
    g.add_argument("--target-return", type=float, default=None,
                   help="stochastic return to aim for (default: " + ", ".join(f"{k} {v.target:.0f}" for k, v in TEACHERS.items()) + ")")
    g.add_argument("--eval-episodes", type=int, default=10, help="stochastic episodes that score a checkpoint")
    g.add_argument("--teacher-dir", default=None, help="checkpoint folder (default runs/teacher/<task>_seed<seed>)")
    g.add_argument("--teacher", default=None, help="use this teacher checkpoint (.pt) instead of training one")
    args = p.parse_args()
    teacher_kwargs = {}
    if args.task in TEACHERS:
        teacher_kwargs = dict(transitions=args.transitions, teacher_steps=args.teacher_steps, ckpt_every=args.ckpt_every,
                              target_return=args.target_return, eval_episodes=args.eval_episodes,
                              teacher_dir=args.teacher_dir, teacher=args.teacher)
    try:
        s = collect(args.task, args.episodes, images=args.images, out=args.out, workers=args.workers,
                    seed=args.seed, noise=args.noise, keep_failures=args.keep_failures,
                    max_attempts=args.max_attempts, **teacher_kwargs)
    except tasks.TaskError as e:
        sys.exit(f"error: {e}")
    if args.task in TEACHERS:
        print(f"{s['task']}: teacher {s['teacher_steps']} PPO steps ({s['teacher_minutes']:.1f} min), return "
              f"stochastic {s['teacher_return_stochastic']:.0f} / deterministic {s['teacher_return_deterministic']:.0f} "
              f"(target {s['target_return']:.0f}); dataset {s['transitions']} transitions, {s['episodes']} episodes, "
              f"return {s['return_mean']:.0f} +- {s['return_std']:.0f} [{s['return_min']:.0f}, {s['return_max']:.0f}], "
              f"{s['file_size_mb']:.1f} MB, {s['minutes']:.1f} min -> {s['out']}")
        print(json.dumps(s))
        return
    print(f"{s['task']}: {s['successes']}/{s['attempts']} successful ({100 * s['success_rate']:.1f}%), "
          f"length {s['mean_length']:.1f} [{s['min_length']}-{s['max_length']}], "
          f"{s['minutes']:.2f} min ({s['episodes_per_minute']:.1f} ep/min), "
          f"{s['file_size_mb']:.1f} MB -> {s['out']}")
    print(json.dumps(s))
    if s["successes"] < args.episodes:
        raise SystemExit(f"only {s['successes']} of {args.episodes} wanted successful demos after {s['attempts']} attempts")


if __name__ == "__main__":
    main()
