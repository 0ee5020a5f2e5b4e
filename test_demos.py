"""Tests for collect_demos.py: scripted robosuite experts (robomimic layout) and the locomotion PPO
teacher (D4RL layout).

Run: python -m pytest -q test_demos.py   (about a minute on 2 cores; the image test needs EGL or OSMesa)
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

import collect_demos
import tasks
import teacher
from collect_demos import collect

# Choose MUJOCO_GL before anything imports mujoco (robosuite would otherwise pick one for the image test).
tasks.setup_rendering()
torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent


def read_demos(path):
    """{demo name: {"actions", "states", "obs": {key: array}}} in file order."""
    with h5py.File(path, "r") as f:
        names = sorted(f["data"], key=lambda n: int(n.split("_")[1]))
        return {n: {"actions": f[f"data/{n}/actions"][:], "states": f[f"data/{n}/states"][:],
                    "obs": {k: v[:] for k, v in f[f"data/{n}/obs"].items()}} for n in names}


@pytest.fixture(scope="module")
def lift2(tmp_path_factory):
    out = tmp_path_factory.mktemp("lift") / "lift.hdf5"
    summary = collect("lift", 2, out=str(out), workers=1, seed=0, progress=False)
    return summary, out


# ----------------------------------------------------------------------------------------------
# Scripted arm experts (robomimic layout)
# ----------------------------------------------------------------------------------------------
def test_lift_collect_and_load(lift2):
    summary, out = lift2
    assert summary["successes"] == 2 and summary["attempts"] == 2 and summary["success_rate"] == 1.0
    assert summary["episodes_written"] == 2 and summary["out"] == str(out)
    ds = tasks.load_dataset(out, "lift")
    assert len(ds.episode_lengths) == 2
    assert ds.states.shape == (ds.episode_lengths.sum(), 19) and ds.actions.shape[1] == 7
    assert np.abs(ds.actions).max() <= 1.0
    assert summary["min_length"] == ds.episode_lengths.min() and summary["max_length"] == ds.episode_lengths.max()


def test_determinism_and_worker_order(lift2, tmp_path):
    _, out = lift2
    first = read_demos(out)
    collect("lift", 2, out=str(tmp_path / "again.hdf5"), workers=1, seed=0, progress=False)
    again = read_demos(tmp_path / "again.hdf5")
    assert list(again) == list(first)
    for name in first:
        np.testing.assert_array_equal(again[name]["actions"], first[name]["actions"])
        np.testing.assert_array_equal(again[name]["states"], first[name]["states"])
    # workers=2: worker w runs seed + 1000*w and the demos are merged in worker order, so demo_0 is the
    # first seed-0 episode and demo_1 the first seed-1000 episode.
    s = collect("lift", 2, out=str(tmp_path / "w2.hdf5"), workers=2, seed=0, progress=False)
    assert s["workers"] == 2 and s["successes"] == 2
    w2 = read_demos(tmp_path / "w2.hdf5")
    assert list(w2) == ["demo_0", "demo_1"]
    collect("lift", 1, out=str(tmp_path / "s1000.hdf5"), workers=1, seed=1000, progress=False)
    s1000 = read_demos(tmp_path / "s1000.hdf5")
    np.testing.assert_array_equal(w2["demo_0"]["actions"], first["demo_0"]["actions"])
    np.testing.assert_array_equal(w2["demo_1"]["actions"], s1000["demo_0"]["actions"])
    assert not np.array_equal(w2["demo_1"]["actions"][:5], first["demo_1"]["actions"][:5])


def test_robomimic_layout(lift2):
    _, out = lift2
    with h5py.File(out, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["type"] == 1 and env_args["env_name"] == "Lift"
        assert env_args["env_kwargs"]["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"
        names = sorted(f["data"])
        total = 0
        for n in names:
            g = f[f"data/{n}"]
            assert g.attrs["num_samples"] == len(g["actions"]) == len(g["states"]) == len(g["obs/object"])
            assert g["dones"][-1] == 1 and g["rewards"][:].sum() >= 1
            assert "<mujoco" in g.attrs["model_file"]
            total += g.attrs["num_samples"]
        assert f["data"].attrs["total"] == total
        masks = [m.decode() for key in ("train", "valid") for m in f[f"mask/{key}"][:]]
        assert sorted(masks) == names


def _replay(env, state):
    """Our env's observation (tasks.OBS_LAYOUT keys) of one stored sim state."""
    env.sim_env.sim.set_state_from_flattened(state)
    env.sim_env.sim.forward()
    return env.layout_obs(with_object=True)


def test_states_reproduce_observations(lift2):
    """Round trip: each stored sim state, set into a fresh env, gives the file's stored observations (every
    state key, in the public layout), and the file says which layout it holds."""
    _, out = lift2
    demos = read_demos(out)
    with h5py.File(out, "r") as f:
        assert f["data"].attrs["obs_layout"] == tasks.OBS_LAYOUT
        made = json.loads(f["data"].attrs["collection"])  # how the demos were made: lift's defaults
        assert made["expert"] == "experts.LiftExpert" and made["action_noise"] == 0.05
        assert made["action_labels"] == collect_demos.LABELS["executed"]
    env = tasks.make_env("lift", seed=0)
    env.reset()
    keys = list(tasks.TASKS["lift"].proprio_keys) + ["object"]
    checked = 0
    for demo in demos.values():
        T = len(demo["actions"])
        for t in sorted({0, 1, T // 2, T - 1}):
            ours = _replay(env, demo["states"][t])
            for k in keys:
                np.testing.assert_allclose(ours[k], demo["obs"][k][t], rtol=0, atol=1e-9, err_msg=k)
            checked += 1
    # and the env's own step observations are those stored (obs[t] is the observation before actions[t])
    demo = demos["demo_0"]
    obs = env.reset(seed=0)
    ds_states = np.concatenate([demo["obs"][k] for k in keys], axis=1)
    np.testing.assert_allclose(obs["state"], ds_states[0], atol=1e-6)
    env.close()
    assert checked >= 8


def _legacy_copy(src, dst, task):
    """A copy of a robomimic file whose obs/object is rearranged into robosuite 1.5's object-state order and
    whose layout marker is gone: what this project's files held before it adopted the v1.4.1 layout."""
    import shutil
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        del f["data"].attrs["obs_layout"]
        for name in f["data"]:
            obj = f[f"data/{name}/obs/object"][:]
            f[f"data/{name}/obs/object"][...] = tasks.legacy_object_state(obj, task)


def test_check_data_fits_our_file_and_spots_the_old_order(lift2, tmp_path):
    _, out = lift2
    report = collect_demos.check_data(out, demos=2)
    assert report["fits"] and report["task"] == "lift" and report["file_layout"] == tasks.OBS_LAYOUT
    assert report["steps"] > 50 and all(d.max() == 0 for d in report["diff"].values())
    legacy = tmp_path / "legacy.hdf5"
    _legacy_copy(out, legacy, "lift")
    report = collect_demos.check_data(legacy, demos=2)
    assert not report["fits"] and report["legacy"] and list(report["bad"]) == ["object"]
    assert report["bad"]["object"] == [7, 8, 9]  # lift: 1.5 negated gripper_to_cube_pos
    assert "robosuite 1.5's object-state order" in report["verdict"]
    # robosuite 1.5 files without a marker are refused by the loader, marked ones too; unmarked 1.4-era load
    with pytest.raises(tasks.TaskError, match=r"legacy.hdf5: observations in layout 'robosuite-v1.5'.*--check-data"):
        tasks.load_dataset(legacy, "lift")
    for version, marker, loads in (("1.4.1", None, True), ("1.5.2", tasks.LEGACY_OBS_LAYOUT, False),
                                   ("1.4.1", tasks.LEGACY_OBS_LAYOUT, False), ("1.5.2", tasks.OBS_LAYOUT, True)):
        with h5py.File(legacy, "a") as f:
            env_args = json.loads(f["data"].attrs["env_args"])
            f["data"].attrs["env_args"] = json.dumps({**env_args, "env_version": version})
            if marker is None:
                f["data"].attrs.pop("obs_layout", None)
            else:
                f["data"].attrs["obs_layout"] = marker
        if loads:
            assert tasks.load_dataset(legacy, "lift").states.shape[1] == 19
        else:
            with pytest.raises(tasks.TaskError, match="re-collect"):
                tasks.load_dataset(legacy, "lift")


def test_check_data_cli(lift2, tmp_path, monkeypatch, capsys):
    _, out = lift2

    def main(*argv):  # collect_demos.main in this process: exit code, stdout, stderr
        monkeypatch.setattr(sys, "argv", ["collect_demos.py", "--check-data", *map(str, argv)])
        with pytest.raises(SystemExit) as e:
            collect_demos.main()
        o, err = capsys.readouterr()
        return e.value.code, o, err

    code, o, _ = main(out, "--demos", "1")
    assert code == 0 and "object[7:10]" in o and "gripper_to_cube_pos" in o
    assert o.strip().splitlines()[-1].startswith("fits: ")
    for bad, message in ((tmp_path / "missing.hdf5", "file not found"), (HERE / "pytest.ini", "not a readable hdf5")):
        code, _, err = main(bad)
        assert code == 2 and err.strip().startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    # one real command line, on a file in the old (robosuite 1.5) order
    legacy = tmp_path / "lift_legacy.hdf5"
    _legacy_copy(out, legacy, "lift")
    r = subprocess.run([sys.executable, str(HERE / "collect_demos.py"), "--check-data", str(legacy), "--demos", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit: object[7-9]") and "robosuite 1.5's object-state order" in last


@pytest.mark.parametrize("task", ["can", "square"])
def test_can_and_square_succeed(task, tmp_path):
    out = tmp_path / f"{task}.hdf5"
    s = collect(task, 1, out=str(out), workers=1, seed=0, progress=False)
    assert s["successes"] == 1 and s["episodes_written"] == 1
    ds = tasks.load_dataset(out, task)
    assert ds.states.shape[1] == 23 and len(ds.episode_lengths) == 1
    # the stored observations are the public layout of the stored states; the old order is spotted
    report = collect_demos.check_data(out)
    assert report["fits"] and report["steps"] == len(ds) and max(d.max() for d in report["diff"].values()) == 0
    _legacy_copy(out, tmp_path / "legacy.hdf5", task)
    report = collect_demos.check_data(tmp_path / "legacy.hdf5")
    assert not report["fits"] and report["legacy"] and report["bad"]["object"] == list(range(14))
    # the last stored state (a few steps past the first success) still counts as a success
    states = read_demos(out)["demo_0"]["states"]
    env = tasks.make_env(task, seed=0)
    env.reset()
    env.sim_env.sim.set_state_from_flattened(states[-1])
    env.sim_env.sim.forward()
    assert env.sim_env._check_success()
    env.sim_env.sim.set_state_from_flattened(states[0])
    env.sim_env.sim.forward()
    assert not env.sim_env._check_success()
    env.close()


def test_transport_two_arm_demo(tmp_path):
    """The two-arm expert finishes TwoArmTransport (seed 0: one attempt) and the file has
    14-D actions, both robots' obs and robomimic's layout; it loads as 59-D states."""
    out = tmp_path / "transport.hdf5"
    s = collect("transport", 1, out=str(out), workers=1, seed=0, progress=False)
    assert s["successes"] == 1 and s["attempts"] == 1 and s["episodes_written"] == 1
    assert (s["noise"], s["labels"]) == (0.1, "clean")  # transport's default data is DART's, as kitchen's
    with h5py.File(out, "r") as f:
        assert json.loads(f["data"].attrs["env_args"])["env_kwargs"]["robots"] == ["Panda", "Panda"]
        g = f["data/demo_0"]
        T = g.attrs["num_samples"]
        assert g["actions"].shape == (T, 14) and np.abs(g["actions"][:]).max() <= 1.0
        assert g["dones"][-1] == 1 and g["rewards"][-1] == 1.0
        for robot in ("robot0", "robot1"):
            assert g[f"obs/{robot}_eef_pos"].shape == (T, 3) and g[f"obs/{robot}_gripper_qpos"].shape == (T, 2)
            assert f"{robot}_proprio-state" not in g["obs"]
        states = g["states"][:]
    ds = tasks.load_dataset(out, "transport")
    assert ds.states.shape == (T, 59) and ds.actions.shape == (T, 14)
    with h5py.File(out, "r") as f:
        stored = {k: v[:] for k, v in f["data/demo_0/obs"].items()}
    env = tasks.make_env("transport", seed=0)
    env.reset()
    for t, want in ((0, False), (T // 2, False), (T - 1, True)):  # trash and hammer are in their bins at the end
        ours = _replay(env, states[t])
        assert env.sim_env._check_success() == want
        for k in tasks.TASKS["transport"].proprio_keys + ("object",):  # round trip, 41-D object in 1.4.1 order
            np.testing.assert_allclose(ours[k], stored[k][t], rtol=0, atol=1e-9, err_msg=k)
        if t != T // 2:  # the last two object dims are payload_in_target_bin, trash_in_trash_bin (success contacts)
            assert list(ours["object"][-2:]) == [float(want), float(want)]
    env.close()


def test_image_demos(tmp_path):
    out = tmp_path / "lift_img.hdf5"
    s = collect("lift", 1, images=True, out=str(out), workers=1, seed=0, progress=False)
    assert s["images"] and s["successes"] == 1
    with h5py.File(out, "r") as f:
        img = f["data/demo_0/obs/robot0_eye_in_hand_image"]
        T = len(f["data/demo_0/actions"])
        assert img.shape == (T, 96, 96, 3) and img.dtype == np.uint8 and img.compression == "gzip"
        assert img[:].std() > 5  # a real picture, not a blank frame
    ds = tasks.load_dataset(out, "lift", obs_mode="image")
    assert ds.images.shape == (T, 3, 96, 96) and ds.states.shape == (T, 9)


@pytest.mark.parametrize("argv, message", [
    (["--task", "kitchen"], "argument --task: invalid choice: 'kitchen'"),
    (["--task", "lift", "--episodes", "0"], "error: argument --episodes: expected an integer >= 1, got '0'"),
    (["--task", "hopper", "--images"], "error: task hopper is state-only: drop --images"),
])
def test_cli_errors(argv, message, tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "collect_demos.py"), *argv, "--out", str(tmp_path / "x.hdf5")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x.hdf5").exists()


def _failing_create_dataset(monkeypatch, fail_on):
    """Make h5py's create_dataset raise once a dataset named like `fail_on` is written (mid-file)."""
    real, calls = h5py.Group.create_dataset, []

    def create_dataset(self, name, *args, **kwargs):
        calls.append(name)
        if fail_on in name:
            raise OSError("disk full (test)")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    return calls


def test_atomic_write_arm(tmp_path, monkeypatch):
    out = tmp_path / "lift.hdf5"
    calls = _failing_create_dataset(monkeypatch, "obs/object")
    with pytest.raises(OSError, match="disk full"):
        collect("lift", 1, out=str(out), workers=1, seed=0, progress=False)
    assert any("actions" in c for c in calls)  # the failure came mid-write
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


# ----------------------------------------------------------------------------------------------
# Locomotion PPO teacher (D4RL layout)
# ----------------------------------------------------------------------------------------------
TINY = dict(teacher_steps=4096, ckpt_every=2048, transitions=2000, eval_episodes=2)


@pytest.fixture(scope="module")
def hopper_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hopper")
    out = root / "medium.hdf5"
    # called like pretrain.py does (episodes = --demos, ignored for locomotion)
    s = collect("hopper", 100, out=str(out), seed=0, teacher_dir=str(root / "ckpt"), progress=False, **TINY)
    return s, out, root


def replay(task, seed, data):
    """Step a fresh env (same seed, same reset stream as the rollout) with the stored actions; return the
    env's own observations, rewards, terminations and truncations."""
    env = tasks.make_env(task, seed=seed)
    obs = env.reset()["state"]
    got = {"observations": [], "rewards": [], "terminated": [], "truncated": []}
    for a in data["actions"]:
        got["observations"].append(obs)
        obs, r, term, trunc, _ = env.step(a)
        obs = obs["state"]
        got["rewards"].append(r)
        got["terminated"].append(term)
        got["truncated"].append(trunc)
        if term or trunc:
            obs = env.reset()["state"]
    env.close()
    return {k: np.array(v) for k, v in got.items()}


def read_d4rl(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f if k != "metadata"}, dict(f["metadata"].attrs)


def test_hopper_teacher_dataset(hopper_tiny):
    s, out, root = hopper_tiny
    data, meta = read_d4rl(out)
    assert set(data) == {"observations", "actions", "rewards", "terminals", "timeouts"}
    assert data["observations"].dtype == data["actions"].dtype == data["rewards"].dtype == np.float32
    assert data["terminals"].dtype == data["timeouts"].dtype == bool
    assert data["observations"].shape == (2000, 11) and data["actions"].shape == (2000, 3)
    # executed actions: the Gaussian samples clipped to the action space (a young policy hits the bounds)
    assert np.abs(data["actions"]).max() == 1.0 and (np.abs(data["actions"]) == 1.0).mean() > 0.01
    # the file is exactly what the env did: raw observations, terminals only on true terminations,
    # timeouts only on truncations and on the last (unfinished) transition
    env_seed = 0 + 30_000
    ref = replay("hopper", env_seed, data)
    np.testing.assert_array_equal(data["observations"], ref["observations"])
    np.testing.assert_allclose(data["rewards"], ref["rewards"], rtol=1e-6)
    np.testing.assert_array_equal(data["terminals"], ref["terminated"])
    want_timeouts = ref["truncated"] & ~ref["terminated"]
    want_timeouts[-1] |= not (ref["terminated"][-1] or ref["truncated"][-1])
    np.testing.assert_array_equal(data["timeouts"], want_timeouts)
    assert data["terminals"].sum() > 10 and not (data["terminals"] & data["timeouts"]).any()
    # loads as a D4RL file; episodes split at terminals/timeouts
    ds = tasks.load_dataset(out, "hopper")
    assert len(ds) == 2000 and ds.episode_lengths.sum() == 2000
    assert len(ds.episode_lengths) == data["terminals"].sum() + data["timeouts"].sum()
    # summary and metadata
    assert s["transitions"] == 2000 and s["episodes"] == data["terminals"].sum() + data["timeouts"][:-1].sum()
    assert s["tail_length"] == ds.episode_lengths[-1] and data["timeouts"][-1]
    assert s["return_min"] <= s["return_mean"] <= s["return_max"] and s["file_size_mb"] > 0
    assert meta["seed"] == 0 and meta["env_id"] == "Hopper-v5" and meta["teacher_steps"] == s["teacher_steps"]
    assert np.isfinite([meta["teacher_return_stochastic"], meta["teacher_return_deterministic"]]).all()


def test_hopper_teacher_checkpoints_and_choice(hopper_tiny):
    s, _, root = hopper_tiny
    ckpts = sorted((root / "ckpt").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_0002048.pt", "step_0004096.pt"]
    assert set(s["checkpoints"]) == {2048, 4096}
    target = s["target_return"]
    assert s["teacher_steps"] == min(s["checkpoints"], key=lambda k: abs(s["checkpoints"][k] - target))
    sd = torch.load(ckpts[-1], weights_only=True)["agent"]
    assert not torch.allclose(sd["obs_var"], torch.ones_like(sd["obs_var"]))  # normalisation stats saved
    assert not torch.allclose(sd["obs_mean"], torch.zeros_like(sd["obs_mean"]))


def test_hopper_teacher_is_deterministic_and_stops_at_target(hopper_tiny, tmp_path, monkeypatch):
    """Same seed -> the same checkpoint weights; a checkpoint within tolerance stops training there."""
    _, _, root = hopper_tiny
    monkeypatch.setattr(teacher, "TARGET_TOL", 100.0)  # every score is a (confirmed) hit
    s2 = collect("hopper", out=str(tmp_path / "h.hdf5"), seed=0, teacher_dir=str(tmp_path / "ckpt"),
                 progress=False, **{**TINY, "teacher_steps": 6144, "transitions": 200})
    assert list(s2["checkpoints"]) == [2048] and s2["teacher_steps"] == 2048
    assert [p.name for p in (tmp_path / "ckpt").glob("*.pt")] == ["step_0002048.pt"]
    a = torch.load(tmp_path / "ckpt" / "step_0002048.pt", weights_only=True)["agent"]
    b = torch.load(root / "ckpt" / "step_0002048.pt", weights_only=True)["agent"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rollout_marks_truncations_as_timeouts(hopper_tiny):
    """With a 15-step limit: episodes that reach it end in a timeout, never a terminal."""
    _, _, root = hopper_tiny
    short = dataclasses.replace(tasks.TASKS["hopper"], max_episode_steps=15)
    agent = teacher.load_teacher(root / "ckpt" / "step_0004096.pt", short)
    data = teacher.rollout(agent, short, seed=5, transitions=300)["data"]
    ref = replay(short, 5, data)
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    assert data["timeouts"][:-1].sum() >= 5 and np.diff(np.r_[-1, ends]).max() <= 15
    np.testing.assert_array_equal(data["terminals"], ref["terminated"])
    np.testing.assert_array_equal(data["timeouts"][:-1], (ref["truncated"] & ~ref["terminated"])[:-1])
    assert data["timeouts"][-1]


def test_reuse_teacher_and_atomic_write(hopper_tiny, tmp_path, monkeypatch):
    _, _, root = hopper_tiny
    ckpt = root / "ckpt" / "step_0002048.pt"
    out = tmp_path / "medium.hdf5"
    out.write_bytes(b"old dataset")
    calls = _failing_create_dataset(monkeypatch, "rewards")
    with pytest.raises(OSError, match="disk full"):
        collect("hopper", out=str(out), teacher=str(ckpt), transitions=300, eval_episodes=1, progress=False)
    assert "observations" in calls and out.read_bytes() == b"old dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["medium.hdf5"]
    monkeypatch.undo()
    s = collect("hopper", out=str(out), teacher=str(ckpt), transitions=300, eval_episodes=1, progress=False)
    assert s["teacher_steps"] == 2048 and s["teacher_checkpoint"] == str(ckpt) and s["transitions"] == 300
    assert len(tasks.load_dataset(out, "hopper")) == 300
    with pytest.raises(tasks.TaskError, match="not found"):
        collect("hopper", out=str(out), teacher=str(tmp_path / "nope.pt"), progress=False)
    with pytest.raises(tasks.TaskError, match="a hopper teacher, not walker2d"):
        collect("walker2d", out=str(out), teacher=str(ckpt), progress=False)


def test_kitchen_expert_demo_in_d4rl_layout(tmp_path):
    # One seeded expert episode through collect() (the expert finishes all four subtasks in ~97% of episodes;
    # seed 1's does): kept episodes hold every subtask in their final state, load back as 59-D D4RL-layout
    # data, and earn one reward per subtask.
    # By default kitchen data is DART's (noise 0.15, clean labels; 44% vs 7% full sequences for executed labels at 0.05)
    s = collect("kitchen-complete", 1, out=str(tmp_path / "dart.hdf5"), workers=1, seed=1, max_attempts=1, progress=False)
    assert (s["successes"], s["noise"], s["labels"]) == (1, 0.15, "clean")
    with h5py.File(tmp_path / "dart.hdf5") as f:
        assert f["metadata"].attrs["action_noise"] == 0.15 and "DART" in f["metadata"].attrs["action_labels"]
    out = tmp_path / "kitchen.hdf5"
    s = collect("kitchen-complete", 1, out=str(out), workers=1, seed=1, max_attempts=1, progress=False,
                noise=0.05, labels="executed")
    assert (s["successes"], s["attempts"]) == (1, 1)
    with h5py.File(out) as f:
        assert {"observations", "actions", "rewards", "terminals", "timeouts"} <= set(f.keys())
        assert f["terminals"][-1] and not f["terminals"][:-1].any()  # ends when the last subtask is done
    ds = tasks.load_dataset(out, "kitchen-complete")
    assert ds.states.shape[1] == 59 and len(ds.episode_lengths) == 1 and ds.episode_lengths[0] <= 280
    assert ds.rewards.sum() == 4.0 and np.abs(ds.actions).max() <= 1.0
    # labels="clean" (DART): the same noisy run (same seed, same states) records the expert's noiseless action:
    # it differs from the executed one by the arm noise (std 0.05, clipped at the range), never on the fingers
    clean = tmp_path / "clean.hdf5"
    collect("kitchen-complete", 1, out=str(clean), workers=1, seed=1, max_attempts=1, progress=False, noise=0.05,
            labels="clean")
    dc = tasks.load_dataset(clean, "kitchen-complete")
    np.testing.assert_array_equal(dc.states, ds.states)
    diff = ds.actions - dc.actions
    assert 0.03 < diff[:, :7].std() < 0.06 and not diff[:, 7:].any()
    with h5py.File(clean) as f:
        assert "DART" in f["metadata"].attrs["action_labels"]
    with pytest.raises(tasks.TaskError, match="--labels must be one of executed, clean, got 'noisy'"):
        collect("kitchen-complete", 1, out=str(tmp_path / "x.hdf5"), workers=1, labels="noisy")
    with pytest.raises(tasks.TaskError, match="state-only"):
        collect("kitchen-complete", 1, images=True, out=str(tmp_path / "x.hdf5"), workers=1)


# ----------------------------------------------------------------------------------------------
# DAgger: a stateless expert labels the states a learner reaches
# ----------------------------------------------------------------------------------------------
def _set_state(env, state):
    env.sim_env.sim.set_state_from_flattened(state)
    env.sim_env.sim.forward()


@pytest.mark.parametrize("task_name, steps, branches", [
    ("square", 260, {"hover", "descend", "close", "lift", "align"}),
    # both arms through every stage: lid off, trash out, hammer picked, handed over (present / hold, release /
    # clear), carried and placed
    ("transport", 800, {"hover", "descend", "close", "lift", "carry", "lower", "release", "drop", "wait", "bring",
                        "present", "hold", "clear", "retreat"}),
])
def test_expert_is_stateless(task_name, steps, branches):
    """A fresh expert with the same episode parameters, put at each recorded state of a noisy episode, gives the
    clean action recorded there: the action is a function of the sim state and the parameters alone."""
    from experts import EXPERTS
    env = tasks.make_env(task_name, seed=3)
    env.reset()
    expert = EXPERTS[task_name](env.sim_env, np.random.default_rng(11), noise=0.05)
    states, clean, seen = [], [], set()
    for _ in range(steps):
        states.append(env.sim_env.sim.get_state().flatten())
        action = expert()
        clean.append(expert.clean)
        seen.update(expert.phase.split(" | "))
        if env.step(action)[4]["success"]:
            break
    assert branches <= seen, branches - seen   # the run went through every stage of the task
    fresh = EXPERTS[task_name](env.sim_env, np.random.default_rng(11), noise=0.05)
    for i in range(0, len(states), 3):
        _set_state(env, states[i])
        # (1e-4: a restored state reproduces positions and velocities to ~1e-7, a changed decision moves the action
        # by far more)
        np.testing.assert_allclose(np.clip(fresh.policy(), -1, 1), clean[i], atol=1e-4, err_msg=f"step {i}")
    # and the label depends on the state: another state gives another action
    _set_state(env, states[0])
    a0 = fresh.policy()
    _set_state(env, states[150])
    assert np.abs(fresh.policy() - a0).max() > 0.1
    env.close()


def test_kitchen_expert_is_stateless():
    """The same for FrankaKitchen (kitchen-complete's four subtasks): the MuJoCo state is qpos and qvel."""
    from experts import KitchenExpert, sample_order
    task = tasks.TASKS["kitchen-complete"]
    env = tasks.make_env(task, seed=3)
    env.reset()
    order = sample_order(task.subtasks, np.random.default_rng(5), shuffle=False)
    expert = KitchenExpert(env.sim_env, order, np.random.default_rng(11), noise=0.05)
    d = expert.d
    states, clean, seen = [], [], set()
    for _ in range(280):
        states.append((d.qpos.copy(), d.qvel.copy()))
        action = expert()
        clean.append(expert.clean)
        seen.add(expert.phase)
        if env.step(action)[2]:  # terminated: every subtask done
            break
    # every subtask through all of its branches
    assert {f"{name}:{branch}" for name, branches in (
        ("microwave", ("pre", "insert", "close", "pull", "release", "back")),
        ("kettle", ("pre", "insert", "close", "lift", "carry", "lower", "release", "back")),
        ("light switch", ("pre", "insert", "push", "back")), ("slide cabinet", ("pre", "insert", "push")))
        for branch in branches} <= seen, seen
    fresh = KitchenExpert(env.sim_env, order, np.random.default_rng(11), noise=0.05)
    for i in range(0, len(states), 3):
        d.qpos[:], d.qvel[:] = states[i]
        np.testing.assert_allclose(np.clip(fresh.policy(), -1, 1), clean[i], atol=1e-6, err_msg=f"step {i}")
    d.qpos[:], d.qvel[:] = states[0]
    a0 = fresh.policy()
    d.qpos[:], d.qvel[:] = states[100]
    assert np.abs(fresh.policy() - a0).max() > 0.1
    env.close()


def test_kitchen_dagger_episode_and_d4rl_masks(tmp_path):
    """A kitchen DAgger episode records the learner's states with the expert's clean labels, in D4RL columns;
    append_d4rl_hdf5 adds it to a demo file with mask/expert and mask/dagger (episode indices), which
    load_dataset's filter_key reads; a file of another width is refused."""
    task = tasks.TASKS["kitchen-complete"]
    env = tasks.make_env(task, seed=5)
    learner = _ZeroPolicy(task, obs_steps=2)
    ep, ok = collect_demos.run_kitchen_episode(env, task, np.random.default_rng(0), 0.05, False, 40, policy=learner,
                                               beta=0.0)
    assert not ok and len(ep["actions"]) == 40 and ep["timeouts"][-1] and not ep["terminals"].any()
    assert len(learner.seen) == 10                   # one chunk of 4 per call, every one the learner's
    np.testing.assert_array_equal(learner.seen[1], np.concatenate(ep["observations"][3:5]))  # (previous, current)
    assert np.abs(ep["actions"][:, :7]).max() > 0.3  # the labels: the expert reaching for the microwave, not zeros
    demos = tmp_path / "k.hdf5"
    collect("kitchen-complete", 2, out=str(demos), workers=1, seed=1, progress=False)
    agg = tmp_path / "agg.hdf5"
    cols = collect_demos.kitchen_d4rl_columns([ep, ep])
    assert tasks.append_d4rl_hdf5(demos, agg, cols, mask="dagger") == [2, 3]
    assert tasks.append_d4rl_hdf5(agg, agg, collect_demos.kitchen_d4rl_columns([ep]), mask="dagger") == [4]
    with h5py.File(agg, "r") as f:
        assert list(f["mask/expert"][:]) == [0, 1] and list(f["mask/dagger"][:]) == [2, 3, 4]
        assert f["metadata"].attrs["task"] == "kitchen-complete"
    both = tasks.load_dataset(agg, "kitchen-complete")
    only = tasks.load_dataset(agg, "kitchen-complete", filter_key="expert")
    new = tasks.load_dataset(agg, "kitchen-complete", filter_key="dagger")
    assert len(both.episode_lengths) == 5 and list(new.episode_lengths) == [40, 40, 40]
    np.testing.assert_array_equal(only.states, tasks.load_dataset(demos, "kitchen-complete").states)
    np.testing.assert_array_equal(new.actions[-40:], ep["actions"])
    with pytest.raises(tasks.TaskError, match="no filter key mask/train"):
        tasks.load_dataset(agg, "kitchen-complete", filter_key="train")
    with pytest.raises(tasks.TaskError, match="added episodes have"):
        bad = dict(cols, observations=np.zeros((80, 60), dtype=np.float32))
        tasks.append_d4rl_hdf5(demos, tmp_path / "bad.hdf5", bad, mask="dagger")
    with pytest.raises(tasks.TaskError, match="D4RL layout"):
        collect_demos.check_oracle(agg, task_name="kitchen-complete", progress=False)
    env.close()


def test_transport_expert_leaves_joint_limits():
    """robot1 put where a DAgger learner left it (forearm turned, wrist joint 6 on its upper limit): the expert's
    joint-limit clamp moves the wrist off the limit and the arm on; the same expert without the clamp holds the joint on
    its limit (where it had stalled: a useless oracle there). Away from the limits the clamp changes nothing."""
    from experts import TransportExpert
    env = tasks.make_env("transport", seed=3)
    rob = env.sim_env.robots[1]
    sim = env.sim_env.sim
    joints = rob._ref_joint_pos_indexes
    upper = sim.model.jnt_range[rob._ref_joint_indexes][5, 1]
    result = {}
    for clamp in (True, False):
        env.reset()
        expert = TransportExpert(env.sim_env, np.random.default_rng(11), noise=0.0)
        twist = np.array([0.3, -0.2, 0.1, 0.1, -0.1, 0.2])
        np.testing.assert_array_equal(expert.arms[1].clamp_joint_limits(twist), twist)  # start pose: far from limits
        sim.data.qpos[joints] = [0.278, 0.568, -0.948, -2.274, -2.335, 3.753, 2.138]
        sim.data.qvel[:] = 0.0
        sim.forward()
        if not clamp:
            expert.arms[1].clamp_joint_limits = lambda tw: tw
        start = expert.arms[1].eef()[0]
        for _ in range(40):
            env.step(expert())
        result[clamp] = (upper - sim.data.qpos[joints][5], np.linalg.norm(expert.arms[1].eef()[0] - start))
    env.close()
    assert result[True][0] > 0.1 and result[True][1] > 0.2, result   # off the limit (at the band's edge), on its way
    assert result[False][0] < 0.02, result  # held on the limit


def test_check_oracle_counts_where_the_expert_goes_on(lift2, tmp_path):
    """From states of a square demo the expert finishes (given the steps); with one step it cannot, and the phases
    it stopped in are reported. A task without a stateless expert is refused in one line."""
    out = tmp_path / "square.hdf5"
    assert collect("square", 1, out=str(out), workers=1, seed=0, progress=False)["successes"] == 1
    r = collect_demos.check_oracle(out, "square", episodes=1, points=2, budget=300, progress=False)
    assert (r["tried"], r["recovered"], r["failed_phases"]) == (2, 2, {})
    r = collect_demos.check_oracle(out, None, episodes=1, points=2, budget=1, progress=False)  # task from env_args
    assert r["task"] == "square" and r["recovered"] == 0 and sum(r["failed_phases"].values()) == 2
    with pytest.raises(tasks.TaskError, match="stateless expert; task lift"):
        collect_demos.check_oracle(lift2[1], progress=False)


class _ZeroPolicy:
    """A learner that always outputs a zero chunk (stands in for a checkpoint's policy); with obs_steps = 2 it checks
    that it is handed (previous state, state)."""
    def __init__(self, task, obs_steps=1):
        self.shape, self.obs_dim = (task.chunk, task.act_dim), task.obs_dim
        self.cfg = SimpleNamespace(obs_steps=obs_steps)
        self.seen = []

    def act(self, obs):
        assert obs["state"].shape == (self.cfg.obs_steps * self.obs_dim,)
        self.seen.append(obs["state"])
        return np.zeros(self.shape)


def test_dagger_episode_labels_learner_states():
    task = tasks.TASKS["square"]
    env = tasks.make_env(task, seed=5)
    from experts import SquareExpert
    learner = _ZeroPolicy(task, obs_steps=2)
    states, step = [], env.step

    def recording_step(action):
        out = step(action)
        states.append(out[0]["state"])
        return out
    env.step = recording_step
    ep, ok = collect_demos.run_dagger_episode(env, task, np.random.default_rng(0), learner, beta=0.0,
                                              noise=0.05, max_steps=40)
    del env.step
    d = task.obs_dim                        # the learner saw the env's last two states at every chunk start
    np.testing.assert_array_equal(learner.seen[0][:d], learner.seen[0][d:])
    for c in range(1, 10):
        np.testing.assert_array_equal(learner.seen[c], np.concatenate(states[4 * c - 2:4 * c]))
    assert not ok and len(ep["actions"]) == 40 and ep["dones"][-1] == 1 and ep["states"].shape[0] == 40
    # the learner drove (zero actions: the arm barely moves) and each label is the expert's clean action there
    assert np.abs(ep["actions"]).max() > 0.3
    labeller = SquareExpert(env.sim_env, np.random.default_rng(0), noise=0.05)   # the episode's parameter draws
    for i in (0, 17, 39):
        _set_state(env, ep["states"][i])
        np.testing.assert_allclose(np.clip(labeller.policy(), -1, 1), ep["actions"][i], atol=1e-9)
    # beta = 1: the expert drives its own noisy actions (a demo with clean labels), so it makes progress
    ep1, _ = collect_demos.run_dagger_episode(env, task, np.random.default_rng(0), _ZeroPolicy(task), beta=1.0,
                                              noise=0.05, max_steps=60)
    eef = ep1["obs"]["robot0_eef_pos"]
    assert np.linalg.norm(eef[-1] - eef[0]) > 0.05 > np.linalg.norm(ep["obs"]["robot0_eef_pos"][-1] - ep["obs"]["robot0_eef_pos"][0])
    env.close()


def test_append_keeps_demos_and_marks_the_new_ones(lift2, tmp_path):
    _, src = lift2
    demos = read_demos(src)
    ep = {k: v for k, v in demos["demo_1"].items()}
    ep.update(rewards=np.zeros(len(ep["actions"])), dones=np.zeros(len(ep["actions"]), dtype=np.int64))
    dst = tmp_path / "agg.hdf5"
    assert tasks.append_robomimic_hdf5(src, dst, [ep, ep], mask="dagger") == ["demo_2", "demo_3"]
    assert tasks.append_robomimic_hdf5(dst, dst, [ep], mask="dagger") == ["demo_4"]
    with h5py.File(dst, "r") as f:
        assert [n.decode() for n in f["mask/expert"][:]] == ["demo_0", "demo_1"]
        assert [n.decode() for n in f["mask/dagger"][:]] == ["demo_2", "demo_3", "demo_4"]
        assert f["data"].attrs["total"] == sum(len(d["actions"]) for d in demos.values()) + 3 * len(ep["actions"])
        assert f["data"].attrs["obs_layout"] == tasks.OBS_LAYOUT
    assert not Path(str(dst) + ".tmp").exists()
    both, only = tasks.load_dataset(dst, "lift"), tasks.load_dataset(dst, "lift", filter_key="expert")
    assert len(both.episode_lengths) == 5 and len(only.episode_lengths) == 2
    np.testing.assert_array_equal(only.states, tasks.load_dataset(src, "lift").states)
    np.testing.assert_allclose(both.actions[-len(ep["actions"]):], ep["actions"], rtol=1e-6)   # stored float64, read float32


def test_pretrain_dagger_round_and_resume(tmp_path, capsys):
    """pretrain.py --dagger-rounds: at the round's step the EMA policy is rolled out, its states labelled and
    appended (<out>/dagger.hdf5, mask/dagger), training continues on demos + labels; a resumed run keeps them."""
    import pretrain
    demos = tmp_path / "square.hdf5"
    collect("square", 1, out=str(demos), workers=1, seed=0, progress=False)
    out = tmp_path / "run"
    common = ["--task", "square", "--dataset", str(demos), "--batch-size", "32", "--hidden-dim", "32", "--warmup", "2",
              "--eval-episodes", "0", "--log-every", "10", "--save-every", "10", "--out", str(out),
              "--dagger-rounds", "1", "--dagger-episodes", "1", "--dagger-beta", "0"]
    pretrain.main(common + ["--steps", "20"])
    assert "DAgger round 1/1 at step 10" in capsys.readouterr().out
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["dagger_rounds_done"] == 1 and ck["step"] == 20
    assert torch.load(out / "step_10.pt", weights_only=True)["dagger_rounds_done"] == 0   # saved before the round
    with h5py.File(out / "dagger.hdf5", "r") as f:
        assert [n.decode() for n in f["mask/expert"][:]] == ["demo_0"] and [n.decode() for n in f["mask/dagger"][:]] == ["demo_1"]
        labelled = len(f["data/demo_1/actions"])
    assert labelled == collect_demos.DAGGER_STEPS["square"]              # a 32-unit policy never succeeds
    pretrain.main(common + ["--steps", "30", "--resume"])
    assert "DAgger round" not in capsys.readouterr().out                 # the round is not repeated
    assert torch.load(out / "latest.pt", weights_only=True)["dagger_rounds_done"] == 1
    # refused in one line where it cannot apply
    for extra, needle in ((["--task", "lift"], "task lift has no expert that can label any state"),
                          (["--filter-key", "train"], "--filter-key does not apply")):
        with pytest.raises(SystemExit) as e:
            pretrain.main(common[:-4] + ["--dagger-rounds", "1", "--steps", "20", "--out", str(tmp_path / "r2")] + extra)
        assert needle in str(e.value.code) and str(e.value.code).startswith("error:")
