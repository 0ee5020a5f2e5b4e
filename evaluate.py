"""Evaluate a DMPO checkpoint: success rate (95% CI), return, episode length and policy latency.

    python evaluate.py --ckpt runs/lift/latest.pt                     # one-step policy, 100 episodes
    python evaluate.py --ckpt runs/lift/latest.pt --inference-steps 1 2 4 8 16 32 --video

The checkpoint carries its task, observation mode, config and normalization, so nothing else is needed.
`evaluate_policy` is also what pretrain.py and finetune.py call, so in-training and standalone numbers
come from one piece of code. Protocol: env i of the vector starts from seed `--seed + i`; every step count
replays exactly the same initial states and the same policy noise, so two runs print identical numbers.
An episode succeeds if the task's success check fired at any step; by default it then ends (the success
definition is unchanged by this; only returns and lengths are, see tasks.py / DPPO issue #32).
"""
import csv
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import cli
import models
import tasks


def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval for a binomial proportion (sane at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)   # exact ends, no round-off


def run_episodes(policy, env, episodes, steps, seed, desc=None, act_steps=None):
    """Roll `policy` with K=`steps` in a ChunkVecEnv until every env has finished its share of `episodes`, executing
    the first `act_steps` actions of each chunk before re-planning (None: the whole chunk, as the reference does).
    Each env contributes the first ceil(episodes / n_envs) episodes it finishes (then the list is cut to
    `episodes` in env order), so short (successful) episodes cannot crowd out long ones."""
    n = env.n_envs
    quota = math.ceil(episodes / n)
    per_env = [[] for _ in range(n)]
    torch.manual_seed(seed)                 # same policy noise for every step count and every run
    obs = env.reset(seed=seed)
    call_ms = []
    bar = tqdm(total=quota * n, desc=desc, leave=False, disable=desc is None)
    while min(len(e) for e in per_env) < quota:
        t0 = time.perf_counter()
        chunks = policy.act(obs, steps=steps)
        call_ms.append(1000 * (time.perf_counter() - t0))
        obs, _, _, info = env.step(chunks[:, :act_steps])
        for ep in info["episodes"]:
            if len(per_env[ep["env"]]) < quota:
                per_env[ep["env"]].append(ep)
                bar.update(1)
    bar.close()
    eps = [ep for i in range(quota) for e in per_env if i < len(e) for ep in [e[i]]][:episodes]
    return eps, call_ms


def evaluate_policy(policy, task, obs_mode, episodes=100, steps_list=(1,), n_envs=10, seed=100_000,
                    max_episode_steps=None, terminate_on_success=True, progress=True, workers=1, act_steps=None):
    """Evaluate for each K in steps_list on the same episodes; returns one dict per K. act_steps: actions executed
    per chunk before re-planning (None = all Ta; deploy_franka.py --act-steps runs the same on the robot)."""
    task = tasks.get_task(task)
    if act_steps is not None and not 1 <= act_steps <= task.chunk:
        raise ValueError(f"--act-steps {act_steps}: expected 1..{task.chunk} (the chunk length of {task.name})")
    n_envs = max(1, min(n_envs, episodes))
    env = tasks.ChunkVecEnv(task, obs_mode, n_envs, seed, terminate_on_success, max_episode_steps, workers,
                            obs_steps=policy.cfg.obs_steps)
    was_training = policy.training
    policy.eval()
    rows = []
    try:
        for k in steps_list:
            t0 = time.time()
            with torch.random.fork_rng():   # seed the policy noise without resetting the caller's training RNG
                eps, call_ms = run_episodes(policy, env, episodes, k, seed, f"eval K={k}" if progress else None,
                                            act_steps)
            succ = sum(e["success"] for e in eps)
            lo, hi = wilson_interval(succ, len(eps))
            returns = np.array([e["return"] for e in eps])
            rows.append({"task": task.name, "obs_mode": obs_mode, "steps": k, "act_steps": act_steps or task.chunk,
                         "episodes": len(eps),
                         "seed": seed, "n_envs": n_envs, "success_rate": succ / len(eps), "ci_low": lo,
                         "ci_high": hi, "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                         "length_mean": float(np.mean([e["length"] for e in eps])),
                         "policy_ms": float(np.median(call_ms)),
                         "policy_ms_per_obs": float(np.median(call_ms)) / n_envs,
                         "wall_s": time.time() - t0})
    finally:
        env.close()
        policy.train(was_training)
    return rows


def eval_columns(row):
    """An evaluate_policy row as the eval_* columns of the pretrain and finetune logs."""
    return {f"eval_{k}": row[k] for k in ("episodes", "success_rate", "ci_low", "ci_high", "return_mean", "length_mean")}


def record_video(policy, task, obs_mode, path, episodes=2, steps=1, seed=100_000, max_episode_steps=None, act_steps=None):
    """Write the first `episodes` episodes of env 0 as one mp4 (gif if the name ends in .gif)."""
    import imageio
    env = tasks.make_env(task, obs_mode, seed, terminate_on_success=True, render_video=True,
                         max_episode_steps=max_episode_steps)
    frames = []
    hist = tasks.ObsHistory(policy.cfg.obs_steps)
    torch.manual_seed(seed)
    policy.eval()
    try:
        for ep in range(episodes):
            obs, done = hist.reset(env.reset(seed + ep)), False
            while not done:
                for action in policy.act(obs, steps=steps)[:act_steps]:
                    obs, _, term, trunc, _ = env.step(action)
                    obs = hist.push(obs)
                    frames.append(env.render())
                    done = term or trunc
                    if done:
                        break
    finally:
        env.close()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    imageio.mimsave(path, frames, fps=20)
    return path


def embedding_report(policy, task, path, size=1024):
    """Collapse statistics (models.embedding_stats) of the policy's observation embeddings on a fixed sample of a
    dataset's observations (a held-out file shows how the encoder treats observations it never trained on)."""
    data = tasks.load_dataset(path, task, policy.cfg.obs_mode)
    states, images = data.probe(size, obs_steps=policy.cfg.obs_steps)
    dev = policy.state_min.device
    stats = policy.embedding_stats(policy.normalize_state(torch.as_tensor(states, dtype=torch.float32, device=dev)),
                                   None if images is None else torch.as_tensor(images, device=dev))
    return {"emb_n": len(states), **{f"emb_{k}": v for k, v in stats.items()}}


def write_csv(path, rows):
    """Append rows to a CSV (header written once); columns are the union in first-seen order."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path) as f:
            old_cols = next(csv.reader(f), [])
        if old_cols != cols:    # a different protocol: do not mix columns in one file
            raise ValueError(f"{path} has columns {old_cols}, these rows have {cols}; choose another --csv")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        w.writerows(rows)


def format_table(rows):
    lines = ["| K | episodes | success | 95% CI | return | length | policy ms/call |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['episodes']} | {100 * r['success_rate']:.1f}% | "
                     f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] | {r['return_mean']:.2f} | "
                     f"{r['length_mean']:.1f} | {r['policy_ms']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by pretrain.py or finetune.py")
    p.add_argument("--episodes", type=cli.nonneg_int, default=100, help="episodes per step count (0: no rollouts, e.g. with --embedding-data)")
    p.add_argument("--embedding-data", default=None, help="also report the collapse statistics of the policy's observation embeddings on this dataset (robomimic/D4RL hdf5, DPPO npz)")
    p.add_argument("--probe-size", type=cli.positive_int, default=1024, help="observations of --embedding-data used")
    p.add_argument("--inference-steps", type=cli.positive_int, nargs="+", default=[1], help="step count(s) K to evaluate")
    p.add_argument("--act-steps", type=cli.positive_int, default=None, help="actions executed per chunk before re-planning (default: the whole chunk; as deploy_franka.py --act-steps)")
    p.add_argument("--n-envs", type=cli.positive_int, default=10, help="environments stepped in one vector")
    p.add_argument("--env-workers", type=cli.positive_int, default=1, help="subprocesses the envs are split over (same numbers; robosuite gains on free cores)")
    p.add_argument("--seed", type=int, default=100_000, help="env i starts from seed + i; also seeds policy noise")
    p.add_argument("--max-episode-steps", type=cli.positive_int, default=None, help="env steps per episode (default: task table)")
    p.add_argument("--no-terminate-on-success", action="store_true", help="keep running after success")
    p.add_argument("--use-model", action="store_true", help="evaluate the raw weights instead of the EMA weights")
    p.add_argument("--device", type=cli.device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--csv", type=cli.out_file, default=None, help="CSV to append to (default: <ckpt dir>/eval.csv)")
    p.add_argument("--video", action="store_true", help="also write <ckpt dir>/video_K<k>.mp4 of two episodes")
    p.add_argument("--task", default=None, choices=sorted(tasks.TASKS), help="override the task stored in the checkpoint")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = models.resolve_device(args.device)
        policy, ckpt = models.load_policy(args.ckpt, device, use_ema=not args.use_model)
        task = args.task or ckpt.get("task")
        if task is None:
            raise ValueError(f"{args.ckpt} names no task; pass --task")
        if args.episodes == 0 and not args.embedding_data:
            raise ValueError("--episodes 0 runs no rollouts: it needs --embedding-data FILE (nothing to report otherwise)")
        task = tasks.get_task(task)
        tasks.check_layout(ckpt, task, args.ckpt)
        obs_mode = policy.cfg.obs_mode
        cli.policy_fits_task(policy.cfg, task, tasks.obs_dims(task, obs_mode)[0],
                             f"{args.ckpt} (trained for {ckpt.get('task', 'an unnamed task')})")
        emb = embedding_report(policy, task, args.embedding_data, args.probe_size) if args.embedding_data else {}
        rows = []
        if args.episodes > 0:
            rows = evaluate_policy(policy, task, obs_mode, args.episodes, args.inference_steps, args.n_envs,
                                   args.seed, args.max_episode_steps, not args.no_terminate_on_success,
                                   workers=args.env_workers, act_steps=args.act_steps)
    except (ValueError, FileNotFoundError, tasks.TaskError) as e:
        sys.exit(f"error: {e}")
    if emb:
        print(f"{args.ckpt}: embeddings ({policy.encoder.out_dim}-D) of {emb['emb_n']} observations of "
              f"{args.embedding_data}: effective rank {emb['emb_eff_rank']:.2f}, nearest-neighbour / mean pairwise "
              f"distance {emb['emb_nn_ratio']:.3f}, mean norm {emb['emb_norm']:.3f}")
    if not rows:
        return [emb]
    for r in rows:
        r.update(ckpt=args.ckpt, ckpt_step=ckpt["step"], weights="model" if args.use_model else "ema",
                 loss=policy.cfg.loss, alpha_disp=policy.cfg.alpha_disp, device=str(device),
                 threads=torch.get_num_threads(), **emb)
    out = args.csv or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.csv")
    write_csv(out, rows)
    print(f"{args.ckpt} (step {ckpt['step']}, {rows[0]['task']}, {obs_mode}, {policy.cfg.loss}, "
          f"alpha_disp={policy.cfg.alpha_disp}): {args.episodes} episodes per K, seeds {args.seed}..{args.seed + rows[0]['n_envs'] - 1}, "
          f"{rows[0]['n_envs']} envs, {'EMA' if not args.use_model else 'raw'} weights, device {device}, "
          f"{rows[0]['act_steps']} of {task.chunk} actions executed per chunk")
    print(format_table(rows))
    print(f"wrote {out}")
    if args.video:
        for k in args.inference_steps:
            path = record_video(policy, task, obs_mode, os.path.join(os.path.dirname(out), f"video_K{k}.mp4"),
                                steps=k, seed=args.seed, max_episode_steps=args.max_episode_steps,
                                act_steps=args.act_steps)
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
