"""DMPO core: the MeanFlow one-step policy, dispersive losses and the light ViT.

Read top to bottom: time convention -> building blocks -> encoders -> velocity head ->
MeanFlow / iMF / flow-matching losses -> dispersive losses -> sampling -> the policy object
(normalization, `act`) -> checkpoints.

Time convention (stated once, used everywhere): data at t = 0, noise at t = 1.
    z_t = (1 - t) * x + t * eps,        v = dz_t/dt = eps - x            (instantaneous velocity)
    u(z_t, r, t) = 1/(t - r) * integral_r^t v(z_s, s) ds                  (average velocity, r <= t)
so that z_r = z_t - (t - r) * u(z_t, r, t) exactly, and one step from pure noise is
    a = z - u(z, r=0, t=1).
MeanFlow identity (MeanFlow paper, Geng et al. 2025, eq. 6): differentiating (t - r) u = int_r^t v ds in t gives
    u(z_t, r, t) = v(z_t, t) - (t - r) * d/dt u(z_t, r, t),
with the total derivative d/dt u = v . du/dz + du/dt (tangent (v, 0, 1) in (z, r, t)), computed by a JVP.
"""
import copy
import math
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("meanflow", "imf", "flow")
DISP_LOSSES = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


@dataclass
class PolicyConfig:
    """Everything needed to rebuild the policy; saved inside every checkpoint."""
    state_dim: int                      # proprio (+ object) state fed to the encoder
    act_dim: int                        # Da
    chunk: int                          # Ta, actions generated per call
    obs_mode: str = "state"             # "state" (MLP encoder) or "image" (light ViT + proprio)
    n_cameras: int = 1                  # image mode: cameras stacked along channels into one ViT
    img_size: int = 96
    # light ViT (method.md §2: IBRL ViT, embed2 stem, 121 tokens of 128, 1 layer, 4 heads)
    vit_dim: int = 128
    vit_heads: int = 4
    vit_depth: int = 1
    spatial_dropout: float = 0.1
    augment: bool = True                # random-shift (pad 4) while training, image mode only
    # state encoder (Gym configs: cond_mlp_dims [64, 16])
    cond_mlp_dims: tuple = (64, 16)
    # residual-MLP velocity head: Linear(in, h) -> n_res_blocks x pre-activation block -> Linear(h, out)
    hidden_dim: int = 768
    n_res_blocks: int = 1
    time_emb_dim: int = 16
    # training objective
    loss: str = "meanflow"              # "meanflow" | "imf" (improved MeanFlow) | "flow" (flow matching / ReFlow baseline)
    flow_ratio: float = 0.5             # fraction of the batch with r = t
    time_mu: float = -0.4               # logit-normal(mu, sigma) for (t, r)
    time_sigma: float = 1.0
    adaptive_weight: bool = False       # MeanFlow adaptive loss weighting (off in all DMPO configs)
    adaptive_p: float = 0.5
    adaptive_c: float = 1e-3
    alpha_disp: float = 0.5             # total = flow loss + alpha_disp * dispersive
    disp_loss: str = "infonce_l2"
    disp_temp: float = 0.5
    inference_steps: int = 1            # K used by `act` unless told otherwise

    def __post_init__(self):
        if self.obs_mode not in ("state", "image"):
            raise ValueError(f"obs_mode must be 'state' or 'image', got {self.obs_mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.disp_loss not in DISP_LOSSES:
            raise ValueError(f"disp_loss must be one of {DISP_LOSSES}, got {self.disp_loss!r}")
        if not 0.0 <= self.flow_ratio <= 1.0:
            raise ValueError(f"flow_ratio must be in [0, 1], got {self.flow_ratio}")
        self.cond_mlp_dims = tuple(self.cond_mlp_dims)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"checkpoint config has unknown keys {sorted(unknown)}")
        return cls(**d)


def resolve_device(name="auto"):
    """'auto' -> CUDA when present, else CPU. Nothing else in the project assumes a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(name)


# ----------------------------------------------------------------------------- building blocks

class SinusoidalEmb(nn.Module):
    """Sinusoidal features of a scalar time in [0, 1] (frequencies exp(-k ln(1e4)/(half-1)))."""

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1)), persistent=False)

    def forward(self, t):                       # (B,) -> (B, dim)
        x = t[:, None] * self.freqs[None]
        return torch.cat([x.sin(), x.cos()], dim=-1)


def time_mlp(dim):
    """t and r get separate embeddings (method.md §2): Sinusoidal(16) -> Linear(16,32) -> Mish -> Linear(32,16)."""
    return nn.Sequential(SinusoidalEmb(dim), nn.Linear(dim, 2 * dim), nn.Mish(), nn.Linear(2 * dim, dim))


class ResidualMLP(nn.Module):
    """Linear(in, h) -> [x + L2(mish(L1(mish(x))))] * n_blocks -> Linear(h, out)  (DPPO/DMPO head)."""

    def __init__(self, in_dim, hidden, out_dim, n_blocks=1):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)]) for _ in range(n_blocks))
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x):
        x = self.inp(x)
        for l1, l2 in self.blocks:
            x = x + l2(F.mish(l1(F.mish(x))))
        return self.out(x)


def mlp(dims, act=nn.Mish):
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- encoders

def random_shift(img, pad=4):
    """DrQ random shift: replicate-pad by `pad`, then crop back at an integer offset in [0, 2*pad] per sample."""
    b, c, h, w = img.shape
    padded = F.pad(img, (pad, pad, pad, pad), mode="replicate")
    sy = torch.randint(0, 2 * pad + 1, (b,), device=img.device)
    sx = torch.randint(0, 2 * pad + 1, (b,), device=img.device)
    rows = (sy[:, None] + torch.arange(h, device=img.device))[:, :, None]      # (B, H, 1)
    cols = (sx[:, None] + torch.arange(w, device=img.device))[:, None, :]      # (B, 1, W)
    out = padded[torch.arange(b, device=img.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class LightViT(nn.Module):
    """The 386k-parameter ViT of IBRL used by DMPO: conv stem (k8 s4 -> ReLU -> k3 s2) turns a 96x96 image
    into 11x11 = 121 tokens of 128, plus learned positions, one pre-LN transformer layer, final LayerNorm."""

    def __init__(self, in_ch, dim=128, heads=4, depth=1, img_size=96):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, dim, 8, stride=4), nn.ReLU(), nn.Conv2d(dim, dim, 3, stride=2))
        side = ((img_size - 8) // 4 + 1 - 3) // 2 + 1
        self.n_tokens = side * side
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, self.n_tokens, dim), std=0.02))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, img):                     # img: float (B, C, H, W) in [-0.5, 0.5]
        x = self.stem(img).flatten(2).transpose(1, 2) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)                     # (B, 121, 128)


class SpatialEmb(nn.Module):
    """Fuse ViT tokens with proprioception (method.md §2): per channel row, [tokens || state] -> Linear -> LN -> ReLU,
    then a learned (128 x 128) weighting summed over rows gives one 128-d visual feature."""

    def __init__(self, n_tokens, dim, state_dim, out_dim=128, dropout=0.1):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(n_tokens + state_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(1, dim, out_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens, state):           # (B, N, D), (B, S) -> (B, out_dim)
        x = tokens.transpose(1, 2)              # (B, D, N)
        x = torch.cat([x, state[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        x = (self.proj(x) * self.weight).sum(dim=1)
        return self.dropout(x)


class ImageEncoder(nn.Module):
    """cond_emb = [SpatialEmb(ViT(rgb), state) || state]  (137-d for one camera and a 9-d proprio state)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.augment = cfg.augment
        self.vit = LightViT(3 * cfg.n_cameras, cfg.vit_dim, cfg.vit_heads, cfg.vit_depth, cfg.img_size)
        self.spatial = SpatialEmb(self.vit.n_tokens, cfg.vit_dim, cfg.state_dim, cfg.vit_dim, cfg.spatial_dropout)
        self.out_dim = cfg.vit_dim + cfg.state_dim

    def forward(self, state, rgb):              # rgb: uint8 or float in [0, 255], (B, 3*cams, H, W)
        img = rgb.float() / 255.0 - 0.5
        if self.training and self.augment:
            img = random_shift(img)
        return torch.cat([self.spatial(self.vit(img), state), state], dim=-1)


class StateEncoder(nn.Module):
    """cond_emb = MLP(state) (Gym configs: [obs, 64, 16], Mish)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.net = mlp([cfg.state_dim, *cfg.cond_mlp_dims])
        self.out_dim = cfg.cond_mlp_dims[-1]

    def forward(self, state, rgb=None):
        return self.net(state)


# ----------------------------------------------------------------------------- dispersive losses

def dispersive_loss(emb, kind="infonce_l2", temp=0.5, margin=1.0):
    """Spread a batch of observation embeddings (B, D) apart, against representation collapse.

    infonce_l2 (default): log mean_{i,j} exp(-||z_i - z_j||^2 / temp), the InfoNCE loss with only negative pairs
      of "Diffuse and Disperse" (Wang & He 2025, eq. 6) that DMPO adds to MeanFlow. The mean includes i = j, which
      bounds it in [-log B, 0]: pairs already far apart stop contributing, so features are not pushed to infinity.
      (DMPO's code uses unsquared distances with a clamped diagonal worth e^10 in every row, which leaves a gradient
      of ~1e-4 at collapse; we follow the paper's form.)
    infonce_cosine: log mean_{i,j} exp(cos(z_i, z_j) / temp).
    hinge: mean_{i != j} relu(margin - ||z_i - z_j||).
    covariance: mean(offdiag(C)^2) + mean(relu(1 - diag(C))) with C the batch covariance (decorrelate, keep variance).
    """
    b = emb.shape[0]
    if kind == "infonce_l2":
        sq = (emb[:, None, :] - emb[None, :, :]).pow(2).sum(-1)
        return torch.logsumexp(-sq.flatten() / temp, dim=0) - math.log(b * b)
    if kind == "infonce_cosine":
        z = F.normalize(emb, dim=-1, eps=1e-8)
        return torch.logsumexp((z @ z.T).flatten() / temp, dim=0) - math.log(b * b)
    if kind == "hinge":
        off = ~torch.eye(b, dtype=torch.bool, device=emb.device)
        sq = (emb[:, None, :] - emb[None, :, :]).pow(2).sum(-1)[off]
        return F.relu(margin - torch.sqrt(sq + 1e-8)).mean()
    if kind == "covariance":
        z = emb - emb.mean(0, keepdim=True)
        cov = z.T @ z / (b - 1)
        diag = torch.diagonal(cov)
        d = cov.shape[0]
        return (cov - torch.diag(diag)).pow(2).sum() / max(d * (d - 1), 1) + F.relu(1.0 - diag).mean()
    raise ValueError(f"unknown dispersive loss {kind!r}; expected one of {DISP_LOSSES}")


# ----------------------------------------------------------------------------- the policy

class MeanFlowPolicy(nn.Module):
    """u_theta(z, r, t | obs): average velocity of an action chunk over [r, t], conditioned on the observation.

    Owns its config and its normalization statistics (min-max to [-1, 1] for state and action), so
    `act(obs)` takes environment units and returns an action chunk in environment units."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg) if cfg.obs_mode == "image" else StateEncoder(cfg)
        self.t_emb = time_mlp(cfg.time_emb_dim)
        self.r_emb = time_mlp(cfg.time_emb_dim)
        in_dim = cfg.chunk * cfg.act_dim + 2 * cfg.time_emb_dim + self.encoder.out_dim
        self.head = ResidualMLP(in_dim, cfg.hidden_dim, cfg.chunk * cfg.act_dim, cfg.n_res_blocks)
        for name, dim in (("state", cfg.state_dim), ("action", cfg.act_dim)):
            self.register_buffer(f"{name}_min", -torch.ones(dim))
            self.register_buffer(f"{name}_max", torch.ones(dim))

    # -- normalization: x_n = 2 (x - min) / (max - min) - 1; constant dims (max == min) map to 0 -------------
    def set_normalization(self, state_min, state_max, action_min, action_max):
        for name, val in (("state_min", state_min), ("state_max", state_max), ("action_min", action_min), ("action_max", action_max)):
            val = torch.as_tensor(np.asarray(val), dtype=torch.float32)
            buf = getattr(self, name)
            if val.shape != buf.shape:
                raise ValueError(f"normalization {name} has shape {tuple(val.shape)}, expected {tuple(buf.shape)}")
            if not torch.isfinite(val).all():
                raise ValueError(f"normalization {name} contains NaN or inf")
            buf.copy_(val)

    @staticmethod
    def _scale(x, lo, hi):
        span = hi - lo
        return torch.where(span > 1e-6, 2 * (x - lo) / span.clamp_min(1e-6) - 1, torch.zeros_like(x))

    def normalize_state(self, s):
        return self._scale(s, self.state_min, self.state_max)

    def normalize_action(self, a):
        return self._scale(a, self.action_min, self.action_max)

    def unnormalize_action(self, a):
        return (a + 1) / 2 * (self.action_max - self.action_min) + self.action_min

    # -- network -------------------------------------------------------------------------------------------
    def encode(self, state_n, rgb=None):
        """Observation embedding cond_emb (the representation the dispersive loss spreads)."""
        return self.encoder(state_n, rgb)

    def velocity(self, z, r, t, cond):
        """u(z, r, t | cond) for z (B, Ta, Da), r and t (B,), cond (B, E)."""
        h = torch.cat([z.flatten(1), self.t_emb(t), self.r_emb(r), cond], dim=-1)
        return self.head(h).view_as(z)

    # -- training ------------------------------------------------------------------------------------------
    def sample_t_r(self, b, device):
        """(t, r) from logit-normal(mu, sigma): t = max and r = min of two draws; then exactly
        round(flow_ratio * B) random items get r = t (the instantaneous-velocity / flow-matching case)."""
        cfg = self.cfg
        s = torch.sigmoid(torch.randn(b, 2, device=device) * cfg.time_sigma + cfg.time_mu)
        t, r = s.max(dim=1).values, s.min(dim=1).values
        if cfg.loss == "flow":
            return t, t.clone()
        n_eq = int(round(cfg.flow_ratio * b))
        idx = torch.randperm(b, device=device)[:n_eq]
        r = r.clone()
        r[idx] = t[idx]
        return t, r

    def loss(self, state_n, action_n, rgb=None):
        """Total DMPO pretraining loss on normalized data: flow loss + alpha_disp * dispersive(cond_emb).
        Returns (total, {"loss_flow": ..., "loss_disp": ...})."""
        cfg = self.cfg
        x = action_n.clamp(-1, 1)
        b = x.shape[0]
        cond = self.encode(state_n, rgb)
        eps = torch.randn_like(x)
        t, r = self.sample_t_r(b, x.device)
        tb, rb = t[:, None, None], r[:, None, None]
        z = (1 - tb) * x + tb * eps
        v = eps - x

        # the JVP is taken over the head only; cond is a closed-over input, so gradients still reach the encoder
        # through the primal output u (torch.func.jvp keeps the primal differentiable).
        def u_fn(z_, r_, t_):
            return self.velocity(z_, r_, t_, cond)

        if cfg.loss == "flow":              # flow matching / ReFlow baseline: regress v at r = t
            u = u_fn(z, t, t)
            err = (u - v).pow(2)
        elif cfg.loss == "meanflow":        # MeanFlow eq. (10): u_tgt = v - (t - r) d/dt u, tangent (v, 0, 1)
            u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
            u_tgt = (v - (tb - rb) * dudt).detach()
            err = (u - u_tgt).pow(2)
        else:                               # improved MeanFlow (iMF, arXiv 2512.02012): tangent uses the model's own
            with torch.no_grad():           # instantaneous velocity u(z, t, t), and the regression target is v itself:
                v_pred = u_fn(z, t, t)      # V = u + (t - r) sg(d/dt u)  ->  || V - (eps - x) ||^2
            u, dudt = torch.func.jvp(u_fn, (z, r, t), (v_pred, torch.zeros_like(r), torch.ones_like(t)))
            err = (u + (tb - rb) * dudt.detach() - v).pow(2)

        per_item = err.flatten(1).mean(1)
        if cfg.adaptive_weight:             # MeanFlow adaptive weighting: w = sg(1 / (delta^2 + c)^p)
            per_item = per_item / (per_item.detach() + cfg.adaptive_c).pow(cfg.adaptive_p)
        loss_flow = per_item.mean()

        if cfg.alpha_disp > 0:
            loss_disp = dispersive_loss(cond, cfg.disp_loss, cfg.disp_temp)
            total = loss_flow + cfg.alpha_disp * loss_disp
        else:                               # alpha = 0 is exactly plain MeanFlow (the MP1-style ablation)
            with torch.no_grad():
                loss_disp = dispersive_loss(cond, cfg.disp_loss, cfg.disp_temp)
            total = loss_flow
        return total, {"loss_flow": loss_flow.detach(), "loss_disp": loss_disp.detach()}

    # -- sampling ------------------------------------------------------------------------------------------
    def sample(self, cond, steps=1, noise=None):
        """K-step sampling from noise (t=1) to data (t=0) with t_i = linspace(1, 0, K+1):
            MeanFlow: z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_{i+1}, t_i)   (exact for a perfect u, any K)
            flow:     z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_i, t_i)       (Euler with the instantaneous velocity)
        K = 1 with MeanFlow is a = z - u(z, 0, 1). Clamped to [-1, 1] after every step, as the reference does."""
        b = cond.shape[0]
        z = noise if noise is not None else torch.randn(b, self.cfg.chunk, self.cfg.act_dim, device=cond.device)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
        for i in range(steps):
            z = self.denoise_step(z, ts[i].expand(b), ts[i + 1].expand(b), cond)
        return z

    def denoise_step(self, z, t, t_next, cond):
        """One jump from t to t_next < t (both (B,)): clamp(z - (t - t_next) u(z, r, t), -1, 1) with r = t_next
        (MeanFlow's average velocity) or r = t (flow matching's instantaneous velocity, i.e. an Euler step).
        The one step rule shared by sampling and by finetune.py's noise-injected chain."""
        r = t if self.cfg.loss == "flow" else t_next
        return (z - (t - t_next)[:, None, None] * self.velocity(z, r, t, cond)).clamp(-1, 1)

    @torch.inference_mode()
    def act(self, obs, steps=None, noise=None):
        """Action chunk(s) in environment units for observation(s) in environment units.

        obs: {"state": (B, S) or (S,), "rgb": (B, C, H, W) or (C, H, W) uint8 (image mode)}; numpy or torch.
        The encoder runs once per call whatever the step count K (default cfg.inference_steps, 1 = one network
        evaluation). Returns numpy (B, Ta, Da), or (Ta, Da) for an unbatched observation."""
        dev = self.state_min.device
        state = torch.as_tensor(np.asarray(obs["state"]) if not torch.is_tensor(obs["state"]) else obs["state"], dtype=torch.float32, device=dev)
        single = state.dim() == 1
        if single:
            state = state[None]
        if state.shape[-1] != self.cfg.state_dim:
            raise ValueError(f"obs['state'] has {state.shape[-1]} dims, the policy expects {self.cfg.state_dim}")
        rgb = None
        if self.cfg.obs_mode == "image":
            if "rgb" not in obs:
                raise ValueError("image policy needs obs['rgb'] (uint8, C x H x W)")
            rgb = torch.as_tensor(obs["rgb"], device=dev)
            if single:
                rgb = rgb[None]
        cond = self.encode(self.normalize_state(state), rgb)
        a = self.unnormalize_action(self.sample(cond, steps or self.cfg.inference_steps, noise))
        a = a.cpu().numpy()
        return a[0] if single else a


def make_policy(cfg: PolicyConfig, device="cpu"):
    return MeanFlowPolicy(cfg).to(device)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers (buffers copied)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, policy, ema=None, step=0, extra=None):
    """One dict, readable with torch.load(weights_only=True): config, weights, EMA weights, normalization, step,
    plus `extra` (optimizer / scheduler state, args) for --resume. Written to a temp file then renamed, so a
    killed run never leaves a half-written checkpoint under the final name."""
    ckpt = {
        "config": asdict(policy.cfg),
        "model": policy.state_dict(),
        "ema": (ema if ema is not None else policy).state_dict(),
        "normalization": {k: getattr(policy, k).detach().cpu().clone() for k in ("state_min", "state_max", "action_min", "action_max")},
        "step": int(step),
    }
    if extra:
        ckpt.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # corrupted / not a torch file
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})".splitlines()[0]) from None
    missing = {"config", "model", "ema", "normalization", "step"} - set(ckpt)
    if missing:
        raise ValueError(f"checkpoint {path} lacks keys {sorted(missing)}; expected a DMPO checkpoint")
    return ckpt


def load_policy(path, device="cpu", use_ema=True):
    """Rebuild the policy from a checkpoint alone (no flags). Uses the EMA weights by default, as fine-tuning does."""
    ckpt = load_checkpoint(path, device)
    cfg = PolicyConfig.from_dict(ckpt["config"])
    policy = make_policy(cfg, device)
    try:
        policy.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} weights do not match its config: {str(e).splitlines()[0]}") from None
    for k, v in ckpt["normalization"].items():
        if not torch.equal(getattr(policy, k).cpu(), v.cpu()):
            raise ValueError(f"checkpoint {path}: normalization {k} disagrees with the weights' buffers")
    return policy.eval(), ckpt
