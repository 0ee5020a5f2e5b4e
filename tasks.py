"""Tasks, environments and datasets for DMPO (one-step MeanFlow policies + PPO fine-tuning).

Everything the stage scripts need to know about a task lives here:
  * TASKS            -- the task table (envs, observation keys, chunk size, horizon, gamma, data paths)
  * make_env         -- one env with a small gymnasium-like API, actions in env units
  * ChunkVecEnv      -- N envs that execute whole action chunks, auto-reset, report episodes
  * load_dataset     -- robomimic hdf5 / D4RL hdf5 / DPPO-DMPO npz (/ local Minari) -> Dataset in env units
                        (D4RL kitchen-*-v0's 60-D observations are mapped onto FrankaKitchen-v1's 59-D ones)
  * write_robomimic_hdf5, download_dataset, chunk_starts, normalization_stats
  * OBS_LAYOUT, check_layout -- robosuite tasks observe in the robomimic v1.4.1 / DPPO layout; old
                        checkpoints (no "obs_layout") and robosuite-1.5-layout files are refused with one line

User mistakes (missing files, wrong shapes, no renderer, offline) raise TaskError with one line, so the
stage scripts can do `except TaskError as e: sys.exit(f"error: {e}")`.
robosuite, gymnasium and mujoco are imported lazily: MUJOCO_GL must be chosen before mujoco is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np


class TaskError(Exception):
    """A problem the user can fix (file, shape, renderer, network). The message is one line."""


# ----------------------------------------------------------------------------------------------
# Task table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    suite: str  # "robosuite" | "gym" | "kitchen"
    env_id: str  # robosuite env name or gymnasium id
    act_dim: int
    obs_dim: int  # low-dim state size in "state" mode (DPPO layout)
    chunk: int  # Ta: actions executed open-loop per policy call
    max_episode_steps: int  # env steps (not chunks)
    gamma: float  # discount per chunk
    default_dataset: str
    hf_subdir: str  # DMPO-datasets folder; robomimic image data lives in f"{hf_subdir}-img"
    robots: tuple = ()
    proprio_keys: tuple = ()
    object_key: str = ""  # robosuite's raw key; robomimic files (and our env's layout) call it "object"
    # robosuite tasks: the public "object" vector as (observable name, width), in the robosuite-1.4.1 order that
    # the robomimic v1.4.1 / DPPO / DMPO data were recorded with (OBS_LAYOUT); see ROBOSUITE_LAYOUT_SOURCES.
    object_features: tuple = ()
    # the same features in robosuite 1.5's "object-state" order, as (name, sign): what this project's env and
    # files held before it adopted the v1.4.1 layout (LEGACY_OBS_LAYOUT); sign -1 = 1.5 negated the feature.
    legacy_object_order: tuple = ()
    cameras: tuple = ()
    env_kwargs: tuple = ()  # extra gym.make kwargs as (key, value) pairs (keeps Task hashable)
    subtasks: tuple = ()  # kitchen: FrankaKitchen-v1 task names that make up the goal


PANDA = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")  # 3 + 4 (xyzw) + 2 = 9
TWO_PANDAS = PANDA + ("robot1_eef_pos", "robot1_eef_quat", "robot1_gripper_qpos")
IMAGE_SIZE = 96  # camera obs are IMAGE_SIZE x IMAGE_SIZE, like the DPPO/DMPO image datasets
VIDEO_SIZE = 256
NO_CFRC = (("include_cfrc_ext_in_observation", False),)  # see _legacy_gym_columns
KITCHEN_MKLS = ("microwave", "kettle", "light switch", "slide cabinet")

# ----------------------------------------------------------------------------------------------
# Observation layout of the robosuite tasks
# ----------------------------------------------------------------------------------------------
# The public robomimic v1.4.1 files (low_dim_v141.hdf5) and the DPPO/DMPO train.npz made from them were recorded
# with robosuite 1.4.1 (DPPO pins it: irom-lab/dppo pyproject.toml, extra "robomimic"); robomimic stores
# obs["object"] = robosuite's "object-state" recomputed from each stored sim state after sim.forward()
# (ARISE-Initiative/robomimic robomimic/envs/env_robosuite.py, EnvRobosuite.reset_to / get_observation).
# robosuite concatenates a modality's active observables in the order they were registered, so the order of
# the sensors lists below is the layout. Read from ARISE-Initiative/robosuite v1.4.1 and v1.5.2 (the released
# sources of those tags, as shipped in the PyPI wheels robosuite==1.4.1 / 1.5.2):
#  * robot0_eef_pos: position of the gripper's grip_site (1.4.1 robosuite/robots/single_arm.py
#    SingleArm.setup_observables; 1.5.2 robosuite/robots/robot.py Robot._create_arm_sensors). Same in both.
#  * robot0_eef_quat: orientation of the hand *body* (robot0_right_hand), not of the grip site, xyzw, in both
#    versions; 1.5 adds robot0_eef_quat_site (the site's orientation) and keeps eef_quat on the body for
#    compatibility with 1.4-era datasets (robot.py docstring, robosuite issue #298). Hand body and grip site
#    differ by a fixed rotation (the right_gripper body's quat in models/assets/grippers/panda_gripper.xml).
#  * robot0_gripper_qpos: qpos of the two finger joints (finger_joint1/2 of the PandaGripper), same in both.
#  * object quaternions are xyzw (robosuite's T.convert_quat(body_xquat, to="xyzw") or T.mat2quat, whose sign
#    convention is w >= 0); the object-to-eef pose is the object pose in the frame (eef_pos, eef_quat), i.e.
#    the grip-site position with the hand-body orientation (world_pose_in_gripper sensor), same in both.
#  * lift: 1.4.1 environments/manipulation/lift.py Lift._setup_observables registers cube_pos, cube_quat,
#    gripper_to_cube_pos = eef_pos - cube_pos. 1.5.2 keeps the order but builds gripper_to_cube_pos with
#    ManipulationEnv._get_obj_eef_sensor (environments/manipulation/manipulation_env.py), which returns
#    cube_pos - eef_pos: the last 3 dims are negated.
#  * can (PickPlaceCan, object "Can") and square (NutAssemblySquare, object "SquareNut"): 1.4.1
#    pick_place.py PickPlace._create_obj_sensors and nut_assembly.py NutAssembly._create_nut_sensors return
#    [obj_pos, obj_quat, obj_to_eef_pos, obj_to_eef_quat]; 1.5.2's versions return the two relative sensors
#    first, then obj_pos, obj_quat (in 1.5 the relative sensors also run before obj_pos/obj_quat refresh the
#    observation cache, so robosuite 1.5's own relative pose uses the previous sample of the object pose).
#  * transport (TwoArmTransport): 1.4.1 two_arm_transport.py TwoArmTransport._setup_observables: payload_pos,
#    payload_quat, trash_pos, trash_quat, lid_handle_pos, lid_handle_quat, target_bin_pos, trash_bin_pos,
#    gripper0_to_payload, gripper0_to_lid_handle, gripper1_to_payload, gripper1_to_trash (object - eef),
#    payload_in_target_bin, trash_in_trash_bin (41 dims). 1.5.2 moves the two contact flags before the four
#    gripper vectors (same signs). Poses come from models/objects/group/transport.py TransportGroup (same file
#    in both versions; quaternions via T.mat2quat).
# Our env computes these features itself from the simulator state (see RobosuiteEnv.layout_obs), so an
# observation is a function of the stored sim state, as in robomimic's files.
OBS_LAYOUT = "robomimic-v1.4"  # what our robosuite envs emit and collect_demos.py writes (data attrs obs_layout)
LEGACY_OBS_LAYOUT = "robosuite-v1.5"  # robosuite 1.5's object-state order: this project's older files/checkpoints
ROBOSUITE_LAYOUT_SOURCES = "ARISE-Initiative/robosuite v1.4.1 vs v1.5.2 (see the comment above OBS_LAYOUT)"


def _pick_features(obj: str) -> tuple:
    return ((f"{obj}_pos", 3), (f"{obj}_quat", 4), (f"{obj}_to_robot0_eef_pos", 3), (f"{obj}_to_robot0_eef_quat", 4))


def _pick_legacy(obj: str) -> tuple:
    return ((f"{obj}_to_robot0_eef_pos", 1), (f"{obj}_to_robot0_eef_quat", 1), (f"{obj}_pos", 1), (f"{obj}_quat", 1))


LIFT_FEATURES = (("cube_pos", 3), ("cube_quat", 4), ("gripper_to_cube_pos", 3))
LIFT_LEGACY = (("cube_pos", 1), ("cube_quat", 1), ("gripper_to_cube_pos", -1))
_TRANSPORT_POSES = (("payload_pos", 3), ("payload_quat", 4), ("trash_pos", 3), ("trash_quat", 4),
                    ("lid_handle_pos", 3), ("lid_handle_quat", 4), ("target_bin_pos", 3), ("trash_bin_pos", 3))
_TRANSPORT_GRIPPERS = (("gripper0_to_payload", 3), ("gripper0_to_lid_handle", 3), ("gripper1_to_payload", 3),
                       ("gripper1_to_trash", 3))
_TRANSPORT_FLAGS = (("payload_in_target_bin", 1), ("trash_in_trash_bin", 1))
TRANSPORT_FEATURES = _TRANSPORT_POSES + _TRANSPORT_GRIPPERS + _TRANSPORT_FLAGS
TRANSPORT_LEGACY = tuple((name, 1) for name, _ in _TRANSPORT_POSES + _TRANSPORT_FLAGS + _TRANSPORT_GRIPPERS)

# max_episode_steps: the DMPO fine-tuning horizons (lift 400, can/square 500, transport 800, gym 1000).
# DPPO's robomimic eval configs use 300 for lift/can/square: pass max_episode_steps=300 to reproduce them.
# gamma is per chunk: 0.999 robomimic, 0.99 gym and kitchen (the released configs, 91gaozhidao/dmpo cfg/*/finetune/*.yaml).
# Kitchen: D4RL's kitchen-complete-v0 and kitchen-partial-v0 share one goal (microwave, kettle, light switch,
# slide cabinet; they differ in their data), kitchen-mixed-v0 swaps the slide cabinet for the bottom burner.
TASKS: dict[str, Task] = {
    "lift": Task("lift", "robosuite", "Lift", act_dim=7, obs_dim=19, chunk=4, max_episode_steps=400,
                 gamma=0.999, default_dataset="data/lift/demos.hdf5", hf_subdir="robomimic/lift",
                 robots=("Panda",), proprio_keys=PANDA, object_key="object-state",
                 cameras=("robot0_eye_in_hand",), object_features=LIFT_FEATURES, legacy_object_order=LIFT_LEGACY),
    "can": Task("can", "robosuite", "PickPlaceCan", act_dim=7, obs_dim=23, chunk=4, max_episode_steps=500,
                gamma=0.999, default_dataset="data/can/demos.hdf5", hf_subdir="robomimic/can",
                robots=("Panda",), proprio_keys=PANDA, object_key="object-state",
                cameras=("robot0_eye_in_hand",), object_features=_pick_features("Can"),
                legacy_object_order=_pick_legacy("Can")),
    "square": Task("square", "robosuite", "NutAssemblySquare", act_dim=7, obs_dim=23, chunk=4,
                   max_episode_steps=500, gamma=0.999, default_dataset="data/square/demos.hdf5",
                   hf_subdir="robomimic/square", robots=("Panda",), proprio_keys=PANDA,
                   object_key="object-state", cameras=("agentview",),
                   object_features=_pick_features("SquareNut"), legacy_object_order=_pick_legacy("SquareNut")),
    "transport": Task("transport", "robosuite", "TwoArmTransport", act_dim=14, obs_dim=59, chunk=8,
                      max_episode_steps=800, gamma=0.999, default_dataset="data/transport/demos.hdf5",
                      hf_subdir="robomimic/transport", robots=("Panda", "Panda"), proprio_keys=TWO_PANDAS,
                      object_key="object-state", cameras=("shouldercamera0", "shouldercamera1"),
                      object_features=TRANSPORT_FEATURES, legacy_object_order=TRANSPORT_LEGACY),
    "hopper": Task("hopper", "gym", "Hopper-v5", act_dim=3, obs_dim=11, chunk=4, max_episode_steps=1000,
                   gamma=0.99, default_dataset="data/hopper/medium.hdf5", hf_subdir="gym/hopper-medium-v2"),
    "walker2d": Task("walker2d", "gym", "Walker2d-v5", act_dim=6, obs_dim=17, chunk=4, max_episode_steps=1000,
                     gamma=0.99, default_dataset="data/walker2d/medium.hdf5",
                     hf_subdir="gym/walker2d-medium-v2"),
    "ant": Task("ant", "gym", "Ant-v5", act_dim=8, obs_dim=27, chunk=4, max_episode_steps=1000, gamma=0.99,
                default_dataset="data/ant/medium.hdf5", hf_subdir="gym/ant-medium-expert-v2",
                env_kwargs=NO_CFRC),
    "humanoid": Task("humanoid", "gym", "Humanoid-v5", act_dim=17, obs_dim=270, chunk=4,
                     max_episode_steps=1000, gamma=0.99, default_dataset="data/humanoid/medium.hdf5",
                     hf_subdir="gym/Humanoid-medium-v3", env_kwargs=NO_CFRC),
    **{f"kitchen-{kind}": Task(f"kitchen-{kind}", "kitchen", "FrankaKitchen-v1", act_dim=9, obs_dim=59, chunk=4,
                               max_episode_steps=280, gamma=0.99,
                               default_dataset=f"data/kitchen-{kind}/demos.hdf5",
                               hf_subdir=f"gym/kitchen-{kind}-v0", subtasks=subtasks)
       for kind, subtasks in (("complete", KITCHEN_MKLS), ("partial", KITCHEN_MKLS),
                              ("mixed", ("microwave", "kettle", "bottom burner", "light switch")))},
}


def get_task(task: Task | str) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[task]


def obs_dims(task: Task | str, obs_mode: str = "state") -> tuple[int, int]:
    """(state_dim, n_cameras). Image mode keeps proprioception only, like DPPO's image datasets."""
    task = get_task(task)
    if obs_mode == "state":
        return task.obs_dim, 0
    if obs_mode != "image":
        raise TaskError(f"obs_mode must be 'state' or 'image', got {obs_mode!r}")
    if not task.cameras:
        raise TaskError(f"task {task.name} has no cameras: use obs_mode 'state'")
    return 9 * len(task.robots), len(task.cameras)


def quaternion_starts(task: Task | str, obs_mode: str = "state") -> tuple[int, ...]:
    """Where the xyzw quaternions start in this task's state vector (robot<i>_eef_quat, then the object's *_quat
    features, in OBS_LAYOUT order); () for tasks without any. A policy given these (PolicyConfig.rot_quats) sees
    each as rotation-matrix columns instead: a quaternion jumps to its negative wherever the sign convention of
    the recorded rotation flips (mat2quat keeps w >= 0, so a rotation near 180 deg alternates sign step to step)."""
    task = get_task(task)
    if task.suite != "robosuite":
        return ()
    starts = [9 * i + 3 for i in range(len(task.robots))]      # each robot: eef_pos 3, eef_quat 4, gripper_qpos 2
    if obs_mode == "state":
        offset = 9 * len(task.robots)
        for name, width in task.object_features:
            if name.endswith("_quat"):
                starts.append(offset)
            offset += width
    return tuple(starts)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
_GL_PROBE = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"


def setup_rendering() -> str:
    """Pick MUJOCO_GL for offscreen rendering and return it. Only image/video envs call this.

    An existing MUJOCO_GL wins (robosuite also sets "egl" itself when it is imported first). Otherwise
    we try EGL, then OSMesa, each in a subprocess: a failed GL init can abort the whole process, and
    mujoco reads MUJOCO_GL once at import, so the choice must happen before mujoco is imported here.
    """
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    errors = []
    for backend in ("egl", "osmesa"):
        env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
        try:
            r = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, text=True,
                               timeout=120)
            ok, why = r.returncode == 0, (r.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            ok, why = False, "timed out"
        if ok:
            os.environ["MUJOCO_GL"] = backend
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend
        errors.append(f"{backend}: {why[:120]}")
    raise TaskError("no offscreen OpenGL works (" + "; ".join(errors) + "); install EGL with "
                    "`apt-get install -y libegl1 libgl1-mesa-dri` or OSMesa with `apt-get install -y libosmesa6`")


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------
def robosuite_kwargs(task: Task | str, obs_mode: str = "state", max_episode_steps: int | None = None,
                     render_video: bool = False, dense_reward: bool = False) -> dict:
    """JSON-serializable kwargs for robosuite.make (also what goes into a robomimic file's env_args)."""
    from robosuite.controllers import load_composite_controller_config

    task = get_task(task)
    cfg = load_composite_controller_config(controller="BASIC", robot="Panda")
    # BASIC also defines left/torso/head/base/legs parts; a Panda has only its "right" arm (each Panda in
    # TwoArmTransport too), and robosuite warns once per unused part, so keep just that one.
    cfg["body_parts"] = {"right": cfg["body_parts"]["right"]}
    # robosuite 1.5's OSC reads deltas in the robot *base* frame; robomimic/DPPO data were recorded with
    # robosuite 1.4, whose OSC used the world frame. Same thing for one Panda, but TwoArmTransport's
    # opposed arms have bases rotated +-90 deg, so set world on every OSC part.
    for part in cfg["body_parts"].values():
        if str(part.get("type", "")).startswith("OSC"):
            part["input_ref_frame"] = "world"
    image = obs_mode == "image"
    cams = list(task.cameras) if image else []
    return dict(
        robots=list(task.robots), controller_configs=cfg, control_freq=20,
        horizon=max_episode_steps or task.max_episode_steps,
        ignore_done=True,  # we truncate ourselves; robosuite would raise on a step after its horizon
        # sparse (1 on success) as in DPPO/DMPO; shaped = robosuite's staged reach/grasp/lift reward, scaled to <= 1
        reward_shaping=dense_reward,
        use_object_obs=True, has_renderer=False,
        has_offscreen_renderer=image or render_video, use_camera_obs=image, camera_names=cams,
        camera_heights=IMAGE_SIZE, camera_widths=IMAGE_SIZE, camera_depths=False,
        # A hard reset rebuilds the model (and the GL context, 1-2 s with cameras); objects are still
        # re-placed on a soft reset, so we never pay for it.
        hard_reset=False,
    )


class RobosuiteEnv:
    """A robosuite env with gymnasium-style reset/step, world-frame OSC and the public observation layout
    (OBS_LAYOUT: robomimic v1.4.1 / DPPO keys and order, computed from the sim state by layout_obs)."""

    def __init__(self, task: Task, obs_mode: str, seed: int, terminate_on_success: bool,
                 render_video: bool, max_episode_steps: int | None, dense_reward: bool = False):
        self.task, self.obs_mode = task, obs_mode
        self.state_dim, _ = obs_dims(task, obs_mode)
        if obs_mode == "image" or render_video:
            setup_rendering()
        import robosuite
        logging.getLogger("robosuite_logs").setLevel(logging.WARNING)  # one INFO line per env otherwise

        self.max_episode_steps = max_episode_steps or task.max_episode_steps
        self.terminate_on_success = terminate_on_success
        kwargs = robosuite_kwargs(task, obs_mode, self.max_episode_steps, render_video, dense_reward)
        self.sim_env = robosuite.make(task.env_id, seed=seed, **kwargs)
        # robomimic's key names, in DPPO's order: proprio keys, then "object" (state mode)
        self.keys = list(task.proprio_keys) + (["object"] if obs_mode == "state" else [])
        self.seed, self.t = seed, 0
        self._scratch = self._scratch_model = self._contact_ids = None

    def _kinematics(self, contacts: bool):
        """A private MjData holding the sim's current state with fresh kinematics (and contacts if asked).

        After a step, sim.data's poses still belong to the last sub-step's start (mj_step integrates after
        computing them) and robosuite's observable cache was sampled two sub-steps earlier still. Recomputing
        here makes the observation a function of sim.get_state(), exactly as in robomimic's files (state ->
        sim.forward() -> observation), without touching sim.data: the simulation and the scripted experts, which
        read sim.data, run bit for bit as before."""
        import mujoco

        model, src = self.sim_env.sim.model._model, self.sim_env.sim.data._data
        if self._scratch_model is not model:  # first call, or robosuite rebuilt the model (hard reset)
            self._scratch, self._scratch_model, self._contact_ids = mujoco.MjData(model), model, None
        d = self._scratch
        d.time = src.time
        d.qpos[:], d.qvel[:] = src.qpos, src.qvel
        d.mocap_pos[:], d.mocap_quat[:] = src.mocap_pos, src.mocap_quat
        (mujoco.mj_fwdPosition if contacts else mujoco.mj_kinematics)(model, d)
        return d

    def layout_obs(self, with_object: bool | None = None) -> dict:
        """{key: float64 array} for this task's state keys in OBS_LAYOUT (robomimic v1.4.1 names and order:
        robot<i>_eef_pos, robot<i>_eef_quat, robot<i>_gripper_qpos, and "object" in task.object_features order),
        computed from the simulator's current state. with_object defaults to state mode."""
        with_object = self.obs_mode == "state" if with_object is None else with_object
        needs_contacts = with_object and self.task.env_id == "TwoArmTransport"
        d = self._kinematics(needs_contacts)
        se, out, eef = self.sim_env, {}, []
        for i, robot in enumerate(se.robots):
            site = robot.eef_site_id["right"]
            body = se.sim.model.body_name2id(robot.robot_model.eef_name["right"])
            pos = d.site_xpos[site].copy()
            quat = d.xquat[body][[1, 2, 3, 0]].copy()  # mujoco wxyz -> xyzw
            out[f"robot{i}_eef_pos"], out[f"robot{i}_eef_quat"] = pos, quat
            out[f"robot{i}_gripper_qpos"] = d.qpos[robot._ref_gripper_joint_pos_indexes["right"]].copy()
            eef.append((pos, quat))
        if with_object:
            feats = _object_features(self, d, eef)
            out["object"] = np.concatenate([np.ravel(feats[name]).astype(np.float64)
                                            for name, _ in self.task.object_features])
        return out

    def _obs(self, raw: dict) -> dict:
        values = self.layout_obs()
        state = np.concatenate([np.ravel(values[k]) for k in self.keys]).astype(np.float32)
        if state.shape != (self.state_dim,):  # would mean a robosuite version with other obs sizes
            raise TaskError(f"{self.task.env_id}: state has {state.size} dims, expected {self.state_dim}")
        obs = {"state": state}
        if self.obs_mode == "image":
            # robosuite renders OpenGL-style (bottom row first): flip to upright, then HWC -> CHW.
            obs["rgb"] = np.concatenate([raw[f"{c}_image"][::-1].transpose(2, 0, 1) for c in self.task.cameras])
        return obs

    def reset(self, seed: int | None = None) -> dict:
        if seed is None:  # the first reset uses the constructor seed, later ones continue its stream
            seed, self.seed = self.seed, None
        if seed is not None:
            # Building the env already drew from env.rng; reseeding here makes reset(seed=s) repeat the
            # first episode exactly. The placement samplers hold a reference to env.rng, so reseed in place.
            self.sim_env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.t = 0
        raw = self.sim_env.reset()
        if self.obs_mode == "state":
            # Right after reset some object sensors read a cache their sibling sensors have not filled yet
            # (PickPlaceCan returns zeros for part of object-state); a second pass gives the true values.
            # Our state comes from layout_obs, but collect_demos.py also stores robosuite's other robot keys.
            # Image mode skips it: that would render every camera again.
            raw = self.sim_env._get_observations(force_update=True)
        return self._obs(raw)

    def step(self, action: np.ndarray):
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(self.task.act_dim), -1.0, 1.0)
        raw, reward, _, _ = self.sim_env.step(action)
        self.t += 1
        success = bool(self.sim_env._check_success())
        # DPPO's wrapper never terminates (dppo issue #32) and counts an episode as a success if any chunk
        # succeeded; terminate_on_success=True ends the episode at the first success instead (like
        # robomimic's rollouts). Either way info["success"] is robosuite's own check at this step.
        terminated = success and self.terminate_on_success
        truncated = self.t >= self.max_episode_steps
        return self._obs(raw), float(reward), terminated, truncated, {"success": success}

    def render(self) -> np.ndarray:
        """Upright (H, W, 3) uint8 frame for videos (needs render_video=True)."""
        return self.sim_env.sim.render(camera_name="agentview", width=VIDEO_SIZE, height=VIDEO_SIZE)[::-1].copy()

    def close(self):
        self.sim_env.close()


def _object_features(env: RobosuiteEnv, d, eef: list) -> dict:
    """robosuite 1.4.1's object observables of env's task, by name, from MjData d (fresh kinematics; contacts
    for TwoArmTransport). eef = [(eef_pos, eef_quat xyzw)] per robot. Mirrors the 1.4.1 sensors cited above."""
    import robosuite.utils.transform_utils as T

    se, env_id = env.sim_env, env.task.env_id

    def body_pose(body_id):
        return d.xpos[body_id].copy(), d.xquat[body_id][[1, 2, 3, 0]].copy()

    if env_id == "Lift":
        pos, quat = body_pose(se.cube_body_id)
        return {"cube_pos": pos, "cube_quat": quat, "gripper_to_cube_pos": eef[0][0] - pos}
    if env_id in ("PickPlaceCan", "NutAssemblySquare"):
        obj = {"PickPlaceCan": "Can", "NutAssemblySquare": "SquareNut"}[env_id]
        pos, quat = body_pose(se.obj_body_id[obj])
        # world_pose_in_gripper = inverse of (eef_pos, eef_quat); the object pose expressed in that frame
        world_in_gripper = T.pose_inv(T.pose2mat(eef[0]))
        rel_pos, rel_quat = T.mat2pose(T.pose_in_A_to_pose_in_B(T.pose2mat((pos, quat)), world_in_gripper))
        return {f"{obj}_pos": pos, f"{obj}_quat": quat, f"{obj}_to_robot0_eef_pos": rel_pos,
                f"{obj}_to_robot0_eef_quat": rel_quat}
    if env_id == "TwoArmTransport":
        tr = se.transport
        if env._contact_ids is None:  # geom-name groups -> id sets, once per model
            ids = lambda names: {se.sim.model.geom_name2id(n) for n in names}
            env._contact_ids = [(ids(tr.target_bin.base_geoms), ids(tr.payload.contact_geoms)),
                                (ids(tr.trash_bin.base_geoms), ids(tr.trash.contact_geoms))]
        pairs = list(zip(d.contact.geom1[: d.ncon].tolist(), d.contact.geom2[: d.ncon].tolist()))

        def touching(a, b):  # robosuite.utils.sim_utils.check_contact on d's contacts
            return float(any((g1 in a and g2 in b) or (g1 in b and g2 in a) for g1, g2 in pairs))

        f = {"payload_pos": d.xpos[tr.payload_body_id].copy(),
             "payload_quat": T.mat2quat(d.xmat[tr.payload_body_id].reshape(3, 3)),
             "trash_pos": d.xpos[tr.trash_body_id].copy(),
             "trash_quat": T.mat2quat(d.xmat[tr.trash_body_id].reshape(3, 3)),
             "lid_handle_pos": d.geom_xpos[tr.lid_handle_geom_ids[0]].copy(),
             "lid_handle_quat": T.mat2quat(d.geom_xmat[tr.lid_handle_geom_ids[0]].reshape(3, 3)),
             "target_bin_pos": d.geom_xpos[tr.target_bin_base_geom_ids[0]].copy(),
             "trash_bin_pos": d.geom_xpos[tr.trash_bin_base_geom_ids[0]].copy()}
        f.update(gripper0_to_payload=f["payload_pos"] - eef[0][0], gripper0_to_lid_handle=f["lid_handle_pos"] - eef[0][0],
                 gripper1_to_payload=f["payload_pos"] - eef[1][0], gripper1_to_trash=f["trash_pos"] - eef[1][0],
                 payload_in_target_bin=touching(*env._contact_ids[0]),
                 trash_in_trash_bin=touching(*env._contact_ids[1]))
        return f
    raise TaskError(f"{env_id}: no public observation layout defined")


def legacy_object_state(obj: np.ndarray, task: Task | str) -> np.ndarray:
    """Map object vectors (..., D) from OBS_LAYOUT (task.object_features order) to robosuite 1.5's "object-state"
    order (task.legacy_object_order, LEGACY_OBS_LAYOUT): what this project's env/files held before it adopted the v1.4.1 layout."""
    task = get_task(task)
    obj = np.asarray(obj)
    offsets, start = {}, 0
    for name, width in task.object_features:
        offsets[name] = slice(start, start + width)
        start += width
    if obj.shape[-1] != start:
        raise TaskError(f"task {task.name}: object vector has {obj.shape[-1]} dims, expected {start}")
    return np.concatenate([sign * obj[..., offsets[name]] for name, sign in task.legacy_object_order], axis=-1)


def check_layout(ckpt_or_layout, task: Task | str, path: str | os.PathLike = "", obs_mode: str | None = None) -> None:
    """Refuse (TaskError, one line) a checkpoint or dataset whose observation layout differs from OBS_LAYOUT for a
    robosuite task in state mode. ckpt_or_layout: a checkpoint dict (its "obs_layout" key; a missing key means
    LEGACY_OBS_LAYOUT, i.e. trained before the v1.4.1 layout was adopted; obs_mode is read from ckpt["config"] if not given) or a
    layout string (None = LEGACY_OBS_LAYOUT). gym/kitchen tasks and image mode (proprio keys only, whose layout
    did not change) always pass."""
    task = get_task(task)
    if isinstance(ckpt_or_layout, dict):
        layout = ckpt_or_layout.get("obs_layout") or LEGACY_OBS_LAYOUT
        if obs_mode is None and isinstance(ckpt_or_layout.get("config"), dict):
            obs_mode = ckpt_or_layout["config"].get("obs_mode")
    else:
        layout = ckpt_or_layout or LEGACY_OBS_LAYOUT
    if task.suite != "robosuite" or (obs_mode or "state") != "state" or layout == OBS_LAYOUT:
        return
    what = "robosuite 1.5's object-state order, made before the v1.4.1 layout was adopted" if layout == LEGACY_OBS_LAYOUT else "unknown"
    raise TaskError(f"{path or 'checkpoint'}: observation layout {layout!r} ({what}), but task {task.name} now uses "
                    f"{OBS_LAYOUT!r} (the robomimic v1.4.1 / DPPO order): retrain from data in that layout "
                    f"(re-collect with collect_demos.py, or check a file with `python collect_demos.py --check-data`)")


class GymEnv:
    """A gymnasium MuJoCo env with the same API as RobosuiteEnv (success is always False). KitchenEnv extends it."""

    def __init__(self, task: Task, obs_mode: str, seed: int, render_video: bool,
                 max_episode_steps: int | None):
        obs_dims(task, obs_mode)
        if obs_mode != "state":
            raise TaskError(f"task {task.name} is state-only")
        if render_video:
            setup_rendering()
        self.task, self.seed = task, seed
        self.max_episode_steps = max_episode_steps or task.max_episode_steps
        kwargs = dict(task.env_kwargs)
        if render_video:
            kwargs.update(render_mode="rgb_array", width=VIDEO_SIZE, height=VIDEO_SIZE)
        self.sim_env = self._make(kwargs)
        self.low, self.high = self.sim_env.action_space.low, self.sim_env.action_space.high
        self.t = 0

    def _make(self, kwargs):
        import gymnasium as gym

        return gym.make(self.task.env_id, max_episode_steps=self.max_episode_steps, **kwargs)

    def _obs(self, obs) -> dict:
        return {"state": np.asarray(obs, dtype=np.float32)}

    def reset(self, seed: int | None = None) -> dict:
        if seed is None:  # the first reset uses the constructor seed, later ones continue its stream
            seed, self.seed = self.seed, None
        self.t = 0
        obs, _ = self.sim_env.reset(seed=seed)
        return self._obs(obs)

    def _clip(self, action: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(action, dtype=np.float64).reshape(self.task.act_dim), self.low, self.high)

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, _ = self.sim_env.step(self._clip(action))
        self.t += 1
        truncated = bool(truncated) or self.t >= self.max_episode_steps
        return self._obs(obs), float(reward), bool(terminated), truncated, {"success": False}

    def render(self) -> np.ndarray:
        return self.sim_env.render()

    def close(self):
        self.sim_env.close()


KITCHEN_DT = 0.08  # FrankaKitchen-v1 (and D4RL kitchen-v0): frame_skip 40 x timestep 0.002 s


class KitchenEnv(GymEnv):
    """FrankaKitchen-v1 (gymnasium-robotics) with the GymEnv API, for a fixed set of D4RL subtasks.

    obs["state"] is v1's 59-D "observation": robot qpos (9) + robot qvel (9) + object qpos (21) + object
    qvel (20), with the env's small observation noise. A subtask is done once its qpos entries come within
    0.3 (L2) of the goal; v1 then drops it from its list, so completion latches even if the object drifts
    back. reward = subtasks newly completed at this step (v1's and D4RL's env reward), so an episode's
    return counts the subtasks done (0..len(subtasks)). info["success"] = every subtask done so far,
    info["completed"] = their names in completion order. Like D4RL, the episode terminates when all are
    done (nothing is left to earn), whatever terminate_on_success says.
    """

    def __init__(self, task: Task, obs_mode: str, seed: int, render_video: bool, max_episode_steps: int | None):
        self.completed = []
        super().__init__(task, obs_mode, seed, render_video, max_episode_steps)
        self.low, self.high = -1.0, 1.0

    def _make(self, kwargs):
        import gymnasium as gym
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)  # registers FrankaKitchen-v1 (idempotent)
        # The passive checker only warns that v1 hands out the same obs dict twice; we copy it anyway.
        return gym.make(self.task.env_id, tasks_to_complete=list(self.task.subtasks), disable_env_checker=True,
                        max_episode_steps=self.max_episode_steps, **kwargs)

    def _obs(self, obs) -> dict:
        return {"state": np.asarray(obs["observation"], dtype=np.float32)}

    def reset(self, seed: int | None = None) -> dict:
        self.completed = []  # the start state is fixed; the seed drives observation noise
        return super().reset(seed)

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = self.sim_env.step(self._clip(action))
        self.t += 1
        self.completed += [name for name in info["step_task_completions"] if name not in self.completed]
        success = len(self.completed) == len(self.task.subtasks)
        truncated = (bool(truncated) or self.t >= self.max_episode_steps) and not terminated
        return self._obs(obs), float(reward), bool(terminated), truncated, \
            {"success": success, "completed": list(self.completed)}


def make_env(task: Task | str, obs_mode: str = "state", seed: int = 0, terminate_on_success: bool = False,
             render_video: bool = False, max_episode_steps: int | None = None, dense_reward: bool = False):
    """One env: reset(seed=None) -> obs, step(action in env units) -> (obs, r, terminated, truncated, info).

    obs = {"state": float32 (state_dim,)} (+ "rgb": uint8 (3*n_cameras, 96, 96), upright, in image mode);
    info["success"] is robosuite's _check_success() (False for gym; all subtasks done for kitchen);
    .sim_env is the raw env. Actions are clipped to the action space (robosuite, kitchen [-1, 1]; Humanoid +-0.4).
    dense_reward=True switches robosuite to its shaped reward (other suites have only one reward).
    """
    task = get_task(task)
    obs_dims(task, obs_mode)
    if task.suite == "robosuite":
        return RobosuiteEnv(task, obs_mode, seed, terminate_on_success, render_video, max_episode_steps, dense_reward)
    if task.suite == "kitchen":
        return KitchenEnv(task, obs_mode, seed, render_video, max_episode_steps)
    return GymEnv(task, obs_mode, seed, render_video, max_episode_steps)


def _stack(obs_list: list[dict]) -> dict:
    return {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}


class ObsHistory:
    """The last n observations of one env as one observation: states concatenated (n * state_dim), image frames
    stacked along channels (n * C, H, W), oldest first; at an episode's start the first observation fills every slot
    (as the dataset sampler, history_indices, repeats an episode's first step). n = 1 passes observations through.
    Every env step must be pushed, also inside an open-loop chunk: the history is per env step, as in the data."""

    def __init__(self, n: int = 1):
        if n < 1:
            raise ValueError(f"observation history needs n >= 1, got {n}")
        self.n, self.frames = n, []

    def reset(self, obs: dict) -> dict:
        self.frames = [obs] * self.n
        return self.get()

    def push(self, obs: dict) -> dict:
        if not self.frames:
            return self.reset(obs)
        self.frames = self.frames[1:] + [obs]
        return self.get()

    def get(self) -> dict:
        if self.n == 1:
            return self.frames[0]
        return {k: np.concatenate([f[k] for f in self.frames]) for k in self.frames[0]}


def history_indices(episode_lengths: np.ndarray, n: int) -> np.ndarray:
    """(N, n) int64: for every step of back-to-back episodes, the indices of its last n steps, oldest first, clamped
    to the episode's first step (the first observation repeated at the start, as ObsHistory does in the env)."""
    lengths = np.asarray(episode_lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    idx = np.arange(int(lengths.sum()), dtype=np.int64)
    return np.maximum(idx[:, None] + np.arange(1 - n, 1, dtype=np.int64)[None], starts[:, None])


class ChunkVecEnv:
    """n_envs envs, one action chunk per call (all of it, or the first actions the caller passes: evaluate.py
    --act-steps re-plans after part of each chunk, as deploy_franka.py does); env i is seeded seed + i.

    workers=1 (default) steps the envs one after the other in this process: a gym MuJoCo step (~50 us) is cheaper than
    the pipe round trip to a subprocess. A robosuite step costs ~5 ms, so workers=W > 1 splits the envs over W
    subprocesses (contiguous blocks, same seeds); results are identical to workers=1, only faster on free cores.
    obs_steps=n > 1 makes every observation the env's last n (ObsHistory: states concatenated, frames stacked on
    channels), pushed at every env step inside a chunk and refilled at each reset.
    step(chunks (N, Ta, act_dim)) -> obs batch, reward (N,) summed over the executed steps, done (N,), info:
      episodes       list of {"env", "success" (any step succeeded), "return", "length" (env steps)}
      terminated     (N,) true terminations (gym falls; robosuite success with terminate_on_success)
      truncated      (N,) time limit; GAE should bootstrap through these, not through terminations
      steps          (N,) env steps executed (an env stops its chunk when its episode ends)
      chunk_success  (N,) success fired during this chunk
      final_obs      batch of the last observation before an auto-reset (= obs for envs not done)
    """

    def __init__(self, task: Task | str, obs_mode: str = "state", n_envs: int = 1, seed: int = 0,
                 terminate_on_success: bool = False, max_episode_steps: int | None = None, workers: int = 1,
                 dense_reward: bool = False, obs_steps: int = 1):
        self.task = get_task(task)
        self.obs_mode, self.n_envs = obs_mode, n_envs
        self.hist = [ObsHistory(obs_steps) for _ in range(n_envs)]
        self.envs, self.remotes, self.procs = [], [], []
        workers = max(1, min(workers, n_envs))
        if workers == 1:
            self.envs = [make_env(self.task, obs_mode, seed + i, terminate_on_success,
                                  max_episode_steps=max_episode_steps, dense_reward=dense_reward)
                         for i in range(n_envs)]
        else:
            import multiprocessing as mp
            ctx = mp.get_context("spawn")      # fork would copy a live GL context / torch threads into the child
            bounds = np.linspace(0, n_envs, workers + 1).round().astype(int)
            self.blocks = list(zip(bounds[:-1], bounds[1:]))
            for lo, hi in self.blocks:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_vec_worker, daemon=True,
                                   args=(child, self.task, obs_mode, int(hi - lo), seed + int(lo),
                                         terminate_on_success, max_episode_steps, dense_reward, obs_steps))
                proc.start()
                child.close()
                self.remotes.append(parent)
                self.procs.append(proc)
            for remote in self.remotes:      # a worker that failed to build its envs reports the error here
                _recv(remote)
        self._zero_stats()

    def _zero_stats(self):
        self.ep_return = np.zeros(self.n_envs)
        self.ep_length = np.zeros(self.n_envs, dtype=np.int64)
        self.ep_success = np.zeros(self.n_envs, dtype=bool)

    def reset(self, seed: int | None = None) -> dict:
        """Reset all envs; with a seed, env i is reseeded with seed + i (repeatable evaluations)."""
        self._zero_stats()
        if self.remotes:
            for remote, (lo, _) in zip(self.remotes, self.blocks):
                remote.send(("reset", None if seed is None else seed + int(lo)))
            return _concat([_recv(remote) for remote in self.remotes])
        return _stack([h.reset(env.reset(None if seed is None else seed + i))
                       for i, (env, h) in enumerate(zip(self.envs, self.hist))])

    def step(self, chunks: np.ndarray):
        chunks = np.asarray(chunks)
        if chunks.ndim != 3 or chunks.shape[0] != self.n_envs or chunks.shape[2] != self.task.act_dim:
            raise ValueError(f"chunks must be (n_envs={self.n_envs}, Ta, {self.task.act_dim}), got {chunks.shape}")
        if self.remotes:
            for remote, (lo, hi) in zip(self.remotes, self.blocks):
                remote.send(("step", chunks[lo:hi]))
            parts = [_recv(remote) for remote in self.remotes]
            episodes = [{**ep, "env": ep["env"] + int(lo)} for (lo, _), p in zip(self.blocks, parts)
                        for ep in p[3]["episodes"]]
            info = {k: np.concatenate([p[3][k] for p in parts])
                    for k in ("terminated", "truncated", "steps", "chunk_success")}
            info.update(episodes=episodes, final_obs=_concat([p[3]["final_obs"] for p in parts]))
            return (_concat([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    np.concatenate([p[2] for p in parts]), info)
        n = self.n_envs
        reward, steps = np.zeros(n), np.zeros(n, dtype=np.int64)
        done, terminated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        chunk_success = np.zeros(n, dtype=bool)
        obs_list, final_list, episodes = [], [], []
        for i, (env, hist) in enumerate(zip(self.envs, self.hist)):
            for action in chunks[i]:
                obs, r, term, trunc, info = env.step(action)
                obs = hist.push(obs)
                reward[i] += r
                steps[i] += 1
                chunk_success[i] |= info["success"]
                self.ep_return[i] += r
                self.ep_length[i] += 1
                self.ep_success[i] |= info["success"]
                if term or trunc:
                    done[i], terminated[i] = True, term
                    break
            final_list.append(obs)
            if done[i]:
                episodes.append({"env": i, "success": bool(self.ep_success[i]),
                                 "return": float(self.ep_return[i]), "length": int(self.ep_length[i])})
                self.ep_return[i], self.ep_length[i], self.ep_success[i] = 0.0, 0, False
                obs = hist.reset(env.reset())
            obs_list.append(obs)
        info = {"episodes": episodes, "terminated": terminated, "truncated": done & ~terminated,
                "steps": steps, "chunk_success": chunk_success, "final_obs": _stack(final_list)}
        return _stack(obs_list), reward, done, info

    def close(self):
        for env in self.envs:
            env.close()
        for remote, proc in zip(self.remotes, self.procs):
            try:
                remote.send(("close", None))
                remote.close()
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self.remotes, self.procs = [], []


def _vec_worker(conn, task, obs_mode, n_envs, seed, terminate_on_success, max_episode_steps, dense_reward, obs_steps):
    """Subprocess side of ChunkVecEnv(workers > 1): a synchronous ChunkVecEnv serving reset/step over a pipe."""
    try:
        vec = ChunkVecEnv(task, obs_mode, n_envs, seed, terminate_on_success, max_episode_steps,
                          dense_reward=dense_reward, obs_steps=obs_steps)
        conn.send(("ok", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "close":
                vec.close()
                return
            conn.send(("ok", vec.reset(arg) if cmd == "reset" else vec.step(arg)))
    except (EOFError, KeyboardInterrupt):
        return
    except Exception as e:                    # noqa: BLE001 -- forwarded to the parent, which re-raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _recv(remote):
    status, payload = remote.recv()
    if status == "error":
        raise TaskError(f"env worker failed: {payload}")
    return payload


def _concat(batches: list[dict]) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------------------------
# Running statistics: observation and reward normalisation of the PPO loops (finetune.py, teacher.py)
# ----------------------------------------------------------------------------------------------
def standardize(x: np.ndarray, mean: np.ndarray, var: np.ndarray, clip: float = 10.0) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-8), clipped to +-clip (gymnasium's NormalizeObservation)."""
    return np.clip((x - mean) / np.sqrt(var + 1e-8), -clip, clip)


class RunningMeanStd:
    """Running mean/variance of batches (the parallel update of Chan et al.), as in gymnasium's Normalize* wrappers."""

    def __init__(self, shape=()):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

    def update(self, x):
        b_mean, b_var, n = x.mean(0), x.var(0), len(x)
        delta, total = b_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + b_var * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x, clip=10.0):
        return standardize(x, self.mean, self.var, clip)


class RewardScaler:
    """r / std(running discounted return), clipped to +-10 (the reward scaling of the released DMPO code,
    91gaozhidao/dmpo util/reward_scaling.py; gymnasium's NormalizeReward). Vectorized over envs; the discounted return
    of an env restarts after its episode ends."""

    def __init__(self, n_envs, gamma, clip=10.0):
        self.gamma, self.clip = gamma, clip
        self.ret = np.zeros(n_envs)
        self.rms = RunningMeanStd()

    def __call__(self, reward, done):
        self.ret = self.ret * self.gamma + reward
        self.rms.update(self.ret)
        self.ret[done] = 0.0
        return np.clip(reward / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip)

    def state_dict(self):
        return {"mean": float(self.rms.mean), "var": float(self.rms.var), "count": float(self.rms.count)}

    def load_state_dict(self, d):
        self.rms.mean, self.rms.var, self.rms.count = float(d["mean"]), float(d["var"]), float(d["count"])


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Demonstrations in environment units; episodes are stored back to back."""
    states: np.ndarray  # float32 (N, state_dim)
    actions: np.ndarray  # float32 (N, act_dim)
    episode_lengths: np.ndarray  # int64 (E,), sums to N
    images: np.ndarray | None = None  # uint8 (N, 3*n_cameras, H, W)
    rewards: np.ndarray | None = None  # float32 (N,)
    path: str = ""

    def __len__(self) -> int:
        return len(self.actions)

    def probe(self, size: int, seed: int = 12345, obs_steps: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
        """(states, images or None) of a fixed random subset of `size` observations (numpy's own generator, so
        torch's stream is untouched): the probe set of the embedding statistics in pretrain.py and evaluate.py.
        obs_steps > 1: each observation with its history, as the policy takes it (ObsHistory's layout)."""
        pick = np.sort(np.random.default_rng(seed).choice(len(self), min(size, len(self)), replace=False))
        hist = history_indices(self.episode_lengths, obs_steps)[pick]          # (size, obs_steps)
        return (self.states[hist].reshape(len(pick), -1),
                None if self.images is None else self.images[hist].reshape(len(pick), -1, *self.images.shape[2:]))

    def split_last(self, n_episodes: int) -> tuple["Dataset", "Dataset"]:
        """(the first E - n episodes, the last n): a held-out part that training never sees."""
        if not 0 < n_episodes < len(self.episode_lengths):
            raise TaskError(f"{self.path}: cannot hold out {n_episodes} of {len(self.episode_lengths)} episodes")
        cut = int(self.episode_lengths[:-n_episodes].sum())

        def part(sl, lengths):
            return Dataset(self.states[sl], self.actions[sl], lengths,
                           None if self.images is None else self.images[sl],
                           None if self.rewards is None else self.rewards[sl], self.path)
        return (part(slice(0, cut), self.episode_lengths[:-n_episodes]),
                part(slice(cut, None), self.episode_lengths[-n_episodes:]))


def chunk_starts(dataset: Dataset, chunk: int) -> np.ndarray:
    """Indices i such that actions[i:i+chunk] lies inside one episode (DPPO: no end padding)."""
    ends = np.cumsum(dataset.episode_lengths)
    ranges = [np.arange(end - length, end - chunk + 1) for end, length in zip(ends, dataset.episode_lengths)]
    return np.concatenate(ranges + [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def normalization_stats(dataset: Dataset) -> dict:
    """Per-dimension min/max of the data. Unlike DPPO's robomimic script (min/max started at 0, i.e.
    min(0, data) and max(0, data)), these are the plain data ranges; the policy stores them itself."""
    return {"state_min": dataset.states.min(0).astype(np.float32),
            "state_max": dataset.states.max(0).astype(np.float32),
            "action_min": dataset.actions.min(0).astype(np.float32),
            "action_max": dataset.actions.max(0).astype(np.float32)}


def to_uint8_chw(images: np.ndarray, layout: str, name: str = "images") -> np.ndarray:
    """(N,H,W,C) or (N,C,H,W) images, uint8 or float in [0,1] or [0,255] -> uint8 (N,C,H,W) in [0,255]."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise TaskError(f"{name}: expected 4-D images (N,{'H,W,C' if layout == 'hwc' else 'C,H,W'}), got {x.shape}")
    if layout == "hwc":
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise TaskError(f"{name}: images contain NaN or inf")
        x = x * 255.0 if x.size and x.max() <= 1.0 else x  # [0,1] floats (robomimic obs utils) vs [0,255]
        x = np.rint(x)
    return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8))


def _legacy_gym_columns(task: Task, dim: int) -> np.ndarray | None:
    """Columns of an older-gym observation that make up our gymnasium-v5 observation, or None.

    Hopper/Walker2d: D4RL -v2 (11/17-D) equals v5. Ant: D4RL ant-*-v2 is 111-D = qpos[2:] 13 + qvel 14 +
    cfrc_ext of all 14 bodies (84); Ant-v5 drops the worldbody's cfrc_ext (105-D). Humanoid: DMPO's
    Humanoid-medium-v3 is 376-D = qpos[2:] 22 + qvel 23 + cinert 14x10 + cvel 14x6 + qfrc_actuator 23 +
    cfrc_ext 14x6; Humanoid-v5 drops the always-zero worldbody/free-joint entries (348-D). The old envs ran
    on mujoco-py >= 2.0, where contact forces are reported as always 0 (gymnasium's Ant/Humanoid docs),
    while MuJoCo 3 reports real ones, so we leave cfrc_ext out of the observation (NO_CFRC: 27-D / 270-D)
    and keep every other column, which carry the same quantities in both versions.
    """
    if task.name == "ant" and dim in (111, 105):
        return np.arange(27)
    if task.name == "humanoid" and dim == 376:
        return np.r_[0:45, 55:185, 191:269, 275:292]
    if task.name == "humanoid" and dim == 348:
        return np.arange(270)
    return None


def kitchen_v0_to_v1(obs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """D4RL kitchen-*-v0 observations (N, 60) -> FrankaKitchen-v1 observations (N, 59).

    D4RL (adept_envs KitchenV0._get_obs): qp robot qpos (9) + obj_qp object qpos (21) + goal (30, the task's
    goal values, constant). v1: robot qpos (9) + robot qvel (9) + object qpos (21) + object qvel (20). Joint
    order, indices, goals and the 0.08 s step are the same in both, so the positions carry over as they are
    and the goal block is dropped. D4RL stores no velocities; we use backward differences within each
    episode, (x[t] - x[t-1]) / 0.08, the mean velocity over the step that led to x[t] (an approximation of
    v1's instantaneous qvel at the end of that step), and 0 at an episode's first step (both envs start at
    rest). Object qvel has 20 entries because the kettle's
    free joint has a 7-D pose (position + wxyz quaternion) but a 6-D velocity: linear in the world frame,
    angular in the kettle's own frame, here the rotation vector of conj(q[t-1]) * q[t] divided by dt.
    """
    qpos = np.concatenate([obs[:, 0:9], obs[:, 9:30]], axis=1).astype(np.float64)  # v1 qpos[0:30]
    prev = qpos.copy()
    starts = np.cumsum(lengths) - lengths
    prev[1:] = qpos[:-1]
    prev[starts] = qpos[starts]  # zero velocity at each episode start
    vel = (qpos - prev) / KITCHEN_DT  # right for the 23 hinge/slide joints and the kettle position
    q0, q1 = prev[:, 26:30], qpos[:, 26:30]  # kettle quaternions (w, x, y, z)
    # conj(q0) * q1 (Hamilton product): the rotation from t-1 to t in the kettle's frame
    w0, v0, w1, v1 = q0[:, :1], q0[:, 1:], q1[:, :1], q1[:, 1:]
    dq_w = w0 * w1 + np.sum(v0 * v1, axis=1, keepdims=True)
    dq_v = w0 * v1 - w1 * v0 - np.cross(v0, v1)
    dq_v = dq_v * np.sign(dq_w + (dq_w == 0))  # q and -q are the same rotation: take the short way round
    sin_half = np.linalg.norm(dq_v, axis=1, keepdims=True)
    angle = 2 * np.arctan2(sin_half, np.abs(dq_w))  # exact log map (like mju_quat2Vel)
    ang = dq_v / np.maximum(sin_half, 1e-12) * angle / KITCHEN_DT
    obj_vel = np.concatenate([vel[:, 9:26], ang], axis=1)  # 14 joints + kettle linear (3) + angular (3)
    return np.concatenate([qpos[:, :9], vel[:, :9], qpos[:, 9:30], obj_vel], axis=1)


def _require(group, keys, path, where=""):
    missing = [k for k in keys if k not in group]
    if missing:
        raise TaskError(f"{path}: missing {', '.join(repr(where + k) for k in missing)} "
                        f"(found: {', '.join(sorted(group.keys())) or 'nothing'})")


def _read_dppo_npz(path: Path, obs_mode: str) -> Dataset:
    norm_path = path.parent / "normalization.npz"
    if not norm_path.exists():
        raise TaskError(f"{path}: DPPO-style data needs {norm_path} next to it (obs_min/obs_max/action_min/action_max)")
    with np.load(path, allow_pickle=False) as z, np.load(norm_path, allow_pickle=False) as nz:
        _require(z, ["states", "actions", "traj_lengths"] + (["images"] if obs_mode == "image" else []), path)
        _require(nz, ["obs_min", "obs_max", "action_min", "action_max"], norm_path)
        states, actions = z["states"].astype(np.float64), z["actions"].astype(np.float64)
        lengths = np.asarray(z["traj_lengths"]).astype(np.int64).ravel()
        images = to_uint8_chw(z["images"], "chw", str(path)) if obs_mode == "image" else None
        rewards = z["rewards"].astype(np.float32) if "rewards" in z else None
        norm = {k: np.asarray(nz[k], dtype=np.float64) for k in nz.files}
    for x, lo, hi in ((states, "obs_min", "obs_max"), (actions, "action_min", "action_max")):
        if x.ndim != 2 or norm[lo].shape != (x.shape[1],) or norm[hi].shape != (x.shape[1],):
            raise TaskError(f"{norm_path}: {lo}/{hi} shapes {norm[lo].shape}/{norm[hi].shape} do not match "
                            f"data of shape {x.shape}")
    # The files hold 2*(x-min)/(max-min+1e-6)-1; invert it so everything downstream is in env units.
    states = (states + 1) / 2 * (norm["obs_max"] - norm["obs_min"] + 1e-6) + norm["obs_min"]
    actions = (actions + 1) / 2 * (norm["action_max"] - norm["action_min"] + 1e-6) + norm["action_min"]
    return Dataset(states, actions, lengths, images, rewards)


def demo_names(data: h5py.Group) -> list[str]:
    """The demo_<i> groups of a robomimic file's data/ group, in numeric order (demo_10 after demo_9)."""
    return sorted((n for n in data if n.startswith("demo_")), key=lambda n: int(n.split("_")[1]))


def mask_names(mask: h5py.Dataset) -> list[str]:
    """The demo names a robomimic filter key (mask/<key>) lists, as str (stored as bytes)."""
    return [n.decode() if isinstance(n, bytes) else str(n) for n in mask[:]]


def _read_robomimic(f: h5py.File, path: Path, task: Task, obs_mode: str, filter_key: str | None) -> Dataset:
    data = f["data"]
    if filter_key is not None:
        if "mask" not in f or filter_key not in f["mask"]:
            found = ", ".join(f["mask"].keys()) if "mask" in f else "no mask group"
            raise TaskError(f"{path}: no filter key mask/{filter_key} (found: {found})")
        names = mask_names(f["mask"][filter_key])
    else:
        names = demo_names(data)
    if not names:
        raise TaskError(f"{path}: no demos under data/")
    keys = list(task.proprio_keys)
    if obs_mode == "state" and task.suite == "robosuite":
        layout = robomimic_file_layout(f)
        if layout is not None and layout != OBS_LAYOUT:
            how = ("marked" if "obs_layout" in data.attrs else
                   f"recorded with robosuite {json.loads(data.attrs['env_args']).get('env_version')}, unmarked")
            raise TaskError(f"{path}: observations in layout {layout!r} ({how}), but task {task.name} uses "
                            f"{OBS_LAYOUT!r} (robomimic v1.4.1 object order); re-collect it with "
                            f"collect_demos.py (`python collect_demos.py --check-data {path}` shows the difference)")
    if obs_mode == "state":
        # robomimic names robosuite's "object-state" "object"; accept both.
        first_obs = data[names[0]]["obs"] if "obs" in data[names[0]] else {}
        keys.append(task.object_key if task.object_key in first_obs else "object")
    cams = [f"{c}_image" for c in task.cameras] if obs_mode == "image" else []
    states, actions, images, rewards, lengths = [], [], [], [], []
    for name in names:
        if name not in data:
            raise TaskError(f"{path}: mask lists {name} but data/{name} does not exist")
        demo = data[name]
        _require(demo, ["actions", "obs"], path, f"data/{name}/")
        _require(demo["obs"], keys + cams, path, f"data/{name}/obs/")
        obs = demo["obs"]
        states.append(np.concatenate([np.asarray(obs[k], dtype=np.float64).reshape(len(obs[k]), -1)
                                      for k in keys], axis=1))
        actions.append(np.asarray(demo["actions"], dtype=np.float64))
        if cams:  # robomimic stores upright (H, W, 3) uint8 frames, one dataset per camera
            images.append(np.concatenate([to_uint8_chw(obs[c][:], "hwc", f"{path}:data/{name}/obs/{c}")
                                          for c in cams], axis=1))
        rewards.append(np.asarray(demo["rewards"], dtype=np.float32) if "rewards" in demo
                       else np.zeros(len(actions[-1]), np.float32))
        lengths.append(len(actions[-1]))
        if len(states[-1]) != lengths[-1] or (cams and len(images[-1]) != lengths[-1]):
            raise TaskError(f"{path}: data/{name} has {lengths[-1]} actions but {len(states[-1])} observations")
    return Dataset(np.concatenate(states), np.concatenate(actions), np.array(lengths, dtype=np.int64),
                   np.concatenate(images) if cams else None, np.concatenate(rewards))


def robomimic_file_layout(f: h5py.File) -> str | None:
    """The observation layout of an open robomimic hdf5 file: data attrs "obs_layout" if present (collect_demos.py
    writes it); else LEGACY_OBS_LAYOUT if env_args says the file was recorded with robosuite 1.5 (its
    object-state order: this project's files before the v1.4.1 layout, and robomimic's own *_v15.hdf5 files); else None
    (unknown: e.g. the public robomimic v1.4.1 files, which are in OBS_LAYOUT)."""
    attrs = f["data"].attrs
    if "obs_layout" in attrs:
        value = attrs["obs_layout"]
        return value.decode() if isinstance(value, bytes) else str(value)
    try:
        env_args = json.loads(attrs["env_args"]) if "env_args" in attrs else {}
    except (TypeError, ValueError):
        return None
    version = str(env_args.get("env_version", "")) if isinstance(env_args, dict) else ""
    return LEGACY_OBS_LAYOUT if version.startswith("1.5") else None


def _d4rl_cuts(cols) -> np.ndarray:
    """The end (exclusive) of each episode in D4RL columns (an h5py file or a dict): after every terminal or timeout
    (D4RL marks the 1000-step time limit in timeouts, not in terminals), and a trailing partial episode is kept."""
    ends = np.asarray(cols["terminals"], dtype=bool).ravel()
    if "timeouts" in cols:
        ends = ends | np.asarray(cols["timeouts"], dtype=bool).ravel()
    cuts = np.flatnonzero(ends) + 1
    return cuts if len(cuts) and cuts[-1] == len(ends) else np.append(cuts, len(ends))


def _read_d4rl(f: h5py.File, path: Path, filter_key: str | None = None) -> Dataset:
    """D4RL's flat columns, cut into episodes at terminals | timeouts. filter_key: only the episodes whose indices
    (0-based, in file order) mask/<key> lists; our own files have them where DAgger added episodes
    (append_d4rl_hdf5), D4RL's own have none."""
    _require(f, ["observations", "actions", "terminals"], path)
    n = len(f["actions"])
    for key in ("terminals", "timeouts"):
        if key in f and len(f[key]) != n:
            raise TaskError(f"{path}: terminals/timeouts have {len(f[key])} entries, actions have {n}")
    cuts = _d4rl_cuts(f)
    lengths = np.diff(np.r_[0, cuts]).astype(np.int64)
    rewards = np.asarray(f["rewards"], dtype=np.float32).ravel() if "rewards" in f else None
    states, actions = np.asarray(f["observations"], dtype=np.float64), np.asarray(f["actions"], dtype=np.float64)
    if filter_key is not None:
        if "mask" not in f or filter_key not in f["mask"]:
            found = ", ".join(f["mask"].keys()) if "mask" in f else "none"
            raise TaskError(f"{path}: no filter key mask/{filter_key} (found: {found})")
        keep = np.asarray(f["mask"][filter_key], dtype=np.int64)
        if len(keep) and (keep.min() < 0 or keep.max() >= len(lengths)):
            raise TaskError(f"{path}: mask/{filter_key} lists episodes outside 0..{len(lengths) - 1}")
        rows = np.concatenate([np.arange(a, b) for a, b in zip(np.r_[0, cuts[:-1]][keep], cuts[keep])] or
                              [np.zeros(0, dtype=np.int64)])
        states, actions, lengths = states[rows], actions[rows], lengths[keep]
        rewards = rewards[rows] if rewards is not None else None
    return Dataset(states, actions, lengths, None, rewards)


def _read_minari(path: Path) -> Dataset:
    try:
        from minari import MinariDataset
    except ImportError:
        raise TaskError(f"{path}: reading a Minari dataset needs `pip install minari` (and pin mujoco==3.3.7)")
    data_dir = path / "data" if (path / "data").is_dir() else path
    states, actions, rewards, lengths = [], [], [], []
    for ep in MinariDataset(data_dir).iterate_episodes():
        states.append(np.asarray(ep.observations)[:-1])  # Minari stores T+1 observations
        actions.append(np.asarray(ep.actions))
        rewards.append(np.asarray(ep.rewards, dtype=np.float32))
        lengths.append(len(ep.actions))
    if not lengths:
        raise TaskError(f"{path}: Minari dataset has no episodes")
    return Dataset(np.concatenate(states), np.concatenate(actions), np.array(lengths, dtype=np.int64),
                   None, np.concatenate(rewards))


def load_dataset(path: str | os.PathLike, task: Task | str, obs_mode: str = "state",
                 filter_key: str | None = None) -> Dataset:
    """Load demos for `task` from a DPPO/DMPO train.npz, a robomimic hdf5, a D4RL hdf5 or a local
    Minari dataset folder (picked from the file itself) and validate them against the task."""
    task = get_task(task)
    state_dim, n_cams = obs_dims(task, obs_mode)
    path = Path(path)
    if not path.exists():
        hint = ""
        if path.resolve() == Path(task.default_dataset).resolve():
            hint = (f"; run `python collect_demos.py --task {task.name}` "
                    f"(or `python pretrain.py --task {task.name} --download` to fetch the DMPO dataset)")
        raise TaskError(f"{path}: file not found{hint}")
    try:
        if path.is_dir():
            ds = _read_minari(path)
        elif path.suffix == ".npz":
            ds = _read_dppo_npz(path, obs_mode)
        else:
            with h5py.File(path, "r") as f:
                if "data" in f:
                    ds = _read_robomimic(f, path, task, obs_mode, filter_key)
                elif "observations" in f:
                    ds = _read_d4rl(f, path, filter_key)
                else:
                    raise TaskError(f"{path}: neither robomimic ('data/demo_*') nor D4RL ('observations', "
                                    f"'actions', 'terminals', 'timeouts') layout (found: {', '.join(f.keys())})")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # unreadable/corrupt files, odd dtypes
        raise TaskError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
    if filter_key is not None and (path.is_dir() or path.suffix == ".npz"):  # formats without mask/<key>
        raise TaskError(f"{path}: filter key {filter_key!r} given, but only hdf5 files (robomimic, D4RL layout) have "
                        f"mask/<key>")
    ds.path = str(path)
    return _validate(ds, path, task, obs_mode, state_dim, n_cams)


def _validate(ds: Dataset, path: Path, task: Task, obs_mode: str, state_dim: int, n_cams: int) -> Dataset:
    if ds.states.ndim != 2 or ds.actions.ndim != 2:
        raise TaskError(f"{path}: states/actions must be 2-D, got {ds.states.shape} and {ds.actions.shape}")
    if task.suite == "gym" and ds.states.shape[1] != state_dim:
        cols = _legacy_gym_columns(task, ds.states.shape[1])
        if cols is not None:
            ds.states = ds.states[:, cols]
    n = len(ds.actions)
    if len(ds.states) != n or ds.episode_lengths.sum() != n or (ds.episode_lengths <= 0).any():
        raise TaskError(f"{path}: {len(ds.states)} states, {n} actions and episode lengths summing to "
                        f"{ds.episode_lengths.sum()} do not agree")
    if task.suite == "kitchen" and obs_mode == "state" and ds.states.shape[1] != state_dim:
        if ds.states.shape[1] != 60:
            raise TaskError(f"{path}: states have {ds.states.shape[1]} dims, task {task.name} expects 59 "
                            f"(FrankaKitchen-v1) or 60 (D4RL kitchen-*-v0)")
        ds.states = kitchen_v0_to_v1(ds.states, ds.episode_lengths)
    if ds.states.shape[1] != state_dim:
        hint = " (an image dataset? use obs_mode 'image')" if obs_mode == "state" and \
            ds.states.shape[1] == 9 * len(task.robots) else ""
        raise TaskError(f"{path}: states have {ds.states.shape[1]} dims, task {task.name} in {obs_mode} mode "
                        f"expects {state_dim}{hint}")
    if ds.actions.shape[1] != task.act_dim:
        raise TaskError(f"{path}: actions have {ds.actions.shape[1]} dims, task {task.name} expects {task.act_dim}")
    if not (np.isfinite(ds.states).all() and np.isfinite(ds.actions).all()):
        raise TaskError(f"{path}: states or actions contain NaN or inf")
    if obs_mode == "image":
        want = (n, 3 * n_cams, IMAGE_SIZE, IMAGE_SIZE)
        if ds.images is None or ds.images.shape != want:
            got = None if ds.images is None else ds.images.shape
            raise TaskError(f"{path}: images have shape {got}, task {task.name} expects {want} "
                            f"(cameras {', '.join(task.cameras)})")
    else:
        ds.images = None  # state mode never needs them; free the memory
    ds.states, ds.actions = ds.states.astype(np.float32), ds.actions.astype(np.float32)
    if ds.rewards is not None and len(ds.rewards) != n:
        ds.rewards = None
    return ds


# ----------------------------------------------------------------------------------------------
# Writing robomimic / D4RL files and downloading DMPO datasets
# ----------------------------------------------------------------------------------------------
def write_robomimic_hdf5(path: str | os.PathLike, episodes: list[dict], env_args: dict,
                         compress_images: bool = True, obs_layout: str | None = None,
                         collection: dict | None = None) -> None:
    """Write episodes in robomimic's layout, atomically (path + ".tmp", then os.replace).

    obs_layout (e.g. OBS_LAYOUT) is stored as data attrs "obs_layout", the marker load_dataset checks.
    collection (how the demos were made, e.g. the action noise) is stored as JSON in data attrs "collection".

    Each episode: actions (T,A), states (T,S) flattened sim states, rewards (T,), dones (T,),
    obs {key: (T,...)}, optional next_obs {key: (T,...)} and model_file (MJCF xml string).
    uint8 image obs ((T,H,W,3), upright) are gzip-compressed. mask/train and mask/valid split 90/10
    (the last tenth of the demos is "valid"; scripted demos are i.i.d., so order does not bias it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    names = [f"demo_{i}" for i in range(len(episodes))]
    n_valid = len(names) // 10
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = int(sum(len(ep["actions"]) for ep in episodes))
        data.attrs["env_args"] = json.dumps(env_args)
        if obs_layout is not None:
            data.attrs["obs_layout"] = obs_layout
        if collection is not None:
            data.attrs["collection"] = json.dumps(collection)
        for name, ep in zip(names, episodes):
            _write_demo(data, name, ep, compress_images)
        f.create_dataset("mask/train", data=np.array(names[:len(names) - n_valid], dtype="S"))
        f.create_dataset("mask/valid", data=np.array(names[len(names) - n_valid:], dtype="S"))
    os.replace(tmp, path)


def _write_demo(data: h5py.Group, name: str, ep: dict, compress_images: bool) -> None:
    """One episode as robomimic's data/<name> group (see write_robomimic_hdf5)."""
    g = data.create_group(name)
    g.attrs["num_samples"] = int(len(ep["actions"]))
    g.attrs["model_file"] = ep.get("model_file", "")
    for key in ("actions", "states", "rewards", "dones"):
        g.create_dataset(key, data=np.asarray(ep[key]))
    for group_name in ("obs", "next_obs"):
        for key, value in ep.get(group_name, {}).items():
            value = np.asarray(value)
            gzip = compress_images and value.dtype == np.uint8 and value.ndim == 4
            g.create_dataset(f"{group_name}/{key}", data=value,
                             **({"compression": "gzip", "compression_opts": 4} if gzip else {}))


def append_robomimic_hdf5(src: str | os.PathLike, dst: str | os.PathLike, episodes: list[dict], mask: str,
                          base_mask: str = "expert", compress_images: bool = True) -> list[str]:
    """Copy the robomimic file `src` to `dst` (src == dst: in place) with `episodes` added as demo_<n>, ...
    (numbered after the last demo), atomically (dst + ".tmp", then os.replace). The new demos are listed in
    mask/<mask> (extended if it exists); the first time, mask/<base_mask> lists the demos already there, so that
    `--filter-key <base_mask>` trains without the added ones. data attrs "total" counts every demo's samples.
    Returns the new demo names."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(dst) + ".tmp")
    try:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as f:
            data = f["data"]
            old = demo_names(data)
            first = int(old[-1].split("_")[1]) + 1 if old else 0
            names = [f"demo_{first + i}" for i in range(len(episodes))]
            for name, ep in zip(names, episodes):
                _write_demo(data, name, ep, compress_images)
            data.attrs["total"] = int(data.attrs.get("total", 0)) + int(sum(len(ep["actions"]) for ep in episodes))
            masks = f.require_group("mask")
            if base_mask not in masks:
                masks.create_dataset(base_mask, data=np.array(old, dtype="S"))
            listed = []
            if mask in masks:
                listed = mask_names(masks[mask])
                del masks[mask]
            masks.create_dataset(mask, data=np.array(listed + names, dtype="S"))
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return names


def write_d4rl_hdf5(path, data: dict, metadata: dict, masks: dict | None = None):
    """D4RL layout (observations, actions, rewards float32; terminals, timeouts bool) plus metadata/ attrs and
    mask/<key> episode-index lists (DAgger's, see append_d4rl_hdf5); atomic: written to path + ".tmp", then renamed
    (the .tmp is removed if writing fails)."""
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
            for key, value in (masks or {}).items():
                f.create_dataset(f"mask/{key}", data=np.asarray(value, dtype=np.int64))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_d4rl_hdf5(src: str | os.PathLike, dst: str | os.PathLike, data: dict, mask: str,
                     base_mask: str = "expert") -> list[int]:
    """The D4RL-layout counterpart of append_robomimic_hdf5: `src`'s columns with `data`'s (whole episodes, the same
    keys) appended, written to `dst` (may equal src) atomically, metadata kept. mask/<mask> lists the new episodes'
    indices (extended if it exists); the first time, mask/<base_mask> lists the episodes already there. Returns the
    new episodes' indices."""
    src, dst = Path(src), Path(dst)
    with h5py.File(src, "r") as f:
        old = {k: np.asarray(f[k]) for k in f if isinstance(f[k], h5py.Dataset)}
        meta = dict(f["metadata"].attrs) if "metadata" in f else {}
        masks = {k: np.asarray(f["mask"][k], dtype=np.int64) for k in f["mask"]} if "mask" in f else {}
    if set(data) != set(old) or old["observations"].shape[1:] != np.shape(data["observations"])[1:]:
        raise TaskError(f"{src}: columns {sorted(old)} with {old['observations'].shape[1:]} observations; the added "
                        f"episodes have {sorted(data)} with {np.shape(data['observations'])[1:]}")
    n_old = len(_d4rl_cuts(old))
    new = list(range(n_old, n_old + len(_d4rl_cuts(data))))
    masks.setdefault(base_mask, np.arange(n_old, dtype=np.int64))
    masks[mask] = np.r_[masks.get(mask, np.zeros(0, dtype=np.int64)), new].astype(np.int64)
    write_d4rl_hdf5(dst, {k: np.concatenate([old[k], np.asarray(data[k], dtype=old[k].dtype)]) for k in old}, meta,
                    masks)
    return new


HF_BASE_URL = "https://huggingface.co/datasets/Guowei-Zou/DMPO-datasets/resolve/main"


def default_dataset_path(task: Task | str, obs_mode: str = "state") -> Path:
    """Where collect_demos.py writes a task's own demos and pretrain.py looks for them: the task's
    default_dataset, with an "_img" suffix for image demos (they also hold the state keys)."""
    path = Path(get_task(task).default_dataset)
    return path.with_name(path.stem + "_img" + path.suffix) if obs_mode == "image" else path


def downloaded_path(task: Task | str, obs_mode: str = "state", dest_dir: str = "data") -> Path:
    """Where download_dataset puts train.npz (mirrors the DMPO-datasets folders, e.g. data/robomimic/lift-img)."""
    task = get_task(task)
    obs_dims(task, obs_mode)
    return Path(dest_dir) / (task.hf_subdir + ("-img" if obs_mode == "image" else "")) / "train.npz"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_dataset(task: Task | str, dest_dir: str = "data", base_url: str = HF_BASE_URL,
                     obs_mode: str = "state", sha256: dict | None = None) -> Path:
    """Fetch the task's DMPO/DPPO train.npz + normalization.npz; returns the train.npz path.

    Files already present are kept. sha256 maps file name -> hex digest; digests are always printed,
    and a mismatch is an error. Each file goes to a ".part" file first, then is renamed, so an
    interrupted download never leaves a truncated train.npz behind.
    """
    from tqdm import tqdm

    train_path = downloaded_path(task, obs_mode, dest_dir)
    folder = train_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    subdir = get_task(task).hf_subdir + ("-img" if obs_mode == "image" else "")
    for name in ("train.npz", "normalization.npz"):
        dest, url = folder / name, f"{base_url.rstrip('/')}/{subdir}/{name}"
        if not dest.exists():
            part = Path(str(dest) + ".part")
            try:
                with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as out:
                    total = int(r.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{subdir}/{name}") as bar:
                        for block in iter(lambda: r.read(1 << 20), b""):
                            out.write(block)
                            bar.update(len(block))
            except (urllib.error.URLError, OSError) as e:
                part.unlink(missing_ok=True)
                reason = getattr(e, "reason", None) or e
                raise TaskError(f"could not download {url} ({reason}); fetch it by hand and save it as {dest}")
            os.replace(part, dest)
        digest = _sha256(dest)
        expected = (sha256 or {}).get(name)
        if expected and digest != expected:
            dest.unlink()
            raise TaskError(f"{dest}: sha256 {digest} does not match the expected {expected}; file removed")
        print(f"{dest}: sha256 {digest}" + (" (verified)" if expected else ""))
    return train_path
