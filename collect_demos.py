"""Demonstrations made offline: runs the scripted experts (experts.py) and locomotion PPO teachers, writes files.

robosuite lift / can / square / transport: each episode runs an expert in the real simulator; episodes stop a
few steps after the first success and only successful ones are kept (--keep-failures keeps the rest, with
robomimic's mask/successful and mask/failed). Output: robomimic's hdf5 layout (tasks.write_robomimic_hdf5).

    python collect_demos.py --task square --episodes 100            # low-dim
    python collect_demos.py --task lift --episodes 50 --images      # + 96x96 cameras
    python collect_demos.py --task transport --episodes 100         # two arms, 14-D actions
    python collect_demos.py --dagger runs/square/latest.pt --episodes 50   # DAgger: label where the policy goes

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

Files written here carry data attrs obs_layout = tasks.OBS_LAYOUT (robomimic v1.4.1 observation layout). To check
that a robomimic file (e.g. a downloaded one) means the same thing in our env, replay its stored sim states:

    python collect_demos.py --check-data FILE [--task can] [--demos 3]   # exit 0 fits, 1 does not, 2 bad file

A DAgger label is only worth imitating where the expert itself can go on. From states of a file's DAgger episodes
(pretrain.py's <out>/dagger.hdf5), run the expert and count how often it still succeeds:

    python collect_demos.py --check-oracle runs/transport/dagger.hdf5 --demos 16 --points 4

`collect(...)` is the programmatic entry point (used when a default dataset is missing); for locomotion
its `episodes` argument is ignored (the size is `transitions`). To add a task, register an episode runner
in RUNNERS (or a TeacherSpec in TEACHERS for a gym task).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_lib
import sys
import time
import traceback

from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

import cli
import tasks
from experts import EXPERTS, KitchenExpert, sample_order, subtask_done
from teacher import TEACHERS, collect_locomotion

# ----------------------------------------------------------------------------- episodes
def _robomimic_obs(env, task, images: bool, obs_rgb=None, force: bool = False) -> dict:
    """Observations under robomimic's key names. The state keys (robot<i>_eef_pos/_eef_quat/_gripper_qpos and
    `object`) are the env's own, in tasks.OBS_LAYOUT (robomimic v1.4.1 order), computed from the sim state that
    is stored next to them; the other robot<i>_* keys (joint positions, velocities, ...; not proprio-state) are
    robosuite's observable caches, and `<camera>_image` (HWC upright) comes from make_env's "rgb" so it matches
    eval. Without `force` the caches are those filled by the last step (no re-render)."""
    raw = env.sim_env._get_observations(force_update=force)
    out = {}
    for k, v in raw.items():
        if k.startswith("robot") and not k.endswith(("_proprio-state", "_image")):
            out[k] = np.array(v, dtype=np.float64)
    out.update(env.layout_obs(with_object=True))
    if images:
        for i, cam in enumerate(task.cameras):
            out[f"{cam}_image"] = np.ascontiguousarray(obs_rgb[3 * i : 3 * i + 3].transpose(1, 2, 0))
    return out


def run_arm_episode(env, task, rng, noise: float, images: bool, max_steps: int, labels: str = "executed"):
    """Run one scripted episode. Returns (episode dict, success). labels: see LABELS."""
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
        ep["actions"].append(expert.clean if labels == "clean" else action)
        ep["rewards"].append(float(reward))
        ep["dones"].append(int(ok))
        if ok and success_at is None:
            success_at = t
        if success_at is not None and t >= success_at + post_success:
            break
        if truncated or (terminated and not ok) or expert.phase == "give_up":
            break
    return _pack_episode(ep, obs_seq, model_file), success_at is not None


def _pack_episode(ep: dict, obs_seq: list, model_file: str) -> dict:
    """Per-step lists (actions, states, rewards, dones; one obs dict per step) -> the arrays of one robomimic demo;
    the last step is marked done."""
    ep["dones"][-1] = 1
    return {"actions": np.asarray(ep["actions"], dtype=np.float64), "states": np.asarray(ep["states"], dtype=np.float64),
            "rewards": np.asarray(ep["rewards"], dtype=np.float64), "dones": np.asarray(ep["dones"], dtype=np.int64),
            "obs": {k: np.stack([o[k] for o in obs_seq]) for k in obs_seq[0]}, "model_file": model_file}


def run_kitchen_episode(env, task, rng, noise: float, images: bool, max_steps: int, labels: str = "executed",
                        policy=None, beta: float = 1.0):
    """One scripted episode on a tasks.KitchenEnv. Returns (episode dict in D4RL columns, success).

    success = every subtask holds in the *final* state (the env latches a subtask the first time it is
    within 0.3 of its goal, so a kettle that passes the goal mid-carry and then drops would still count).
    The episode stops when the env terminates (all subtasks latched) or after max_steps.
    With a `policy`, a DAgger episode (see run_dagger_episode): each chunk is the policy's (one-step `act`, run
    open-loop) with probability 1 - beta, else the expert's noisy actions, and every step records the expert's
    clean action at the visited state (the label) instead of the executed one; labels="clean" records that label
    in expert episodes too (see LABELS).
    """
    if images:
        raise tasks.TaskError(f"task {task.name} is state-only: drop --images")
    obs = env.reset()
    order = sample_order(task.subtasks, rng, shuffle=task.name != "kitchen-complete")  # D4RL: complete has one order
    expert = KitchenExpert(env.sim_env, order, rng, noise)
    hist = tasks.ObsHistory(policy.cfg.obs_steps) if policy is not None else None
    policy_obs = hist.reset(obs) if policy is not None else None
    observations, actions, rewards = [], [], []
    terminated, truncated, info = False, False, {"completed": []}
    while len(actions) < max_steps and not (terminated or truncated):
        chunk = None if policy is None or rng.random() < beta else policy.act(policy_obs)
        for k in range(1 if chunk is None else len(chunk)):
            action = expert()
            observations.append(obs["state"])
            actions.append(expert.clean if policy is not None or labels == "clean" else action)
            obs, reward, terminated, truncated, info = env.step(action if chunk is None else chunk[k])
            policy_obs = hist.push(obs) if policy is not None else None
            rewards.append(reward)
            if terminated or truncated or len(actions) >= max_steps:
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


def kitchen_metadata(task, made: dict, stats: dict) -> dict:
    """D4RL-layout metadata/ attrs: the task, the env, `made` (collect()'s record of how the demos were made) and
    the kept/attempted counts in `stats`."""
    import gymnasium
    import gymnasium_robotics
    import mujoco

    return {"task": task.name, "env_id": task.env_id, "subtasks": json.dumps(list(task.subtasks)),
            "observation": "FrankaKitchen-v1 59-D: robot qpos 9, robot qvel 9, object qpos 21, object qvel 20",
            "policy": "scripted DLS-IK expert (experts.KitchenExpert)", **made,
            "episodes": stats["episodes"], "attempts": stats["attempts"],
            "rewards": "subtasks newly completed at the step (env reward)",
            "filter": "kept episodes whose final state satisfies every subtask",
            "gymnasium_version": gymnasium.__version__, "gymnasium_robotics_version": gymnasium_robotics.__version__,
            "mujoco_version": mujoco.__version__}


# What makes each task's data: arm tasks register an episode runner (run by the worker pool), locomotion
# tasks the PPO-teacher pipeline (collect() dispatches on TEACHERS). pretrain.py checks membership here.
RUNNERS = {"lift": run_arm_episode, "can": run_arm_episode, "square": run_arm_episode, "transport": run_arm_episode,
           **{name: collect_locomotion for name in TEACHERS},
           **{name: run_kitchen_episode for name, t in tasks.TASKS.items() if t.suite == "kitchen"}}
# What an episode records as its action. "executed": the action sent to the env, expert plus noise, as a human demo
# records it. "clean": the expert's noiseless action at the state the noisy execution reached; the noise then only
# spreads the states (DART, Laskey et al. 2017, arXiv 1703.09327), and every label is the expert's correction there.
LABELS = {"executed": "the executed action (expert + Gaussian noise)",
          "clean": "the expert's noiseless action at the visited state (DART)"}
# How each task's demos are made by default: the std of the Gaussian action noise (x0.3 on rotation) and which action
# is recorded. Lift, can and square keep human-like demos (small noise, executed actions; square gets its recovery
# data from DAgger rounds in pretrain.py instead). Franka Kitchen uses DART: trained on executed labels at noise 0.05,
# the policy drifts off the demos before the light switch and completes 7% of full sequences; clean labels at noise
# 0.15 give it the expert's corrections there (44%; see the README). kitchen-mixed's bottom burner tolerates less
# noise (the expert finishes 30/30 at 0.05, 22/30 at 0.1, 10/30 at 0.15), so it gets 0.1. Transport too: on demos
# with executed labels at 0.05 plus five DAgger rounds its policy never succeeded (0/50); on clean labels at noise 0.1
# (the expert finishes 100 of 101; at 0.15 only 5 of 13) it succeeds in 62% and 64% on two evaluation seed sets
# (README, Results).
COLLECTION = {**{name: dict(noise=0.1 if name == "kitchen-mixed" else 0.15, labels="clean")
                 for name, t in tasks.TASKS.items() if t.suite == "kitchen"},
              "transport": dict(noise=0.1, labels="clean")}
DEFAULT_COLLECTION = dict(noise=0.05, labels="executed")


def collection_defaults(task_name: str) -> dict:
    """The task's default collection settings: {"noise": std, "labels": a LABELS key} (see COLLECTION)."""
    return COLLECTION.get(task_name, DEFAULT_COLLECTION)


EPISODE_STEPS = {"lift": 200, "can": 400, "square": 400, "transport": 800}  # scripted-episode caps (steps)


# ----------------------------------------------------------------------------- collection
def _collect_worker(task_name, quota, max_attempts, seed, images, noise, labels, keep_failures, emit):
    """Collect `quota` successful episodes with one env; report each through emit(kind, payload)."""
    task = tasks.TASKS[task_name]
    env = tasks.make_env(task, obs_mode="image" if images else "state", seed=seed)
    rng = np.random.default_rng(seed)
    max_steps = min(EPISODE_STEPS.get(task_name, task.max_episode_steps), task.max_episode_steps)
    successes = attempts = 0
    while successes < quota and attempts < max_attempts:
        ep, ok = RUNNERS[task_name](env, task, rng, noise, images, max_steps, labels=labels)
        attempts += 1
        successes += ok
        ep["success"] = ok
        emit("episode" if (ok or keep_failures) else "failure", ep if (ok or keep_failures) else len(ep["actions"]))
    env.close()
    emit("done", {"attempts": attempts, "successes": successes})


def _worker_main(worker, target, args, queue, parent_pid):
    def emit(kind, payload):
        if os.getppid() != parent_pid:  # parent killed: do not collect on as an orphan
            os._exit(1)
        queue.put((worker, kind, payload))

    try:
        target(*args, emit=emit)
    except BaseException:  # noqa: BLE001 - forwarded to the parent
        queue.put((worker, "error", traceback.format_exc()))


def env_args_for(task, images: bool) -> dict:
    """robomimic `env_args`: how to rebuild the env that recorded the demos."""
    if task.suite != "robosuite":  # robomimic EnvType.GYM_TYPE
        return {"env_name": task.env_id, "type": 2, "env_kwargs": dict(task.env_kwargs)}
    import robosuite

    return {"env_name": task.env_id, "env_version": robosuite.__version__, "type": 1,
            "env_kwargs": tasks.robosuite_kwargs(task, "image" if images else "state")}


def _run_workers(jobs, handle, target=None, start="fork"):
    """One process per job, each running target(*job, emit=...) (default _collect_worker); messages are handled as
    they arrive (progress), results are merged by the caller in worker order. A worker that dies without reporting
    raises instead of hanging. fork by default: the caller's __main__ (e.g. pretrain.py) is not re-imported and the
    expert workers never touch torch; DAgger's workers run a policy, so they start fresh ("spawn"): a forked copy of
    a process that has used torch's thread pools can deadlock."""
    ctx = mp.get_context(start if start in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    target = target or _collect_worker
    procs = [ctx.Process(target=_worker_main, args=(w, target, job, queue, os.getpid()), daemon=True)
             for w, job in enumerate(jobs)]
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


def _shares(episodes: int, workers: int) -> list[int]:
    """Episodes per worker: as equal as possible, the first workers taking the remainder."""
    return [episodes // workers + (w < episodes % workers) for w in range(workers)]


def _bookkeeping(w, kind, payload, stats, what) -> bool:
    """The messages every worker sends besides its episodes: "error" raises with the worker's traceback, "done"
    stores its counts in stats[w]. True when the message was one of those."""
    if kind == "error":
        raise RuntimeError(f"{what} worker {w} failed:\n{payload}")
    if kind == "done":
        stats[w] = payload
        return True
    return False


def _write(out, episodes, env_args, keep_failures, collection):
    """Write via tasks.write_robomimic_hdf5 (atomic; `collection` goes to data attrs). With failures kept, also add
    mask/successful and mask/failed, still atomically: write to a side file, add the masks, then rename. A failed
    write leaves `out` as it was and removes its temporary files."""
    eps = [{k: v for k, v in ep.items() if k != "success"} for ep in episodes]
    side = str(out) + ".masks.tmp"
    try:
        if not keep_failures:
            tasks.write_robomimic_hdf5(out, eps, env_args=env_args, compress_images=True, obs_layout=tasks.OBS_LAYOUT,
                                       collection=collection)
            return
        tasks.write_robomimic_hdf5(side, eps, env_args=env_args, compress_images=True, obs_layout=tasks.OBS_LAYOUT,
                                   collection=collection)
        with h5py.File(side, "a") as f:
            for name, want in (("successful", True), ("failed", False)):
                names = [f"demo_{i}" for i, ep in enumerate(episodes) if ep["success"] == want]
                f.create_dataset(f"mask/{name}", data=np.array(names, dtype="S"))
        os.replace(side, out)
    except BaseException:
        for tmp in (str(out) + ".tmp", side, side + ".tmp"):  # write_robomimic_hdf5 writes path + ".tmp"
            Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- DAgger (recovery data)
def run_dagger_episode(env, task, rng, policy, beta: float, noise: float, max_steps: int):
    """One DAgger episode (Ross, Gordon & Bagnell 2011, "A Reduction of Imitation Learning ... to No-Regret Online
    Learning", arXiv 1011.0686): the learner `policy` drives (one-step `act`, whole chunks executed open-loop, as in
    evaluation), except that each chunk is, with probability beta, the expert's own noisy actions (the beta mixture
    of the paper); every visited state is labelled with the expert's *clean* action at that state. The expert must
    be stateless (its action a function of the sim state and its episode parameters), so that the label at a state
    the learner reached is what the expert would do there. Failed episodes are kept: their states are the ones the
    demonstrations lack. Returns (episode dict in the demos' layout, success)."""
    hist = tasks.ObsHistory(policy.cfg.obs_steps)      # the policy's observation history, pushed every step
    obs = hist.reset(env.reset())
    sim_env = env.sim_env
    expert = EXPERTS[task.name](sim_env, rng, noise)
    post_success = int(rng.integers(2, 6))
    ep = {k: [] for k in ("actions", "states", "rewards", "dones")}
    obs_seq, success_at, t, over = [], None, 0, False
    while not over:
        chunk = None if rng.random() < beta else policy.act(obs)
        for k in range(task.chunk):
            obs_seq.append(_robomimic_obs(env, task, False))
            ep["states"].append(sim_env.sim.get_state().flatten())
            executed = expert()                    # also sets expert.clean, the label
            obs, reward, _, truncated, info = env.step(executed if chunk is None else chunk[k])
            obs = hist.push(obs)
            ep["actions"].append(expert.clean)
            ep["rewards"].append(float(reward))
            ep["dones"].append(int(info["success"]))
            t += 1
            if info["success"] and success_at is None:
                success_at = t
            over = truncated or t >= max_steps or (success_at is not None and t > success_at + post_success)
            if over:
                break
    return _pack_episode(ep, obs_seq, sim_env.sim.model.get_xml()), success_at is not None


def _dagger_worker(task_name, ckpt, quota, seed, beta, noise, max_steps, emit):
    """Run `quota` DAgger episodes with the checkpoint's policy (CPU, one thread) in one env seeded `seed`."""
    import torch

    import models
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    policy, _ = models.load_policy(ckpt)
    task = tasks.TASKS[task_name]
    env = tasks.make_env(task, obs_mode="state", seed=seed)
    rng = np.random.default_rng(seed)
    successes = 0
    with torch.no_grad():
        for _ in range(quota):
            if task.suite == "kitchen":
                ep, ok = run_kitchen_episode(env, task, rng, noise, False, max_steps, policy=policy, beta=beta)
            else:
                ep, ok = run_dagger_episode(env, task, rng, policy, beta, noise, max_steps)
            successes += ok
            emit("episode", ep)
    env.close()
    emit("done", {"attempts": quota, "successes": successes})


def can_label(task_name: str) -> bool:
    """Whether the task's expert is stateless, i.e. can label any state a policy reaches (what DAgger needs)."""
    task = tasks.TASKS.get(task_name)
    expert = KitchenExpert if task is not None and task.suite == "kitchen" else EXPERTS.get(task_name)
    return getattr(expert, "stateless", False)


DAGGER_STEPS = {"square": 300, "transport": 700}  # DAgger episode cap: the demos take 140-300 (square) and
                                # 430-630 (transport) steps; a policy stuck longer adds
                                # hundreds of copies of one state (often one the expert cannot leave either: a wrist
                                # at its joint limit), which would outweigh everything else in the data


def dagger(task_name, ckpt, src, out, episodes=50, beta=0.5, workers=2, seed=10_000, noise=0.05, max_steps=None,
           progress=True) -> dict:
    """Roll out the checkpoint's policy for `episodes` episodes of at most max_steps (default DAGGER_STEPS) (env
    seeds seed + 1000*w + i, apart from the demos' and the evaluation's), the expert driving a fraction beta of the
    chunks, label every visited state with the expert (run_dagger_episode), and write `src`'s demos plus the new
    episodes to `out` (may equal src) with mask/dagger listing the new ones and mask/expert the demos
    (tasks.append_robomimic_hdf5; kitchen: tasks.append_d4rl_hdf5, episode indices): `--filter-key expert` trains
    without them. beta > 0 matters early on: a policy
    that never grasps only visits the approach, and the expert's chunks carry it on to the later phases, where the
    policy's own chunks then drift and get labelled. Returns a summary dict."""
    task = tasks.get_task(task_name)
    if not can_label(task.name):
        have = sorted(n for n in tasks.TASKS if can_label(n))
        raise tasks.TaskError(f"DAgger needs an expert that can label any state; task {task.name} has none "
                              f"(stateless experts: {', '.join(have)})")
    if not Path(src).is_file():
        raise tasks.TaskError(f"DAgger source dataset {src} does not exist")
    workers = max(1, min(int(workers), episodes))
    quotas = _shares(episodes, workers)
    kept = [[] for _ in range(workers)]
    stats = [None] * workers
    t0 = time.time()
    bar = tqdm(total=episodes, desc=f"{task.name} DAgger", unit="ep", dynamic_ncols=True, disable=not progress)

    def handle(w, kind, payload):
        if _bookkeeping(w, kind, payload, stats, "DAgger"):
            return
        kept[w].append(payload)
        bar.update(1)

    max_steps = min(max_steps or DAGGER_STEPS.get(task.name, task.max_episode_steps), task.max_episode_steps)
    jobs = [(task.name, str(ckpt), quotas[w], seed + 1000 * w, beta, noise, max_steps) for w in range(workers)]
    try:
        _run_workers(jobs, handle, target=_dagger_worker, start="spawn")
    finally:
        bar.close()
    eps = [ep for w in range(workers) for ep in kept[w]]
    if task.suite == "kitchen":  # D4RL layout: mask/<key> lists episode indices
        names = tasks.append_d4rl_hdf5(src, out, kitchen_d4rl_columns(eps), mask="dagger", base_mask="expert")
    else:
        names = tasks.append_robomimic_hdf5(src, out, eps, mask="dagger", base_mask="expert")
    successes = sum(s["successes"] for s in stats)
    return {"task": task.name, "ckpt": str(ckpt), "out": str(out), "episodes": len(eps), "beta": beta,
            "learner_success_rate": successes / max(len(eps), 1), "samples": int(sum(len(ep["actions"]) for ep in eps)),
            "first_demo": names[0] if names else None, "minutes": (time.time() - t0) / 60.0}


def _open_hdf5(path) -> h5py.File:
    """The file at `path` opened for reading, or a one-line tasks.TaskError."""
    path = Path(path)
    if not path.is_file():
        raise tasks.TaskError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise tasks.TaskError(f"{path}: not a readable hdf5 file ({str(e).splitlines()[0][:120]})")


def _recorded_env(f: h5py.File) -> str | None:
    """The robosuite env name in a robomimic file's data/env_args, None if it has none."""
    try:
        return json.loads(f["data"].attrs.get("env_args", "{}")).get("env_name") if "data" in f else None
    except (TypeError, ValueError, AttributeError):
        return None


def _task_from_env(path, env_name) -> str:
    if env_name not in ROBOSUITE_TASKS:
        raise tasks.TaskError(f"{path}: cannot tell the task from env_args (env_name {env_name!r}); "
                              f"pass --task ({', '.join(ROBOSUITE_TASKS.values())})")
    return ROBOSUITE_TASKS[env_name]


def check_oracle(path, task_name: str | None = None, episodes: int = 3, points: int = 4, budget: int | None = None,
                 seed: int = 0, noise: float = 0.05, progress: bool = True) -> dict:
    """Is the expert a usable DAgger oracle where the learner went? Its label at a state is only worth imitating if
    the expert can go on from there. For the last `episodes` episodes of the file's mask/dagger (all demos if it
    has none), at `points` evenly spaced steps of each, the stored sim state is set into a fresh env, a fresh expert
    (new parameter draws, action noise `noise`) runs for `budget` steps (default: the task's horizon), and whether
    it reaches success is counted. Returns {"task", "file", "tried", "recovered", "rate", "failed_phases": {phase
    the expert ended in: count}, "minutes"}; a bad file raises tasks.TaskError."""
    with _open_hdf5(path) as f:
        task_name = task_name or _task_from_env(path, _recorded_env(f))
        if not can_label(task_name):
            raise tasks.TaskError(f"--check-oracle needs a stateless expert; task {task_name} has none")
        if "data" not in f:
            raise tasks.TaskError(f"{path}: --check-oracle restores the sim states of a robomimic file "
                                  f"(data/demo_*/states); this one has none (D4RL layout)")
        names = ([n.decode() for n in f["mask/dagger"][:]] if "mask/dagger" in f else
                 tasks.demo_names(f["data"]) if "data" in f else [])
        if not names:
            raise tasks.TaskError(f"{path}: no episodes (data/demo_*) to start from")
        if any("states" not in f[f"data/{n}"] for n in names[-episodes:]):
            raise tasks.TaskError(f"{path}: episodes without data/<demo>/states (sim states) cannot be restored")
        starts = []
        for n in names[-episodes:]:
            states = np.asarray(f[f"data/{n}/states"])
            starts.extend(states[[len(states) * (k + 1) // (points + 1) for k in range(points)]])
    task = tasks.TASKS[task_name]
    budget = budget or task.max_episode_steps
    env = tasks.make_env(task, obs_mode="state", seed=seed)
    rng = np.random.default_rng(seed)
    recovered, failed, t0 = 0, {}, time.time()
    try:
        for state in tqdm(starts, desc=f"{task.name} oracle check", unit="start", disable=not progress):
            env.reset()
            env.sim_env.sim.set_state_from_flattened(state)
            env.sim_env.sim.forward()
            expert = EXPERTS[task.name](env.sim_env, rng, noise)
            ok = False
            for _ in range(budget):
                action = expert()
                if env.step(action)[4]["success"]:
                    ok = True
                    break
            recovered += ok
            if not ok:
                failed[expert.phase] = failed.get(expert.phase, 0) + 1
    finally:
        env.close()
    return {"task": task.name, "file": str(path), "tried": len(starts), "recovered": recovered,
            "rate": recovered / len(starts), "failed_phases": failed, "minutes": (time.time() - t0) / 60.0}


def make_missing(task_name, episodes, images, out) -> dict:
    """What pretrain.py calls when a task's default dataset is missing: say what is being made (and the command
    that makes it by hand), or refuse in one line (TaskError) when this task has no offline data maker."""
    if task_name not in RUNNERS:
        raise tasks.TaskError(f"no dataset for {task_name} at {out}: this task has no offline data maker yet; run "
                              f"with --download (needs internet) or pass --dataset PATH to a DPPO/robomimic/D4RL file")
    if task_name in TEACHERS:
        print(f"{out} is missing: training a PPO teacher and rolling out 200k transitions "
              f"(`python collect_demos.py --task {task_name}`; --demos does not apply)")
    else:
        print(f"{out} is missing: collecting {episodes} demos with collect_demos.py "
              f"(`python collect_demos.py --task {task_name} --episodes {episodes}{' --images' if images else ''}`)")
    return collect(task_name, episodes, images=images, out=out)


def collect(task_name, episodes=100, images=False, out=None, workers=2, seed=0, noise=None, labels=None,
            keep_failures=False, max_attempts=None, progress=True, **teacher_kwargs) -> dict:
    """Collect `episodes` successful scripted demos of `task_name` and write them to `out`. `noise`/`labels` left
    at None take the task's collection_defaults.

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
    default = collection_defaults(task_name)
    noise = default["noise"] if noise is None else noise
    labels = default["labels"] if labels is None else labels
    if labels not in LABELS:
        raise tasks.TaskError(f"--labels must be one of {', '.join(LABELS)}, got {labels!r}")
    task = tasks.TASKS[task_name]
    if task.suite == "kitchen" and (images or keep_failures):  # D4RL layout: no cameras, no success masks
        raise tasks.TaskError(f"task {task_name} writes state-only D4RL-layout data: drop --images/--keep-failures")
    out = out or str(tasks.default_dataset_path(task, "image" if images else "state"))
    workers = max(1, min(int(workers), episodes))
    max_attempts = max_attempts or 2 * episodes + 20
    quotas = _shares(episodes, workers)
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
        if _bookkeeping(w, kind, payload, stats, "collect"):
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

    jobs = [(task_name, quotas[w], caps[w], seed + 1000 * w, images, noise, labels, keep_failures)
            for w in range(workers)]
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
    made = {"seed": seed, "workers": workers, "action_noise": noise, "action_labels": LABELS[labels]}  # either layout
    if episodes_out and task.suite == "kitchen":  # D4RL layout, like the kitchen-*-v0 files tasks.py also reads
        meta = kitchen_metadata(task, made, {"episodes": len(episodes_out), "attempts": attempts})
        tasks.write_d4rl_hdf5(out, kitchen_d4rl_columns(episodes_out), meta)
    elif episodes_out:
        _write(out, episodes_out, env_args_for(task, images), keep_failures,
               {"expert": f"experts.{EXPERTS[task_name].__name__}", **made})
    minutes = (time.time() - t0) / 60.0
    return {
        "task": task_name,
        "out": out if episodes_out else None,
        "images": bool(images),
        "workers": workers,
        "seed": seed,
        "noise": noise,
        "labels": labels,
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


# ----------------------------------------------------------------------------- --check-data
ROBOSUITE_TASKS = {t.env_id: name for name, t in tasks.TASKS.items() if t.suite == "robosuite"}
CHECK_TOL = 1e-3  # metres / quaternion units: replay of the file's own sim states must reproduce its obs this closely


def _feature_slices(task) -> list:
    """[(name, slice into the object vector)] in task.object_features order."""
    out, start = [], 0
    for name, width in task.object_features:
        out.append((name, slice(start, start + width)))
        start += width
    return out


def check_data(path, task_name: str | None = None, demos: int = 3, tol: float = CHECK_TOL) -> dict:
    """Does a robomimic hdf5 file mean the same thing in our env? For the first `demos` demos, every stored sim
    state (data/demo_*/states) is set into our env (reset, set_state_from_flattened, forward) and our observation
    (tasks.OBS_LAYOUT, RobosuiteEnv.layout_obs) is compared with the file's stored obs/<key>.

    Returns {"task", "file_layout", "demos", "steps", "diff": {key: per-dim max |ours - file|}, "bad": {key:
    [dims > tol]}, "legacy": file's object = ours in robosuite 1.5's order, "moved": [(feature, file dims)],
    "fits", "verdict"}. Problems with the file itself raise tasks.TaskError (one line)."""
    path = Path(path)
    with _open_hdf5(path) as f:
        names = tasks.demo_names(f["data"]) if "data" in f else []
        if not names:
            raise tasks.TaskError(f"{path}: not a robomimic file (no data/demo_*)")
        env_name = _recorded_env(f)
        task_name = task_name or _task_from_env(path, env_name)
        task = tasks.get_task(task_name)
        if task.suite != "robosuite":
            raise tasks.TaskError(f"--check-data replays robosuite sim states; task {task.name} is not a robosuite task")
        if env_name is not None and env_name != task.env_id:
            raise tasks.TaskError(f"{path}: recorded in {env_name}, but task {task.name} is {task.env_id}")
        file_layout = tasks.robomimic_file_layout(f)
        keys = list(task.proprio_keys) + ["object"]
        stored, states, used = {k: [] for k in keys}, [], names[:max(1, demos)]
        for name in used:
            g = f[f"data/{name}"]
            obs = g["obs"] if "obs" in g else {}
            okey = "object" if "object" in obs else task.object_key
            missing = [k for k in keys[:-1] if k not in obs] + ([] if okey in obs else ["object"])
            if "states" not in g or missing:
                raise tasks.TaskError(f"{path}: data/{name} lacks " + ", ".join(
                    (["states"] if "states" not in g else []) + [f"obs/{k}" for k in missing]))
            states.append(np.asarray(g["states"], dtype=np.float64))
            for k in keys:
                stored[k].append(np.asarray(obs[okey if k == "object" else k], dtype=np.float64).reshape(len(states[-1]), -1))
    env = tasks.make_env(task, "state", seed=0)
    try:
        env.reset()
        sim = env.sim_env.sim
        size = len(sim.get_state().flatten())
        ours = {k: [] for k in keys}
        for name, st in zip(used, states):
            if st.ndim != 2 or st.shape[1] != size:
                raise tasks.TaskError(f"{path}: data/{name}/states have shape {st.shape}, our {task.env_id} sim state "
                                      f"has {size} values (another robosuite/model version?); cannot replay")
            for state in st:
                sim.set_state_from_flattened(state)
                sim.forward()
                values = env.layout_obs(with_object=True)
                for k in keys:
                    ours[k].append(values[k])
    finally:
        env.close()
    ours = {k: np.stack(v) for k, v in ours.items()}
    stored = {k: np.concatenate(v) for k, v in stored.items()}
    diff, bad = {}, {}
    for k in keys:
        if stored[k].shape != ours[k].shape:
            raise tasks.TaskError(f"{path}: obs/{k} has {stored[k].shape[1]} dims per step, our {k} has {ours[k].shape[1]}")
        diff[k] = np.abs(ours[k] - stored[k]).max(0)
        if (diff[k] > tol).any():
            bad[k] = np.flatnonzero(diff[k] > tol).tolist()
    legacy, moved = False, []

    def close(a, b):  # a known rearrangement: judged by the median over steps, so that files whose values lag
        # a little (robosuite 1.5's observable caches) or flip a quaternion's sign at a few steps still match
        return bool(np.median(np.abs(a - b), axis=0).max() <= 10 * tol)

    if "object" in bad:
        legacy = close(tasks.legacy_object_state(ours["object"], task), stored["object"])
        width = stored["object"].shape[1]
        for name, sl in _feature_slices(task):
            if diff["object"][sl].max() <= tol:
                continue
            w = sl.stop - sl.start
            for j in range(width - w + 1):
                for sign in (1, -1):
                    if close(sign * ours["object"][:, sl], stored["object"][:, j:j + w]):
                        moved.append((name, f"{'-' if sign < 0 else ''}object[{j}:{j + w}]"))
    steps = len(ours["object"])
    if not bad:
        verdict = (f"fits: {steps} stored states of {len(used)} demo(s) reproduce obs/{', obs/'.join(keys)} within "
                   f"{tol:g} (max {max(d.max() for d in diff.values()):.2g}); our layout {tasks.OBS_LAYOUT}, "
                   f"file {file_layout or 'unmarked'}")
    else:
        parts = [f"{k}{_dims(bad[k])} (max {diff[k].max():.3g})" for k in keys if k in bad]
        verdict = f"does not fit: {', '.join(parts)} differ beyond {tol:g}"
        if legacy:
            verdict += (f"; obs/object matches our object rearranged into robosuite 1.5's object-state order "
                        f"({tasks.LEGACY_OBS_LAYOUT}: this project's files before the v1.4.1 layout, robomimic *_v15 files)")
        elif moved:
            verdict += "; found elsewhere in the file's object: " + ", ".join(f"{n} at {w}" for n, w in moved)
    return {"task": task.name, "file_layout": file_layout, "demos": used, "steps": steps, "diff": diff,
            "bad": bad, "legacy": legacy, "moved": moved, "fits": not bad, "tol": tol, "verdict": verdict}


def _dims(dims: list) -> str:
    """[0, 1, 2, 7] -> "[0-2,7]"."""
    runs, start = [], None
    for i, d in enumerate(dims):
        if start is None:
            start = d
        if i + 1 == len(dims) or dims[i + 1] != d + 1:
            runs.append(f"{start}" if start == d else f"{start}-{d}")
            start = None
    return "[" + ",".join(runs) + "]"


def print_check(path, report: dict) -> None:
    task = tasks.TASKS[report["task"]]
    print(f"{path}: task {task.name} ({task.env_id}), {report['steps']} states from {', '.join(report['demos'])}; "
          f"max |ours - file| per dimension:")
    rows = [(k, slice(0, len(report["diff"][k])), "") for k in task.proprio_keys]
    rows += [(f"object[{sl.start}:{sl.stop}]", sl, name) for name, sl in _feature_slices(task)]
    for label, sl, name in rows:
        d = report["diff"]["object" if label.startswith("object[") else label][sl]
        flag = "  <-- differs" if (d > report["tol"]).any() else ""
        print(f"  {label:<20} {name:<23} " + " ".join(f"{x:.1e}" for x in d) + flag)
    print(report["verdict"])


def run_dagger_cli(args) -> int:
    """--dagger CKPT: one DAgger round by hand (pretrain.py --dagger-rounds runs them inside training)."""
    import models
    try:
        ckpt = models.load_checkpoint(args.dagger)
        if ckpt.get("stage", "pretrain") != "pretrain" or ckpt.get("obs_mode", "state") != "state":
            raise tasks.TaskError(f"--dagger {args.dagger}: expected a state-observation pretrain checkpoint")
        tasks.check_layout(ckpt, ckpt["task"], args.dagger)
        if args.task is not None and args.task != ckpt["task"]:
            raise tasks.TaskError(f"--task {args.task} but checkpoint {args.dagger} is a {ckpt['task']} policy")
        src = args.dataset or ckpt.get("dataset")
        if not src:
            raise tasks.TaskError(f"--dagger {args.dagger}: the checkpoint names no dataset; pass --dataset FILE")
        out = args.out or str(Path(src).with_name(Path(src).stem + "_dagger.hdf5"))
        if args.out is None and Path(out).exists():
            src = out                          # later rounds accumulate in the same file
        s = dagger(ckpt["task"], args.dagger, src, out, args.episodes, args.beta, workers=args.workers,
                   seed=10_000 + args.seed)
    except (ValueError, FileNotFoundError, tasks.TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['task']}: {s['episodes']} DAgger episodes of {s['ckpt']} (policy success "
          f"{100 * s['learner_success_rate']:.0f}%), +{s['samples']} labelled states, {s['minutes']:.1f} min -> {s['out']} "
          f"(train with or without them: --filter-key expert)")
    print(json.dumps(s))
    return 0


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(RUNNERS), default=None,
                   help="task to collect demos for (with --check-data: default from the file's env_args)")
    p.add_argument("--check-data", metavar="FILE", default=None,
                   help="replay a robomimic hdf5's stored sim states in our env and compare its stored obs with ours "
                        "(exit 0: fits, 1: does not fit, 2: bad file)")
    p.add_argument("--check-oracle", metavar="FILE", default=None,
                   help="from states in the file's DAgger episodes (mask/dagger; else its demos), run the expert and "
                        "count how often it still succeeds: is it a usable DAgger oracle where the learner went?")
    p.add_argument("--demos", type=cli.positive_int, default=3, help="--check-data: how many demos to replay; --check-oracle: how many (last) episodes to start from (default 3)")
    p.add_argument("--points", type=cli.positive_int, default=4, help="--check-oracle: evenly spaced start states per episode (default 4)")
    p.add_argument("--tol", type=cli.positive_float, default=CHECK_TOL, help=f"--check-data: tolerance (default {CHECK_TOL:g})")
    p.add_argument("--episodes", type=cli.positive_int, default=100,
                   help="number of successful demos wanted (arm tasks; locomotion uses --transitions)")
    p.add_argument("--images", action="store_true", help="also record 96x96 camera images of the task's cameras")
    p.add_argument("--out", type=cli.out_file, default=None, help="output hdf5 path (default: the task's default_dataset, *_img.hdf5 with --images)")
    p.add_argument("--workers", type=cli.positive_int, default=2, help="parallel collection processes (one per core)")
    p.add_argument("--seed", type=int, default=0, help="base seed; worker w uses seed + 1000*w")
    per_task = ", ".join(f"{k} {v['noise']:g}" for k, v in COLLECTION.items())
    p.add_argument("--noise", type=cli.nonneg_float, default=None,
                   help=f"std of Gaussian action noise (x0.3 on rotation); default {DEFAULT_COLLECTION['noise']:g}, "
                        f"{per_task}; --check-oracle: {DEFAULT_COLLECTION['noise']:g}")
    p.add_argument("--labels", choices=sorted(LABELS), default=None,
                   help="record the executed (noisy) action, as a human demo would, or the expert's clean action at "
                        f"the visited state (DART); default {DEFAULT_COLLECTION['labels']}, clean for "
                        + ", ".join(k for k, v in COLLECTION.items() if v["labels"] == "clean"))
    p.add_argument("--keep-failures", action="store_true", help="also write failed episodes")
    g = p.add_argument_group("DAgger: recovery data where a trained policy goes (robosuite tasks with a stateless expert)")
    g.add_argument("--dagger", metavar="CKPT", default=None,
                   help="roll out this pretrain checkpoint's policy for --episodes episodes, label every visited state with "
                        "the expert's clean action, and write the dataset plus those episodes (mask/dagger; the originals "
                        "in mask/expert) to --out")
    g.add_argument("--dataset", default=None, help="--dagger: the dataset to extend (default: the one the checkpoint trained on)")
    g.add_argument("--beta", type=cli.probability, default=0.5, help="--dagger: probability that a chunk is the expert's own instead of the policy's")
    p.add_argument("--max-attempts", type=cli.positive_int, default=None, help="cap on attempts (default 2*episodes+20)")
    g = p.add_argument_group(f"locomotion teacher ({', '.join(TEACHERS)})")
    g.add_argument("--transitions", type=cli.positive_int, default=200_000, help="transitions in the dataset (default 200000)")
    g.add_argument("--teacher-steps", type=cli.positive_int, default=None,
                   help="max PPO env steps (default per task: " + ", ".join(f"{k} {v.max_steps}" for k, v in TEACHERS.items())
                   + "); training stops at the first checkpoint within 10%% of the target")
    g.add_argument("--ckpt-every", type=cli.positive_int, default=25_000, help="env steps between teacher checkpoints")
    g.add_argument("--target-return", type=cli.finite_float, default=None,
                   help="stochastic return to aim for (default: " + ", ".join(f"{k} {v.target:.0f}" for k, v in TEACHERS.items()) + ")")
    g.add_argument("--eval-episodes", type=cli.positive_int, default=10, help="stochastic episodes that score a checkpoint")
    g.add_argument("--teacher-dir", default=None, help="checkpoint folder (default runs/teacher/<task>_seed<seed>)")
    g.add_argument("--teacher", default=None, help="use this teacher checkpoint (.pt) instead of training one")
    args = p.parse_args()
    if args.check_data:
        try:
            report = check_data(args.check_data, args.task, args.demos, args.tol)
        except tasks.TaskError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        print_check(args.check_data, report)
        raise SystemExit(0 if report["fits"] else 1)
    if args.check_oracle:
        try:
            r = check_oracle(args.check_oracle, args.task, args.demos, args.points, seed=args.seed,
                             noise=DEFAULT_COLLECTION["noise"] if args.noise is None else args.noise)
        except tasks.TaskError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        print(f"{r['file']}: the {r['task']} expert succeeded from {r['recovered']}/{r['tried']} states "
              f"({100 * r['rate']:.0f}%) in {r['minutes']:.1f} min; failures ended in {r['failed_phases'] or 'none'}")
        print(json.dumps(r))
        raise SystemExit(0)
    if args.dagger:
        raise SystemExit(run_dagger_cli(args))
    if args.task is None:
        p.error("--task is required (unless --check-data FILE, --check-oracle FILE or --dagger CKPT)")
    teacher_kwargs = {}
    if args.task in TEACHERS:
        teacher_kwargs = dict(transitions=args.transitions, teacher_steps=args.teacher_steps, ckpt_every=args.ckpt_every,
                              target_return=args.target_return, eval_episodes=args.eval_episodes,
                              teacher_dir=args.teacher_dir, teacher=args.teacher)
    try:
        s = collect(args.task, args.episodes, images=args.images, out=args.out, workers=args.workers,
                    seed=args.seed, noise=args.noise, labels=args.labels, keep_failures=args.keep_failures,
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
          f"length {s['mean_length']:.1f} [{s['min_length']}-{s['max_length']}], noise {s['noise']:g}, {s['labels']} "
          f"labels, {s['minutes']:.2f} min ({s['episodes_per_minute']:.1f} ep/min), "
          f"{s['file_size_mb']:.1f} MB -> {s['out']}")
    print(json.dumps(s))
    if s["successes"] < args.episodes:
        raise SystemExit(f"only {s['successes']} of {args.episodes} wanted successful demos after {s['attempts']} attempts")


if __name__ == "__main__":
    main()
