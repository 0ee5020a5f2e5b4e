"""Demonstrations: scripted experts for robosuite Lift / Can / Square, PPO teachers for locomotion.

Scripted, state-based expert demonstrations for robosuite Lift / Can / Square.

Each expert is a small phase machine that reads object and gripper poses from the
simulator and servos the OSC_POSE controller (7-D delta action). Per-episode randomness
(gains, speed caps, hover heights, waypoint offsets, grasp durations, Gaussian action
noise) makes the demonstrations vary like robomimic's multi-human ("MH") data. Episodes
stop a few steps after the first success; by default only successful episodes are kept.
The output is robomimic's hdf5 layout, written by `tasks.write_robomimic_hdf5`.

    python collect_demos.py --task square --episodes 100            # low-dim
    python collect_demos.py --task lift --episodes 50 --images      # + 96x96 cameras

Locomotion (hopper, walker2d) has no scripted expert: a compact PPO teacher is trained on the CPU
(checkpoint every 25k steps), the checkpoint whose *stochastic* return is closest to a D4RL-"medium"
target (hopper 1500, walker2d 2500) is chosen, and its stochastic rollouts are written in D4RL layout
(observations, clipped executed actions, rewards, terminals on true terminations only, timeouts on the
1000-step limit and on the last transition; metadata/ attrs describe the teacher):

    python collect_demos.py --task hopper                             # 200k transitions
    python collect_demos.py --task walker2d --transitions 1000000
    python collect_demos.py --task hopper --teacher runs/teacher/hopper_seed0/step_0176128.pt  # reuse one

`collect(...)` is the programmatic entry point (used when a default dataset is missing); for locomotion
its `episodes` argument is ignored (the size is `transitions`). To add another task, register it in
RUNNERS (an episode runner for arm tasks, or a TeacherSpec in TEACHERS for a gym task).
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
from scipy.spatial.transform import Rotation
from torch import nn
from torch.distributions import Normal
from tqdm import tqdm

import tasks
from finetune import RewardScaler, RunningMeanStd

# ----------------------------------------------------------------------------- geometry
POS_SCALE = 0.05  # metres per unit of position action (OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per unit of rotation action
GRIP_OPEN, GRIP_CLOSE = -1.0, 1.0
# Gripper pointing down at yaw 0: site x (finger-closing axis) = world +y, site z = world -z.
R_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def down_at_yaw(yaw: float) -> np.ndarray:
    """Top-down gripper orientation whose fingers close along rot_z(yaw) @ (0, 1, 0)."""
    return rot_z(yaw) @ R_DOWN


def body_yaw(R: np.ndarray) -> float:
    """Yaw of a body's x axis in the world xy plane."""
    return float(np.arctan2(R[1, 0], R[0, 0]))


def gripper_yaw(R: np.ndarray) -> float:
    """Inverse of down_at_yaw for the yaw part (column 0 = (-sin, cos, 0))."""
    return float(np.arctan2(-R[0, 0], R[1, 0]))


def wrap(a: float, period: float = 2 * np.pi) -> float:
    """Wrap an angle to [-period/2, period/2)."""
    return float((a + period / 2) % period - period / 2)


def rot_err(R_tgt: np.ndarray, R: np.ndarray) -> np.ndarray:
    """World-frame rotation vector taking R to R_tgt (the controller applies R(delta) @ R)."""
    return Rotation.from_matrix(R_tgt @ R.T).as_rotvec()


# ----------------------------------------------------------------------------- experts
class ArmExpert:
    """Phase-machine expert for a single Panda with the OSC_POSE + gripper action.

    Subclasses implement `sample()` (per-episode parameters) and `policy()` (returns the
    clean action and may call `goto`). `__call__` adds Gaussian noise and clips.
    """

    first_phase = "hover"
    max_retries = 3

    def __init__(self, sim_env, rng: np.random.Generator, noise: float):
        self.env = sim_env
        self.sim = sim_env.sim
        self.rng = rng
        self.noise = noise
        self.site = sim_env.robots[0].eef_site_id["right"]
        self.kp = rng.uniform(0.8, 1.2)
        self.vmax = rng.uniform(0.6, 1.0)
        self.phase, self.t = self.first_phase, 0
        self.retries = 0
        self.prev_pos = self.eef()[0]
        self.speed = 0.0  # eef displacement over the last step (m)
        self.sample()

    # -- helpers
    def eef(self):
        d = self.sim.data
        return d.site_xpos[self.site].copy(), d.site_xmat[self.site].reshape(3, 3).copy()

    def body(self, body_id: int):
        d = self.sim.data
        return d.body_xpos[body_id].copy(), d.body_xmat[body_id].reshape(3, 3).copy()

    def finger_gap(self) -> float:
        q = self.sim.data.qpos[self.env.robots[0]._ref_gripper_joint_pos_indexes["right"]]
        return float(q[0] - q[1])

    def goto(self, phase: str):
        self.phase, self.t = phase, -1  # t is incremented after policy()

    def servo(self, tgt_pos, tgt_R, grip, vmax=None, vmax_z=None, kp_xy=1.0, rot_gain=1.5) -> np.ndarray:
        """P-control towards an absolute pose. With vmax_z, xy and z speeds are capped separately;
        kp_xy scales the xy gain (fine alignment), rot_gain the orientation gain."""
        pos, R = self.eef()
        vmax = self.vmax if vmax is None else vmax
        v = self.kp * (np.asarray(tgt_pos) - pos) / POS_SCALE
        v[:2] *= kp_xy
        if vmax_z is None:
            n = np.linalg.norm(v)
            if n > vmax:
                v *= vmax / n
        else:
            n = np.linalg.norm(v[:2])
            if n > vmax:
                v[:2] *= vmax / n
            v[2] = np.clip(v[2], -vmax_z, vmax_z)
        w = np.clip(rot_gain * rot_err(tgt_R, R) / ROT_SCALE, -1.0, 1.0)
        return np.concatenate([v, w, [grip]])

    def pos_err(self, tgt_pos) -> float:
        return float(np.linalg.norm(np.asarray(tgt_pos) - self.eef()[0]))

    def ang_err(self, tgt_R) -> float:
        return float(np.linalg.norm(rot_err(tgt_R, self.eef()[1])))

    def retry(self):
        """Grasp lost or phase timed out: open and start over (bounded)."""
        self.retries += 1
        self.goto("reopen" if self.retries <= self.max_retries else "give_up")

    # -- interface
    def sample(self):
        raise NotImplementedError

    def policy(self) -> np.ndarray:
        raise NotImplementedError

    def __call__(self) -> np.ndarray:
        pos = self.eef()[0]
        self.speed = float(np.linalg.norm(pos - self.prev_pos))
        self.prev_pos = pos
        a = self.policy()
        self.t += 1
        if self.noise > 0:
            a = a + self.rng.normal(0.0, self.noise, 7) * np.array([1, 1, 1, 0.3, 0.3, 0.3, 0])
        return np.clip(a, -1.0, 1.0)

    def grasp_phases(self, hover_tgt, grasp_tgt, R_t, descend_timeout, grasp_tol=0.008, hover_xy_tol=None):
        """hover above the grasp point -> descend onto it -> close the gripper; shared by every expert.
        Returns an action, or None when the phase is not one of these three."""
        if self.phase == "hover":
            xy_ok = hover_xy_tol is None or np.linalg.norm(hover_tgt[:2] - self.eef()[0][:2]) < hover_xy_tol
            if xy_ok and self.pos_err(hover_tgt) < 0.012 and self.ang_err(R_t) < 0.08:
                self.goto("descend")
            return self.servo(hover_tgt, R_t, GRIP_OPEN)
        if self.phase == "descend":
            if self.pos_err(grasp_tgt) < grasp_tol or self.t > descend_timeout:
                self.goto("close")
                self.hold = grasp_tgt
            return self.servo(grasp_tgt, R_t, GRIP_OPEN, vmax_z=self.descend_vmax)
        if self.phase == "close":
            if self.t >= self.close_steps:
                self.goto("lift")
            return self.servo(self.hold, R_t, GRIP_CLOSE)
        return None

    def common_phases(self, hold_R) -> np.ndarray | None:
        """Phases shared by all experts (recovery). Returns an action or None."""
        pos, _ = self.eef()
        if self.phase == "reopen":  # open and rise, then start again
            if self.t >= 8:
                self.goto(self.first_phase)
            return self.servo(pos + [0, 0, 0.03], hold_R, GRIP_OPEN)
        if self.phase == "give_up":
            return self.servo(pos, hold_R, GRIP_OPEN)
        return None


class LiftExpert(ArmExpert):
    """Hover over the cube, descend, close, lift to ~1.05 m."""

    def sample(self):
        r = self.rng
        self.hover_h = r.uniform(0.06, 0.12)
        self.hover_off = r.uniform(-0.01, 0.01, 2)
        self.grasp_off = np.append(r.uniform(-0.004, 0.004, 2), -0.005 + r.uniform(-0.003, 0.003))
        self.close_steps = int(r.integers(6, 12))
        self.lift_z = r.uniform(1.0, 1.08)
        self.descend_vmax = r.uniform(0.4, 0.6)
        self.cube_id = self.env.cube_body_id

    def policy(self):
        cube, Rc = self.body(self.cube_id)
        R_t = down_at_yaw(wrap(body_yaw(Rc), np.pi / 2))  # cube is 4-fold symmetric
        pos, _ = self.eef()
        a = self.common_phases(R_t)
        if a is not None:
            return a
        a = self.grasp_phases(cube + np.append(self.hover_off, self.hover_h), cube + self.grasp_off, R_t, 40)
        if a is not None:
            return a
        if self.phase == "lift":
            if self.t > 5 and (pos[2] - cube[2] > 0.03 or self.finger_gap() < 0.01):
                self.retry()
            return self.servo([self.hold[0], self.hold[1], self.lift_z], R_t, GRIP_CLOSE)
        raise ValueError(self.phase)


class CanExpert(ArmExpert):
    """Grasp the can from above, carry it over the bin quadrant, release ~5 cm above the floor."""

    # Aim well inside the target quadrant: its centre (0.1975, 0.4025) is at the Panda's reach edge.
    DROP_XY = np.array([0.15, 0.34])

    def sample(self):
        r = self.rng
        self.hover_h = r.uniform(0.08, 0.14)
        self.yaw = r.uniform(-0.3, 0.3)
        self.grasp_off = np.append(r.uniform(-0.004, 0.004, 2), 0.01 + r.uniform(-0.005, 0.005))
        self.close_steps = int(r.integers(8, 12))
        self.carry_z = r.uniform(1.02, 1.08)
        self.drop_xy = self.DROP_XY + r.uniform(-0.015, 0.015, 2)
        self.release_z = r.uniform(0.93, 0.97)
        self.open_steps = 6
        self.descend_vmax = r.uniform(0.4, 0.6)
        self.can_id = self.env.obj_body_id["Can"]

    def policy(self):
        can, _ = self.body(self.can_id)
        R_t = down_at_yaw(self.yaw)
        pos, _ = self.eef()
        a = self.common_phases(R_t)
        if a is not None:
            return a
        held = self.phase in ("lift", "carry", "lower")
        if held and self.t > 5 and (pos[2] - can[2] > 0.04 or self.finger_gap() < 0.01):
            self.retry()
            return self.servo(pos, R_t, GRIP_OPEN)
        a = self.grasp_phases(can + [0.0, 0.0, self.hover_h], can + self.grasp_off, R_t, 50)
        if a is not None:
            return a
        if self.phase == "lift":
            if pos[2] > self.carry_z - 0.03:
                self.goto("carry")
            return self.servo([self.hold[0], self.hold[1], self.carry_z], R_t, GRIP_CLOSE)
        if self.phase == "carry":  # servo the *can's* xy onto the drop point
            d = self.drop_xy - can[:2]
            if np.linalg.norm(d) < 0.02:
                self.goto("lower")
            return self.servo(np.append(pos[:2] + d, self.carry_z), R_t, GRIP_CLOSE)
        if self.phase == "lower":
            d = self.drop_xy - can[:2]
            if pos[2] < self.release_z + 0.01 or self.t > 60:
                self.goto("open")
                self.hold = pos
            return self.servo(np.append(pos[:2] + d, self.release_z), R_t, GRIP_CLOSE, vmax=0.6)
        if self.phase == "open":
            if self.t >= self.open_steps:
                self.goto("retreat")
            return self.servo(self.hold, R_t, GRIP_OPEN)
        if self.phase == "retreat":
            return self.servo(np.append(self.hold[:2], 1.1), R_t, GRIP_OPEN)
        raise ValueError(self.phase)


class SquareExpert(ArmExpert):
    """Grasp the nut's handle, yaw it to 180/270 deg over peg 1, lower it onto the peg."""

    def sample(self):
        r = self.rng
        self.hover_h = r.uniform(0.06, 0.10)
        self.grasp_off = np.array([0.0, 0.0, -0.003 + r.uniform(-0.002, 0.002)])
        self.handle_shift = r.uniform(0.0, 0.008)  # along the handle, away from the ring
        self.close_steps = int(r.integers(8, 12))
        self.carry_z = r.uniform(1.00, 1.04)
        self.lower_vz = r.uniform(0.3, 0.5)
        self.kp_xy = r.uniform(1.5, 2.0)  # stiffer xy servo of the nut centre over the peg
        self.rot_gain = r.uniform(2.5, 3.5)  # and of the wrist: ~1 deg of tilt already jams the nut
        self.descend_vmax = r.uniform(0.4, 0.6)
        m = self.sim.model
        self.nut_id = self.env.obj_body_id["SquareNut"]
        self.handle_site = m.site_name2id("SquareNut_handle_site")
        self.peg_id = self.env.peg1_body_id
        self.R_grasp = None
        self.nut_goal_yaw = None
        self.realigns = 0

    def policy(self):
        d = self.sim.data
        nut, Rn = self.body(self.nut_id)
        nut_yaw = body_yaw(Rn)
        handle = d.site_xpos[self.handle_site] + self.handle_shift * Rn[:, 0]
        peg = d.body_xpos[self.peg_id]
        pos, R = self.eef()
        grasp_R = down_at_yaw(wrap(nut_yaw, np.pi))
        a = self.common_phases(grasp_R if self.R_grasp is None else self.R_grasp)
        if a is not None:
            self.R_grasp = None
            return a
        held = self.phase in ("lift", "align", "lower", "raise")
        if held and self.t > 5 and (np.linalg.norm(pos - handle) > 0.04 or self.finger_gap() < 0.01):
            self.retry()
            return self.servo(pos, R, GRIP_OPEN)
        a = self.grasp_phases(handle + [0.0, 0.0, self.hover_h], handle + self.grasp_off, grasp_R, 50,
                              grasp_tol=0.006, hover_xy_tol=0.005)
        if a is not None:
            if self.phase == "lift":      # the gripper has just closed: carry with the grasp orientation
                self.R_grasp = grasp_R
            return a
        if self.phase == "lift":
            if pos[2] > self.carry_z - 0.015:
                self.goto("align")
                self.choose_goal_yaw(nut_yaw, gripper_yaw(R))
            return self.servo([self.hold[0], self.hold[1], self.carry_z], self.R_grasp, GRIP_CLOSE)
        # closed loop on the nut: gripper yaw target = current yaw + remaining nut yaw error
        yaw_e = wrap(self.nut_goal_yaw - nut_yaw)
        R_t = down_at_yaw(gripper_yaw(R) + yaw_e)  # absolute pitch/roll (down), only yaw relative
        dxy = peg[:2] - nut[:2]
        if self.phase == "align":
            done = np.linalg.norm(dxy) < 0.004 and abs(yaw_e) < 0.05 and self.speed < 0.002
            if done or (self.t > 120 and np.linalg.norm(dxy) < 0.008):
                self.goto("lower")
            return self.servo(np.append(pos[:2] + dxy, self.carry_z), R_t, GRIP_CLOSE, vmax_z=0.5,
                              kp_xy=self.kp_xy, rot_gain=self.rot_gain)
        if self.phase == "lower":  # z steps only while the nut is centred (xy and z capped separately)
            z = pos[2] - 0.03 if np.linalg.norm(dxy) < 0.003 else pos[2]
            stalled = self.t > 20 and self.speed < 0.0005 and np.linalg.norm(dxy) < 0.003
            if stalled and nut[2] > 0.88 and self.realigns < 2:  # jammed on the peg top: lift, re-align
                self.realigns += 1
                self.goto("raise")
            elif nut[2] < 0.835 or stalled or self.t > 150:
                self.goto("release")
                self.hold = pos
            return self.servo(np.append(pos[:2] + dxy, z), R_t, GRIP_CLOSE, vmax_z=self.lower_vz,
                              kp_xy=self.kp_xy, rot_gain=self.rot_gain)
        if self.phase == "raise":
            if pos[2] > self.carry_z - 0.01 or self.t > 40:
                self.goto("align")
            return self.servo(np.append(pos[:2], self.carry_z), R_t, GRIP_CLOSE, vmax_z=0.5)
        if self.phase == "release":
            if self.t >= 6:
                self.goto("retreat")
            return self.servo(self.hold, R_t, GRIP_OPEN)
        if self.phase == "retreat":
            return self.servo(np.append(self.hold[:2], 1.05), R_t, GRIP_OPEN)
        raise ValueError(self.phase)

    def choose_goal_yaw(self, nut_yaw: float, grip_yaw: float):
        """Nut yaw 180 or 270 deg: the handle then sits on the robot side of the peg. (0 deg puts the
        gripper at the reach edge, 90 deg near it: the arm stalls and tilts, the nut jams.)
        Pick the one needing the least wrist rotation that keeps |gripper yaw| < 150 deg (joint 7)."""
        offset = wrap(nut_yaw - grip_yaw)
        best = None
        for goal in (np.pi, 1.5 * np.pi):
            g_yaw = wrap(goal - offset)
            if abs(g_yaw) > np.deg2rad(150):
                continue
            cost = abs(wrap(g_yaw - grip_yaw)) + 0.3 * self.rng.random()
            if best is None or cost < best[0]:
                best = (cost, goal)
        self.nut_goal_yaw = best[1] if best else 1.5 * np.pi


EXPERTS = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert}


# ----------------------------------------------------------------------------- episodes
def _robomimic_obs(env, task, images: bool, obs_rgb=None, force: bool = False) -> dict:
    """Raw robosuite obs under robomimic's key names (every robot0_* key except proprio-state,
    `object`, and `<camera>_image` HWC upright, taken from make_env's "rgb" so they match eval).
    Without `force` this reads robosuite's observable caches (filled by the last step: no re-render)."""
    raw = env.sim_env._get_observations(force_update=force)
    out = {}
    for k, v in raw.items():
        if k.startswith("robot0_") and k != "robot0_proprio-state" and not k.endswith("_image"):
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
RUNNERS = {"lift": run_arm_episode, "can": run_arm_episode, "square": run_arm_episode,
           **{name: collect_locomotion for name in TEACHERS}}
EPISODE_STEPS = {"lift": 200, "can": 400, "square": 400}  # scripted-episode caps (steps)


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
    out = out or task.default_dataset
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
    if episodes_out:
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
    p.add_argument("--out", default=None, help="output hdf5 path (default: the task's default_dataset)")
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
