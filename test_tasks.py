"""Tests for tasks.py: task table, envs, chunked vector env, dataset readers/writer, downloads.

Run: python -m pytest -q test_tasks.py   (about a minute on 2 cores; image tests need EGL or OSMesa)
"""

import functools
import http.server
import socket
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

import tasks
from tasks import TASKS, ChunkVecEnv, Dataset, TaskError, chunk_starts, load_dataset, make_env

# Choose MUJOCO_GL before anything imports mujoco, so the test's own mujoco.Renderer (used as an
# independent upright reference) gets the same backend as robosuite.
tasks.setup_rendering()


# ----------------------------------------------------------------------------------------------
# Task table
# ----------------------------------------------------------------------------------------------
def test_task_table_and_dims():
    assert set(TASKS) == {"lift", "can", "square", "transport", "hopper", "walker2d", "ant", "humanoid",
                          "kitchen-complete", "kitchen-partial", "kitchen-mixed"}
    want = {"lift": 19, "can": 23, "square": 23, "transport": 59, "hopper": 11, "walker2d": 17}
    for name, dim in want.items():
        assert tasks.obs_dims(name, "state") == (dim, 0)
    assert tasks.obs_dims("lift", "image") == (9, 1)
    assert tasks.obs_dims("square", "image") == (9, 1)
    assert tasks.obs_dims("transport", "image") == (18, 2)
    assert TASKS["transport"].act_dim == 14 and TASKS["transport"].chunk == 8
    assert TASKS["lift"].gamma == 0.999 and TASKS["hopper"].gamma == 0.99
    with pytest.raises(TaskError, match="unknown task"):
        tasks.get_task("kitchen-nope")
    with pytest.raises(TaskError, match="state"):
        tasks.obs_dims("hopper", "image")


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------
# Independent reference for the public (robosuite 1.4.1 / robomimic v1.4.1) layout, in plain numpy from sim.data.
def _quat_to_mat(q):  # xyzw
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _mat_to_quat(R):  # xyzw with w >= 0 (robosuite's T.mat2quat convention)
    w = np.sqrt(max(0.0, 1 + np.trace(R))) / 2
    x = np.copysign(np.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = np.copysign(np.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = np.copysign(np.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    return np.array([x, y, z, w])


def public_layout_reference(env):
    """(proprio, object) of the env's current sim state, computed from sim.data after sim.forward(), with
    the robosuite 1.4.1 definitions: eef = grip-site position + hand-body orientation; quaternions xyzw;
    object pose relative to the eef by inverse pose composition; lift's gripper_to_cube_pos = eef - cube."""
    se = env.sim_env
    m, d = se.sim.model, se.sim.data
    se.sim.forward()
    xyzw = lambda wxyz: np.asarray(wxyz)[[1, 2, 3, 0]]
    proprio, eef = [], []
    for i in range(len(se.robots)):
        pos = d.site_xpos[m.site_name2id(f"gripper{i}_right_grip_site")].copy()
        quat = xyzw(d.body_xquat[m.body_name2id(f"robot{i}_right_hand")])
        grip = [d.qpos[m.get_joint_qpos_addr(f"gripper{i}_right_finger_joint{j}")] for j in (1, 2)]
        proprio += [pos, quat, grip]
        eef.append((pos, quat))
    name = env.task.name
    if name == "lift":
        body = m.body_name2id("cube_main")
        cube = d.body_xpos[body]
        obj = [cube, xyzw(d.body_xquat[body]), eef[0][0] - cube]
    elif name in ("can", "square"):
        body = m.body_name2id("Can_main" if name == "can" else "SquareNut_main")
        p_o, q_o = d.body_xpos[body], xyzw(d.body_xquat[body])
        R_e = _quat_to_mat(eef[0][1])
        rel_pos = R_e.T @ (p_o - eef[0][0])
        rel_quat = _mat_to_quat(R_e.T @ _quat_to_mat(q_o))
        obj = [p_o, q_o, rel_pos, rel_quat]
    else:
        bpos = lambda n: d.body_xpos[m.body_name2id(n)]
        bquat = lambda n: _mat_to_quat(d.body_xmat[m.body_name2id(n)].reshape(3, 3))
        gpos = lambda n: d.geom_xpos[m.geom_name2id(n)]
        names = {m.geom_id2name(g) for g in range(m.ngeom)}
        contact = [(m.geom_id2name(c.geom1), m.geom_id2name(c.geom2)) for c in d.contact[: d.ncon]]
        touch = lambda a, b: float(any((g1 in a and g2 in b) or (g1 in b and g2 in a) for g1, g2 in contact))
        payload = {n for n in names if n and n.startswith("payload_")}
        trash = {n for n in names if n and n.startswith("trash_g")}
        lid = gpos("transport_start_bin_lid_handle")
        obj = [bpos("payload_root"), bquat("payload_root"), bpos("trash_main"), bquat("trash_main"), lid,
               _mat_to_quat(d.geom_xmat[m.geom_name2id("transport_start_bin_lid_handle")].reshape(3, 3)),
               gpos("transport_target_bin_base"), gpos("transport_trash_bin_base"),
               bpos("payload_root") - eef[0][0], lid - eef[0][0], bpos("payload_root") - eef[1][0],
               bpos("trash_main") - eef[1][0],
               [touch({"transport_target_bin_base"}, payload)], [touch({"transport_trash_bin_base"}, trash)]]
    return np.concatenate([np.ravel(x) for x in proprio]), np.concatenate([np.ravel(x) for x in obj])


@pytest.mark.parametrize("name", ["lift", "can", "square", "transport"])
def test_robosuite_state_env(name):
    """The state is the public robomimic v1.4.1 layout (proprio keys, then the object vector in robosuite
    1.4.1's order), recomputed independently from the simulator, at reset and after steps."""
    task = TASKS[name]
    env = make_env(name, "state", seed=0)
    obs = env.reset(seed=0)
    assert set(obs) == {"state"} and obs["state"].dtype == np.float32
    assert obs["state"].shape == (task.obs_dim,)
    n_prop = 9 * len(task.robots)
    # tasks.legacy_object_state knows robosuite 1.5's own object-state order (what this project emitted
    # before the v1.4.1 layout was adopted): at reset (nothing moves; two forced refreshes fill robosuite's caches) it must
    # reproduce robosuite's vector exactly, and differ from ours.
    env.sim_env._get_observations(force_update=True)
    raw = env.sim_env._get_observations(force_update=True)
    ours = obs["state"][n_prop:]
    np.testing.assert_allclose(tasks.legacy_object_state(ours, task), raw["object-state"], atol=1e-6)
    assert not np.allclose(ours, raw["object-state"], atol=1e-3)
    rng = np.random.default_rng(0)
    for step in range(4):
        if step:
            obs, r, term, trunc, info = env.step(rng.uniform(-1, 1, task.act_dim))
            assert obs["state"].shape == (task.obs_dim,) and obs["state"].dtype == np.float32
            assert isinstance(r, float) and type(info["success"]) is bool
            assert term is False and trunc is False
        proprio, obj = public_layout_reference(env)
        np.testing.assert_allclose(obs["state"][:n_prop], proprio, rtol=0, atol=2e-6)
        np.testing.assert_allclose(obs["state"][n_prop:], obj, rtol=0, atol=2e-5)
        # the comparison is order-sensitive: the same values in robosuite 1.5's order do not pass
        assert np.abs(tasks.legacy_object_state(obj, task) - obj).max() > 1e-2
    env.close()


def test_layout_table_and_check_layout(tmp_path):
    for name, task in TASKS.items():
        if task.suite != "robosuite":
            assert task.object_features == () and task.legacy_object_order == ()
            continue
        assert sum(w for _, w in task.object_features) == task.obs_dim - 9 * len(task.robots)
        assert sorted(n for n, _ in task.legacy_object_order) == sorted(n for n, _ in task.object_features)
    assert [n for n, _ in TASKS["can"].object_features] == ["Can_pos", "Can_quat", "Can_to_robot0_eef_pos",
                                                           "Can_to_robot0_eef_quat"]
    assert TASKS["transport"].object_features[-2:] == (("payload_in_target_bin", 1), ("trash_in_trash_bin", 1))
    assert ("gripper_to_cube_pos", -1) in TASKS["lift"].legacy_object_order
    check = tasks.check_layout
    for ok in ({"obs_layout": tasks.OBS_LAYOUT}, tasks.OBS_LAYOUT):
        check(ok, "square", "a.pt")
    for stale in ({"config": {"obs_mode": "state"}}, {}, None, tasks.LEGACY_OBS_LAYOUT, "something-else"):
        with pytest.raises(TaskError, match=r"a\.pt: observation layout .*task can now uses 'robomimic-v1.4'") as e:
            check(stale, "can", "a.pt")
        assert "\n" not in str(e.value)
    check({"config": {"obs_mode": "image"}}, "lift", "img.pt")      # proprio-only inputs did not change
    check({}, "hopper", "h.pt")                                     # gym and kitchen are unaffected
    check(None, "kitchen-complete", "k.pt")
    with pytest.raises(TaskError):
        check({"config": {"obs_mode": "image"}}, "lift", "img.pt", obs_mode="state")


def test_transport_arms_move_in_world_frame():
    # robosuite 1.5 defaults to base-frame deltas; the opposed arms would then move in opposite world
    # directions for the same action. With input_ref_frame="world" both follow world +x.
    cfg = tasks.robosuite_kwargs("transport")["controller_configs"]
    assert all(p["input_ref_frame"] == "world" for p in cfg["body_parts"].values() if p["type"].startswith("OSC"))
    env = make_env("transport", seed=0)
    env.reset()
    start = [env.sim_env.sim.data.site_xpos[r.eef_site_id["right"]].copy() for r in env.sim_env.robots]
    action = np.zeros(14)
    action[0] = action[7] = 1.0  # +x for both arms
    for _ in range(5):
        env.step(action)
    for robot, p0 in zip(env.sim_env.robots, start):
        moved = env.sim_env.sim.data.site_xpos[robot.eef_site_id["right"]] - p0
        assert moved[0] > 0.03 and abs(moved[1]) < 0.5 * moved[0]
    env.close()


def _upright_reference(env, camera):
    """Render `camera` with mujoco's own Renderer, which returns images top row first."""
    import mujoco

    renderer = mujoco.Renderer(env.sim_env.sim.model._model, tasks.IMAGE_SIZE, tasks.IMAGE_SIZE)
    renderer.update_scene(env.sim_env.sim.data._data, camera=camera)
    image = renderer.render().transpose(2, 0, 1).astype(np.float64)
    try:
        renderer.close()
    except Exception:  # EGL complains when freeing a second context; harmless
        pass
    return image


@pytest.mark.parametrize("name,channels", [("lift", 3), ("transport", 6)])
def test_robosuite_image_env(name, channels):
    task = TASKS[name]
    env = make_env(name, "image", seed=0)
    obs = env.reset()
    obs, *_ = env.step(np.zeros(task.act_dim))
    assert obs["rgb"].shape == (channels, 96, 96) and obs["rgb"].dtype == np.uint8
    assert obs["state"].shape == (9 * len(task.robots),) and obs["state"].dtype == np.float32
    for i, cam in enumerate(task.cameras):
        mine = obs["rgb"][3 * i:3 * i + 3].astype(np.float64)
        ref = _upright_reference(env, cam)
        upright, flipped = np.abs(mine - ref).mean(), np.abs(mine[:, ::-1] - ref).mean()
        assert upright < 0.6 * flipped, (cam, upright, flipped)
    env.close()


def test_video_frame_is_upright_hwc():
    env = make_env("lift", "state", seed=0, render_video=True)
    env.reset()
    frame = env.render()
    assert frame.shape == (tasks.VIDEO_SIZE, tasks.VIDEO_SIZE, 3) and frame.dtype == np.uint8
    raw = env.sim_env.sim.render(camera_name="agentview", width=tasks.VIDEO_SIZE, height=tasks.VIDEO_SIZE)
    np.testing.assert_array_equal(frame, raw[::-1])
    env.close()


@pytest.mark.parametrize("name", ["hopper", "walker2d", "ant", "humanoid"])
def test_gym_env(name):
    task = TASKS[name]
    env = make_env(name, seed=0)
    obs = env.reset()
    assert obs["state"].shape == (task.obs_dim,) and obs["state"].dtype == np.float32
    assert env.sim_env.observation_space.shape == (task.obs_dim,)
    assert env.sim_env.action_space.shape == (task.act_dim,)
    obs, r, term, trunc, info = env.step(np.zeros(task.act_dim))
    assert isinstance(r, float) and info["success"] is False and isinstance(term, bool)
    env.close()


def test_gym_seeding_is_deterministic():
    a, b = make_env("hopper", seed=3), make_env("hopper", seed=3)
    np.testing.assert_array_equal(a.reset()["state"], b.reset()["state"])
    assert not np.array_equal(a.reset()["state"], make_env("hopper", seed=4).reset()["state"])


def test_vec_env_truncation_mid_chunk():
    vec = ChunkVecEnv("hopper", n_envs=3, seed=0, max_episode_steps=10)
    obs = vec.reset()
    assert obs["state"].shape == (3, 11)
    chunks = np.zeros((3, 4, 3))
    total = np.zeros(3)
    for call in range(3):
        obs, reward, done, info = vec.step(chunks)
        total += reward
        if call < 2:
            assert not done.any() and (info["steps"] == 4).all() and info["episodes"] == []
    # 4 + 4 + 2 steps: the chunk was cut at the time limit, the env reset, and the episode reported.
    assert done.all() and (info["steps"] == 2).all()
    assert not info["terminated"].any() and info["truncated"].all()
    assert [e["env"] for e in info["episodes"]] == [0, 1, 2]
    for e in info["episodes"]:
        assert e["length"] == 10 and e["success"] is False
        assert e["return"] == pytest.approx(total[e["env"]])
    assert not np.array_equal(obs["state"], info["final_obs"]["state"])  # reset obs vs last obs
    vec.close()


def test_vec_env_reports_falls_as_terminations():
    vec = ChunkVecEnv("hopper", n_envs=2, seed=1)
    vec.reset()
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(100):
        _, _, done, info = vec.step(rng.uniform(-1, 1, (2, 4, 3)))
        assert (info["terminated"] == done).all()  # nothing reaches 1000 steps here
        episodes += info["episodes"]
        if len(episodes) >= 2:
            break
    assert len(episodes) >= 2 and all(0 < e["length"] < 1000 for e in episodes)

def test_vec_env_worker_processes_match_the_synchronous_vector():
    """workers=2 splits 3 envs into subprocess blocks [0] and [1, 2]: observations, rewards, dones, episodes (with
    their global env index) and final observations must equal the in-process vector's, falls and resets included."""
    rng = np.random.default_rng(0)
    chunks = [rng.uniform(-1, 1, (3, 4, 3)) for _ in range(40)]
    traces = []
    for workers in (1, 2):
        vec = ChunkVecEnv("hopper", n_envs=3, seed=2, max_episode_steps=30, workers=workers)
        trace = [vec.reset(seed=7)["state"]]
        for c in chunks:
            obs, reward, done, info = vec.step(c)
            trace += [obs["state"], reward, done, info["terminated"], info["steps"], info["final_obs"]["state"],
                      [(e["env"], e["length"], round(e["return"], 9)) for e in info["episodes"]]]
        vec.close()
        traces.append(trace)
    n_episodes = sum(len(x) for x in traces[0][7::7])
    assert n_episodes >= 6  # episodes ended (by falls or the 30-step limit) and were reported
    for x, y in zip(*traces):
        if isinstance(x, list):
            assert x == y
        else:
            np.testing.assert_array_equal(x, y)


def test_observation_history_in_the_env_and_in_the_data():
    """ChunkVecEnv(obs_steps=3) (in 2 worker processes) gives each env's last 3 states per env step, oldest first,
    pushed inside chunks, with the first state repeated after every reset and in final_obs; the dataset side
    (history_indices, Dataset.probe) clamps to an episode's first step in the same way."""
    rng = np.random.default_rng(0)
    chunks = [rng.uniform(-1, 1, (3, 4, 3)) for _ in range(25)]
    vec = ChunkVecEnv("hopper", n_envs=3, seed=2, max_episode_steps=30, workers=2, obs_steps=3)
    envs = [make_env("hopper", seed=2 + i, max_episode_steps=30) for i in range(3)]
    frames = [[env.reset(7 + i)["state"]] * 3 for i, env in enumerate(envs)]
    obs = vec.reset(seed=7)["state"]
    ended = 0
    for c in chunks:
        assert obs.shape == (3, 33)
        for i in range(3):
            np.testing.assert_array_equal(obs[i], np.concatenate(frames[i][-3:]))
        obs, _, done, info = vec.step(c)
        obs = obs["state"]
        for i, env in enumerate(envs):          # the reference: plain envs, every step's state kept by hand
            for a in c[i]:
                o, _, term, trunc, _ = env.step(a)
                frames[i].append(o["state"])
                if term or trunc:
                    np.testing.assert_array_equal(info["final_obs"]["state"][i], np.concatenate(frames[i][-3:]))
                    frames[i] = [env.reset()["state"]] * 3
                    ended += 1
                    break
    vec.close()
    assert ended >= 3
    np.testing.assert_array_equal(tasks.history_indices(np.array([3, 2]), 2), [[0, 0], [0, 1], [1, 2], [3, 3], [3, 4]])
    np.testing.assert_array_equal(tasks.history_indices(np.array([3, 2]), 1), np.arange(5)[:, None])
    ds = Dataset(np.arange(10, dtype=np.float32).reshape(5, 2), np.zeros((5, 1), np.float32), np.array([3, 2]))
    states, _ = ds.probe(5, obs_steps=2)
    np.testing.assert_array_equal(states, [[0, 1, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5], [6, 7, 6, 7], [6, 7, 8, 9]])


def test_vec_env_robosuite_seeding_and_autoreset():
    rng = np.random.default_rng(0)
    chunks = [rng.uniform(-1, 1, (2, 4, 7)) for _ in range(2)]
    runs = []
    for _ in range(2):
        vec = ChunkVecEnv("lift", n_envs=2, seed=5, max_episode_steps=6)
        trace = [vec.reset()["state"]]
        for c in chunks:
            obs, reward, done, info = vec.step(c)
            trace.append(obs["state"])
        assert done.all() and (info["steps"] == 2).all() and len(info["episodes"]) == 2
        assert all(e["length"] == 6 for e in info["episodes"])
        again = vec.reset(seed=5)["state"]  # an explicit reseed reproduces the first episode
        np.testing.assert_array_equal(again, trace[0])
        runs.append(trace)
        vec.close()
    for x, y in zip(*runs):  # two evaluations with the same seed are identical
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(runs[0][0][0], runs[0][0][1])  # env i gets seed + i


def test_terminate_on_success():
    for flag in (True, False):
        vec = ChunkVecEnv("lift", n_envs=1, seed=0, terminate_on_success=flag)
        vec.reset()
        sim_env = vec.envs[0].sim_env
        # Teleport the cube 20 cm above the table: robosuite's own check fires on the next step.
        qpos = sim_env.sim.data.get_joint_qpos(sim_env.cube.joints[0]).copy()
        qpos[2] = sim_env.model.mujoco_arena.table_offset[2] + 0.2
        sim_env.sim.data.set_joint_qpos(sim_env.cube.joints[0], qpos)
        sim_env.sim.forward()
        _, reward, done, info = vec.step(np.zeros((1, 4, 7)))
        assert info["chunk_success"][0] and reward[0] >= 1.0
        if flag:
            assert done[0] and info["terminated"][0] and info["steps"][0] == 1
            assert info["episodes"] == [{"env": 0, "success": True, "return": 1.0, "length": 1}]
        else:
            assert not done[0] and info["steps"][0] == 4
        vec.close()


def test_dense_reward_is_robosuites_shaped_reward():
    """Sparse: 0 until success. Dense: a reaching term from the first step (scaled so that success pays 1)."""
    sparse, dense = make_env("lift", seed=0), make_env("lift", seed=0, dense_reward=True)
    sparse.reset(), dense.reset()
    r_sparse, r_dense = sparse.step(np.zeros(7))[1], dense.step(np.zeros(7))[1]
    assert r_sparse == 0.0 and 0.0 < r_dense < 0.5
    sim_env = dense.sim_env
    qpos = sim_env.sim.data.get_joint_qpos(sim_env.cube.joints[0]).copy()
    qpos[2] = sim_env.model.mujoco_arena.table_offset[2] + 0.2
    sim_env.sim.data.set_joint_qpos(sim_env.cube.joints[0], qpos)
    sim_env.sim.forward()
    assert dense.step(np.zeros(7))[1] == pytest.approx(1.0)
    sparse.close(), dense.close()


# ----------------------------------------------------------------------------------------------
# Datasets: the same episodes in every format
# ----------------------------------------------------------------------------------------------
LIFT_KEYS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}


def _lift_episodes(lengths=(5, 7, 3, 6, 4, 8, 5, 4, 6, 9), seed=0):
    rng = np.random.default_rng(seed)
    episodes = []
    for t in lengths:
        obs = {k: rng.normal(size=(t, d)) for k, d in LIFT_KEYS.items()}
        obs["robot0_eye_in_hand_image"] = rng.integers(0, 256, (t, 96, 96, 3), dtype=np.uint8)
        episodes.append({"actions": rng.uniform(-1, 1, (t, 7)), "states": rng.normal(size=(t, 32)),
                         "rewards": np.zeros(t), "dones": np.zeros(t, dtype=np.int64), "obs": obs,
                         "model_file": "<mujoco/>"})
    return episodes


def _scale(x, lo, hi):
    return 2 * (x - lo) / (hi - lo + 1e-6) - 1


def _write_dppo(folder: Path, states, actions, lengths, images=None, robomimic_quirk=True):
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = states.min(0), states.max(0)
    alo, ahi = actions.min(0), actions.max(0)
    if robomimic_quirk:  # DPPO's robomimic script starts min/max at 0
        lo, hi, alo, ahi = np.minimum(lo, 0), np.maximum(hi, 0), np.minimum(alo, 0), np.maximum(ahi, 0)
    arrays = {"states": _scale(states, lo, hi).astype(np.float32), "actions": _scale(actions, alo, ahi).astype(np.float32),
              "traj_lengths": np.asarray(lengths)}
    if images is not None:
        arrays["images"] = images
    np.savez(folder / "train.npz", **arrays)
    np.savez(folder / "normalization.npz", obs_min=lo, obs_max=hi, action_min=alo, action_max=ahi)
    return folder / "train.npz"


@pytest.fixture(scope="module")
def lift_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lift")
    episodes = _lift_episodes()
    hdf5 = root / "demos.hdf5"
    tasks.write_robomimic_hdf5(hdf5, episodes, {"env_name": "Lift", "type": 1, "env_kwargs": {}})
    cat = lambda key: np.concatenate([ep["obs"][key] for ep in episodes])
    states = np.concatenate([cat(k) for k in LIFT_KEYS], axis=1)
    proprio = states[:, :9]
    actions = np.concatenate([ep["actions"] for ep in episodes])
    lengths = [len(ep["actions"]) for ep in episodes]
    chw = cat("robot0_eye_in_hand_image").transpose(0, 3, 1, 2)
    npz_state = _write_dppo(root / "state", states, actions, lengths)
    npz_image = _write_dppo(root / "image", proprio, actions, lengths, images=chw)
    return dict(hdf5=hdf5, npz_state=npz_state, npz_image=npz_image, states=states, actions=actions,
                lengths=lengths, chw=chw, episodes=episodes, root=root)


def test_robomimic_writer_layout(lift_files):
    with h5py.File(lift_files["hdf5"], "r") as f:
        assert f["data"].attrs["total"] == sum(lift_files["lengths"])
        assert f["data"].attrs["env_args"].startswith("{")
        assert f["data/demo_0"].attrs["num_samples"] == 5 and f["data/demo_0"].attrs["model_file"] == "<mujoco/>"
        assert f["data/demo_0/obs/robot0_eye_in_hand_image"].compression == "gzip"
        assert f["data/demo_0/obs/object"].compression is None
        assert f["mask/train"].dtype.kind == "S" and list(f["mask/valid"][:]) == [b"demo_9"]
        assert len(f["mask/train"]) == 9
        for key in ("actions", "states", "rewards", "dones"):
            assert key in f["data/demo_3"]
    assert not Path(str(lift_files["hdf5"]) + ".tmp").exists()


def test_robomimic_and_dppo_npz_agree(lift_files):
    for mode in ("state", "image"):
        a = load_dataset(lift_files["hdf5"], "lift", mode)
        b = load_dataset(lift_files["npz_state" if mode == "state" else "npz_image"], "lift", mode)
        for ds in (a, b):
            assert ds.states.dtype == np.float32 and ds.actions.dtype == np.float32
            np.testing.assert_array_equal(ds.episode_lengths, lift_files["lengths"])
        want = lift_files["states"] if mode == "state" else lift_files["states"][:, :9]
        np.testing.assert_allclose(a.states, want, atol=1e-5)
        np.testing.assert_allclose(b.states, want, atol=1e-5)  # normalization undone -> env units
        np.testing.assert_allclose(b.actions, lift_files["actions"], atol=1e-5)
        np.testing.assert_allclose(a.actions, lift_files["actions"], atol=1e-6)
        if mode == "image":
            assert a.images.dtype == np.uint8 and a.images.shape == (len(a), 3, 96, 96)
            np.testing.assert_array_equal(a.images, lift_files["chw"])
            np.testing.assert_array_equal(b.images, lift_files["chw"])
        else:
            assert a.images is None and b.images is None


def test_robomimic_filter_keys(lift_files):
    ds = load_dataset(lift_files["hdf5"], "lift", filter_key="valid")
    np.testing.assert_array_equal(ds.episode_lengths, [9])
    np.testing.assert_allclose(ds.actions, lift_files["episodes"][9]["actions"], atol=1e-6)
    assert len(load_dataset(lift_files["hdf5"], "lift", filter_key="train").episode_lengths) == 9
    with pytest.raises(TaskError, match="mask/nope"):
        load_dataset(lift_files["hdf5"], "lift", filter_key="nope")
    with pytest.raises(TaskError, match="only hdf5 files"):  # other formats have no masks: never ignore the key
        load_dataset(lift_files["npz_state"], "lift", filter_key="valid")


def _hopper_episodes(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [4, 6, 5]  # last one is cut short: no terminal, no timeout
    obs = rng.normal(size=(sum(lengths), 11))
    actions = rng.uniform(-1, 1, (sum(lengths), 3))
    terminals = np.zeros(sum(lengths), bool)
    timeouts = np.zeros(sum(lengths), bool)
    terminals[3] = True  # a fall
    timeouts[9] = True  # a time limit
    return obs, actions, terminals, timeouts, lengths


def test_d4rl_and_dppo_npz_agree(tmp_path):
    obs, actions, terminals, timeouts, lengths = _hopper_episodes()
    with h5py.File(tmp_path / "medium.hdf5", "w") as f:
        f["observations"], f["actions"] = obs.astype(np.float32), actions.astype(np.float32)
        f["rewards"] = np.ones(len(obs), np.float32)
        f["terminals"], f["timeouts"] = terminals, timeouts
    a = load_dataset(tmp_path / "medium.hdf5", "hopper")
    b = load_dataset(_write_dppo(tmp_path / "npz", obs, actions, lengths, robomimic_quirk=False), "hopper")
    for ds in (a, b):
        np.testing.assert_array_equal(ds.episode_lengths, lengths)
        np.testing.assert_allclose(ds.states, obs, atol=1e-5)
        np.testing.assert_allclose(ds.actions, actions, atol=1e-5)
    assert a.rewards.shape == (15,)


def test_legacy_gym_observations_map_onto_v5(tmp_path):
    rng = np.random.default_rng(0)
    # Ant-v2 (111) = qpos 13 + qvel 14 + cfrc_ext 84 -> our 27.
    ant = rng.normal(size=(6, 111))
    with h5py.File(tmp_path / "ant.hdf5", "w") as f:
        f["observations"], f["actions"] = ant, rng.uniform(-1, 1, (6, 8))
        f["terminals"], f["timeouts"] = np.zeros(6, bool), np.eye(6, dtype=bool)[5]
    np.testing.assert_allclose(load_dataset(tmp_path / "ant.hdf5", "ant").states, ant[:, :27], atol=1e-6)
    # Humanoid-v3 (376): drop worldbody cinert (10), cvel (6), free-joint qfrc_actuator (6), cfrc_ext (84).
    segments = [rng.normal(size=(4, 45)), np.zeros((4, 10)), rng.normal(size=(4, 130)), np.zeros((4, 6)),
                rng.normal(size=(4, 78)), np.zeros((4, 6)), rng.normal(size=(4, 17)), rng.normal(size=(4, 84))]
    hum = np.concatenate(segments, axis=1)
    assert hum.shape[1] == 376
    with h5py.File(tmp_path / "hum.hdf5", "w") as f:
        f["observations"], f["actions"] = hum, rng.uniform(-0.4, 0.4, (4, 17))
        f["terminals"] = np.zeros(4, bool)
    want = np.concatenate([segments[i] for i in (0, 2, 4, 6)], axis=1)
    np.testing.assert_allclose(load_dataset(tmp_path / "hum.hdf5", "humanoid").states, want, atol=1e-6)


def test_image_conversions(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    chw = u8.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(tasks.to_uint8_chw(u8, "hwc"), chw)
    np.testing.assert_array_equal(tasks.to_uint8_chw(chw, "chw"), chw)
    np.testing.assert_array_equal(tasks.to_uint8_chw(chw / 255.0, "chw"), chw)  # floats in [0, 1]
    np.testing.assert_array_equal(tasks.to_uint8_chw(chw.astype(np.float32), "chw"), chw)  # [0, 255]
    np.testing.assert_array_equal(tasks.to_uint8_chw(u8.astype(np.float64) / 255, "hwc"), chw)
    assert tasks.to_uint8_chw(chw.astype(np.int64), "chw").dtype == np.uint8
    bad = chw / 255.0
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(TaskError, match="NaN"):
        tasks.to_uint8_chw(bad, "chw")
    # Float [0,1] images inside a DPPO npz come out as uint8 CHW too.
    states, actions = rng.normal(size=(2, 9)), rng.uniform(-1, 1, (2, 7))
    path = _write_dppo(tmp_path / "f", states, actions, [2], images=(chw / 255.0).astype(np.float32))
    np.testing.assert_array_equal(load_dataset(path, "lift", "image").images, chw)


def test_chunk_starts_never_cross_an_episode():
    ds = Dataset(np.zeros((14, 1), np.float32), np.zeros((14, 1), np.float32), np.array([5, 2, 7]))
    np.testing.assert_array_equal(chunk_starts(ds, 4), [0, 1, 7, 8, 9, 10])
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, 50)
    episode_of = np.repeat(np.arange(50), lengths)
    ds = Dataset(np.zeros((lengths.sum(), 1)), np.zeros((lengths.sum(), 1)), lengths)
    for chunk in (1, 4, 8):
        starts = chunk_starts(ds, chunk)
        assert starts.dtype == np.int64
        assert (episode_of[starts] == episode_of[starts + chunk - 1]).all()
        assert len(starts) == np.maximum(lengths - chunk + 1, 0).sum()


def test_normalization_stats(lift_files):
    ds = load_dataset(lift_files["hdf5"], "lift")
    stats = tasks.normalization_stats(ds)
    assert set(stats) == {"state_min", "state_max", "action_min", "action_max"}
    np.testing.assert_allclose(stats["state_min"], lift_files["states"].min(0), atol=1e-6)
    assert all(v.dtype == np.float32 for v in stats.values())


# ----------------------------------------------------------------------------------------------
# Bad inputs: one-line TaskErrors that name the file
# ----------------------------------------------------------------------------------------------
def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(TaskError, match="nothing_here.hdf5: file not found"):
        load_dataset(tmp_path / "nothing_here.hdf5", "lift")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaskError, match=r"collect_demos.py --task can"):
        load_dataset(TASKS["can"].default_dataset, "can")


def test_bad_files(tmp_path, lift_files):
    rng = np.random.default_rng(0)

    def expect(path, task, pattern, mode="state"):
        with pytest.raises(TaskError, match=pattern) as e:
            load_dataset(path, task, mode)
        assert Path(path).name in str(e.value) and "\n" not in str(e.value)

    expect(lift_files["hdf5"], "can", "states have 19 dims.*expects 23")  # dim mismatch
    expect(lift_files["npz_image"], "lift", "image dataset")  # image data read in state mode
    expect(lift_files["npz_state"], "lift", "images", mode="image")  # no images in the file
    # wrong keys
    np.savez(tmp_path / "keys.npz", obs=np.zeros((3, 19)))
    np.savez(tmp_path / "normalization.npz", obs_min=np.zeros(19), obs_max=np.ones(19),
             action_min=np.zeros(7), action_max=np.ones(7))
    expect(tmp_path / "keys.npz", "lift", "missing 'states'")
    with h5py.File(tmp_path / "odd.hdf5", "w") as f:
        f["stuff"] = np.zeros(3)
    expect(tmp_path / "odd.hdf5", "lift", "neither robomimic")
    with h5py.File(tmp_path / "noobj.hdf5", "w") as f:
        f["data/demo_0/actions"] = np.zeros((3, 7))
        f["data/demo_0/obs/robot0_eef_pos"] = np.zeros((3, 3))
    expect(tmp_path / "noobj.hdf5", "lift", "robot0_eef_quat")
    # wrong shapes and values
    with h5py.File(tmp_path / "shape.hdf5", "w") as f:
        f["observations"], f["actions"] = np.zeros((5, 11)), np.zeros((4, 3))
        f["terminals"] = np.zeros(4, bool)
    expect(tmp_path / "shape.hdf5", "hopper", "do not agree")
    for name, obs in (("nan.hdf5", np.full((4, 11), np.nan)), ("dims.hdf5", np.zeros((4, 12)))):
        with h5py.File(tmp_path / name, "w") as f:
            f["observations"], f["actions"], f["terminals"] = obs, np.zeros((4, 3)), np.zeros(4, bool)
    expect(tmp_path / "nan.hdf5", "hopper", "NaN")
    expect(tmp_path / "dims.hdf5", "hopper", "12 dims")
    (tmp_path / "junk.hdf5").write_bytes(b"not an hdf5 file")
    expect(tmp_path / "junk.hdf5", "lift", "cannot read")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    expect(tmp_path / "junk.npz", "lift", "cannot read")
    # a DPPO npz without its normalization.npz
    lone = tmp_path / "lone"
    lone.mkdir()
    np.savez(lone / "train.npz", states=rng.normal(size=(2, 19)), actions=np.zeros((2, 7)), traj_lengths=[2])
    expect(lone / "train.npz", "lift", "normalization.npz")


# ----------------------------------------------------------------------------------------------
# Franka Kitchen
# ----------------------------------------------------------------------------------------------
# FrankaKitchen-v1's goals as qpos index -> value. Equality constraints tie joint pairs: light_switch (17) =
# 14 * light_joint (18) and each knob = 174 * its burner slide (11 and 12 for the bottom burner).
KITCHEN_GOAL_QPOS = {
    "microwave": {22: -0.75},
    "kettle": dict(zip(range(23, 30), (-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06))),
    "light switch": {17: -0.69, 18: -0.69 / 14},
    "slide cabinet": {19: 0.37},
    "bottom burner": {11: -0.88, 12: -0.88 / 174},
}


@pytest.mark.parametrize("name", ["kitchen-complete", "kitchen-partial", "kitchen-mixed"])
def test_kitchen_env(name):
    task = TASKS[name]
    assert (task.obs_dim, task.act_dim, task.chunk, task.max_episode_steps, task.gamma) == (59, 9, 4, 280, 0.99)
    assert len(task.subtasks) == 4 and {"microwave", "kettle", "light switch"} < set(task.subtasks)
    env = make_env(name, seed=0)
    obs = env.reset()
    assert set(obs) == {"state"} and obs["state"].shape == (59,) and obs["state"].dtype == np.float32
    assert set(env.sim_env.unwrapped.tasks_to_complete) == set(task.subtasks)
    obs, r, term, trunc, info = env.step(np.zeros(9))
    assert obs["state"].shape == (59,) and r == 0.0 and (term, trunc) == (False, False)
    assert info == {"success": False, "completed": []}
    with pytest.raises(TaskError, match="no cameras"):
        make_env(name, "image")
    env.close()


def test_kitchen_video_frame():
    env = make_env("kitchen-complete", seed=0, render_video=True)
    env.reset()
    frame = env.render()
    assert frame.shape == (tasks.VIDEO_SIZE, tasks.VIDEO_SIZE, 3) and frame.dtype == np.uint8 and frame.std() > 10
    env.close()


def test_kitchen_reward_and_success_bookkeeping():
    env = make_env("kitchen-mixed", seed=0, max_episode_steps=5)
    env.reset()
    data = env.sim_env.unwrapped.data

    def put(*names):  # place objects at their goals (qpos), as a finished subtask would leave them
        for name in names:
            for i, value in KITCHEN_GOAL_QPOS[name].items():
                data.qpos[i] = value
        data.qvel[:] = 0.0

    put("microwave")
    _, r, term, _, info = env.step(np.zeros(9))
    assert r == 1.0 and not term and info == {"success": False, "completed": ["microwave"]}
    _, r, term, _, info = env.step(np.zeros(9))  # completion latches: no second reward
    assert r == 0.0 and info["completed"] == ["microwave"]
    data.qpos[22] = 0.0  # close the door again: still counted
    _, r, _, _, info = env.step(np.zeros(9))
    assert r == 0.0 and info["completed"] == ["microwave"] and not info["success"]
    put("kettle", "bottom burner", "light switch")
    _, r, term, trunc, info = env.step(np.zeros(9))
    assert r == 3.0 and term and not trunc and info["success"]
    assert set(info["completed"]) == set(TASKS["kitchen-mixed"].subtasks)
    env.reset()  # a new episode starts from zero
    _, r, _, trunc, info = env.step(np.zeros(9))
    assert r == 0.0 and info == {"success": False, "completed": []}
    for _ in range(4):
        _, _, term, trunc, _ = env.step(np.zeros(9))
    assert trunc and not term  # max_episode_steps=5


def _kitchen_v0_episodes(rng):
    """Two episodes of D4RL kitchen-v0 observations (qpos 9 + object qpos 21 + goal 30) with known velocities."""
    lengths, dt = [4, 3], 0.08
    qvel = rng.normal(size=(7, 29))  # robot 9 + 14 object joints + kettle linear 3 + kettle angular 3
    qpos = np.zeros((7, 30))
    for start, n in zip(np.cumsum(lengths) - lengths, lengths):
        qpos[start] = rng.normal(size=30) * 0.1
        qpos[start, 26:30] = [1, 0, 0, 0]
        for t in range(start + 1, start + n):
            qpos[t, :26] = qpos[t - 1, :26] + qvel[t, :26] * dt
            w = qvel[t, 26:29]  # body-frame angular velocity: q[t] = q[t-1] * exp(w dt / 2)
            angle = np.linalg.norm(w) * dt
            dq = np.r_[np.cos(angle / 2), np.sin(angle / 2) * w / np.linalg.norm(w)]
            a, b = qpos[t - 1, 26:30], dq
            qpos[t, 26:30] = [a[0] * b[0] - a[1:] @ b[1:], *(a[0] * b[1:] + b[0] * a[1:] + np.cross(a[1:], b[1:]))]
        qvel[start] = 0.0
    goal = np.zeros((7, 30))
    goal[:, 22] = -0.75
    return np.concatenate([qpos, goal], axis=1), qpos, qvel, lengths


def test_kitchen_d4rl_60d_maps_onto_v1(tmp_path):
    rng = np.random.default_rng(0)
    obs60, qpos, qvel, lengths = _kitchen_v0_episodes(rng)
    path = tmp_path / "kitchen_complete-v0.hdf5"
    with h5py.File(path, "w") as f:  # D4RL's kitchen layout (its files also carry infos/ we do not need)
        f["observations"], f["actions"] = obs60.astype(np.float32), rng.uniform(-1, 1, (7, 9)).astype(np.float32)
        f["rewards"] = np.zeros(7, np.float32)
        f["terminals"], f["timeouts"] = np.zeros(7, bool), np.eye(7, dtype=bool)[[3, 6]].any(0)
    ds = load_dataset(path, "kitchen-complete")
    np.testing.assert_array_equal(ds.episode_lengths, lengths)
    assert ds.states.shape == (7, 59)
    np.testing.assert_allclose(ds.states[:, 0:9], qpos[:, 0:9], atol=1e-6)  # robot qpos
    np.testing.assert_allclose(ds.states[:, 18:39], qpos[:, 9:30], atol=1e-6)  # object qpos
    np.testing.assert_allclose(ds.states[:, 9:18], qvel[:, 0:9], atol=1e-4)  # finite-difference velocities
    np.testing.assert_allclose(ds.states[:, 39:59], qvel[:, 9:29], atol=1e-3)  # incl. kettle angular velocity
    assert not ds.states[[0, 4], 9:18].any()  # zero at each episode start


def test_kitchen_59d_round_trip_and_bad_width(tmp_path):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(6, 59)).astype(np.float32)
    with h5py.File(tmp_path / "ours.hdf5", "w") as f:  # what collect_demos.py writes for kitchen
        f["observations"], f["actions"] = obs, rng.uniform(-1, 1, (6, 9)).astype(np.float32)
        f["rewards"], f["terminals"], f["timeouts"] = np.zeros(6, np.float32), np.eye(6, dtype=bool)[1], \
            np.eye(6, dtype=bool)[5]
    ds = load_dataset(tmp_path / "ours.hdf5", "kitchen-partial")
    np.testing.assert_array_equal(ds.states, obs)
    np.testing.assert_array_equal(ds.episode_lengths, [2, 4])
    with h5py.File(tmp_path / "odd.hdf5", "w") as f:
        f["observations"], f["actions"], f["terminals"] = np.zeros((3, 61)), np.zeros((3, 9)), np.zeros(3, bool)
    with pytest.raises(TaskError, match=r"odd.hdf5: states have 61 dims.*59 \(FrankaKitchen-v1\) or 60") as e:
        load_dataset(tmp_path / "odd.hdf5", "kitchen-mixed")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Downloads against a local HTTP server
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "server"
    rng = np.random.default_rng(0)
    _write_dppo(root / "gym" / "hopper-medium-v2", rng.normal(size=(8, 11)), rng.uniform(-1, 1, (8, 3)), [8],
                robomimic_quirk=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_local_server(tmp_path, http_root, capsys):
    root, url = http_root
    dest = tmp_path / "data"
    good = tasks._sha256(root / "gym" / "hopper-medium-v2" / "train.npz")
    path = tasks.download_dataset("hopper", dest_dir=str(dest), base_url=url, sha256={"train.npz": good})
    assert path == dest / "gym" / "hopper-medium-v2" / "train.npz" == tasks.downloaded_path("hopper", "state", str(dest))
    assert (path.parent / "normalization.npz").exists() and not list(path.parent.glob("*.part"))
    out = capsys.readouterr().out
    assert f"sha256 {good} (verified)" in out and "normalization.npz: sha256" in out
    assert len(load_dataset(path, "hopper")) == 8
    # A wrong checksum removes the file and says so.
    path.unlink()
    with pytest.raises(TaskError, match="does not match"):
        tasks.download_dataset("hopper", dest_dir=str(dest), base_url=url, sha256={"train.npz": "0" * 64})
    assert not path.exists()
    # A missing file on the server (HTTP 404) is a one-line error too.
    with pytest.raises(TaskError, match="could not download .*lift-img/train.npz"):
        tasks.download_dataset("lift", dest_dir=str(dest), base_url=url, obs_mode="image")


def test_download_offline_message(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TaskError) as e:
        tasks.download_dataset("lift", dest_dir=str(tmp_path), base_url=f"http://127.0.0.1:{port}")
    msg = str(e.value)
    assert "could not download" in msg and "robomimic/lift/train.npz" in msg and "\n" not in msg
    assert str(tmp_path / "robomimic" / "lift" / "train.npz") in msg


def test_minari_local_dataset(tmp_path):
    minari = pytest.importorskip("minari")  # optional dependency
    import gymnasium as gym

    env = minari.DataCollector(gym.make("Hopper-v5"))
    env.reset(seed=0)
    for _ in range(30):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    ds = env.create_dataset("hopper/test-v0", algorithm_name="random")
    loaded = load_dataset(Path(ds.spec.data_path).parent, "hopper")
    assert loaded.states.shape[1] == 11 and len(loaded) == ds.total_steps


def test_setup_rendering(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    assert tasks.setup_rendering() in ("egl", "osmesa")  # probes in a subprocess
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(tasks.sys, "executable", "/bin/false")  # every backend "fails"
    with pytest.raises(TaskError, match=r"apt-get install -y libegl1 libgl1-mesa-dri.*libosmesa6") as e:
        tasks.setup_rendering()
    assert "\n" not in str(e.value)
    monkeypatch.setenv("MUJOCO_GL", "osmesa")  # an explicit choice is respected as is
    assert tasks.setup_rendering() == "osmesa"


def test_orientation_features_are_continuous_through_a_full_yaw_turn():
    """Sweep the square nut's yaw through 360 deg with the hand held over it: the recorded quaternions jump to their
    negatives (mat2quat's sign convention), the policy's rotation features (PolicyConfig.rot_quats =
    tasks.quaternion_starts) do not, and they are the same whichever sign the recording picked."""
    import torch
    from scipy.spatial.transform import Rotation

    import models
    task = TASKS["square"]
    starts = tasks.quaternion_starts(task)
    assert starts == (3, 12, 19)           # robot0_eef_quat; SquareNut_quat, SquareNut_to_robot0_eef_quat
    assert tasks.quaternion_starts(task, "image") == (3,) and tasks.quaternion_starts("transport") == (3, 12, 21, 28, 35)
    assert tasks.quaternion_starts("hopper") == ()
    env = make_env(task, seed=0)
    env.reset()
    sim = env.sim_env.sim
    joint = sim.model.get_joint_qpos_addr("SquareNut_joint0")[0]
    states = []
    for yaw in np.linspace(0, 2 * np.pi, 721):
        sim.data.qpos[joint + 3:joint + 7] = Rotation.from_euler("z", yaw).as_quat()[[3, 0, 1, 2]]   # wxyz
        sim.forward()
        states.append(np.concatenate([np.concatenate(list(env.layout_obs().values()))]))
    env.close()
    s = torch.as_tensor(np.array(states), dtype=torch.float32)
    assert s.shape == (721, task.obs_dim)
    raw_jump = (s[1:] - s[:-1]).abs().max(0).values
    assert raw_jump[12:16].max() > 1.0 or raw_jump[19:23].max() > 1.0      # the quaternions flip sign somewhere
    cfg = models.PolicyConfig(state_dim=task.obs_dim, act_dim=7, chunk=4, rot_quats=starts, cond_mlp_dims=(8,), hidden_dim=8)
    assert cfg.feature_dim == task.obs_dim + 6
    policy = models.make_policy(cfg)
    feats = policy.normalize_state(s)
    assert feats.shape == (721, cfg.feature_dim)
    # a 0.5 deg step moves a rotation-matrix entry by at most ~0.0087; nothing else in the state moves
    assert (feats[1:] - feats[:-1]).abs().max() < 0.01
    flipped = s.clone()
    for i in starts:
        flipped[:, i:i + 4] *= -1
    torch.testing.assert_close(policy.normalize_state(flipped), feats)
    # the features are the rotation matrix's first two columns
    q = s[:, 12:16].double().numpy()
    np.testing.assert_allclose(feats[:, -12:-6].numpy(), Rotation.from_quat(q).as_matrix()[:, :, :2].transpose(0, 2, 1).reshape(-1, 6), atol=1e-5)
    with pytest.raises(ValueError, match="rot_quats"):
        models.PolicyConfig(state_dim=23, act_dim=7, chunk=4, rot_quats=(3, 5))     # overlapping blocks
    with pytest.raises(ValueError, match="rot_quats"):
        models.PolicyConfig(state_dim=23, act_dim=7, chunk=4, rot_quats=(20,))      # past the end
