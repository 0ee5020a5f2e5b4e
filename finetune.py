"""Fine-tune a pretrained DMPO policy with PPO: the one-step MeanFlow policy improves past its demonstrations.

    python finetune.py --ckpt runs/lift_state_meanflow_a0_s0/latest.pt            # K = 1, per-task defaults
    python finetune.py --ckpt runs/hopper_.../latest.pt --max-minutes 60 --eval-every 10
    python finetune.py --ckpt ... --bc-coef 0                                       # no BC regularizer (ablation)
    python finetune.py --out runs/ft_lift_state_K1_bc0.05_s0 --resume --iterations 200

The policy is the pretrained MeanFlow chain with noise injected at every denoising step (DMPO paper, arXiv 2601.20701,
fine-tuning section; the ReinFlow frame, arXiv 2505.22094, that the released code 91gaozhidao/dmpo
model/flow/ft_ppo/ppomeanflow.py uses): x_0 ~ N(0, I), x_{i+1} = clamp(x_i - (t_i - t_{i+1}) u(x_i, t_{i+1}, t_i | s)) + sigma_i eps,
with sigma_i from a small learned network bounded to [min_std, max_std]. Every transition is Gaussian, so the chain
has an exact log-probability and PPO can train it. K = 1 (the one-step policy of the paper) by default.

Loop (read top to bottom in `main`): load checkpoint -> actor (trained), frozen reference copy (BC), noise net,
critic -> [rollout n_steps chunks in n_envs envs -> running reward scaling -> GAE over chunk steps -> PPO epochs
(clipped surrogate + entropy + value + BC-to-pretrained) with KL early stop] x iterations -> CSV, checkpoint, eval.
Besides losses and success, log.csv carries the checks of the update itself: ratio_dev_first (the PPO ratio on the
iteration's first minibatch, 1 up to round-off), approx_kl split into mean and std parts, clipfrac, explained_var,
adv_success / adv_failure (mean advantage of the chunks of episodes that succeeded / failed) and grad_cos_halves
(agreement of the policy gradients of the two env halves: near 0 means the iteration's update is mostly noise).
The fine-tuned actor is saved as an ordinary MeanFlowPolicy ("model"/"ema"), so evaluate.py --ckpt reads it as is;
the noise net, critic, frozen pretrained weights, optimizers and reward statistics ride along for --resume.

Choices where this file departs from, or pins down, the released code (91gaozhidao/dmpo, model/flow/ft_ppo/ and
agent/finetune/reinflow/):
  * sigma is bounded by a tanh squash of the log-variance into [log min_std^2, log max_std^2] (ReinFlow's form), not a
    hard clamp, so a fresh noise net starts mid-range (~0.077) with a gradient instead of stuck at max_std.
  * The env receives clamp(x_K, -1, 1) but the stored chain keeps x_K unclamped, so the log-probability is exact.
  * A time-limit truncation bootstraps from V(final observation); a termination does not (GAE cuts the trace at both).
  * The actor runs in eval mode (no dropout); image tasks are random-shifted once per rollout, as the reference buffer.
  * Robosuite episodes end at success by default (the evaluation protocol); --no-terminate-on-success is the reference.
    --dense-reward (off; not in the reference) trains on robosuite's shaped reward and needs --no-terminate-on-success.
  * --env-workers W steps the envs in W subprocesses (identical rollouts): robosuite is ~5 ms a step, worth a core.
  * CPU-sized defaults (defaults()): ~10x smaller rollouts per iteration and an actor lr of 1e-5 instead of 3e-6
    (square: the released 2.5e-6 with 20 envs, measured).
"""
import argparse
import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import evaluate
import models
import tasks

# flags that may change when a run is resumed; every other setting comes from the checkpoint's saved args
RUN_CONTROL = ("iterations", "max_minutes", "eval_every", "eval_episodes", "eval_envs", "eval_seed", "save_every",
               "keep_every", "threads", "device", "out", "resume", "env_workers")


# ----------------------------------------------------------------------------- settings: every default in one place
# A run's settings are the values below for its checkpoint's task and observation mode and the chosen --preset,
# overridden by the flags typed. `python finetune.py --ckpt C [--preset paper] --help` shows the effective values;
# a run prints them when it starts and stores them in its checkpoint ("args").
#   cpu    (default) sized for a 2-core CPU: ~10x smaller rollouts per iteration than the released configs, so more
#          iterations fit in an hour, and the actor lr raised from 3e-6 to 1e-5 to match (square state: 2.5e-6 and
#          20 envs, which is what improved it; see defaults()).
#   paper  the released configs (91gaozhidao/dmpo cfg/{robomimic,gym}/finetune/*/ft_ppo_meanflow_mlp*.yaml). They
#          set 5 denoising steps; the paper reports one-step fine-tuning, so --ft-steps stays 1 in both presets.
COMMON = dict(ft_steps=1, gae_lambda=0.95, critic_lr_warmup=25, critic_lr_cycle=100, actor_wd=0.0, update_epochs=10,
              clip_coef=0.01, ent_coef=0.01, vf_coef=0.5, target_kl=0.01, max_grad_norm=25.0, critic_warmup=2,
              min_std=0.05, max_std=0.12, noise_clip=3.0, logprob_clip=1.0, critic_hidden=256, bc_coef_final=0.05,
              bc_decay_start=20, bc_decay_end=50, max_episode_steps=None)
PAPER = {  # n_envs, n_steps (chunks per env per iteration), minibatch, actor lr, critic lr -> min, critic wd, iterations
    "lift": (25, 400, 500, 3e-6, 4.5e-4, 3e-4, 0.0, 301), "can": (25, 500, 500, 2.5e-6, 4e-4, 2.5e-4, 0.0, 301),
    "square": (25, 500, 500, 2.5e-6, 4e-4, 2.5e-4, 0.0, 301), "transport": (14, 800, 560, 3e-6, 4.5e-4, 3e-4, 0.0, 301),
    "gym": (40, 500, 50000, 3e-6, 4.5e-4, 3e-4, 1e-5, 1000), "kitchen": (40, 200, 5600, 3e-6, 6.5e-4, 3e-4, 1e-5, 301),
}


def defaults(task, obs_mode="state", preset="cpu"):
    """The default of every training setting for this task, observation mode and preset (the table above)."""
    task = tasks.get_task(task)
    kitchen = task.suite == "kitchen"
    gym = task.suite == "gym" or kitchen             # kitchen is trained like gym
    image = obs_mode == "image"
    d = dict(COMMON, gamma=task.gamma, noise_hidden=[384] * 3 if image else [256] * 3,
             bc_coef=0.2 if task.name in ("square", "transport") else 0.05)   # square/transport: 0.2 -> 0.05 (it. 20-50)
    if preset == "paper":
        n_envs, n_steps, mb, actor_lr, c_lr, c_min, c_wd, itrs = PAPER["kitchen" if kitchen else "gym" if gym else task.name]
        d.update(n_envs=n_envs, n_steps=n_steps, minibatch_size=mb, actor_lr=actor_lr, critic_lr=c_lr, critic_lr_min=c_min,
                 critic_wd=c_wd, iterations=itrs, critic_lr_warmup=10 if kitchen else 25)
        return d
    c_lr, c_min = {"can": (4e-4, 2.5e-4), "square": (4e-4, 2.5e-4)}.get(task.name, (6.5e-4, 3e-4) if kitchen else (4.5e-4, 3e-4))
    d.update(iterations=300 if gym else 100, n_envs=4 if image else 10, n_steps=140 if kitchen else (250 if gym else 100),
             minibatch_size=100 if image else (500 if gym else 250), actor_lr=1e-5, critic_lr=c_lr, critic_lr_min=c_min,
             critic_wd=1e-5 if gym else 0.0)
    if task.name == "square" and not image:
        # measured (README, fine-tuning square): from a 27% start, lr 1e-5 with 10 envs stayed at 28%; the released
        # configs' lr 2.5e-6 with 20 envs reached 46% in 78 min. At 1e-5 each update moves ~0.9 nats per chunk along
        # a gradient whose direction is noise at this rollout size; a smaller step lets the signal add up.
        d.update(n_envs=20, actor_lr=2.5e-6)
    return d


def make_parser(task="lift", obs_mode="state", preset="cpu"):
    """The flags, with the defaults of `defaults(task, obs_mode, preset)` (so --help shows the values a run would use)."""
    d = defaults(task, obs_mode, preset)
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                           epilog=f"Defaults shown are for task {task} ({obs_mode}), --preset {preset}; pass --ckpt "
                                  f"(and --preset) before --help to see a checkpoint's.")
    p.add_argument("--ckpt", default=None, help="pretrained checkpoint (pretrain.py); its EMA weights are fine-tuned")
    p.add_argument("--task", default=None, choices=sorted(tasks.TASKS), help="override the task stored in the checkpoint")
    p.add_argument("--preset", default=preset, choices=("cpu", "paper"), help="cpu: sized for a 2-core CPU; paper: the released configs")
    p.add_argument("--ft-steps", type=cli.positive_int, default=d["ft_steps"], help="K: denoising steps of the fine-tuned chain (1 = one-step policy)")
    # rollout
    p.add_argument("--iterations", type=cli.positive_int, default=d["iterations"], help="PPO iterations")
    p.add_argument("--max-minutes", type=cli.nonneg_float, default=0, help="stop (save, evaluate) once the run's wall time, resumes included, exceeds this; 0 = off")
    p.add_argument("--n-envs", type=cli.positive_int, default=d["n_envs"], help="parallel envs")
    p.add_argument("--n-steps", type=cli.positive_int, default=d["n_steps"], help="chunks per env per iteration")
    p.add_argument("--env-workers", type=cli.positive_int, default=1, help="subprocesses the training/eval envs are split over (robosuite: one per free core)")
    p.add_argument("--max-episode-steps", type=cli.positive_int, default=d["max_episode_steps"], help="env steps per episode (None: the task table's)")
    p.add_argument("--dense-reward", action="store_true", help="robosuite: train on its shaped reach/grasp/lift reward instead of the sparse success reward (the reference)")
    p.add_argument("--terminate-on-success", action=argparse.BooleanOptionalAction, default=True,
                   help="end robosuite episodes at success (like evaluation); --no-... is the reference's never-done wrapper")
    # PPO
    p.add_argument("--gamma", type=cli.unit_interval_closed_above, default=d["gamma"], help="discount per chunk")
    p.add_argument("--gae-lambda", type=cli.probability, default=d["gae_lambda"], help="GAE lambda")
    p.add_argument("--actor-lr", type=cli.positive_float, default=d["actor_lr"], help="actor + noise-net lr (the released configs: 2.5e-6-3e-6)")
    p.add_argument("--critic-lr", type=cli.positive_float, default=d["critic_lr"], help="critic peak lr")
    p.add_argument("--critic-lr-min", type=cli.positive_float, default=d["critic_lr_min"], help="critic cosine floor")
    p.add_argument("--critic-lr-warmup", type=cli.nonneg_int, default=d["critic_lr_warmup"], help="critic lr warm-up iterations per cosine cycle")
    p.add_argument("--critic-lr-cycle", type=cli.positive_int, default=d["critic_lr_cycle"], help="critic cosine cycle length in iterations (restarts)")
    p.add_argument("--actor-wd", type=cli.nonneg_float, default=d["actor_wd"], help="AdamW weight decay of the actor")
    p.add_argument("--critic-wd", type=cli.nonneg_float, default=d["critic_wd"], help="AdamW weight decay of the critic")
    p.add_argument("--update-epochs", type=cli.positive_int, default=d["update_epochs"], help="PPO epochs over each rollout")
    p.add_argument("--minibatch-size", type=cli.positive_int, default=d["minibatch_size"], help="chunks per minibatch")
    p.add_argument("--clip-coef", type=cli.positive_float, default=d["clip_coef"], help="PPO ratio clip (on the dimension-normalized log-prob)")
    p.add_argument("--ent-coef", type=cli.nonneg_float, default=d["ent_coef"], help="entropy bonus weight")
    p.add_argument("--vf-coef", type=cli.nonneg_float, default=d["vf_coef"], help="value loss weight")
    p.add_argument("--target-kl", type=cli.nonneg_float, default=d["target_kl"], help="stop the update once a minibatch's approx KL exceeds this (0 = off)")
    p.add_argument("--max-grad-norm", type=cli.positive_float, default=d["max_grad_norm"], help="gradient clipping, actor and critic separately")
    p.add_argument("--critic-warmup", type=cli.nonneg_int, default=d["critic_warmup"], help="first iterations train only the critic")
    p.add_argument("--reward-scaling", action=argparse.BooleanOptionalAction, default=True,
                   help="divide rewards by the running std of the discounted return (clip +-10)")
    # noise injection / log-probability
    p.add_argument("--min-std", type=cli.positive_float, default=d["min_std"], help="lower bound of the injected noise std (normalized actions)")
    p.add_argument("--max-std", type=cli.positive_float, default=d["max_std"], help="upper bound of the injected noise std")
    p.add_argument("--noise-clip", type=cli.positive_float, default=d["noise_clip"], help="injected standard-normal noise is clipped to +-this")
    p.add_argument("--logprob-clip", type=cli.nonneg_float, default=d["logprob_clip"], help="clamp the normalized log-prob to +-this (0 = off)")
    p.add_argument("--noise-hidden", type=cli.positive_int, nargs="+", default=d["noise_hidden"], help="noise-net MLP widths")
    p.add_argument("--critic-hidden", type=cli.positive_int, default=d["critic_hidden"], help="critic residual-MLP width")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="image tasks: random-shift the rollout images once per iteration before the update")
    # BC regularizer
    p.add_argument("--bc-coef", type=cli.nonneg_float, default=d["bc_coef"], help="BC-to-pretrained weight at the start (0 = ablation)")
    p.add_argument("--bc-coef-final", type=cli.nonneg_float, default=d["bc_coef_final"], help="BC weight after the decay (a typed --bc-coef alone is constant)")
    p.add_argument("--bc-decay-start", type=cli.nonneg_int, default=d["bc_decay_start"], help="iteration where the linear BC decay starts")
    p.add_argument("--bc-decay-end", type=cli.nonneg_int, default=d["bc_decay_end"], help="iteration where the BC weight reaches --bc-coef-final")
    # bookkeeping
    p.add_argument("--eval-every", type=cli.nonneg_int, default=10, help="iterations between evaluations (0 = only before and after)")
    p.add_argument("--eval-episodes", type=cli.nonneg_int, default=50, help="episodes per evaluation (0 disables evaluation)")
    p.add_argument("--eval-envs", type=cli.positive_int, default=10, help="environments per evaluation vector")
    p.add_argument("--eval-seed", type=int, default=100_000, help="evaluation seed (as evaluate.py)")
    p.add_argument("--seed", type=int, default=0, help="seed for torch/numpy and the training envs")
    p.add_argument("--device", type=cli.device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--out", type=cli.out_dir, default=None, help="run directory (default: runs/ft_<task>_<obs>_K<K>_bc<coef>_s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue <out>/latest.pt: training settings come from it; only --iterations, --max-minutes, the eval/save intervals, --env-workers, --threads and --device may change (a differing training flag is an error)")
    p.add_argument("--save-every", type=cli.positive_int, default=5, help="iterations between writes of latest.pt (and always at the end)")
    p.add_argument("--keep-every", type=cli.nonneg_int, default=0, help="also keep itr_<N>.pt every this many iterations (0 = never)")
    return p


def parser_for(argv):
    """The parser whose defaults are those of the run's task and observation mode (read from the --ckpt named in
    argv when it can be read; lift/state otherwise) and the --preset named in argv."""
    sel = cli.selectors(argv, ckpt=None, task=None, preset="cpu", choices={"task": sorted(tasks.TASKS) + [None],
                                                                          "preset": ["cpu", "paper"]})
    task = obs_mode = None
    if sel["ckpt"]:
        try:
            ck = models.load_checkpoint(sel["ckpt"])
            task, obs_mode = ck.get("task"), ck["config"].get("obs_mode", "state")
        except (ValueError, FileNotFoundError):
            pass                                   # reported in one line when the run loads it
    return make_parser(sel["task"] or task or "lift", obs_mode or "state", sel["preset"])


def parse_args(argv=None):
    return parser_for(argv).parse_args(argv)


# ----------------------------------------------------------------------------- schedules

def bc_coef_at(itr, coef, coef_final, decay_start, decay_end):
    """BC weight at iteration `itr`: `coef` up to decay_start, linear to `coef_final` at decay_end, then constant
    (91gaozhidao/dmpo agent/finetune/reinflow/train_ppo_meanflow_agent.py `update_bc_coeff`: square/transport 0.2 -> 0.05
    between iterations 20 and 50)."""
    if itr <= decay_start or decay_end <= decay_start:
        return coef if itr <= decay_start else coef_final
    if itr >= decay_end:
        return coef_final
    return coef + (coef_final - coef) * (itr - decay_start) / (decay_end - decay_start)


def cosine_warmup_restarts(itr, lr_max, lr_min, cycle, warmup):
    """Critic lr (the released finetune configs' CosineAnnealingWarmupRestarts): per cycle, linear lr_min -> lr_max over `warmup` iterations, then cosine to lr_min."""
    pos = (itr - 1) % max(cycle, 1)
    if pos < warmup:
        return lr_min + (lr_max - lr_min) * pos / max(warmup, 1)
    frac = (pos - warmup) / max(cycle - warmup, 1)
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------- the stochastic chain

class NoiseNet(nn.Module):
    """sigma(x_i, s, t_i): input [x_i flattened || cond_emb || time embedding of t_i] -> Tanh MLP -> log-variance,
    squashed by tanh into [log min_std^2, log max_std^2] (ReinFlow's bounded form of the released code's clamp, which keeps
    a gradient everywhere; a hard clamp would pin a freshly initialized net at max_std with zero gradient)."""

    def __init__(self, cond_dim, chunk, act_dim, hidden=(256, 256, 256), min_std=0.05, max_std=0.12, time_dim=16):
        super().__init__()
        if not 0 < min_std < max_std:
            raise ValueError(f"need 0 < min_std < max_std, got {min_std}, {max_std}")
        self.t_emb = models.time_mlp(time_dim)
        self.net = models.mlp([chunk * act_dim + cond_dim + time_dim, *hidden, chunk * act_dim], act=nn.Tanh)
        self.register_buffer("logvar_min", torch.tensor(2 * math.log(min_std)))
        self.register_buffer("logvar_max", torch.tensor(2 * math.log(max_std)))

    def forward(self, x, cond, t):              # x (B, Ta, Da), cond (B, E), t (B,) -> std (B, Ta, Da)
        h = self.net(torch.cat([x.flatten(1), cond, self.t_emb(t)], dim=-1))
        logvar = self.logvar_min + (self.logvar_max - self.logvar_min) * (torch.tanh(h) + 1) / 2
        return torch.exp(0.5 * logvar).view_as(x)


def chain_times(k, device):
    """(t_i, t_{i+1}) for i = 0..K-1 with t = linspace(1, 0, K+1), the grid of MeanFlowPolicy.sample; each
    deterministic step is policy.denoise_step (mu_i = clamp(x_i - (t_i - t_{i+1}) u, -1, 1), as model/flow/ft_ppo/ppomeanflow.py)."""
    ts = torch.linspace(1.0, 0.0, k + 1, device=device)
    return ts[:-1], ts[1:]


def sample_chain(policy, noise_net, cond, k, noise_clip=3.0):
    """Roll the noisy chain: returns chain (B, K+1, Ta, Da) = [x_0, ..., x_K] (x_K unclamped; the env gets
    clamp(x_K, -1, 1), a fixed post-processing that does not enter the log-probability)."""
    b, cfg = cond.shape[0], policy.cfg
    ts, tn = chain_times(k, cond.device)
    x = torch.randn(b, cfg.chunk, cfg.act_dim, device=cond.device)
    chain = [x]
    for i in range(k):
        t = ts[i].expand(b)
        mu = policy.denoise_step(x, t, tn[i].expand(b), cond)
        std = noise_net(x, cond, t)
        x = mu + std * torch.randn_like(mu).clamp(-noise_clip, noise_clip)
        chain.append(x)
    return torch.stack(chain, dim=1)


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def transitions_log_density(chain, mu, std):
    """sum_i log N(x_{i+1}; mu_i, std_i^2) over the K transitions of each chain (summed over all dims)."""
    return (-0.5 * ((chain[:, 1:] - mu) / std).pow(2) - std.log() - LOG_SQRT_2PI).flatten(1).sum(1)


def chain_log_prob(policy, noise_net, cond, chain):
    """Exact log-density of a stored chain, summed over all dims: log N(x_0; 0, I) + sum_i log N(x_{i+1}; mu_i, sigma_i^2)
    (the initial-noise term is included, `account_for_initial_stochasticity`). All K transitions are evaluated in one
    batched network call (teacher forcing on the stored x_i). Also returns the chain entropy (sum over dims) and the
    stds and means (B, K, Ta, Da) of the K transitions."""
    b, k = chain.shape[0], chain.shape[1] - 1
    ts, tn = chain_times(k, chain.device)
    x_in = chain[:, :-1].flatten(0, 1)                              # (B*K, Ta, Da), row order (b, i)
    cond_k = cond.repeat_interleave(k, dim=0)
    t = ts.repeat(b)
    mu = policy.denoise_step(x_in, t, tn.repeat(b), cond_k).view_as(chain[:, 1:])
    std = noise_net(x_in, cond_k, t).view_as(chain[:, 1:])
    x0 = chain[:, 0]
    lp0 = (-0.5 * x0.pow(2) - LOG_SQRT_2PI).flatten(1).sum(1)
    lp = transitions_log_density(chain, mu, std)
    dims = x0[0].numel()
    ent = dims * (0.5 + LOG_SQRT_2PI) * (k + 1) + std.log().flatten(1).sum(1)
    return lp0 + lp, ent, std, mu


@torch.no_grad()
def logratio_parts(chain, mu_old, std_old, mu_new, std_new, k, dims):
    """Split the (unclipped, normalized) log-ratio of a stored chain into what the noise std changed and what the
    mean action changed: log pi_new - log pi_old = [log N(x; mu_old, std_new) - log N(x; mu_old, std_old)]
    + [log N(x; mu_new, std_new) - log N(x; mu_old, std_new)], each divided by (K+1) Ta Da like the log-prob.
    Their approximate KLs show how much of the trust region the std spends (a hypothesis for stalled learning)."""
    def lp(mu, std):
        return transitions_log_density(chain, mu, std) / ((k + 1) * dims)
    mid = lp(mu_old, std_new)
    return lp(mu_new, std_new) - mid, mid - lp(mu_old, std_old)     # (mean part, std part)


def approx_kl(logratio):
    """mean((ratio - 1) - log ratio), the low-variance KL estimate (Schulman's k3) PPO logs and early-stops on."""
    return ((logratio.exp() - 1) - logratio).mean()


def normalize_log_prob(lp, k, dims, clip=1.0):
    """The released code's normalization (model/flow/ft_ppo/ppoflow.py): divide by (K+1) * Ta * Da, then clamp to [-clip, clip]."""
    lp = lp / ((k + 1) * dims)
    return lp.clamp(-clip, clip) if clip > 0 else lp


@torch.no_grad()
def reference_action(policy_old, state_n, rgb, k):
    """Action of the frozen pretrained policy from zero noise (the BC target, the paper's W2 regularizer to the pretrained policy)."""
    cond = policy_old.encode(state_n, rgb)
    zeros = torch.zeros(cond.shape[0], policy_old.cfg.chunk, policy_old.cfg.act_dim, device=cond.device)
    return policy_old.sample(cond, k, noise=zeros)


def bc_loss(policy, cond, a_old, k):
    """MSE between the fine-tuned deterministic chain from zero noise and the pretrained one's action."""
    return F.mse_loss(policy.sample(cond, k, noise=torch.zeros_like(a_old)), a_old)


# ----------------------------------------------------------------------------- GAE

@torch.no_grad()
def compute_gae(rewards, values, dones, boot, next_value, gamma, lam):
    """GAE over chunk steps (Schulman et al. 2016; per chunk as DPPO, arXiv 2409.00588), tensors (T, N) in time order per env:
        delta_t = r_t + gamma * V' - V(s_t),   A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1},
    with V' = V(s_{t+1}) while the episode goes on, V(final obs) on truncation (`boot`, a time limit is not a
    terminal state), and 0 on termination (boot = 0). The trace is cut at every episode end either way, because the
    next stored observation belongs to the new episode. (The reference bootstraps truncations from the post-reset
    observation; this uses the last real one.) Returns advantages (T, N); returns = advantages + values."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        nxt = torch.where(dones[t] > 0, boot[t], nxt)
        delta = rewards[t] + gamma * nxt - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        adv[t] = last
    return adv


def standardize_advantages(adv):
    """Zero mean, unit std (population) over the given advantages: PPO's per-minibatch normalization."""
    return (adv - adv.mean()) / (adv.std(correction=0) + 1e-8)


def mark_episode_chunks(outcome, ep_start, step, episodes):
    """Rollout bookkeeping for the advantage-sign check: the chunks t in [ep_start[env], step] of each episode that
    ended at chunk `step` get +1 (it succeeded) or -1 (it failed) in outcome (T, N); ep_start moves past them.
    Episodes still running at the end of the rollout stay 0 (their outcome is unknown)."""
    for ep in episodes:
        i = ep["env"]
        outcome[ep_start[i]:step + 1, i] = 1.0 if ep["success"] else -1.0
        ep_start[i] = step + 1


def half_gradient_cosine(actor, noise_net, state, rgb, chain, adv, env, n_envs, k, dims, logprob_clip):
    """Cosine between two independent estimates of the policy gradient, grad of mean(A * log pi) (advantages
    standardized within each), from the rollout's envs split in two halves. Near 1: the iteration's samples agree on
    a direction; near 0: the update is mostly noise. With n samples per estimate and a per-sample signal-to-noise
    ratio r, the cosine is about n r^2 / (1 + n r^2), so it tells how many samples a reliable direction would need."""
    if n_envs < 2:
        return float("nan")
    params = [p for p in list(actor.parameters()) + list(noise_net.parameters()) if p.requires_grad]
    grads = []
    for half in (env < n_envs // 2, env >= n_envs // 2):
        a = standardize_advantages(adv[half])
        cond = actor.encode(state[half], None if rgb is None else rgb[half])
        lp = normalize_log_prob(chain_log_prob(actor, noise_net, cond, chain[half])[0], k, dims, logprob_clip)
        g = torch.autograd.grad((a * lp).mean(), params, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]))
    return float(F.cosine_similarity(grads[0], grads[1], dim=0))


# ----------------------------------------------------------------------------- critic

class Critic(nn.Module):
    """V(s), trained from scratch: the released code's CriticObs / ViTCritic (91gaozhidao/dmpo model/common/critic.py),
    a ResidualMLP [in, 256, 256, 256, 1] on the normalized state or, for images, on an encoder of its own built like the
    policy's (models.ImageEncoder: light ViT + SpatialEmb || state), without augmentation or dropout inside."""

    def __init__(self, cfg, hidden=256):
        super().__init__()
        image = cfg.obs_mode == "image"
        self.encoder = models.ImageEncoder(dataclasses.replace(cfg, augment=False, spatial_dropout=0.0)) if image else None
        self.net = models.ResidualMLP(self.encoder.out_dim if image else cfg.input_dim, hidden, 1, n_blocks=1)

    def forward(self, state_n, rgb=None):
        x = self.encoder(state_n, rgb) if self.encoder is not None else state_n
        return self.net(x).squeeze(-1)


CSV_COLS = ["iteration", "env_steps", "wall_s", "episodes", "success_rate", "return_mean", "length_mean",
            "policy_loss", "value_loss", "entropy", "bc_loss", "bc_coef", "approx_kl", "approx_kl_mean", "approx_kl_std",
            "clipfrac", "std_mean",
            "explained_var", "adv_success", "adv_failure", "grad_cos_halves", "ratio_dev_first", "actor_lr", "critic_lr",
            "grad_steps", "kl_stop", "rollout_s", "update_s",
            "env_steps_per_s", "eval_episodes", "eval_success_rate", "eval_ci_low", "eval_ci_high",
            "eval_return_mean", "eval_length_mean"]


def settings(parser, args, argv, device):
    """Flags (parsed by `parser` into `args`) -> the run's settings. A new run takes the defaults table for its checkpoint's task and the preset,
    overridden by the typed flags; --resume takes every training setting from <out>/latest.pt (cli.resume_settings:
    a differing training flag is an error). Returns (args, task, policy, out dir, resume checkpoint or None)."""
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out (the run directory)")
        out = Path(args.out)
        latest = out / "latest.pt"
        if not latest.exists():
            raise ValueError(f"--resume: {latest} does not exist")
        resume_ckpt = models.load_checkpoint(str(latest), device)
        cli.require_stage(resume_ckpt, "finetune", latest)
        tasks.check_layout(resume_ckpt, resume_ckpt["task"], latest)
        saved = resume_ckpt["args"]
        run_defaults = vars(make_parser(resume_ckpt["task"], resume_ckpt["config"]["obs_mode"],
                                        saved.get("preset", "cpu")).parse_args([]))
        args = cli.resume_settings(parser, argv, args, saved, RUN_CONTROL, latest, run_defaults)
        if args.iterations <= resume_ckpt["step"]:
            raise ValueError(f"--resume: --iterations {args.iterations} is not beyond the run's iteration "
                             f"{resume_ckpt['step']} ({latest}); pass a larger --iterations to continue")
        policy, _ = models.load_policy(str(latest), device)     # the fine-tuned actor
        return args, tasks.get_task(resume_ckpt["task"]), policy, out, resume_ckpt
    if args.ckpt is None:
        raise ValueError("pass --ckpt (a pretrained checkpoint) or --out DIR --resume")
    policy, pre = models.load_policy(args.ckpt, device, use_ema=True)
    if not (args.task or pre.get("task")):
        raise ValueError(f"{args.ckpt} names no task; pass --task")
    task = tasks.get_task(args.task or pre["task"])
    tasks.check_layout(pre, task, args.ckpt)
    typed = cli.explicit_flags(parser, argv)
    if "bc_coef" in typed and "bc_coef_final" not in typed:
        args.bc_coef_final = args.bc_coef          # a typed --bc-coef is constant unless told otherwise
    out = Path(args.out or f"runs/ft_{task.name}_{policy.cfg.obs_mode}_K{args.ft_steps}_bc{args.bc_coef:g}_s{args.seed}")
    if (out / "latest.pt").exists():
        raise ValueError(f"{out / 'latest.pt'} exists: pass --resume to continue it or --out to start a new run")
    args.out = str(out)
    cli.policy_fits_task(policy.cfg, task, tasks.obs_dims(task, policy.cfg.obs_mode)[0],
                         f"{args.ckpt} (trained for {pre.get('task', 'an unnamed task')})")
    return args, task, policy, out, None


def main(argv=None):
    # --- settings: a new run starts from --ckpt; --resume restores everything but the run-control flags ----------
    try:
        parser = parser_for(argv)
        args = parser.parse_args(argv)
        torch.set_num_threads(args.threads)          # run-control flags: the same on a resumed run
        device = models.setup_device(models.resolve_device(args.device))
        args, task, policy, out, resume_ckpt = settings(parser, args, argv, device)
        if args.min_std >= args.max_std:
            raise ValueError(f"--min-std {args.min_std} must be below --max-std {args.max_std}")
        if args.dense_reward and (task.suite != "robosuite" or args.terminate_on_success):
            # ending at success would pay the shaped reward for *not* finishing (reaching alone earns ~0.4 a step)
            raise ValueError("--dense-reward is for robosuite tasks and needs --no-terminate-on-success")
        obs_mode = policy.cfg.obs_mode
    except (ValueError, FileNotFoundError, tasks.TaskError) as e:
        sys.exit(f"error: {e}")
    latest = out / "latest.pt"
    out.mkdir(parents=True, exist_ok=True)
    for name in cli.remove_stale_tmp(out):
        print(f"removed {out / name} (a partial checkpoint of a run killed while saving)")
    print(cli.format_settings(args))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    K, image = args.ft_steps, obs_mode == "image"
    dims = task.chunk * task.act_dim

    # --- networks: trained actor (all of it, encoder included), frozen pretrained copy, noise net, critic ---------
    actor = policy.eval()                        # eval mode throughout: no dropout / in-net augmentation, so the
    actor.cfg.inference_steps = K                # rollout and update log-probs come from the same function
    actor_old = copy.deepcopy(actor).requires_grad_(False).eval()
    noise_net = NoiseNet(actor.encoder.out_dim, task.chunk, task.act_dim, args.noise_hidden, args.min_std, args.max_std).to(device)
    critic = Critic(actor.cfg, args.critic_hidden).to(device)
    actor_opt = models.make_optimizer(list(actor.parameters()) + list(noise_net.parameters()), args.actor_lr, args.actor_wd, device)
    critic_opt = models.make_optimizer(critic.parameters(), args.critic_lr, args.critic_wd, device)
    scaler = tasks.RewardScaler(args.n_envs, args.gamma)
    itr, env_steps, wall_prev = 0, 0, 0.0
    if resume_ckpt is not None:
        actor_old.load_state_dict(resume_ckpt["reference_model"])
        noise_net.load_state_dict(resume_ckpt["noise_net"])
        critic.load_state_dict(resume_ckpt["critic"])
        actor_opt.load_state_dict(resume_ckpt["actor_optimizer"])
        critic_opt.load_state_dict(resume_ckpt["critic_optimizer"])
        scaler.load_state_dict(resume_ckpt["reward_scaler"])
        torch.set_rng_state(resume_ckpt["rng"])
        itr, env_steps, wall_prev = resume_ckpt["step"], resume_ckpt["env_steps"], resume_ckpt["wall_s"]
        print(f"resumed {latest} at iteration {itr} ({env_steps} env steps)")
    print(f"{task.name} ({obs_mode}): fine-tuning a K={K} chain; actor {models.count_params(actor) / 1e6:.2f}M, "
          f"noise net {models.count_params(noise_net) / 1e3:.0f}k, critic {models.count_params(critic) / 1e3:.0f}k params; "
          f"{args.n_envs} envs x {args.n_steps} chunks per iteration; run dir {out}")
    wall0 = time.time()                          # this session's start; wall_prev holds the earlier sessions'

    def save(path):
        models.save_checkpoint(str(path), actor, None, itr, extra={
            "stage": "finetune", "task": task.name, "obs_mode": obs_mode, "obs_layout": tasks.OBS_LAYOUT,
            "args": vars(args), "env_steps": env_steps,
            "noise_net": noise_net.state_dict(), "critic": critic.state_dict(),
            "reference_model": actor_old.state_dict(), "actor_optimizer": actor_opt.state_dict(),
            "critic_optimizer": critic_opt.state_dict(), "reward_scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(), "wall_s": wall_prev + time.time() - wall0})

    def run_eval():
        with torch.random.fork_rng():            # evaluate_policy reseeds torch; keep the training stream intact
            r = evaluate.evaluate_policy(actor, task, obs_mode, args.eval_episodes, (K,), args.eval_envs,
                                         args.eval_seed, args.max_episode_steps, True, progress=False,
                                         workers=args.env_workers)[0]
        return evaluate.eval_columns(r)

    # --- CSV: a new file, or on resume the old one cut back to the checkpoint's iteration -------------------------
    csv_path = out / "log.csv"
    cli.trim_csv(csv_path, CSV_COLS, "iteration", itr)

    def log_row(row):
        cli.append_csv(csv_path, CSV_COLS, row)

    if itr == 0 and args.eval_episodes > 0:      # the pretrained policy's score: the baseline fine-tuning must beat
        row = {"iteration": 0, "env_steps": 0, "wall_s": 0.0, **run_eval()}
        log_row(row)
        print(f"pretrained policy: eval success {row['eval_success_rate']:.3f}, return {row['eval_return_mean']:.2f}")

    # --- environments (training seeds differ from the evaluation seeds; a resumed run gets fresh ones) ------------
    envs = tasks.ChunkVecEnv(task, obs_mode, args.n_envs, args.seed + 10_000 * itr, args.terminate_on_success,
                             args.max_episode_steps, args.env_workers, args.dense_reward, actor.cfg.obs_steps)
    obs = envs.reset()
    T, N = args.n_steps, args.n_envs

    def to_tensors(o):
        s = actor.normalize_state(torch.as_tensor(o["state"], device=device))
        return s, (torch.as_tensor(o["rgb"], device=device) if image else None)

    # --- rollout buffers, allocated once: every slot is overwritten each iteration (b_boot is re-zeroed) ----------
    b_state = torch.zeros(T, N, actor.cfg.input_dim, device=device)   # normalized: the encoder's input
    b_rgb = torch.zeros(T, N, *obs["rgb"].shape[1:], dtype=torch.uint8, device=device) if image else None
    b_chain = torch.zeros(T, N, K + 1, task.chunk, task.act_dim, device=device)
    b_logp = torch.zeros(T, N, device=device)
    b_value = torch.zeros(T, N, device=device)
    b_reward = torch.zeros(T, N, device=device)
    b_done = torch.zeros(T, N, device=device)
    b_boot = torch.zeros(T, N, device=device)      # V(final obs) of truncated episodes, 0 for terminations
    b_mu = torch.zeros(T, N, K, task.chunk, task.act_dim, device=device)    # the acting chain's transition means
    b_std = torch.zeros(T, N, K, task.chunk, task.act_dim, device=device)   # and stds (for the KL split)
    b_outcome = torch.zeros(T, N, device=device)   # +1 / -1: chunk of an episode that succeeded / failed, 0: unknown

    bar = tqdm(total=args.iterations, initial=itr, desc=f"finetune {task.name}", dynamic_ncols=True)
    while itr < args.iterations:
        itr += 1
        t_start, steps_before = time.time(), env_steps
        # ===================== rollout: T chunks in N envs with the noisy chain =====================
        b_boot.zero_()
        b_outcome.zero_()
        ep_start = np.zeros(N, dtype=np.int64)
        episodes, stds = [], []
        for step in range(T):
            state_n, rgb = to_tensors(obs)
            with torch.no_grad():
                cond = actor.encode(state_n, rgb)
                chain = sample_chain(actor, noise_net, cond, K, args.noise_clip)
                lp, _, std, mu = chain_log_prob(actor, noise_net, cond, chain)
                b_value[step] = critic(state_n, rgb)
            b_state[step], b_chain[step], b_mu[step], b_std[step] = state_n, chain, mu, std
            b_logp[step] = normalize_log_prob(lp, K, dims, args.logprob_clip)
            if image:
                b_rgb[step] = rgb
            stds.append(std.mean().item())
            action = actor.unnormalize_action(chain[:, -1].clamp(-1, 1)).cpu().numpy()
            obs, reward, done, info = envs.step(action)
            env_steps += int(info["steps"].sum())
            episodes += info["episodes"]
            mark_episode_chunks(b_outcome, ep_start, step, info["episodes"])
            if args.reward_scaling:
                reward = scaler(reward, done)
            b_reward[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            b_done[step] = torch.as_tensor(done, dtype=torch.float32, device=device)
            trunc = np.flatnonzero(info["truncated"])
            if len(trunc):                         # time limit: bootstrap from the value of the last real observation
                fs, frgb = to_tensors({k: v[trunc] for k, v in info["final_obs"].items()})
                with torch.no_grad():
                    b_boot[step, torch.as_tensor(trunc, device=device)] = critic(fs, frgb)
        with torch.no_grad():
            next_value = critic(*to_tensors(obs))
        rollout_s = time.time() - t_start

        # ===================== flatten; image tasks: augment once, recompute old log-probs / values ================
        B = T * N
        f_state, f_chain = b_state.flatten(0, 1), b_chain.flatten(0, 1)
        f_rgb = b_rgb.flatten(0, 1) if image else None
        f_logp, f_mu, f_std = b_logp.flatten(), b_mu.flatten(0, 1), b_std.flatten(0, 1)
        if image and args.augment:                 # the released PPO image buffer (agent/finetune/reinflow/buffer.py) shifts every image once
            f_rgb = torch.cat([models.random_shift(f_rgb[i:i + 256].float()).round().to(torch.uint8)
                               for i in range(0, B, 256)])
            with torch.no_grad():
                for i in range(0, B, 256):
                    sl = slice(i, i + 256)
                    cond = actor.encode(f_state[sl], f_rgb[sl])
                    lp, _, f_std[sl], f_mu[sl] = chain_log_prob(actor, noise_net, cond, f_chain[sl])
                    f_logp[sl] = normalize_log_prob(lp, K, dims, args.logprob_clip)
                    b_value.view(-1)[sl] = critic(f_state[sl], f_rgb[sl])
        with torch.no_grad():                      # BC targets: the frozen pretrained policy from zero noise
            f_aold = torch.cat([reference_action(actor_old, f_state[i:i + 1024], f_rgb[i:i + 1024] if image else None, K)
                                for i in range(0, B, 1024)])

        # ===================== GAE over chunk steps (termination cuts, truncation bootstraps) ======================
        adv = compute_gae(b_reward, b_value, b_done, b_boot, next_value, args.gamma, args.gae_lambda)
        f_ret = (adv + b_value).flatten()
        f_adv, f_value = adv.flatten(), b_value.flatten()

        # ===================== PPO update =====================
        bc_coef = bc_coef_at(itr, args.bc_coef, args.bc_coef_final, args.bc_decay_start, args.bc_decay_end)
        critic_lr = cosine_warmup_restarts(itr, args.critic_lr, args.critic_lr_min, args.critic_lr_cycle, args.critic_lr_warmup)
        for g in critic_opt.param_groups:
            g["lr"] = critic_lr
        train_actor = itr > args.critic_warmup
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "bc_loss", "approx_kl", "approx_kl_mean",
                                 "approx_kl_std", "clipfrac")}
        grad_steps, kl_stop, ratio_dev_first = 0, False, None
        grad_cos = (half_gradient_cosine(actor, noise_net, f_state, f_rgb, f_chain, f_adv,
                                         torch.arange(B, device=device) % N, N, K, dims, args.logprob_clip)
                    if train_actor else None)
        t_update = time.time()
        for epoch in range(args.update_epochs):
            perm = torch.randperm(B, device=device)
            for start in range(0, B, args.minibatch_size):
                idx = perm[start:start + args.minibatch_size]
                s_mb, rgb_mb = f_state[idx], (f_rgb[idx] if image else None)
                v_loss = 0.5 * (critic(s_mb, rgb_mb) - f_ret[idx]).pow(2).mean()
                loss = args.vf_coef * v_loss
                if train_actor:
                    cond = actor.encode(s_mb, rgb_mb)
                    lp, ent, std_new, mu_new = chain_log_prob(actor, noise_net, cond, f_chain[idx])
                    logratio = normalize_log_prob(lp, K, dims, args.logprob_clip) - f_logp[idx]
                    ratio = logratio.exp()
                    if ratio_dev_first is None:    # before this iteration's first actor step the policy is the one
                        ratio_dev_first = (ratio - 1).abs().max().item()   # that acted: ratio 1 (ReinFlow issue #5)
                    mb_adv = standardize_advantages(f_adv[idx])
                    pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                    entropy = (ent / ((K + 1) * dims)).mean()                           # normalized like the log-prob
                    if bc_coef > 0:
                        bc = bc_loss(actor, cond, f_aold[idx], K)
                    else:
                        with torch.no_grad():
                            bc = bc_loss(actor, cond, f_aold[idx], K)
                    loss = pg_loss - args.ent_coef * entropy + loss + bc_coef * bc
                    with torch.no_grad():
                        kl = approx_kl(logratio)
                        stats["approx_kl"].append(kl.item())
                        l_mean, l_std = logratio_parts(f_chain[idx], f_mu[idx], f_std[idx], mu_new, std_new, K, dims)
                        stats["approx_kl_mean"].append(approx_kl(l_mean).item())
                        stats["approx_kl_std"].append(approx_kl(l_std).item())
                        stats["clipfrac"].append(((ratio - 1).abs() > args.clip_coef).float().mean().item())
                        stats["policy_loss"].append(pg_loss.item())
                        stats["entropy"].append(entropy.item())
                        stats["bc_loss"].append(bc.item())
                stats["value_loss"].append(v_loss.item())
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                terms = {"value_loss": stats["value_loss"][-1],
                         "critic_grad_norm": nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)}
                if train_actor:
                    terms.update({k: stats[k][-1] for k in ("policy_loss", "entropy", "bc_loss")})
                    terms["actor_grad_norm"] = nn.utils.clip_grad_norm_(
                        list(actor.parameters()) + list(noise_net.parameters()), args.max_grad_norm)
                try:                               # stop before a non-finite update reaches the weights or a checkpoint
                    cli.check_finite(itr, unit="iteration", **terms)
                except cli.NonFiniteError as e:
                    bar.close()
                    envs.close()
                    sys.exit(cli.nonfinite_exit(e, latest, "iteration"))
                critic_opt.step()
                if train_actor:
                    actor_opt.step()
                grad_steps += 1
                if train_actor and args.target_kl > 0 and kl.item() > args.target_kl:
                    kl_stop = True                 # KL early stop ends this iteration's update
                    break
            if kl_stop:
                break
        update_s = time.time() - t_update

        # ===================== logging, evaluation, checkpoints =====================
        wall = wall_prev + time.time() - wall0
        last_itr = itr == args.iterations or (args.max_minutes > 0 and wall >= 60 * args.max_minutes)
        with torch.no_grad():
            var_y = f_ret.var()
            explained_var = float(1 - (f_ret - f_value).var() / var_y) if var_y > 0 else float("nan")
            # the advantage sign check: chunks of successful episodes should average a positive advantage
            adv_outcome = {f"adv_{name}": float(adv[b_outcome == sign].mean())
                           for name, sign in (("success", 1.0), ("failure", -1.0)) if (b_outcome == sign).any()}
        row = {"iteration": itr, "env_steps": env_steps, "wall_s": round(wall, 1), "episodes": len(episodes),
               "bc_coef": bc_coef, "std_mean": float(np.mean(stds)), "explained_var": explained_var,
               "actor_lr": args.actor_lr if train_actor else 0.0, "critic_lr": critic_lr, "grad_steps": grad_steps,
               "kl_stop": int(kl_stop), "rollout_s": round(rollout_s, 2), "update_s": round(update_s, 2),
               "env_steps_per_s": round((env_steps - steps_before) / max(time.time() - t_start, 1e-9), 1)}
        row.update({k: float(np.mean(v)) for k, v in stats.items() if v}, **adv_outcome)
        if ratio_dev_first is not None:
            row.update(ratio_dev_first=ratio_dev_first, grad_cos_halves=grad_cos)
        if episodes:
            row.update(success_rate=float(np.mean([e["success"] for e in episodes])),
                       return_mean=float(np.mean([e["return"] for e in episodes])),
                       length_mean=float(np.mean([e["length"] for e in episodes])))
        if args.eval_episodes > 0 and ((args.eval_every and itr % args.eval_every == 0) or last_itr):
            row.update(run_eval())
        log_row(row)
        bar.update(1)
        bar.set_postfix_str(" ".join(f"{k} {row[k]:.3g}" for k in ("success_rate", "return_mean", "approx_kl",
                                                                  "std_mean", "eval_success_rate") if k in row))
        if itr % args.save_every == 0 and not last_itr:
            save(latest)
        if args.keep_every and itr % args.keep_every == 0:
            save(out / f"itr_{itr}.pt")
        if last_itr:
            break
    bar.close()
    envs.close()
    save(latest)
    print(f"done: {itr} iterations, {env_steps} env steps in {(wall_prev + time.time() - wall0) / 60:.1f} min")
    print(f"checkpoint: {latest}  (evaluate: python evaluate.py --ckpt {latest})")


if __name__ == "__main__":
    main()
