"""Tests for deploy_franka.py on the simulated Panda: real-time loop, CSV, watchdog, NaN stop, workspace clamp,
stop on exceptions, and the set-up refusals. The franky/RealSense path needs hardware and is not tested here.

Run: python -m pytest -q test_deploy.py   (about 15 s on 2 cores)
"""
import csv
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import deploy_franka as dep
from models import PolicyConfig, make_policy, save_checkpoint
from tasks import OBS_LAYOUT, TASKS, make_env, obs_dims

HZ = 20.0
SCALES = dep.controller_scales(TASKS["lift"])


@pytest.fixture(scope="module")
def lift_env():
    env = make_env("lift", "state", seed=0)  # ~3 s to build: shared, each backend resets it
    yield env
    env.close()


def write_lift_checkpoint(path, extra=None):
    torch.manual_seed(0)
    state_dim, _ = obs_dims("lift", "state")
    policy = make_policy(PolicyConfig(state_dim=state_dim, act_dim=TASKS["lift"].act_dim, chunk=TASKS["lift"].chunk))
    save_checkpoint(str(path), policy, extra={"obs_layout": OBS_LAYOUT, **(extra or {})})
    return str(path)


class ScriptedPolicy:
    """Stands in for MeanFlowPolicy in the fault tests: call i (from 1) returns fn(i), a (4, 7) chunk."""

    def __init__(self, fn, obs_steps=1):
        self.cfg = SimpleNamespace(chunk=4, obs_steps=obs_steps)
        self.fn, self.calls, self.seen = fn, 0, []

    def act(self, obs, steps=None):
        self.calls += 1
        self.seen.append(obs["state"].copy())
        return self.fn(self.calls)


def still(_call):
    return np.zeros((4, 7))


def default_limits(hz=HZ):
    return dep.make_limits(dep.parse_args(["--ckpt", "unused"]), 1.0 / hz)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(policy, backend, tmp_path, steps=12, limits=None, hz=HZ, **kw):
    log = str(tmp_path / "log.csv")
    return dep.run_loop(policy, backend, limits or default_limits(hz), SCALES, hz, steps, log, **kw), log


# ----------------------------------------------------------------------------- the loop

def test_cli_runs_n_steps_at_target_rate_and_writes_csv(tmp_path):
    ckpt = write_lift_checkpoint(tmp_path / "ckpt.pt", extra={"task": "lift", "obs_mode": "state"})
    log = tmp_path / "run.csv"
    s = dep.main(["--ckpt", ckpt, "--backend", "sim", "--hz", str(HZ), "--steps", "20", "--log", str(log)])
    assert s["steps"] == 20 and s["reason"] == "done" and not s["watchdog_tripped"]
    # The schedule is absolute, so the rate can only fall short, and only if a step took a whole period.
    assert 0.9 * HZ <= s["hz_achieved"] <= 1.01 * HZ
    assert s["inferences"] == 5  # chunk of 4, one inference per chunk
    rows = read_rows(log)
    assert len(rows) == 20 and list(rows[0]) == dep.CSV_COLUMNS
    assert sum(np.isfinite(float(r["infer_ms"])) for r in rows) == 5
    assert all(float(r["obs_age_ms"]) >= 0 and float(r["loop_ms"]) > 0 for r in rows)
    first, last = rows[0], rows[-1]
    moved = np.linalg.norm([float(last[f"meas_{a}"]) - float(first[f"meas_{a}"]) for a in "xyz"])
    assert moved > 1e-3  # the simulated arm really followed the commands


def test_cli_capture_trace_gives_the_eager_commands(tmp_path):
    """--capture trace (models.compile_act) drives the same loop with the same actions as the eager policy."""
    ckpt = write_lift_checkpoint(tmp_path / "ckpt.pt", extra={"task": "lift", "obs_mode": "state"})
    cmds = {}
    for capture in ("none", "trace"):
        log = tmp_path / f"{capture}.csv"
        s = dep.main(["--ckpt", ckpt, "--backend", "sim", "--hz", "50", "--steps", "8", "--log", str(log),
                      "--capture", capture])
        assert s["steps"] == 8 and s["reason"] == "done" and s["inferences"] == 2
        cmds[capture] = np.array([[float(r[f"cmd_{a}"]) for a in "xyz"] for r in read_rows(log)])
    np.testing.assert_allclose(cmds["trace"], cmds["none"], atol=2e-6)
    with pytest.raises(SystemExit, match="--capture graph"):
        dep.main(["--ckpt", ckpt, "--backend", "sim", "--steps", "1", "--capture", "graph", "--log",
                  str(tmp_path / "g.csv")])


def test_loop_feeds_a_history_policy_every_periods_reading(lift_env, tmp_path):
    """A policy with obs_steps = 2 gets (previous reading, reading), the first reading repeated at the start, with
    the readings taken while a chunk plays out pushed too."""
    backend = dep.SimBackend(lift_env)
    readings, read = [], backend.read_state

    def spy():
        r = read()
        readings.append(r.obs["state"].copy())
        return r
    backend.read_state = spy
    policy = ScriptedPolicy(lambda call: np.full((4, 7), 0.3 * (-1) ** call), obs_steps=2)
    s, _ = run(policy, backend, tmp_path, steps=8)
    assert s["steps"] == 8 and policy.calls == 2
    np.testing.assert_array_equal(policy.seen[0], np.concatenate([readings[0], readings[0]]))
    np.testing.assert_array_equal(policy.seen[1], np.concatenate([readings[3], readings[4]]))
    assert not np.array_equal(readings[3], readings[4])


def test_watchdog_trips_when_the_policy_sleeps_past_the_deadline(lift_env, tmp_path):
    backend = dep.SimBackend(lift_env)
    woke = {}

    def sleepy(call):
        if call == 2:
            time.sleep(12 / HZ)  # 12 periods, the watchdog allows 3
            woke["t"] = time.perf_counter()
        return np.zeros((4, 7))

    s, log = run(ScriptedPolicy(sleepy), backend, tmp_path, watchdog_periods=3)
    assert s["watchdog_tripped"] and s["reason"].startswith("watchdog")
    assert backend.stopped and backend.stop_time < woke["t"]  # stopped while the policy was still asleep
    assert backend.n_commands == 4 and len(read_rows(log)) == 4  # nothing commanded after the trip


def test_nan_action_stops_the_robot(lift_env, tmp_path):
    backend = dep.SimBackend(lift_env)

    def nan_second_chunk(call):
        chunk = np.zeros((4, 7))
        if call == 2:
            chunk[0, 2] = np.nan
        return chunk

    s, log = run(ScriptedPolicy(nan_second_chunk), backend, tmp_path)
    assert s["reason"].startswith("unsafe: non-finite")
    assert backend.stopped and backend.n_commands == 4 and len(read_rows(log)) == 4


def test_target_outside_the_workspace_is_clamped(lift_env, tmp_path):
    backend = dep.SimBackend(lift_env)
    start = backend.read_state().pos
    lo, hi = start - 0.1, start + np.array([0.02, 0.1, 0.02])  # 2 cm of room in +x and +z
    limits = dep.Limits(lo, hi, step_pos=0.01, step_rot=0.1)
    push = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0])  # full speed up and forward, out of the box
    s, log = run(ScriptedPolicy(lambda _: np.tile(push, (4, 1))), backend, tmp_path, steps=16, limits=limits)
    assert s["reason"] == "done" and s["clamped"] == 16
    rows = read_rows(log)
    cmd = np.array([[float(r[f"cmd_{a}"]) for a in "xyz"] for r in rows])
    meas = np.array([[float(r[f"meas_{a}"]) for a in "xyz"] for r in rows])
    assert (cmd <= hi + 1e-5).all() and (cmd >= lo - 1e-5).all()  # the CSV keeps 6 decimals
    assert (np.linalg.norm(cmd - meas, axis=1) <= 0.01 + 1e-5).all()  # per-step delta clamp
    assert "box" in rows[-1]["clamp"] and "step" in rows[0]["clamp"]
    assert (meas[-1] <= hi + 0.01).all() and meas[-1][2] > start[2] + 0.01  # went up, stopped at the wall


@pytest.mark.parametrize("error", [RuntimeError("camera unplugged"), KeyboardInterrupt()])
def test_exception_inside_the_loop_still_stops_the_robot(lift_env, tmp_path, error):
    backend = dep.SimBackend(lift_env)

    def failing(call):
        if call == 2:
            raise error
        return np.zeros((4, 7))

    if isinstance(error, KeyboardInterrupt):  # Ctrl-C ends the run normally, with a summary
        s, log = run(ScriptedPolicy(failing), backend, tmp_path)
        assert s["reason"] == "interrupted"
    else:
        with pytest.raises(RuntimeError, match="camera unplugged"):
            run(ScriptedPolicy(failing), backend, tmp_path)
        log = str(tmp_path / "log.csv")
    assert backend.stopped and backend.n_commands == 4
    assert len(read_rows(log)) == 4  # the log was closed (flushed) on the way out


def test_dry_run_never_moves(lift_env, tmp_path):
    backend = dep.SimBackend(lift_env, dry_run=True)
    start = backend.read_state().pos
    run(ScriptedPolicy(lambda _: np.tile([1.0, 0, 0, 0, 0, 0, 0], (4, 1))), backend, tmp_path, steps=8)
    assert backend.n_commands == 8 and np.array_equal(backend.read_state().pos, start)


# ----------------------------------------------------------------------------- pieces and refusals

def test_safe_command_rejects_non_finite_and_bounds_rotation():
    limits = default_limits()
    pos, quat = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0, 0.0])
    for bad in (np.inf, -np.inf, np.nan):
        with pytest.raises(dep.UnsafeAction):
            dep.safe_command(np.r_[np.zeros(6), bad], pos, quat, limits, SCALES)
    with pytest.raises(dep.UnsafeAction, match="outside"):
        dep.safe_command(np.zeros(7), pos + [0, 0, 1.0], quat, limits, SCALES)
    cmd = dep.safe_command(np.r_[0, 0, 0, 0, 0, 1.0, 1.0], pos, quat, limits, SCALES)
    assert cmd.clamp == "rot" and dep.quat_angle(cmd.quat, quat) == pytest.approx(limits.step_rot)
    assert cmd.action[5] == pytest.approx(limits.step_rot / SCALES[5]) and cmd.grip == 1.0


def test_setup_refusals(tmp_path, monkeypatch):
    bare = write_lift_checkpoint(tmp_path / "bare.pt")  # config names no task
    with pytest.raises(SystemExit, match="pass --task"):
        dep.main(["--ckpt", bare])
    with pytest.raises(SystemExit, match="wrong --task"):
        dep.main(["--ckpt", bare, "--task", "can"])  # 23-D state, the policy takes 19
    # A state policy on a real robot would need object poses; refuse before any hardware is touched.
    with pytest.raises(SystemExit, match="object state"):
        dep.main(["--ckpt", bare, "--task", "lift", "--backend", "franky", "--execute"])
    with pytest.raises(SystemExit, match="aborted"):
        dep.confirm_motion("172.16.0.2", read=lambda _: "yes")
    dep.confirm_motion("172.16.0.2", read=lambda _: dep.CONFIRM_WORD)


def test_square_resize_matches_the_policy_image_layout():
    img = np.zeros((480, 640, 3), np.uint8)
    img[:, 80:320] = 200  # left half of the centre square
    out = dep.square_resize(img, 96)
    assert out.shape == (3, 96, 96) and out.dtype == np.uint8
    assert (out[:, :, :48] == 200).all() and (out[:, :, 48:] == 0).all()
