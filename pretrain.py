"""Pretrain a DMPO policy: MeanFlow (one-step) + dispersive regularization, by behaviour cloning on demos.

    python pretrain.py --task lift                          # makes scripted demos if missing, trains, evaluates
    python pretrain.py --task transport --alpha-disp 0.9    # two-arm demos made offline (DART), 100k steps
    python pretrain.py --task lift --resume                 # continue the same run (CSV, step, optimizer, EMA)

Loop: sample (observation, action chunk) pairs that never cross an episode end (with --obs-steps N, the observation
is the chunk's first step and the N - 1 before it, the episode's first repeated at its start) -> normalize with the
data's min/max (stored in the policy) -> MeanFlow loss + alpha_disp * dispersive loss -> AdamW with a
warm-up + cosine learning rate -> EMA of the weights (what evaluation and fine-tuning use).
"""
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import cli
import evaluate
import models
import tasks

# flags that may change when a run is resumed; every other setting comes from the checkpoint (cli.resume_settings)
RUN_CONTROL = ("steps", "max_minutes", "eval_every", "eval_episodes", "eval_envs", "log_every", "save_every", "threads",
               "device", "compile", "probe_size", "out", "resume")

# ----------------------------------------------------------------------------- settings: every default in one place
# A run's settings are this table's values for its task family and --preset, overridden by the flags typed. The
# effective values show in `python pretrain.py --task T [--obs image] [--preset paper] --help`, are printed when a run
# starts and are stored in its checkpoint ("args").
#   cpu    (default) sized for a 2-core CPU; the README's figures use it unless they say otherwise.
#   paper  the released configs (91gaozhidao/dmpo cfg/robomimic/pretrain/*/pre_meanflow_dispersive_mlp_img.yaml and
#          cfg/gym/pretrain/*/pre_improved_meanflow_dispersive_mlp.yaml): epochs over the dataset instead of steps,
#          warm-up and EMA start in epochs, cosine to min_lr, batch 256 robomimic / 128 gym / 64 kitchen.
# Network shapes (hidden_dim, cond_dims) follow the released configs in both presets.
COMMON = dict(orientation="quat", alpha_disp=0.5, disp_loss="infonce_l2", disp_temp=0.5, flow_ratio=0.5, min_lr_ratio=0.1, warmup=500,
              weight_decay=1e-6, ema_decay=0.995, ema_every=10, ema_start=1000, grad_clip=1.0, inference_steps=1,
              epochs=None, warmup_epochs=None, ema_start_epochs=None, demos=100,
              dagger_rounds=0, dagger_episodes=50, dagger_beta=0.5, obs_steps=1)
PRESETS = {
    "cpu": {
        "robomimic": dict(loss="meanflow", steps=30_000, batch_size=256, lr=1e-4, hidden_dim=512, cond_dims=[128, 32]),
        "robomimic-image": dict(loss="meanflow", steps=100_000, batch_size=256, lr=1e-4, hidden_dim=768, cond_dims=[128, 32]),
        "gym": dict(loss="imf", steps=30_000, batch_size=128, lr=1e-3, hidden_dim=512, cond_dims=[64, 16]),
        "gym-large": dict(loss="imf", steps=30_000, batch_size=128, lr=1e-3, hidden_dim=512, cond_dims=[128, 32]),
        "humanoid": dict(loss="imf", steps=30_000, batch_size=128, lr=1e-3, hidden_dim=768, cond_dims=[128, 32]),
        "kitchen": dict(loss="imf", steps=30_000, batch_size=64, lr=1e-3, hidden_dim=256, cond_dims=[32, 16], demos=200),
    },
    "paper": {   # n_epochs; CosineAnnealingWarmupRestarts(first_cycle = n_epochs, warmup, min_lr); EMA reset before epoch 20
        "robomimic": dict(loss="meanflow", epochs=2000, warmup_epochs=100, ema_start_epochs=20, batch_size=256, lr=1e-4,
                          min_lr_ratio=0.1, hidden_dim=512, cond_dims=[128, 32]),
        "robomimic-image": dict(loss="meanflow", epochs=2000, warmup_epochs=100, ema_start_epochs=20, batch_size=256,
                                lr=1e-4, min_lr_ratio=0.1, hidden_dim=768, cond_dims=[128, 32]),
        "gym": dict(loss="imf", epochs=40, warmup_epochs=5, ema_start_epochs=0, batch_size=128, lr=1e-3, min_lr_ratio=0.1,
                    hidden_dim=512, cond_dims=[64, 16]),                       # hopper; walker2d: 80 epochs, warm-up 10
        "gym-large": dict(loss="imf", epochs=50, warmup_epochs=5, ema_start_epochs=0, batch_size=128, lr=1e-4,
                          min_lr_ratio=0.1, hidden_dim=512, cond_dims=[128, 32]),  # ant
        "humanoid": dict(loss="imf", epochs=100, warmup_epochs=10, ema_start_epochs=0, batch_size=128, lr=5e-4,
                         min_lr_ratio=0.02, hidden_dim=768, cond_dims=[128, 32]),
        "kitchen": dict(loss="imf", epochs=3000, warmup_epochs=100, ema_start_epochs=20, batch_size=64, lr=1e-3,
                        min_lr_ratio=0.1, hidden_dim=256, cond_dims=[32, 16], demos=200),  # partial/mixed: 5000 epochs
    },
}
PAPER_TASK_EPOCHS = {"walker2d": (80, 10), "kitchen-partial": (5000, 100), "kitchen-mixed": (5000, 100)}
# Per-task changes to the cpu preset for state policies, each measured (README, Results). Square's policy leaves the
# demonstrated states and never comes back (covariate shift: the scripted demos hold almost no recoveries), so it gets
# DAgger rounds, recovery data labelled by its expert (collect_demos.dagger); "rot6d" feeds each quaternion of the
# state to the encoder as rotation-matrix columns (models.quat_to_rot6d) instead of as recorded ("quat"): square's
# nut-to-hand quaternion is a rotation of ~180 deg (hand down, nut up), where the recorded sign alternates from step
# to step; and a 3x higher learning rate. Transport, the longest task (two arms, ~500 steps), gets rot6d, lr 3e-4 and
# an observation history of 2 (which took square from 82% to 90%), but no DAgger rounds: its demos are DART's
# (collect_demos.COLLECTION: the expert's clean action at states visited under noise 0.1), on which 100k steps reach
# 62% / 64% one-step success (50 episodes on each of two evaluation seed sets), where five DAgger rounds on human-like
# demos had left it at 0/50; and no dispersive term (same data, steps and seed: alpha 0.9 scored 24% / 28%). Where a
# user turns the term on (the paper's transport weight, --alpha-disp 0.9), transport uses the released DMPO code's
# form, which scored 62% at that weight on the same data where the paper's form scored 24% and the cosine form 0%.
# Kitchen-complete's policy under-fits the IK expert's joint-space actions at the reference's 0.17M-parameter size
# (action error 0.12 on its own training states): 512 wide, batch 128 and 150k steps (~43 min on one core) took it
# from 0% / 0.84 subtasks per episode to 7% / 2.0; DAgger rounds did not help there (8% / 1.67: more varied states for
# the same capacity), so it has none. Lift drops the dispersive term: same data and seed, alpha 0 scored 200/200 over
# both evaluation seed sets against 187/200 at 0.5 (the term stretched the embedding 7x without raising its rank). Can
# gets 300 demos and square's learning rate (99% at 30k steps; 100 demos at lr 1e-4 had reached 80%, measured in an
# older observation layout). Kitchen-complete drops the dispersive term too: on its default data alpha 0 finished
# 449/600 evaluation episodes over three training seeds (73/64%, 73/77%, 81/81% on two evaluation seed sets), alpha
# 0.5 227/400 over two (44/50%, 60/73%).
CPU_STATE_TASK = {"lift": dict(alpha_disp=0.0),
                  "can": dict(lr=3e-4, demos=300),
                  "square": dict(lr=3e-4, dagger_rounds=5, orientation="rot6d"),
                  "transport": dict(lr=3e-4, orientation="rot6d", obs_steps=2, steps=100_000, alpha_disp=0.0,
                                    disp_loss="infonce_l2_released"),
                  "kitchen-complete": dict(hidden_dim=512, batch_size=128, steps=150_000, alpha_disp=0.0)}


def family(task, obs):
    if task.suite == "robomimic" or task.suite == "robosuite":
        return "robomimic-image" if obs == "image" else "robomimic"
    if task.suite == "kitchen":
        return "kitchen"
    return {"hopper": "gym", "walker2d": "gym", "humanoid": "humanoid"}.get(task.name, "gym-large")


def defaults(task, obs="state", preset="cpu"):
    """The default of every training setting for this task, observation mode and preset (the table above)."""
    task = tasks.get_task(task)
    d = {**COMMON, **PRESETS[preset][family(task, obs)]}
    if preset == "paper" and task.name in PAPER_TASK_EPOCHS:
        d["epochs"], d["warmup_epochs"] = PAPER_TASK_EPOCHS[task.name]
    if preset == "cpu" and obs == "state":
        d.update(CPU_STATE_TASK.get(task.name, {}))
    return d


def make_parser(task="lift", obs="state", preset="cpu"):
    """The flags, with the defaults of `defaults(task, obs, preset)` (so --help shows the values a run would use)."""
    d = defaults(task, obs, preset)
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                           epilog=f"Defaults shown are for --task {task} --obs {obs} --preset {preset}; "
                                  f"add those flags before --help to see another task's.")
    p.add_argument("--task", default=task, choices=sorted(tasks.TASKS), help="task from the table in tasks.py")
    p.add_argument("--obs", default=obs, choices=["state", "image"], help="low-dim state or camera images + proprio")
    p.add_argument("--preset", default=preset, choices=sorted(PRESETS), help="cpu: sized for a 2-core CPU; paper: the released configs (epochs, schedules)")
    p.add_argument("--dataset", default=None, help="robomimic/D4RL hdf5 or DPPO train.npz (default: the task's own demos)")
    p.add_argument("--download", action="store_true", help="fetch the task's DMPO dataset into data/ and train on it")
    p.add_argument("--filter-key", default=None, help="robomimic hdf5 only: train on the demos listed in mask/<KEY> (e.g. better, clean)")
    p.add_argument("--holdout-episodes", type=cli.nonneg_int, default=0, help="keep the last N episodes out of training; the embedding statistics are then measured on them")
    p.add_argument("--probe-size", type=cli.positive_int, default=1024, help="observations whose embeddings give the logged collapse statistics (emb_* columns)")
    p.add_argument("--demos", type=cli.positive_int, default=d["demos"], help="scripted demos to collect when the default dataset is missing")
    p.add_argument("--orientation", default=d["orientation"], choices=["quat", "rot6d"], help="how the encoder sees the state's quaternions: as recorded, or as rotation-matrix columns (continuous where the recorded sign flips; robosuite tasks)")
    p.add_argument("--obs-steps", type=cli.positive_int, default=d["obs_steps"], help="condition on the last N observations (states concatenated, image frames stacked; an episode's first observation repeated at its start); 1 as DMPO's configs, 2 as Diffusion Policy's")
    p.add_argument("--dagger-rounds", type=cli.nonneg_int, default=d["dagger_rounds"], help="DAgger rounds, evenly spaced over the steps: roll out the EMA policy, label the visited states with the task's expert, train on demos + all labels (<out>/dagger.hdf5; state obs, tasks with a stateless expert: square, transport, kitchen)")
    p.add_argument("--dagger-episodes", type=cli.positive_int, default=d["dagger_episodes"], help="policy episodes per DAgger round")
    p.add_argument("--dagger-beta", type=cli.probability, default=d["dagger_beta"], help="probability that a DAgger chunk is the expert's instead of the policy's")
    p.add_argument("--loss", default=d["loss"], choices=list(models.LOSSES), help="meanflow, improved MeanFlow (imf), or flow matching (ReFlow baseline)")
    p.add_argument("--alpha-disp", type=cli.nonneg_float, default=d["alpha_disp"], help="weight of the dispersive loss (0 = plain MeanFlow)")
    p.add_argument("--disp-loss", default=d["disp_loss"], choices=list(models.DISP_LOSSES), help="dispersive loss variant")
    p.add_argument("--disp-temp", type=cli.positive_float, default=d["disp_temp"], help="dispersive loss temperature")
    p.add_argument("--flow-ratio", type=cli.probability, default=d["flow_ratio"], help="fraction of each batch trained with r = t")
    p.add_argument("--steps", type=cli.positive_int, default=d.get("steps"), help="gradient steps (a typed --steps overrides the preset's --epochs)")
    p.add_argument("--epochs", type=cli.positive_int, default=d["epochs"], help="passes over the dataset's chunks; sets --steps (and the *-epochs settings set theirs) once the data is loaded")
    p.add_argument("--batch-size", type=cli.positive_int, default=d["batch_size"], help="batch size")
    p.add_argument("--lr", type=cli.positive_float, default=d["lr"], help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=cli.probability, default=d["min_lr_ratio"], help="cosine decays to lr * this")
    p.add_argument("--warmup", type=cli.nonneg_int, default=d["warmup"], help="linear warm-up steps")
    p.add_argument("--warmup-epochs", type=cli.nonneg_int, default=d["warmup_epochs"], help="linear warm-up in epochs (sets --warmup)")
    p.add_argument("--weight-decay", type=cli.nonneg_float, default=d["weight_decay"], help="AdamW weight decay")
    p.add_argument("--ema-decay", type=cli.fraction_open, default=d["ema_decay"], help="EMA decay per EMA update")
    p.add_argument("--ema-every", type=cli.positive_int, default=d["ema_every"], help="gradient steps between EMA updates")
    p.add_argument("--ema-start", type=cli.nonneg_int, default=d["ema_start"], help="EMA copies the weights until this step")
    p.add_argument("--ema-start-epochs", type=cli.nonneg_int, default=d["ema_start_epochs"], help="the same in epochs (sets --ema-start)")
    p.add_argument("--grad-clip", type=cli.nonneg_float, default=d["grad_clip"], help="max gradient norm (0 = off)")
    p.add_argument("--hidden-dim", type=cli.positive_int, default=d["hidden_dim"], help="velocity head width")
    p.add_argument("--cond-dims", type=cli.positive_int, nargs="+", default=d["cond_dims"], help="state encoder MLP widths")
    p.add_argument("--no-augment", action="store_true", help="disable random-shift image augmentation")
    p.add_argument("--inference-steps", type=cli.positive_int, default=d["inference_steps"], help="K used by act() and the in-training evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed for torch/numpy")
    p.add_argument("--device", type=cli.device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (fewer kernel launches on a GPU; ~20 s to compile, then ~1.4x faster steps on this CPU; same batches, results equal up to float round-off)")
    p.add_argument("--out", type=cli.out_dir, default=None, help="run directory (default: runs/<task>_<obs>_<loss>_a<alpha>_s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue <out>/latest.pt: training settings come from it; only --steps, --max-minutes, the eval/log/save intervals, --threads and --device may change (a differing training flag is an error)")
    p.add_argument("--log-every", type=cli.positive_int, default=100, help="steps between CSV rows")
    p.add_argument("--save-every", type=cli.positive_int, default=2000, help="steps between checkpoints (latest.pt + step_N.pt)")
    p.add_argument("--max-minutes", type=cli.nonneg_float, default=0, help="also stop (save, evaluate) once the run's wall time, resumes included, exceeds this; 0 = off")
    p.add_argument("--eval-every", type=cli.nonneg_int, default=0, help="steps between evaluations during training (0 = only at the end)")
    p.add_argument("--eval-episodes", type=cli.nonneg_int, default=50, help="episodes per evaluation (0 disables evaluation)")
    p.add_argument("--eval-envs", type=cli.positive_int, default=10, help="environments per evaluation vector")
    return p


def parser_for(argv):
    """The parser whose defaults are those of the task/obs/preset named in argv (first pass: those three flags)."""
    return make_parser(**cli.selectors(argv, task="lift", obs="state", preset="cpu", choices={"task": sorted(tasks.TASKS)}))


def parse_args(argv=None):
    return parser_for(argv).parse_args(argv)


def epochs_to_steps(args, n_chunks):
    """--epochs and the *-epochs settings become steps once the number of chunks is known (drop_last batches)."""
    per_epoch = max(1, n_chunks // args.batch_size)
    if args.epochs is not None:
        args.steps = args.epochs * per_epoch
    if args.warmup_epochs is not None:
        args.warmup = args.warmup_epochs * per_epoch
    if args.ema_start_epochs is not None:
        args.ema_start = args.ema_start_epochs * per_epoch
    return per_epoch


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
    import collect_demos   # the data maker (the one stage this script calls): demos when the default dataset is missing
    collect_demos.make_missing(task.name, args.demos, args.obs == "image", str(path))
    return str(path)


def check_dagger(args, task):
    """DAgger rounds need a task whose expert can label any state, state observations and the whole dataset."""
    import collect_demos   # the data maker also makes the DAgger rounds' labels
    if not collect_demos.can_label(task.name):
        raise ValueError(f"--dagger-rounds {args.dagger_rounds}: task {task.name} has no expert that can label any "
                         f"state; pass --dagger-rounds 0")
    if args.obs != "state":
        raise ValueError(f"--dagger-rounds {args.dagger_rounds}: DAgger labels state observations; pass --obs state "
                         f"or --dagger-rounds 0")
    for flag, value in (("--filter-key", args.filter_key), ("--holdout-episodes", args.holdout_episodes)):
        if value:
            raise ValueError(f"--dagger-rounds {args.dagger_rounds} trains on every demo plus the labels; {flag} "
                             f"does not apply (pass --dagger-rounds 0)")


def lr_at(step, args):
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


CSV_COLS = ["step", "loss_total", "loss_flow", "loss_disp", "lr", "grad_norm", "wall_s", "samples_per_s",
            "emb_eff_rank", "emb_nn_ratio", "emb_norm",
            "eval_steps", "eval_episodes", "eval_success_rate", "eval_ci_low", "eval_ci_high", "eval_return_mean",
            "eval_length_mean"]


def settings(argv):
    """Flags -> the run's settings: the defaults table for the task/obs/preset, overridden by the typed flags;
    --resume takes the training settings from the run's checkpoint (cli.resume_settings). Returns (args, task,
    out dir, resume checkpoint or None)."""
    parser = parser_for(argv)
    args = parser.parse_args(argv)
    typed = cli.explicit_flags(parser, argv)
    if "steps" in typed and "epochs" not in typed:
        args.epochs = None                    # a typed --steps overrides the preset's epochs
    task = tasks.get_task(args.task)
    out = Path(args.out or f"runs/{task.name}_{args.obs}_{args.loss}_a{args.alpha_disp:g}_s{args.seed}")
    latest = out / "latest.pt"
    if not args.resume:
        if latest.exists():
            raise ValueError(f"{latest} exists: pass --resume to continue it or --out to start a new run")
        return args, task, out, None
    if not latest.exists():
        raise ValueError(f"--resume: {latest} does not exist")
    ckpt = models.load_checkpoint(str(latest))
    cli.require_stage(ckpt, "pretrain", latest)
    tasks.check_layout(ckpt, ckpt["task"], latest)
    # settings added since older runs started, at the values those runs trained with
    saved = {"orientation": "rot6d" if ckpt["config"].get("rot_quats") else "quat", "dagger_rounds": 0, "obs_steps": 1,
             **ckpt["args"]}
    run_defaults = vars(make_parser(saved["task"], saved.get("obs", "state"), saved.get("preset", "cpu")).parse_args([]))
    args = cli.resume_settings(parser, argv, args, saved, RUN_CONTROL, latest, run_defaults)
    args.epochs = args.warmup_epochs = args.ema_start_epochs = None   # already turned into steps when the run began
    if args.steps <= ckpt["step"]:
        raise ValueError(f"--resume: --steps {args.steps} is not beyond the run's step {ckpt['step']} ({latest}); "
                         f"pass a larger --steps to continue")
    return args, tasks.get_task(args.task), out, ckpt


def main(argv=None):
    try:
        args, task, out, resume_ckpt = settings(argv)
        torch.set_num_threads(args.threads)
        device = models.setup_device(models.resolve_device(args.device))   # CUDA: TF32 matmuls, cuDNN autotuning
        dataset_path = find_dataset(args, task)
        if args.dagger_rounds:
            check_dagger(args, task)
        data = tasks.load_dataset(dataset_path, task, args.obs, filter_key=args.filter_key)
        dagger_path = out / "dagger.hdf5"     # demos + the DAgger rounds' labels, made by this run
        dagger_done = resume_ckpt.get("dagger_rounds_done", 0) if resume_ckpt is not None else 0
        if dagger_done:
            if not dagger_path.is_file():
                raise ValueError(f"--resume: the run did {dagger_done} DAgger round(s) but {dagger_path} is missing")
            data_all = tasks.load_dataset(dagger_path, task, args.obs)
        probe_data = data
        if args.holdout_episodes:             # never trained on (nor in the normalization): the embedding probe
            data, probe_data = data.split_last(args.holdout_episodes)
        starts_np = tasks.chunk_starts(data, task.chunk)
        epochs_to_steps(args, len(starts_np))
        if len(starts_np) < args.batch_size:   # refused before a run directory is written
            raise ValueError(f"{dataset_path}: {len(starts_np)} complete action chunks of {task.chunk} steps "
                             f"(episodes of {int(np.min(data.episode_lengths)) if len(data.episode_lengths) else 0}"
                             f"-{int(np.max(data.episode_lengths)) if len(data.episode_lengths) else 0} steps); "
                             f"a batch needs --batch-size {args.batch_size}: use more or longer episodes or a smaller batch")
    except (ValueError, FileNotFoundError, tasks.TaskError) as e:
        sys.exit(f"error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    latest = out / "latest.pt"
    for name in cli.remove_stale_tmp(out):
        print(f"removed {out / name} (a partial checkpoint of a run killed while saving)")
    print(cli.format_settings(args))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    # --- the policy, its normalization (from the data) and its EMA copy -----------------------------------
    state_dim, n_cams = tasks.obs_dims(task, args.obs)
    cfg = models.PolicyConfig(state_dim=state_dim, act_dim=task.act_dim, chunk=task.chunk, obs_mode=args.obs,
                              n_cameras=max(n_cams, 1), augment=not args.no_augment, cond_mlp_dims=tuple(args.cond_dims),
                              hidden_dim=args.hidden_dim, loss=args.loss, flow_ratio=args.flow_ratio,
                              alpha_disp=args.alpha_disp, disp_loss=args.disp_loss, disp_temp=args.disp_temp,
                              inference_steps=args.inference_steps,
                              rot_quats=tasks.quaternion_starts(task, args.obs) if args.orientation == "rot6d" else (),
                              obs_steps=args.obs_steps)
    policy = models.make_policy(cfg, device)
    stats = tasks.normalization_stats(data)   # of the demos: DAgger rounds keep this normalization
    policy.set_normalization(**stats)
    ema = copy.deepcopy(policy).requires_grad_(False)
    opt = models.make_optimizer(policy.parameters(), args.lr, args.weight_decay, device)   # fused AdamW on CUDA
    step, wall_prev = 0, 0.0
    if resume_ckpt is not None:
        policy.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        opt.load_state_dict(resume_ckpt["optimizer"])
        torch.set_rng_state(resume_ckpt["rng"])
        step, wall_prev = resume_ckpt["step"], resume_ckpt.get("wall_s", 0.0)
        print(f"resumed {latest} at step {step}")

    # --- the data, normalized once and kept on the device --------------------------------------------------
    def on_device(data):
        states = policy.normalize_state(torch.as_tensor(data.states, device=device))
        actions = policy.normalize_action(torch.as_tensor(data.actions, device=device)).clamp(-1, 1)
        images = torch.as_tensor(data.images, device=device) if args.obs == "image" else None
        history = torch.as_tensor(tasks.history_indices(data.episode_lengths, args.obs_steps), device=device)
        return states, actions, images, torch.as_tensor(tasks.chunk_starts(data, task.chunk), device=device), history

    states, actions, images, starts, history = on_device(data_all if dagger_done else data)
    offsets = torch.arange(task.chunk, device=device)
    # DAgger round r (1..R) runs once step reaches round_steps[r - 1]: rounds evenly spaced, the last R+1-th of the
    # steps trains on every label
    round_steps = [args.steps * r // (args.dagger_rounds + 1) for r in range(1, args.dagger_rounds + 1)]
    # probe set of the collapse statistics: held-out episodes, else a fixed sample of the training observations
    probe_states, probe_images = probe_data.probe(args.probe_size, obs_steps=args.obs_steps)
    probe_states = policy.normalize_state(torch.as_tensor(probe_states, device=device))
    probe_rgb = torch.as_tensor(probe_images, device=device) if args.obs == "image" else None
    print(f"{task.name} ({args.obs}): {len(data.episode_lengths)} episodes, {len(data)} steps, {len(starts)} chunks "
          f"from {dataset_path}; policy {models.count_params(policy) / 1e6:.2f}M params on {device}; run dir {out}")

    wall0 = time.time() - wall_prev           # wall time of the run, resumes included

    def save(path):
        models.save_checkpoint(str(path), policy, ema, step, extra={
            "stage": "pretrain", "task": task.name, "obs_mode": args.obs, "obs_layout": tasks.OBS_LAYOUT,
            "dataset": str(dataset_path), "dagger_rounds_done": dagger_done,
            "args": vars(args), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "wall_s": time.time() - wall0})

    def run_eval():                           # the EMA copy is what is evaluated (and fine-tuned)
        r = evaluate.evaluate_policy(ema, task, args.obs, args.eval_episodes, (args.inference_steps,),
                                     args.eval_envs, progress=False)[0]
        return {"eval_steps": r["steps"], **evaluate.eval_columns(r)}

    csv_path = out / "log.csv"
    cli.trim_csv(csv_path, CSV_COLS, "step", step)   # a new log, or the old one cut back to the checkpoint's step
    bar = tqdm(total=args.steps, initial=step, desc=f"pretrain {task.name}", dynamic_ncols=True)
    acc = {"loss_total": 0.0, "loss_flow": 0.0, "loss_disp": 0.0, "grad_norm": 0.0, "n": 0}
    t_log = time.time()
    row = {}
    policy.train()
    loss_fn = policy.loss
    if args.compile:
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True   # draw t, r, noise with eager's RNG: the same batches as without it
        loss_fn = torch.compile(policy.loss)
    while step < args.steps:
        # --- DAgger: the current EMA policy drives, the expert labels where it went; train on everything so far ---
        if dagger_done < args.dagger_rounds and step >= round_steps[dagger_done]:
            save(latest)                      # the policy the workers load
            import collect_demos
            r = collect_demos.dagger(task.name, latest, dagger_path if dagger_done else dataset_path, dagger_path,
                                     args.dagger_episodes, args.dagger_beta, seed=10_000 * (dagger_done + 1) + args.seed,
                                     progress=False)
            dagger_done += 1
            states, actions, images, starts, history = on_device(tasks.load_dataset(dagger_path, task, args.obs))
            tqdm.write(f"DAgger round {dagger_done}/{args.dagger_rounds} at step {step}: {r['episodes']} episodes, "
                       f"policy success {100 * r['learner_success_rate']:.0f}%, +{r['samples']} labelled states "
                       f"({r['minutes']:.1f} min); training on {len(states)} states -> {dagger_path}")
            save(latest)
        # --- one gradient step on a random batch of (observation history, action chunk) ---
        idx = starts[torch.randint(len(starts), (args.batch_size,), device=device)]
        hist = history[idx]                   # (B, obs_steps): the chunk's first step and the steps before it
        rgb = images[hist].flatten(1, 2) if images is not None else None
        total, info = loss_fn(states[hist].flatten(1), actions[idx[:, None] + offsets], rgb)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {"loss_flow": float(info["loss_flow"]), "loss_disp": float(info["loss_disp"]),
                 "loss_total": float(total.detach()), "grad_norm": float(gn)}
        try:                                  # stop before a non-finite update reaches the weights or a checkpoint
            cli.check_finite(step + 1, **terms)
        except cli.NonFiniteError as e:
            bar.close()
            sys.exit(cli.nonfinite_exit(e, latest))
        opt.step()
        step += 1
        if step % args.ema_every == 0:   # EMA every 10 steps with 0.995 (reference); plain copy before ema_start
            models.ema_update(ema, policy, args.ema_decay if step >= args.ema_start else 0.0)
        for k, v in terms.items():
            acc[k] += v
        acc["n"] += 1
        bar.update(1)

        # --- logging, evaluation, checkpoints ---
        # --max-minutes ends the run early (the cosine schedule still spans --steps, so lr is not at its floor)
        last = step == args.steps or (args.max_minutes > 0 and time.time() - wall0 > 60 * args.max_minutes)
        if step % args.log_every == 0 or last:
            row = {k: acc[k] / acc["n"] for k in ("loss_total", "loss_flow", "loss_disp", "grad_norm")}
            row.update(step=step, lr=lr_at(step - 1, args), wall_s=round(time.time() - wall0, 1),
                       samples_per_s=round(acc["n"] * args.batch_size / (time.time() - t_log), 1),
                       **{f"emb_{k}": v for k, v in ema.embedding_stats(probe_states, probe_rgb).items()})
            if args.eval_episodes > 0 and ((args.eval_every and step % args.eval_every == 0) or last):
                row.update(run_eval())
            cli.append_csv(csv_path, CSV_COLS, row)
            bar.set_postfix_str(f"loss {row['loss_flow']:.4f} disp {row['loss_disp']:.3f}"
                                + (f" success {row['eval_success_rate']:.2f}" if "eval_success_rate" in row else ""))
            acc = {k: 0.0 for k in acc}
            t_log = time.time()
        if step % args.save_every == 0 or last:   # a killed run loses at most one save interval
            save(latest)
            if step % args.save_every == 0:
                save(out / f"step_{step}.pt")
        if last:
            break
    bar.close()
    msg = f"done: {step} steps in {(time.time() - wall0) / 60:.1f} min, final loss {row['loss_flow']:.4f}"
    if "eval_success_rate" in row:                   # the last row was evaluated
        if task.suite == "gym":                      # locomotion has no success flag: report the return
            msg += f", {row['eval_steps']}-step return {row['eval_return_mean']:.1f}"
        else:
            msg += (f", {row['eval_steps']}-step success {100 * row['eval_success_rate']:.1f}% "
                    f"[{100 * row['eval_ci_low']:.1f}, {100 * row['eval_ci_high']:.1f}]")
        msg += f" over {row['eval_episodes']} episodes"
    print(msg)
    print(f"checkpoint: {latest}  (evaluate: python evaluate.py --ckpt {latest})")


if __name__ == "__main__":
    main()
