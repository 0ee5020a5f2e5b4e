# Real-time one-step control of a Franka Panda/FR3 with a DMPO checkpoint; README section "Deploying on a Franka".
"""Run a trained one-step policy in a fixed-rate control loop, on the task's simulated Panda or on a real robot.

    python deploy_franka.py --ckpt runs/lift/ckpt.pt --backend sim --hz 20 --steps 400
    python deploy_franka.py --ckpt runs/lift_img/ckpt.pt --backend franky --robot-ip 172.16.0.2 --camera realsense
    python deploy_franka.py ... --backend franky --execute        # real motion: asks you to type MOVE first

Loop design. Every period (1 / --hz) the loop reads the robot, takes the next action from a queue, passes it
through the safety filter, commands it, logs one CSV row and sleeps until the next period. When the queue is
empty it calls the policy *inline* on the observation it has just read and queues the first --act-steps
actions of the chunk. Inline on purpose: one-step inference takes about 1 ms (state MLP) to 2-8 ms (light
ViT) on this 2-core CPU, inside a 10-50 ms period, so the chunk starts from an observation read in the same
period. An inference thread would add GIL contention, races on the queue and chunks planned from older
observations, and pays off only for policies slower than a period -- what one-step MeanFlow removes.
A slow inference shows up as a deadline miss in the CSV, and the watchdog below covers a hang.

Actions are robosuite OSC_POSE deltas in [-1, 1] (world frame; position x output_max 0.05 m, axis-angle
x 0.5 rad, gripper > 0 closes), the same units evaluate.py feeds the env. Like robosuite's controller, a
delta is applied to the *measured* pose, so the target of every step is measured + delta. The demos were
recorded at 20 Hz: --hz 20 reproduces the training timing (and runs the sim in real time, one env step =
50 ms of simulated time); higher rates are for measuring headroom, and the velocity limits below bound the
motion whatever the rate.

Safety, in this order every step: a NaN/inf action or a measured pose far outside the workspace stops the
robot; the action is clipped to [-1, 1]; the target is clamped into the workspace box; the step is shortened
to min(--max-delta-pos, --max-vel / hz) and the rotation to min(--max-delta-rot, --max-ang-vel / hz).
A watchdog thread stops and holds the robot when no command went out for --watchdog-periods periods (a hung
policy, camera or GC pause). Ctrl-C, SIGTERM or any exception ends in a `finally` that stops the motion.
--dry-run computes and logs actions without moving; on a real robot motion needs --execute and typing MOVE.

Frames. The policy saw robosuite's world frame: eef position of the grip site, eef quaternion (x, y, z, w) of
the hand body, two finger joint positions (+w/2, -w/2). The franky backend adds the robot base position of
the task's scene to franky's base-frame pose, picks the quaternion sign the policy saw at home, and, before
moving anywhere, homes to robosuite's initial joint configuration and checks that the measured pose matches
the simulated one (this catches a wrong end-effector/TCP setting in Desk).

The real-robot path (FrankyBackend, RealSenseCamera) is written against franky-control's and pyrealsense2's
documented APIs but has NOT been run on hardware here; the sim path is what test_deploy.py checks.
"""
import csv
import gc
import importlib
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

import cli
import tasks
from models import CAPTURE_MODES, compile_act, load_policy

CSV_COLUMNS = ["step", "t_s", "lag_ms", "period_ms", "loop_ms", "infer_ms", "send_ms", "obs_age_ms", "queue", "miss", "clamp",
               "cmd_x", "cmd_y", "cmd_z", "cmd_qx", "cmd_qy", "cmd_qz", "cmd_qw", "cmd_grip",
               "meas_x", "meas_y", "meas_z", "meas_qx", "meas_qy", "meas_qz", "meas_qw", "meas_grip"]
CONFIRM_WORD = "MOVE"
OUTSIDE_MARGIN = 0.02  # m: a measured pose this far outside the box means the arm is not where we think it is


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by pretrain.py / finetune.py")
    p.add_argument("--task", default=None, help="task name; overrides or fills in the checkpoint's own 'task'")
    p.add_argument("--backend", choices=("sim", "franky"), default="sim", help="robosuite Panda or a real robot via franky")
    p.add_argument("--hz", type=cli.positive_float, default=20.0, help="control loop rate; the demos were recorded at 20 Hz")
    p.add_argument("--steps", type=cli.nonneg_int, default=400, help="control periods to run (0 = until Ctrl-C)")
    p.add_argument("--act-steps", type=cli.positive_int, default=None, help="actions executed per chunk before re-planning (default: the whole chunk)")
    p.add_argument("--inference-steps", type=cli.positive_int, default=None, help="MeanFlow steps K per call (default: the checkpoint's, normally 1)")
    p.add_argument("--watchdog-periods", type=cli.positive_float, default=3.0, help="stop and hold if no command went out for this many periods")
    p.add_argument("--workspace", type=cli.finite_float, nargs=6, default=[-0.30, 0.35, -0.40, 0.40, 0.81, 1.25],
                   metavar=("XMIN", "XMAX", "YMIN", "YMAX", "ZMIN", "ZMAX"), help="eef box in the task's world frame (m)")
    p.add_argument("--max-delta-pos", type=cli.positive_float, default=0.03, help="largest eef translation per step (m)")
    p.add_argument("--max-delta-rot", type=cli.positive_float, default=0.25, help="largest eef rotation per step (rad)")
    p.add_argument("--max-vel", type=cli.positive_float, default=0.5, help="eef speed limit (m/s); also franky's translation limit")
    p.add_argument("--max-ang-vel", type=cli.positive_float, default=2.0, help="eef angular speed limit (rad/s); also franky's rotation limit")
    p.add_argument("--dry-run", action="store_true", help="compute and log actions, never move (sim: never step)")
    p.add_argument("--execute", action="store_true", help="franky: allow real motion (asks for a typed confirmation)")
    p.add_argument("--log", type=cli.out_file, default=None, help="per-step CSV (default runs/deploy/<task>__<backend>__<time>.csv)")
    p.add_argument("--seed", type=int, default=0, help="torch noise and sim scene seed")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads; 1 keeps latency predictable on a shared CPU")
    p.add_argument("--device", type=cli.device, default="cpu", help="torch device for the policy")
    p.add_argument("--capture", choices=("none",) + CAPTURE_MODES, default="none",
                   help="run one-step inference through a captured graph (models.compile_act): trace = TorchScript "
                        "trace + freeze (CPU; same actions up to float round-off, about 10-30%% faster per call), "
                        "compile = torch.compile (slow to compile), graph = a CUDA graph (CUDA only), auto = graph on "
                        "CUDA else trace; none = eager policy.act")
    p.add_argument("--robot-ip", default="172.16.0.2", help="franky: FCI address of the robot")
    p.add_argument("--dynamics-factor", type=cli.positive_float, default=0.05, help="franky: relative velocity/acceleration/jerk factor (start low)")
    p.add_argument("--max-force", type=cli.positive_float, default=20.0, help="franky: stop when the external eef force exceeds this (N)")
    p.add_argument("--gripper-speed", type=cli.positive_float, default=0.05, help="franky: finger speed (m/s)")
    p.add_argument("--gripper-force", type=cli.positive_float, default=20.0, help="franky: grasp force (N)")
    p.add_argument("--no-home", action="store_true", help="franky: skip the move to robosuite's home joints and the frame check")
    p.add_argument("--frame-tol", type=cli.nonneg_float, nargs=2, default=[0.02, 0.15], metavar=("M", "RAD"),
                   help="franky: allowed home-pose mismatch against the sim (m, rad)")
    p.add_argument("--camera", choices=("none", "realsense"), default="none", help="franky: image source for image policies")
    p.add_argument("--camera-serial", default=None, help="realsense: device serial when several are plugged in")
    p.add_argument("--camera-rotate", type=int, choices=(0, 90, 180, 270), default=0, help="rotate frames to match the sim camera's up")
    p.add_argument("--object-source", default=None, help="MODULE:FUNC returning object-state from proprio (state policies on a real robot)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- geometry (quaternions are x, y, z, w)

def quat_mul(a, b):
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw,
                     aw * bw - ax * bx - ay * by - az * bz])


def axisangle_to_quat(v):
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    return np.r_[np.asarray(v) / angle * np.sin(angle / 2), np.cos(angle / 2)]


def quat_angle(a, b):
    """Rotation angle between two orientations (rad), blind to the quaternion sign."""
    return 2 * np.arccos(np.clip(abs(float(np.dot(a, b))), 0.0, 1.0))


# ----------------------------------------------------------------------------- safety filter

class UnsafeAction(Exception):
    """The loop must stop the robot: a non-finite action, or the arm is outside the workspace."""


@dataclass
class Limits:
    box_lo: np.ndarray
    box_hi: np.ndarray
    step_pos: float   # m per period: min(max delta, speed limit * period)
    step_rot: float   # rad per period


def make_limits(args, period):
    box = np.asarray(args.workspace, dtype=np.float64).reshape(3, 2)
    if (box[:, 0] >= box[:, 1]).any():
        raise SystemExit(f"error: --workspace needs min < max on every axis, got {args.workspace}")
    return Limits(box[:, 0], box[:, 1], min(args.max_delta_pos, args.max_vel * period),
                  min(args.max_delta_rot, args.max_ang_vel * period))


@dataclass
class Command:
    action: np.ndarray  # 7-D normalized action equivalent to the clamped target (what the sim env executes)
    pos: np.ndarray     # target eef position, task world frame
    quat: np.ndarray    # target eef orientation
    grip: float         # > 0 closes
    clamp: str          # limits that fired, e.g. "box+step"


def safe_command(action, pos, quat, limits, scales):
    """Turn a policy action into a bounded target pose. scales = OSC output_max (0.05 m x3, 0.5 rad x3)."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (7,) or not np.isfinite(a).all():
        raise UnsafeAction(f"non-finite or malformed action {np.array2string(a, precision=3)}")
    if (pos < limits.box_lo - OUTSIDE_MARGIN).any() or (pos > limits.box_hi + OUTSIDE_MARGIN).any():
        raise UnsafeAction(f"measured eef {np.round(pos, 3)} is outside the workspace box")
    fired = []
    a = np.clip(a, -1.0, 1.0)  # the env's action space; unnormalization can overshoot it
    target = np.clip(pos + a[:3] * scales[:3], limits.box_lo, limits.box_hi)
    if not np.allclose(target, pos + a[:3] * scales[:3]):
        fired.append("box")
    # Shorten, don't clip per axis: keeps the direction the policy asked for. The box is convex and pos is
    # (nearly) inside it, so a shortened step stays inside.
    dp = target - pos
    if np.linalg.norm(dp) > limits.step_pos:
        dp *= limits.step_pos / np.linalg.norm(dp)
        fired.append("step")
    dr = a[3:6] * scales[3:6]
    if np.linalg.norm(dr) > limits.step_rot:
        dr *= limits.step_rot / np.linalg.norm(dr)
        fired.append("rot")
    # robosuite's OSC left-multiplies the delta rotation (world frame); do the same so both backends agree.
    q = quat_mul(axisangle_to_quat(dr), quat)
    safe = np.r_[dp / scales[:3], dr / scales[3:6], a[6]]
    return Command(safe, pos + dp, q / np.linalg.norm(q), float(a[6]), "+".join(fired))


class Watchdog:
    """Calls `on_trip` from its own thread when `feed` has not been called for `timeout` seconds.

    It must live outside the control thread: a policy, camera or GC stall blocks that thread, and then
    nothing in it could stop the robot."""

    def __init__(self, timeout, on_trip):
        self.timeout, self.on_trip = timeout, on_trip
        self.tripped, self.trip_time = False, None
        self._last = time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def start(self):
        self.feed()
        self._thread.start()

    def feed(self):
        self._last = time.perf_counter()

    def _watch(self):
        while not self._done.wait(self.timeout / 4):
            if time.perf_counter() - self._last > self.timeout:
                self.tripped, self.trip_time = True, time.perf_counter()
                self.on_trip()
                return

    def close(self):
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


# ----------------------------------------------------------------------------- backends

@dataclass
class Reading:
    obs: dict          # policy input {"state", "rgb"?} in the training layout
    pos: np.ndarray    # measured eef position, task world frame
    quat: np.ndarray   # measured eef orientation
    grip: float        # measured finger opening (m, sum of both fingers)
    t: float           # perf_counter time of the oldest part of the observation


class SimBackend:
    """The task's robosuite Panda from tasks.make_env. One command = one env.step (1/20 s of simulated time).

    Physics only advances inside `command`, so once stopped the arm holds exactly where it is."""

    def __init__(self, env, seed=0, dry_run=False):
        self.env, self.dry_run = env, dry_run
        # A fresh robosuite env spends ~60 ms of one-time set-up in its first step: pay it before the clock
        # starts, then reset so the run still begins from the seeded scene.
        env.reset(seed=seed)
        env.step(np.zeros(env.task.act_dim))
        self.obs = env.reset(seed=seed)
        self.lock = threading.Lock()  # the watchdog may call stop() while the loop steps
        self.stopped, self.stop_time, self.n_commands = False, None, 0

    def read_state(self):
        with self.lock:
            s = self.obs["state"]
            return Reading(self.obs, s[:3].astype(np.float64), s[3:7].astype(np.float64), float(s[7] - s[8]),
                           time.perf_counter())

    def command(self, cmd):
        with self.lock:
            if self.stopped:
                return False
            if not self.dry_run:
                self.obs = self.env.step(cmd.action)[0]
            self.n_commands += 1
            return True

    def stop(self):
        with self.lock:
            if not self.stopped:
                self.stopped, self.stop_time = True, time.perf_counter()

    def close(self):
        self.env.close()


@dataclass
class SimReference:
    """Where the policy's world frame puts the real robot: base position, home joints and the home eef pose."""
    base_pos: np.ndarray
    home_qpos: np.ndarray
    home_pos: np.ndarray
    home_quat: np.ndarray


def sim_reference(task):
    env = tasks.make_env(task, "state", seed=0)
    try:
        se = env.sim_env
        robot = se.robots[0]
        body = se.sim.model.body_name2id(robot.robot_model.root_body)
        base_pos, base_quat = se.sim.data.body_xpos[body].copy(), se.sim.data.body_xquat[body].copy()
        if not np.allclose(np.abs(base_quat), [1, 0, 0, 0], atol=1e-6):
            raise SystemExit(f"error: {task.name}: robot base is rotated in the scene; only translation is mapped")
        se.sim.data.qpos[robot._ref_joint_pos_indexes] = robot.init_qpos
        se.sim.forward()
        raw = se._get_observations(force_update=True)
        return SimReference(base_pos, np.asarray(robot.init_qpos, dtype=np.float64),
                            raw["robot0_eef_pos"].astype(np.float64), raw["robot0_eef_quat"].astype(np.float64))
    finally:
        env.close()


class Latest:
    """Runs a blocking `read` in a daemon thread and keeps its newest value with its arrival time, so a slow
    device (a 30 fps camera, the gripper's state stream) never blocks the control loop."""

    def __init__(self, read, name):
        self._read, self._lock, self._done = read, threading.Lock(), threading.Event()
        self.value, self.t, self.error = None, None, None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.is_set():
            try:
                v = self._read()
            except Exception as e:  # surfaced to the control loop by get()
                self.error = e
                return
            with self._lock:
                self.value, self.t = v, time.perf_counter()

    def get(self, wait=5.0):
        deadline = time.perf_counter() + wait
        while self.value is None and self.error is None and time.perf_counter() < deadline:
            time.sleep(0.01)
        if self.error is not None:
            raise RuntimeError(f"{self._thread.name} failed: {self.error}")
        if self.value is None:
            raise RuntimeError(f"{self._thread.name}: nothing received within {wait:.0f} s")
        with self._lock:
            return self.value, self.t

    def close(self):
        self._done.set()


def square_resize(img, size):
    """(H, W, 3) uint8 -> (3, size, size): centre square crop, then block-mean (or nearest) down-sampling.
    640x480 -> 480x480 -> 96x96 is an exact 5x5 mean, close to what the sim's 96x96 render looks like."""
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s % size == 0:
        k = s // size
        img = img.reshape(size, k, size, k, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    else:
        idx = (np.arange(size) * s / size).astype(int)
        img = img[idx][:, idx]
    return np.ascontiguousarray(img.transpose(2, 0, 1))


class RealSenseCamera:
    """Colour frames from a RealSense (pyrealsense2, imported only here), resized to the policy's 96x96."""

    def __init__(self, serial=None, rotate=0, size=tasks.IMAGE_SIZE):
        try:
            import pyrealsense2 as rs
        except ImportError:
            raise SystemExit("error: --camera realsense needs `pip install pyrealsense2` (librealsense 2.5x)") from None
        self.pipe, cfg = rs.pipeline(), rs.config()
        if serial:
            cfg.enable_device(serial)
        cfg.enable_stream(rs.stream.color, 640, 480, rs.format.rgb8, 30)
        self.pipe.start(cfg)
        turns = rotate // 90

        def grab():
            frame = self.pipe.wait_for_frames().get_color_frame()
            return square_resize(np.rot90(np.asanyarray(frame.get_data()), turns), size)

        self.frames = Latest(grab, "realsense")

    def latest(self):
        return self.frames.get()

    def close(self):
        self.frames.close()
        self.pipe.stop()


class FrankyBackend:
    """A real Panda/FR3 through franky-control (imported only here). Untested: no robot on this machine.

    Each command preempts the running motion with an absolute CartesianMotion to the new target; franky's
    Ruckig OTG turns that into a jerk-limited 1 kHz trajectory, so the Python loop never has to be real-time
    and a jump in the target cannot trip libfranka's discontinuity reflexes."""

    def __init__(self, args, ref, image, object_source, camera):
        try:
            import franky
        except ImportError:
            raise SystemExit("error: --backend franky needs `pip install franky-control` with wheels matching the "
                             "robot's libfranka (see its README); the PyPI package `franky` is unrelated") from None
        self.f, self.ref, self.image, self.object_source, self.camera = franky, ref, image, object_source, camera
        self.motion_enabled = args.execute and not args.dry_run
        self.lock = threading.Lock()
        self.stopped, self.stop_time, self.n_commands, self.contact = False, None, 0, False
        self.grip_closed, self.grip_speed, self.grip_force = None, args.gripper_speed, args.gripper_force
        if "PREEMPT_RT" not in os.uname().version:
            print("warning: this kernel is not PREEMPT_RT; libfranka will report communication_constraints_violation")
        self.robot = franky.Robot(args.robot_ip)
        self.robot.recover_from_errors()
        self.robot.relative_dynamics_factor = args.dynamics_factor
        self.robot.translation_velocity_limit.set(args.max_vel)
        self.robot.rotation_velocity_limit.set(args.max_ang_vel)
        self.gripper = franky.Gripper(args.robot_ip)
        self.width = Latest(lambda: float(self.gripper.width), "gripper")
        m = franky.Measure
        force = (m.FORCE_X ** 2 + m.FORCE_Y ** 2 + m.FORCE_Z ** 2) ** 0.5
        self.reaction = franky.Reaction(force > args.max_force, franky.CartesianStopMotion())
        self.reaction.register_callback(self._on_contact)

    def _on_contact(self, robot_state, rel_time, abs_time):
        self.contact = True  # the reaction already stopped the arm; the loop ends at its next read

    def home_and_check(self, tol_pos, tol_rot):
        """Move to robosuite's initial joints, then compare the measured pose with the sim's pose there."""
        self.robot.move(self.f.JointMotion(self.ref.home_qpos.tolist()))
        r = self.read_state()
        dp, dr = np.linalg.norm(r.pos - self.ref.home_pos), quat_angle(r.quat, self.ref.home_quat)
        print(f"home check: eef {np.round(r.pos, 4)} vs sim {np.round(self.ref.home_pos, 4)} ({dp * 100:.1f} cm, "
              f"{np.degrees(dr):.1f} deg)")
        if dp > tol_pos or dr > tol_rot:
            raise SystemExit("error: the real home pose does not match the simulated one: check the end-effector "
                             "(TCP) setting in Desk and the gripper mounting; the policy's frames would be wrong")

    def read_state(self):
        if self.contact:
            raise UnsafeAction("external force above --max-force: the force reaction stopped the arm")
        ee = self.robot.current_cartesian_state.pose.end_effector_pose
        t = time.perf_counter()
        pos = np.asarray(ee.translation, dtype=np.float64) + self.ref.base_pos
        quat = np.asarray(ee.quaternion, dtype=np.float64)
        if np.dot(quat, self.ref.home_quat) < 0:  # q and -q are one rotation but two different network inputs
            quat = -quat
        width, t_grip = self.width.get()
        proprio = np.r_[pos, quat, width / 2, -width / 2].astype(np.float32)
        obs = {"state": proprio}
        t_obs = min(t, t_grip)
        if self.image:
            obs["rgb"], t_img = self.camera.latest()
            t_obs = min(t_obs, t_img)
        else:
            obj = np.asarray(self.object_source(proprio), dtype=np.float32).ravel()
            obs["state"] = np.r_[proprio, obj]
        return Reading(obs, pos, quat, float(width), t_obs)

    def command(self, cmd):
        with self.lock:
            if self.stopped:
                return False
            if self.motion_enabled:
                target = self.f.Affine((cmd.pos - self.ref.base_pos).tolist(), cmd.quat.tolist())
                motion = self.f.CartesianMotion(target, self.f.ReferenceType.Absolute)
                motion.add_reaction(self.reaction)
                self.robot.move(motion, asynchronous=True)  # also raises a stored error of the previous motion
                closed = cmd.grip > 0
                if closed != self.grip_closed:  # gripper commands take ~1 s: only send changes
                    if closed:
                        self.gripper.grasp_async(0.0, self.grip_speed, self.grip_force, epsilon_outer=1.0)
                    else:
                        self.gripper.move_async(0.08, self.grip_speed)
                    self.grip_closed = closed
            self.n_commands += 1
            return True

    def stop(self):
        with self.lock:
            if self.stopped:
                return
            self.stopped, self.stop_time = True, time.perf_counter()
            if not self.motion_enabled:
                return
            try:
                self.robot.move(self.f.CartesianStopMotion(), asynchronous=True)
                self.robot.join_motion()
            except Exception as e:  # a reflex may already have stopped the arm; never mask the original error
                print(f"warning: stop motion raised {type(e).__name__}: {e} (the robot's own reflex holds it)")

    def close(self):
        self.width.close()
        if self.camera is not None:
            self.camera.close()


# ----------------------------------------------------------------------------- the control loop

def sleep_until(t):
    # time.sleep overshoots by 50-100 us plus scheduler noise; sleep to 1 ms before, then spin the rest.
    remaining = t - time.perf_counter()
    if remaining > 1e-3:
        time.sleep(remaining - 1e-3)
    while time.perf_counter() < t:
        pass


def percentiles(x):
    x = np.asarray([v for v in x if np.isfinite(v)])
    if not len(x):
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max())}


def run_loop(policy, backend, limits, scales, hz, steps, log_path, watchdog_periods=3.0, act_steps=None,
             inference_steps=None):
    """Run `steps` periods (0 = forever) and return a summary dict. The backend is always stopped on exit."""
    period = 1.0 / hz
    act_steps = act_steps or policy.cfg.chunk
    queue, chunk_t = deque(), None
    hist = tasks.ObsHistory(policy.cfg.obs_steps)   # every period's reading, also while a chunk plays out
    stats = {"loop_ms": [], "infer_ms": [], "send_ms": [], "e2e_ms": [], "misses": 0, "clamped": 0}
    watchdog = Watchdog(watchdog_periods * period, backend.stop)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log_file = open(log_path, "w", newline="")
    log = csv.writer(log_file)
    log.writerow(CSV_COLUMNS)
    reason, k = "done", 0
    t0 = next_t = time.perf_counter()
    prev_start = t0
    try:
        watchdog.start()
        while steps == 0 or k < steps:
            sleep_until(next_t)
            start = time.perf_counter()
            r = backend.read_state()
            obs = hist.push(r.obs)
            infer_ms = float("nan")
            if not queue:
                t_inf = time.perf_counter()
                chunk = policy.act(obs, steps=inference_steps)
                infer_ms = (time.perf_counter() - t_inf) * 1e3
                queue.extend(np.asarray(chunk)[:act_steps])
                chunk_t = r.t
            cmd = safe_command(queue.popleft(), r.pos, r.quat, limits, scales)
            issued = time.perf_counter()
            if watchdog.tripped or not backend.command(cmd):
                reason = "watchdog: no command for {:.0f} ms".format(watchdog_periods * period * 1e3)
                break
            watchdog.feed()
            done = time.perf_counter()
            miss = done > next_t + period
            stats["misses"] += miss
            stats["clamped"] += bool(cmd.clamp)
            stats["loop_ms"].append((done - start) * 1e3)
            stats["send_ms"].append((done - issued) * 1e3)
            if np.isfinite(infer_ms):
                stats["infer_ms"].append(infer_ms)
                stats["e2e_ms"].append((issued - r.t) * 1e3)
            log.writerow([k, f"{start - t0:.6f}", f"{(start - next_t) * 1e3:.3f}", f"{(start - prev_start) * 1e3:.3f}",
                          f"{(done - start) * 1e3:.3f}", f"{infer_ms:.3f}", f"{(done - issued) * 1e3:.3f}",
                          f"{(issued - chunk_t) * 1e3:.3f}", len(queue), int(miss), cmd.clamp,
                          *np.round(cmd.pos, 6), *np.round(cmd.quat, 6), f"{cmd.grip:.3f}",
                          *np.round(r.pos, 6), *np.round(r.quat, 6), f"{r.grip:.6f}"])
            if k % max(int(hz), 1) == 0:
                log_file.flush()  # about once a second: a crash loses at most a second of rows
            prev_start, k = start, k + 1
            # A step that overran its period: start the next one now and drop the missed slots rather than
            # firing them back to back, which would send several steps in one period past the speed limit.
            next_t = max(next_t + period, time.perf_counter())
    except UnsafeAction as e:
        reason = f"unsafe: {e}"
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        watchdog.close()
        backend.stop()
        log_file.close()
    elapsed = max(prev_start - t0, 1e-9)
    summary = {"steps": k, "seconds": elapsed, "hz_target": hz, "hz_achieved": (k - 1) / elapsed if k > 1 else 0.0,
               "reason": reason, "misses": stats["misses"], "clamped": stats["clamped"],
               "watchdog_tripped": watchdog.tripped, "log": log_path,
               "loop_ms": percentiles(stats["loop_ms"]), "infer_ms": percentiles(stats["infer_ms"]),
               "e2e_ms": percentiles(stats["e2e_ms"]), "send_ms": percentiles(stats["send_ms"]),
               "inferences": len(stats["infer_ms"])}
    print_summary(summary)
    return summary


def _fmt(d):
    return f"p50 {d['p50']:.2f}  p99 {d['p99']:.2f}  max {d['max']:.2f}"


def print_summary(s):
    print(f"deploy: {s['steps']} steps in {s['seconds']:.2f} s = {s['hz_achieved']:.2f} Hz (target {s['hz_target']:g}); "
          f"stopped: {s['reason']}")
    print(f"  loop work ms        {_fmt(s['loop_ms'])}")
    print(f"  inference ms        {_fmt(s['infer_ms'])}  ({s['inferences']} calls)")
    print(f"  obs -> command ms   {_fmt(s['e2e_ms'])}  (read + inference + safety, steps that ran inference)")
    print(f"  send ms            {_fmt(s['send_ms'])}  (sim: the physics step; franky: queuing the motion)")
    print(f"  deadline misses {s['misses']}, clamped steps {s['clamped']}, watchdog {'TRIPPED' if s['watchdog_tripped'] else 'ok'}")
    print(f"  per-step log: {s['log']}")


# ----------------------------------------------------------------------------- setup

def resolve_task(args, policy, ckpt):
    name = args.task or ckpt.get("task")
    if name is None:
        raise SystemExit("error: the checkpoint does not name its task; pass --task (e.g. --task lift)")
    if args.task and ckpt.get("task") and args.task != ckpt["task"]:
        print(f"note: --task {args.task} overrides the checkpoint's task {ckpt['task']!r}")
    try:
        task = tasks.get_task(name)
    except tasks.TaskError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = policy.cfg
    if ckpt.get("obs_mode", cfg.obs_mode) != cfg.obs_mode:
        raise SystemExit(f"error: checkpoint says obs_mode {ckpt['obs_mode']!r} but its policy is {cfg.obs_mode!r}")
    if task.suite != "robosuite" or task.robots != ("Panda",):
        raise SystemExit(f"error: task {task.name} is not a single-arm Panda task; deploy supports lift, can, square")
    try:
        tasks.check_layout(ckpt, task, args.ckpt)
    except tasks.TaskError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        cli.policy_fits_task(cfg, task, tasks.obs_dims(task, cfg.obs_mode)[0],
                             f"{args.ckpt} (trained for {ckpt.get('task', 'an unnamed task')}; wrong --task?)")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return task


def load_object_source(args, task, obs_mode):
    """A state policy also reads object state (pose of the cube/can/nut ...), which a real robot cannot measure."""
    if args.backend != "franky" or obs_mode != "state":
        return None
    if not args.object_source:
        n_obj = tasks.obs_dims(task, "state")[0] - 9
        raise SystemExit(f"error: this is a state policy: {n_obj} of its {n_obj + 9} inputs are object state "
                         f"('{task.object_key}') that the real robot does not measure. Deploy an image policy, or pass "
                         "--object-source MODULE:FUNC, a function (proprio 9-D, world frame) -> the object vector in "
                         "tasks.TASKS[task].object_features order (robomimic v1.4.1 layout), e.g. from a tracker")
    module, _, func = args.object_source.partition(":")
    return getattr(importlib.import_module(module), func)


def controller_scales(task):
    cfg = tasks.robosuite_kwargs(task)["controller_configs"]["body_parts"]["right"]
    return np.asarray(cfg["output_max"], dtype=np.float64)


def confirm_motion(robot_ip, read=None):
    print(f"About to move the real robot at {robot_ip}. Keep the user stop button in your hand.")
    try:
        answer = (read or input)(f"Type {CONFIRM_WORD} to continue: ")
    except EOFError:  # no terminal (a pipe, a batch job): nobody confirmed
        answer = ""
    if answer.strip() != CONFIRM_WORD:
        raise SystemExit("aborted: no confirmation, the robot did not move")


def make_backend(args, task, obs_mode):
    if args.backend == "sim":
        return SimBackend(tasks.make_env(task, obs_mode, seed=args.seed), seed=args.seed, dry_run=args.dry_run)
    object_source = load_object_source(args, task, obs_mode)  # refuse before touching any hardware
    if obs_mode == "image" and args.camera == "none":
        raise SystemExit("error: an image policy needs a camera: pass --camera realsense")
    if args.dry_run or not args.execute:
        print("franky: dry run, the robot will not move (pass --execute to move it)")
    ref = sim_reference(task)
    camera = RealSenseCamera(args.camera_serial, args.camera_rotate) if obs_mode == "image" else None
    try:
        backend = FrankyBackend(args, ref, obs_mode == "image", object_source, camera)
    except BaseException:
        if camera is not None:
            camera.close()
        raise
    try:
        if backend.motion_enabled:
            confirm_motion(args.robot_ip)
            if not args.no_home:
                backend.home_and_check(*args.frame_tol)
    except BaseException:
        backend.stop()
        backend.close()
        raise
    return backend


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    policy, ckpt = load_policy(args.ckpt, device=args.device)
    task = resolve_task(args, policy, ckpt)
    obs_mode = policy.cfg.obs_mode
    if args.act_steps is not None and not 1 <= args.act_steps <= policy.cfg.chunk:
        raise SystemExit(f"error: --act-steps must be in [1, {policy.cfg.chunk}] (the policy's chunk)")
    if args.capture != "none":  # captured after the checks above, so a refusal never waits for a capture
        try:
            policy = compile_act(policy, batch=1, steps=args.inference_steps, mode=args.capture)
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: --capture {args.capture}: {str(e).splitlines()[0]}") from None
        print(f"policy captured ({policy.mode}, K={policy.steps})")
    limits = make_limits(args, 1.0 / args.hz)
    log_path = args.log or f"runs/deploy/{task.name}__{args.backend}__{int(time.time())}.csv"
    backend = None
    try:
        backend = make_backend(args, task, obs_mode)
        for _ in range(3):  # the first calls allocate; keep that out of the first control period
            policy.act(tasks.ObsHistory(policy.cfg.obs_steps).reset(backend.read_state().obs), steps=args.inference_steps)
        gc.collect()
        gc.freeze()  # objects from start-up stop being scanned by later collections (shorter GC pauses)
        print(f"{task.name} ({obs_mode}) on {args.backend} at {args.hz:g} Hz, chunk {policy.cfg.chunk}, "
              f"workspace {args.workspace}")
        return run_loop(policy, backend, limits, controller_scales(task), args.hz, args.steps, log_path,
                        args.watchdog_periods, args.act_steps, args.inference_steps)
    finally:
        if backend is not None:
            backend.stop()
            backend.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # lands in the loop's `finally`, which stops the robot


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # a killed launcher or systemd must stop the robot too
    try:
        summary = main()
    except (tasks.TaskError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    sys.exit(0 if summary["reason"] in ("done", "interrupted") else 2)  # 2: a safety stop, for wrapper scripts
