"""Pretrain a DMPO policy: MeanFlow (one-step) + dispersive regularization, by behaviour cloning on demos.

    python pretrain.py --task lift                          # makes scripted demos if missing, trains, evaluates
    python pretrain.py --task transport --alpha-disp 0.9    # needs a transport dataset (see --download)
    python pretrain.py --task lift --resume                 # continue the same run (CSV, step, optimizer, EMA)

Loop: sample (observation, action chunk) pairs that never cross an episode end -> normalize with the
data's min/max (stored in the policy) -> MeanFlow loss + alpha_disp * dispersive loss -> AdamW with a
warm-up + cosine learning rate -> EMA of the weights (what evaluation and fine-tuning use).
"""
import argparse
import copy
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import evaluate
import models
import tasks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="lift", choices=sorted(tasks.TASKS), help="task from the table in tasks.py")
    p.add_argument("--obs", default="state", choices=["state", "image"], help="low-dim state or camera images + proprio")
    p.add_argument("--dataset", default=None, help="robomimic/D4RL hdf5 or DPPO train.npz (default: the task's own demos)")
    p.add_argument("--download", action="store_true", help="fetch the task's DMPO dataset into data/ and train on it")
    p.add_argument("--filter-key", default=None, help="robomimic hdf5 only: train on the demos listed in mask/<KEY> (e.g. better, clean)")
    p.add_argument("--demos", type=int, default=None, help="scripted demos to collect when the default dataset is missing (default 100; 200 kitchen)")
    p.add_argument("--loss", default=None, choices=list(models.LOSSES), help="meanflow, improved MeanFlow (imf), or flow matching (ReFlow baseline); default meanflow, imf for gym (as the reference)")
    p.add_argument("--alpha-disp", type=float, default=0.5, help="weight of the dispersive loss (0 = plain MeanFlow)")
    p.add_argument("--disp-loss", default="infonce_l2", choices=list(models.DISP_LOSSES), help="dispersive loss variant")
    p.add_argument("--disp-temp", type=float, default=0.5, help="dispersive loss temperature")
    p.add_argument("--flow-ratio", type=float, default=0.5, help="fraction of each batch trained with r = t")
    p.add_argument("--steps", type=int, default=None, help="gradient steps (default: 30000 state, 100000 image)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 256 robomimic, 128 gym)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 robomimic, 1e-3 gym)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay per EMA update")
    p.add_argument("--ema-every", type=int, default=10, help="gradient steps between EMA updates")
    p.add_argument("--ema-start", type=int, default=1000, help="EMA copies the weights until this step")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--hidden-dim", type=int, default=None, help="velocity head width (default: 768 image, 512 state)")
    p.add_argument("--cond-dims", type=int, nargs="+", default=None, help="state encoder MLP widths (default: task-specific)")
    p.add_argument("--no-augment", action="store_true", help="disable random-shift image augmentation")
    p.add_argument("--inference-steps", type=int, default=1, help="K used by act() and the in-training evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed for torch/numpy")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<task>_<obs>_<loss>_a<alpha>_s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest.pt")
    p.add_argument("--log-every", type=int, default=100, help="steps between CSV rows")
    p.add_argument("--save-every", type=int, default=2000, help="steps between checkpoints (latest.pt + step_N.pt)")
    p.add_argument("--max-minutes", type=float, default=0, help="also stop (save, evaluate) once the run's wall time, resumes included, exceeds this; 0 = off")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations during training (0 = only at the end)")
    p.add_argument("--eval-episodes", type=int, default=50, help="episodes per evaluation (0 disables evaluation)")
    p.add_argument("--eval-envs", type=int, default=10, help="environments per evaluation vector")
    return p.parse_args(argv)


def task_defaults(task, obs):
    """Reference hyperparameters (method.md sections 1-2): robomimic MeanFlow, lr 1e-4, batch 256; Gym improved
    MeanFlow (the released Gym checkpoints use iMF), lr 1e-3, batch 128;
    state encoders [obs, 64, 16] for hopper/walker2d, [obs, 128, 32] for the larger state spaces;
    Kitchen like Gym but batch 64, MLP [256]x3 and encoder [obs, 32, 16] (167k parameters)."""
    kitchen = task.suite == "kitchen"
    gym = task.suite == "gym" or kitchen
    return {
        "loss": "imf" if gym else "meanflow",
        "steps": 100_000 if obs == "image" else 30_000,
        "batch_size": 64 if kitchen else (128 if gym else 256),
        "lr": 1e-3 if gym else 1e-4,
        "hidden_dim": 256 if kitchen else (768 if obs == "image" or task.name == "humanoid" else 512),
        "cond_dims": [32, 16] if kitchen else ([64, 16] if task.name in ("hopper", "walker2d") else [128, 32]),
        "demos": 200 if kitchen else 100,
    }


def find_dataset(args, task):
    """The dataset path to train on; makes the scripted demos when the task's default dataset is missing."""
    if args.download:
        return str(tasks.download_dataset(task, obs_mode=args.obs))
    if args.dataset:
        return args.dataset
    path = tasks.default_dataset_path(task, args.obs)
    if path.exists():
        return str(path)
    downloaded = tasks.downloaded_path(task, args.obs)
    if downloaded.exists():
        return str(downloaded)
    import collect_demos
    if task.name not in collect_demos.RUNNERS:
        raise tasks.TaskError(f"no dataset for {task.name} at {path}: this task has no offline data maker yet; "
                              f"run with --download (needs internet) or pass --dataset PATH to a DPPO/robomimic/D4RL file")
    if task.name in collect_demos.TEACHERS:
        print(f"{path} is missing: training a PPO teacher and rolling out 200k transitions "
              f"(`python collect_demos.py --task {task.name}`; --demos does not apply)")
    else:
        print(f"{path} is missing: collecting {args.demos} demos with collect_demos.py "
              f"(`python collect_demos.py --task {task.name} --episodes {args.demos}{' --images' if args.obs == 'image' else ''}`)")
    collect_demos.collect(task.name, args.demos, images=args.obs == "image", out=str(path))
    return str(path)


def lr_at(step, args):
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


CSV_COLS = ["step", "loss_total", "loss_flow", "loss_disp", "lr", "grad_norm", "wall_s", "samples_per_s",
            "eval_steps", "eval_episodes", "success_rate", "ci_low", "ci_high", "return_mean", "length_mean"]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        task = tasks.get_task(args.task)
        device = models.resolve_device(args.device)
        for key, val in task_defaults(task, args.obs).items():
            if getattr(args, key) is None:
                setattr(args, key, val)
        if min(args.steps, args.batch_size, args.log_every, args.save_every) < 1:
            raise ValueError("--steps, --batch-size, --log-every and --save-every must be >= 1")
        out = Path(args.out or f"runs/{task.name}_{args.obs}_{args.loss}_a{args.alpha_disp:g}_s{args.seed}")
        latest = out / "latest.pt"
        if latest.exists() and not args.resume:
            raise ValueError(f"{latest} exists: pass --resume to continue it or --out to start a new run")
        if args.resume and not latest.exists():
            raise ValueError(f"--resume: {latest} does not exist")
        dataset_path = find_dataset(args, task)
        data = tasks.load_dataset(dataset_path, task, args.obs, filter_key=args.filter_key)
    except (ValueError, tasks.TaskError) as e:
        sys.exit(f"error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    # --- the policy, its normalization (from the data) and its EMA copy -----------------------------------
    state_dim, n_cams = tasks.obs_dims(task, args.obs)
    cfg = models.PolicyConfig(state_dim=state_dim, act_dim=task.act_dim, chunk=task.chunk, obs_mode=args.obs,
                              n_cameras=max(n_cams, 1), augment=not args.no_augment, cond_mlp_dims=tuple(args.cond_dims),
                              hidden_dim=args.hidden_dim, loss=args.loss, flow_ratio=args.flow_ratio,
                              alpha_disp=args.alpha_disp, disp_loss=args.disp_loss, disp_temp=args.disp_temp,
                              inference_steps=args.inference_steps)
    policy = models.make_policy(cfg, device)
    stats = tasks.normalization_stats(data)
    policy.set_normalization(**stats)
    ema = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if args.resume:
        policy_r, ckpt = models.load_policy(str(latest), device, use_ema=False)
        if policy_r.cfg != cfg:
            sys.exit(f"error: --resume: {latest} was trained with a different config; use the same flags or a new --out")
        policy.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        print(f"resumed {latest} at step {step}")

    # --- the data, normalized once and kept on the device --------------------------------------------------
    states = policy.normalize_state(torch.as_tensor(data.states, device=device))
    actions = policy.normalize_action(torch.as_tensor(data.actions, device=device)).clamp(-1, 1)
    images = torch.as_tensor(data.images, device=device) if args.obs == "image" else None
    starts = torch.as_tensor(tasks.chunk_starts(data, task.chunk), device=device)
    offsets = torch.arange(task.chunk, device=device)
    print(f"{task.name} ({args.obs}): {len(data.episode_lengths)} episodes, {len(data)} steps, {len(starts)} chunks "
          f"from {dataset_path}; policy {models.count_params(policy) / 1e6:.2f}M params on {device}; run dir {out}")

    def save(path):
        models.save_checkpoint(str(path), policy, ema, step, extra={
            "task": task.name, "obs_mode": args.obs, "dataset": str(dataset_path), "args": vars(args),
            "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "wall_s": time.time() - wall0})

    def run_eval():
        rows = evaluate.evaluate_policy(ema, task, args.obs, args.eval_episodes, (args.inference_steps,),
                                        args.eval_envs, progress=False)
        r = rows[0]
        return {"eval_steps": r["steps"], "eval_episodes": r["episodes"], "success_rate": r["success_rate"],
                "ci_low": r["ci_low"], "ci_high": r["ci_high"], "return_mean": r["return_mean"],
                "length_mean": r["length_mean"]}

    csv_path = out / "log.csv"
    if not args.resume:
        with open(csv_path, "w", newline="") as f:
            csv.DictWriter(f, CSV_COLS).writeheader()
    wall0 = time.time() - (ckpt.get("wall_s", 0.0) if args.resume else 0.0)
    bar = tqdm(total=args.steps, initial=step, desc=f"pretrain {task.name}", dynamic_ncols=True)
    acc = {"loss_total": 0.0, "loss_flow": 0.0, "loss_disp": 0.0, "grad_norm": 0.0, "n": 0}
    t_log = time.time()
    policy.train()
    while step < args.steps:
        # --- one gradient step on a random batch of (observation, action chunk) ---
        idx = starts[torch.randint(len(starts), (args.batch_size,), device=device)]
        rgb = images[idx] if images is not None else None
        total, info = policy.loss(states[idx], actions[idx[:, None] + offsets], rgb)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        step += 1
        if step % args.ema_every == 0:   # EMA every 10 steps with 0.995 (reference); plain copy before ema_start
            models.ema_update(ema, policy, args.ema_decay if step >= args.ema_start else 0.0)
        for k, v in (("loss_total", total.detach()), ("loss_flow", info["loss_flow"]), ("loss_disp", info["loss_disp"]), ("grad_norm", gn)):
            acc[k] += float(v)
        acc["n"] += 1
        bar.update(1)

        # --- logging, evaluation, checkpoints ---
        # --max-minutes ends the run early (the cosine schedule still spans --steps, so lr is not at its floor)
        last = step == args.steps or (args.max_minutes > 0 and time.time() - wall0 > 60 * args.max_minutes)
        if step % args.log_every == 0 or last:
            row = {k: acc[k] / acc["n"] for k in ("loss_total", "loss_flow", "loss_disp", "grad_norm")}
            row.update(step=step, lr=lr_at(step - 1, args), wall_s=round(time.time() - wall0, 1),
                       samples_per_s=round(acc["n"] * args.batch_size / (time.time() - t_log), 1))
            if args.eval_episodes > 0 and ((args.eval_every and step % args.eval_every == 0) or last):
                row.update(run_eval())
                policy.train()
            with open(csv_path, "a", newline="") as f:
                csv.DictWriter(f, CSV_COLS).writerow(row)
            bar.set_postfix_str(f"loss {row['loss_flow']:.4f} disp {row['loss_disp']:.3f}"
                                + (f" success {row['success_rate']:.2f}" if "success_rate" in row else ""))
            acc = {k: 0.0 for k in acc}
            t_log = time.time()
        if step % args.save_every == 0 or last:   # a killed run loses at most one save interval
            save(latest)
            if step % args.save_every == 0:
                save(out / f"step_{step}.pt")
        if last:
            break
    bar.close()
    with open(csv_path) as f:
        final = list(csv.DictReader(f))[-1]
    msg = f"done: {step} steps in {(time.time() - wall0) / 60:.1f} min, final loss {float(final['loss_flow']):.4f}"
    if final.get("success_rate"):                  # the last row was evaluated
        if task.suite == "gym":                      # locomotion has no success flag: report the return
            msg += f", {final['eval_steps']}-step return {float(final['return_mean']):.1f}"
        else:
            msg += (f", {final['eval_steps']}-step success {100 * float(final['success_rate']):.1f}% "
                    f"[{100 * float(final['ci_low']):.1f}, {100 * float(final['ci_high']):.1f}]")
        msg += f" over {final['eval_episodes']} episodes"
    print(msg)
    print(f"checkpoint: {latest}  (evaluate: python evaluate.py --ckpt {latest})")


if __name__ == "__main__":
    main()
