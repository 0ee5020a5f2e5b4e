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
import math
import numbers
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("meanflow", "imf", "flow")
DISP_LOSSES = ("infonce_l2", "infonce_l2_released", "infonce_cosine", "hinge", "covariance")


def _real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_steps(steps):
    """K-step sampling needs K >= 1 (K <= 0 used to return the input noise silently)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"inference steps K must be >= 1, got {steps}")
    return int(steps)


@dataclass
class PolicyConfig:
    """Everything needed to rebuild the policy; saved inside every checkpoint."""
    state_dim: int                      # proprio (+ object) state fed to the encoder
    act_dim: int                        # Da
    chunk: int                          # Ta, actions generated per call
    obs_mode: str = "state"             # "state" (MLP encoder) or "image" (light ViT + proprio)
    n_cameras: int = 1                  # image mode: cameras stacked along channels into one ViT
    img_size: int = 96
    # light ViT (IBRL's ViT, Hu et al. 2023, as in 91gaozhidao/dmpo model/common/vit.py: embed2 stem, 121 tokens of 128, 1 layer, 4 heads)
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
    # where xyzw quaternions start in the state (tasks.quaternion_starts): the encoder sees each as the first two
    # columns of its rotation matrix instead of the normalized quaternion (quat_to_rot6d); () = the state as it is
    rot_quats: tuple = ()
    # observation history: the policy conditions on the last obs_steps observations (oldest first), their states
    # concatenated (obs_steps * state_dim) and, in image mode, their frames stacked along channels; 1 = DMPO's configs
    obs_steps: int = 1

    def __post_init__(self):
        if self.obs_mode not in ("state", "image"):
            raise ValueError(f"obs_mode must be 'state' or 'image', got {self.obs_mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.disp_loss not in DISP_LOSSES:
            raise ValueError(f"disp_loss must be one of {DISP_LOSSES}, got {self.disp_loss!r}")
        if not 0.0 <= self.flow_ratio <= 1.0:
            raise ValueError(f"flow_ratio must be in [0, 1], got {self.flow_ratio}")
        if isinstance(self.inference_steps, bool) or not isinstance(self.inference_steps, numbers.Integral) \
                or self.inference_steps < 1:
            raise ValueError(f"inference_steps must be an integer >= 1, got {self.inference_steps!r}")
        if not (_real(self.alpha_disp) and math.isfinite(self.alpha_disp) and self.alpha_disp >= 0):
            raise ValueError(f"alpha_disp must be a finite number >= 0, got {self.alpha_disp!r}")
        if not (_real(self.disp_temp) and math.isfinite(self.disp_temp) and self.disp_temp > 0):
            raise ValueError(f"disp_temp must be a finite number > 0, got {self.disp_temp!r}")
        if isinstance(self.obs_steps, bool) or not isinstance(self.obs_steps, numbers.Integral) or self.obs_steps < 1:
            raise ValueError(f"obs_steps must be an integer >= 1, got {self.obs_steps!r}")
        self.cond_mlp_dims = tuple(self.cond_mlp_dims)
        self.rot_quats = tuple(self.rot_quats)
        starts = sorted(i for i in self.rot_quats if isinstance(i, numbers.Integral) and not isinstance(i, bool))
        if len(starts) != len(self.rot_quats) or any(b < a + 4 for a, b in zip(starts, starts[1:])) or \
                (starts and (starts[0] < 0 or starts[-1] > self.state_dim - 4)):
            raise ValueError(f"rot_quats must be start indices of non-overlapping 4-D blocks of the {self.state_dim}-D "
                             f"state, got {self.rot_quats!r}")

    @property
    def feature_dim(self) -> int:
        """Width of the normalized state the encoder takes: each quaternion in rot_quats becomes 6 numbers."""
        return self.state_dim + 2 * len(self.rot_quats)

    @property
    def obs_width(self) -> int:
        """Width of the raw state `act` takes: obs_steps states of state_dim, oldest first."""
        return self.obs_steps * self.state_dim

    @property
    def input_dim(self) -> int:
        """Width of the encoder's state input: obs_steps normalized states of feature_dim."""
        return self.obs_steps * self.feature_dim

    @property
    def rgb_channels(self) -> int:
        """Channels of the image input `act` and the encoder take: obs_steps frames of 3 * n_cameras, oldest first."""
        return 3 * self.n_cameras * self.obs_steps

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"checkpoint config has unknown keys {sorted(unknown)}")
        return cls(**d)


def quat_to_rot6d(q):
    """xyzw quaternions (..., 4) -> the first two columns of their rotation matrices (..., 6). A rotation has two
    quaternions, q and -q, and a recorded one switches between them where its sign convention flips; the matrix
    columns are continuous in the rotation (Zhou et al. 2019, "On the Continuity of Rotation Representations in
    Neural Networks", arXiv 1812.07035). Entries lie in [-1, 1], so they need no further normalization."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    x, y, z, w = q.unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y + z * w), 2 * (x * z - y * w),
                        2 * (x * y - z * w), 1 - 2 * (x * x + z * z), 2 * (y * z + x * w)], dim=-1)


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
    """t and r get separate embeddings (91gaozhidao/dmpo model/flow/mlp_meanflow.py): Sinusoidal(16) -> Linear(16,32) -> Mish -> Linear(32,16)."""
    return nn.Sequential(SinusoidalEmb(dim), nn.Linear(dim, 2 * dim), nn.Mish(), nn.Linear(2 * dim, dim))


class ResidualMLP(nn.Module):
    """Linear(in, h) -> [x + L2(mish(L1(mish(x))))] * n_blocks -> Linear(h, out)  (DPPO/DMPO head)."""

    def __init__(self, in_dim, hidden, out_dim, n_blocks=1):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)]) for _ in range(n_blocks))
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x):
        # F.linear on the layers' own weights: the same arithmetic as calling the nn.Linear modules, without their
        # per-call module dispatch (a batch-1 head evaluation is dispatch-bound on a CPU)
        x = F.linear(x, self.inp.weight, self.inp.bias)
        for l1, l2 in self.blocks:
            x = x + F.linear(F.mish(F.linear(F.mish(x), l1.weight, l1.bias)), l2.weight, l2.bias)
        return F.linear(x, self.out.weight, self.out.bias)


def mish_and_slope(x):
    """(mish(x), d mish / dx) with mish(x) = x tanh(softplus(x)): the slope is tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)."""
    th = torch.tanh(F.softplus(x))
    return x * th, th + x * torch.sigmoid(x) * (1 - th * th)


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
    """Fuse ViT tokens with proprioception (91gaozhidao/dmpo model/common/modules.py SpatialEmb): per channel row, [tokens || state] -> Linear -> LN -> ReLU,
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
        self.vit = LightViT(cfg.rgb_channels, cfg.vit_dim, cfg.vit_heads, cfg.vit_depth, cfg.img_size)
        self.spatial = SpatialEmb(self.vit.n_tokens, cfg.vit_dim, cfg.input_dim, cfg.vit_dim, cfg.spatial_dropout)
        self.out_dim = cfg.vit_dim + cfg.input_dim

    def forward(self, state, rgb):              # rgb: uint8 or float in [0, 255], (B, 3*cams*obs_steps, H, W)
        img = rgb.float() / 255.0 - 0.5
        if self.training and self.augment:
            img = random_shift(img)
        return torch.cat([self.spatial(self.vit(img), state), state], dim=-1)


class StateEncoder(nn.Module):
    """cond_emb = MLP(state) (Gym configs: [obs, 64, 16], Mish)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.net = mlp([cfg.input_dim, *cfg.cond_mlp_dims])
        self.out_dim = cfg.cond_mlp_dims[-1]

    def forward(self, state, rgb=None):
        return self.net(state)


# ----------------------------------------------------------------------------- dispersive losses

def dispersive_loss(emb, kind="infonce_l2", temp=0.5, margin=1.0):
    """Spread a batch of observation embeddings (B, D) apart, against representation collapse.

    infonce_l2 (default): log mean_{i,j} exp(-||z_i - z_j||^2 / temp), the InfoNCE loss with only negative pairs
      of "Diffuse and Disperse" (Wang & He 2025, arXiv 2506.09027, eq. 6) that the DMPO paper adds to MeanFlow. The
      mean includes i = j, which bounds it in [-log B, 0]: pairs already far apart stop contributing.
    infonce_l2_released: the form in the released DMPO code (91gaozhidao/dmpo model/loss/dispersive_loss.py):
      -mean_i log sum_j exp(min(||z_i - z_j|| / temp, 10)) with unsquared distances and the diagonal clamped to
      e^10, which dominates every row until distances reach 10 * temp, so its gradient is ~1e-4 at collapse.
    infonce_cosine: log mean_{i,j} exp(cos(z_i, z_j) / temp).
    hinge: mean_{i != j} relu(margin - ||z_i - z_j||).
    covariance: mean(offdiag(C)^2) + mean(relu(1 - diag(C))) with C the batch covariance (decorrelate, keep variance).
    """
    b = emb.shape[0]
    if kind == "infonce_l2":
        sq = (emb[:, None, :] - emb[None, :, :]).pow(2).sum(-1)
        return torch.logsumexp(-sq.flatten() / temp, dim=0) - math.log(b * b)
    if kind == "infonce_l2_released":
        # S_ij = -d_ij / temp, diagonal -1e9, S clamped to [-10, 10]; loss = -mean_i logsumexp_j(-S_ij)
        d = torch.sqrt((emb[:, None, :] - emb[None, :, :]).pow(2).sum(-1) + 1e-12)
        s = -d / temp
        s = s.masked_fill(torch.eye(b, dtype=torch.bool, device=emb.device), -1e9).clamp(-10.0, 10.0)
        return -torch.logsumexp(-s, dim=1).mean()
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


@torch.no_grad()
def embedding_stats(emb):
    """Collapse diagnostics of N >= 2 embeddings (N, D), computed in float64:
      eff_rank  participation ratio (sum l)^2 / sum l^2 of the covariance eigenvalues l: 1 when the points lie on a
                line (or one direction dominates), D when they spread isotropically; 0 for identical points;
      nn_ratio  mean nearest-neighbour distance / mean pairwise distance: near 0 when the points clump into tight
                groups (distinct observations mapped onto nearly the same embedding), larger when they spread;
      norm      mean L2 norm (growing the norm is a cheap way to satisfy a distance-based dispersive loss)."""
    z = emb.detach().double().flatten(1)
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"embedding_stats needs at least 2 embeddings, got {n}")
    zc = z - z.mean(0, keepdim=True)
    lam = torch.linalg.eigvalsh(zc.T @ zc / (n - 1)).clamp_min(0)
    eff_rank = float(lam.sum() ** 2 / (lam.pow(2).sum())) if lam.sum() > 0 else 0.0
    d = torch.cdist(z, z)
    mean_pair = float(d.sum() / (n * (n - 1)))
    nn = float(d.masked_fill(torch.eye(n, dtype=torch.bool, device=d.device), float("inf")).min(1).values.mean())
    return {"eff_rank": eff_rank, "nn_ratio": nn / mean_pair if mean_pair > 0 else 0.0,
            "norm": float(z.norm(dim=1).mean())}


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
        quat_dims = {i + k for i in cfg.rot_quats for k in range(4)}
        self.register_buffer("keep_dims", torch.tensor([i for i in range(cfg.state_dim) if i not in quat_dims]),
                             persistent=False)    # derived from the config, not saved

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

    def _derived(self, key, deps, build):
        """A value computed from the tensors `deps` (buffers, parameters) and kept until one of them changes: in
        place (its version counter moves: set_normalization, load_state_dict, an optimizer step) or by being
        replaced or moved (its storage changes: .to(device), .double()). The check is a few attribute reads per call,
        which is what lets `act` skip the per-call arithmetic on constants. Built outside inference mode and without
        autograd, so the value serves inference and training alike; the entry holds its deps' storages, so a stale
        address cannot be reused by a new tensor and mistaken for the old one."""
        stamp = tuple((d.data_ptr(), d._version) for d in deps)
        cache = self.__dict__.setdefault("_derived_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            val = build()
        if len(cache) > 64:                   # many distinct batch sizes / step counts: start over
            cache.clear()
        cache[key] = (stamp, val, [d.detach() for d in deps])
        return val

    # A state dimension that the data barely moves is treated as constant. In FrankaKitchen the objects no subtask
    # touches (burner knobs, hinge cabinet) vary only by the env's observation noise (spans ~1e-4), which carries
    # nothing to imitate, while min/max scaling would blow a small bump by the policy up to 10^4 (DAgger rollouts
    # reached 4e4). Robosuite and gym data move every state dimension by more than 1e-3.
    STATE_SPAN_MIN = 1e-3

    def _norm_coefs(self, name, lo, hi):
        """x_n = (x - lo) * scale + off with scale = 2 / (hi - lo), off = -1, or 0 and 0 on constant dims (state
        dims spanning less than STATE_SPAN_MIN count as constant)."""
        def build():
            span = hi - lo
            keep = span > (self.STATE_SPAN_MIN if name == "state" else 1e-6)
            return (torch.where(keep, 2 / span.clamp_min(1e-6), torch.zeros_like(span)),
                    torch.where(keep, -torch.ones_like(span), torch.zeros_like(span)))
        return self._derived(("norm", name), (lo, hi), build)

    def normalize_state(self, s):
        """Raw state (..., k * state_dim), k >= 1 states back to back (an observation history, or one state) ->
        (..., k * cfg.feature_dim): each state min/max-normalized, with the quaternions of cfg.rot_quats replaced by
        their rotation-matrix columns (state_features)."""
        scale, off = self._norm_coefs("state", self.state_min, self.state_max)
        return self.normalize_frames(s, self.state_min, scale, off)

    def normalize_frames(self, s, lo, scale, off):
        """normalize_state with the coefficients given (the captured act passes snapshots of them)."""
        f = s.unflatten(-1, (-1, self.cfg.state_dim))
        return self.state_features(f, torch.addcmul(off, f - lo, scale)).flatten(-2)

    def state_features(self, s, s_n):
        """s_n (the normalized state) with each quaternion of cfg.rot_quats, read from the raw state s, as its
        rotation-matrix columns (quat_to_rot6d) after the other dims; s_n itself when there are none."""
        if not self.cfg.rot_quats:
            return s_n
        return torch.cat([s_n[..., self.keep_dims]] + [quat_to_rot6d(s[..., i:i + 4]) for i in self.cfg.rot_quats], -1)

    def normalize_action(self, a):
        scale, off = self._norm_coefs("action", self.action_min, self.action_max)
        return torch.addcmul(off, a - self.action_min, scale)

    def unnormalize_action(self, a):
        """a_env = a_n * (max - min) / 2 + (max + min) / 2 (one fused op on cached constants)."""
        lo, hi = self.action_min, self.action_max
        half, mid = self._derived("unnorm", (lo, hi), lambda: ((hi - lo) / 2, (hi + lo) / 2))
        return torch.addcmul(mid, a, half)

    # -- network -------------------------------------------------------------------------------------------
    def encode(self, state_n, rgb=None):
        """Observation embedding cond_emb (the representation the dispersive loss spreads)."""
        return self.encoder(state_n, rgb)

    @torch.no_grad()
    def embedding_stats(self, state_n, rgb=None, batch=256):
        """embedding_stats of cond_emb for a probe set of normalized observations, in eval mode (no augmentation or
        dropout), batch by batch; the module's train/eval mode is restored."""
        was_training = self.training
        self.eval()
        try:
            emb = torch.cat([self.encode(state_n[i:i + batch], None if rgb is None else rgb[i:i + batch])
                             for i in range(0, len(state_n), batch)])
        finally:
            self.train(was_training)
        return embedding_stats(emb)

    def velocity(self, z, r, t, cond):
        """u(z, r, t | cond) for z (B, Ta, Da), r and t (B,), cond (B, E)."""
        return self.head_from_emb(z, self.t_emb(t), self.r_emb(r), cond)

    @torch.no_grad()
    def velocity_dt(self, z, r, t, cond, z_dot):
        """d/dt u(z, r, t | cond) along the tangent (z_dot, 0, 1) in (z, r, t) -- the MeanFlow JVP -- by forward-mode
        differentiation written out for this head (sinusoidal t embedding -> Linear -> Mish -> Linear, then the
        residual MLP), without autograd: the training losses stop gradients through du/dt, so nothing needs a graph.
        Same values as torch.func.jvp(velocity, (z, r, t), (z_dot, 0, 1))[1] up to float round-off (a test checks),
        at about one extra forward instead of torch.func.jvp's ~2x (batch 128, 512-wide head, one CPU thread)."""
        sin_emb, lin1, _, lin2 = self.t_emb
        f = sin_emb.freqs[None]
        x = t[:, None] * f
        sin, cos = x.sin(), x.cos()
        a = F.linear(torch.cat([sin, cos], -1), lin1.weight, lin1.bias)
        a_dot = F.linear(torch.cat([cos * f, -sin * f], -1), lin1.weight)
        m, slope = mish_and_slope(a)
        t_e = F.linear(m, lin2.weight, lin2.bias)
        t_e_dot = F.linear(slope * a_dot, lin2.weight)
        head = self.head
        h = torch.cat([z.flatten(1), t_e, self.r_emb(r), cond], dim=-1)
        # r and cond have zero tangent: only the z and t-embedding columns of the input layer see one
        k = z[0].numel() + t_e.shape[1]
        x = F.linear(h, head.inp.weight, head.inp.bias)
        x_dot = F.linear(torch.cat([z_dot.flatten(1), t_e_dot], -1), head.inp.weight[:, :k])
        for i, (l1, l2) in enumerate(head.blocks):
            y, s1 = mish_and_slope(x)
            a = F.linear(y, l1.weight, l1.bias)
            a_dot = F.linear(s1 * x_dot, l1.weight)
            b, s2 = mish_and_slope(a)
            if i + 1 < len(head.blocks):    # the last block's primal output is not needed for the tangent
                x = x + F.linear(b, l2.weight, l2.bias)
            x_dot = x_dot + F.linear(s2 * a_dot, l2.weight)
        return F.linear(x_dot, head.out.weight).view_as(z)

    def head_from_emb(self, z, t_emb, r_emb, cond):
        """The velocity head given the time embeddings t_emb(t), r_emb(r) (sampling reuses them across calls)."""
        h = torch.cat([z.flatten(1), t_emb, r_emb, cond], dim=-1)
        return self.head(h).view_as(z)

    # -- training ------------------------------------------------------------------------------------------
    def sample_t_r(self, b, device):
        """(t, r) from logit-normal(mu, sigma): t = max and r = min of two draws; then exactly
        round(flow_ratio * B) random items get r = t (the instantaneous-velocity / flow-matching case)."""
        t, r, _, _ = self._sample_t_r_split(b, device)
        return t, r

    def _sample_t_r_split(self, b, device):
        """sample_t_r plus the permutation that chose the r = t items: perm[:n_eq] have r = t, perm[n_eq:] r <= t.
        The random draws are exactly sample_t_r's (seeded runs see the same batches)."""
        cfg = self.cfg
        s = torch.sigmoid(torch.randn(b, 2, device=device) * cfg.time_sigma + cfg.time_mu)
        t, r = s.max(dim=1).values, s.min(dim=1).values
        if cfg.loss == "flow":
            return t, t.clone(), None, b
        n_eq = int(round(cfg.flow_ratio * b))
        perm = torch.randperm(b, device=device)
        idx = perm[:n_eq]
        r = r.clone()
        r[idx] = t[idx]
        return t, r, perm, n_eq

    def loss(self, state_n, action_n, rgb=None):
        """Total DMPO pretraining loss on normalized data: flow loss + alpha_disp * dispersive(cond_emb).
        Returns (total, {"loss_flow": ..., "loss_disp": ...}).

        Items with r = t have (t - r) du/dt = 0: their MeanFlow / iMF error is || u(z, t, t) - v ||^2, a plain
        forward. Only the r < t items (half the batch at flow_ratio 0.5) go through the JVP; the per-item errors are
        put back in batch order, so the loss equals the full-batch-JVP formulation up to float round-off."""
        cfg = self.cfg
        x = action_n.clamp(-1, 1)
        b = x.shape[0]
        cond = self.encode(state_n, rgb)
        eps = torch.randn_like(x)
        t, r, perm, n_eq = self._sample_t_r_split(b, x.device)
        tb = t[:, None, None]
        z = (1 - tb) * x + tb * eps
        v = eps - x

        if cfg.loss == "flow":              # flow matching / ReFlow baseline: regress v at r = t
            per_item = (self.velocity(z, t, t, cond) - v).pow(2).flatten(1).mean(1)
        else:
            parts, order = [], []
            if n_eq > 0:                    # r = t: the target is v itself, one plain forward
                eq = perm[:n_eq]
                t_eq = t[eq]
                u = self.velocity(z[eq], t_eq, t_eq, cond[eq])
                parts.append((u - v[eq]).pow(2).flatten(1).mean(1))
                order.append(eq)
            if n_eq < b:                    # r < t: u with autograd, its total derivative du/dt without
                lt = perm[n_eq:]
                z_l, v_l, r_l, t_l, c_l = z[lt], v[lt], r[lt], t[lt], cond[lt]
                gap = (t_l - r_l)[:, None, None]
                if cfg.loss == "meanflow":  # MeanFlow eq. (10): u_tgt = v - (t - r) d/dt u, tangent (v, 0, 1)
                    u, dudt = self._u_and_dudt(z_l, r_l, t_l, c_l, v_l)
                    err = (u - (v_l - gap * dudt).detach()).pow(2)
                else:                       # improved MeanFlow (iMF, arXiv 2512.02012): tangent uses the model's own
                    with torch.no_grad():   # instantaneous velocity u(z, t, t), and the regression target is v itself:
                        v_pred = self.velocity(z_l, t_l, t_l, c_l)     # V = u + (t - r) sg(d/dt u) -> ||V - (eps - x)||^2
                    u, dudt = self._u_and_dudt(z_l, r_l, t_l, c_l, v_pred)
                    err = (u + gap * dudt.detach() - v_l).pow(2)
                parts.append(err.flatten(1).mean(1))
                order.append(lt)
            errs = torch.cat(parts) if len(parts) > 1 else parts[0]
            where = torch.cat(order) if len(order) > 1 else order[0]
            per_item = errs.new_empty(b).index_copy(0, where, errs)     # back to batch order

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

    jvp_impl = "manual"                     # "manual": velocity_dt; "func": torch.func.jvp (the reference)

    def _u_and_dudt(self, z, r, t, cond, z_dot):
        """u(z, r, t | cond) with autograd (gradients reach the head and, through cond, the encoder) and
        d/dt u along (z_dot, 0, 1) without (every loss stops its gradient)."""
        if self.jvp_impl == "func":         # the JVP over the head only; cond is a closed-over input, so gradients
            def u_fn(z_, t_):               # still reach the encoder through the primal output u
                return self.velocity(z_, r, t_, cond)
            return torch.func.jvp(u_fn, (z, t), (z_dot, torch.ones_like(t)))
        return self.velocity(z, r, t, cond), self.velocity_dt(z, r, t, cond.detach(), z_dot)

    # -- sampling ------------------------------------------------------------------------------------------
    def _times(self, steps, b, device):
        """[(r_i, t_i, dt_i)] of K-step sampling for batch b: t_i = linspace(1, 0, K+1)[i] as (B,) tensors, r_i the
        next time (MeanFlow) or t_i (flow matching), dt_i = t_i - t_{i+1} as a Python float (exactly the float32
        difference, so multiplying by it rounds as multiplying by the tensor did). Made once per (K, B, device)."""
        flow = self.cfg.loss == "flow"
        cache = self.__dict__.setdefault("_times_cache", {})
        key = (steps, b, str(device), flow)
        hit = cache.get(key)
        if hit is None:
            with torch.inference_mode(False), torch.no_grad():
                ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
                hit = []
                for i in range(steps):
                    t = ts[i].expand(b).clone()
                    r = t if flow else ts[i + 1].expand(b).clone()
                    hit.append((r, t, float((ts[i] - ts[i + 1]).cpu())))
            if len(cache) > 64:
                cache.clear()
            cache[key] = hit
        return hit

    def _time_embs(self, steps, b, device):
        """[(t_emb(t_i), r_emb(r_i), dt_i)] for K-step sampling: the time embeddings of a fixed schedule are
        constants of the weights, so inference computes them once (rebuilt when the time-MLP weights change)."""
        times = self._times(steps, b, device)
        t_emb, r_emb = self.t_emb, self.r_emb
        mods = self.__dict__.get("_time_mods")
        if mods is None or mods[0] is not t_emb or mods[1] is not r_emb:
            mods = (t_emb, r_emb, [*t_emb.modules(), *r_emb.modules()])
            self.__dict__["_time_mods"] = mods
        # read each call from the modules' own dicts (~1 us; Module.parameters() would cost ~20 us), so a parameter
        # replaced outright (load_state_dict(assign=True)) is noticed as well as one changed in place
        deps = [x for mod in mods[2] for d in (mod._parameters, mod._buffers) for x in d.values() if x is not None]
        return self._derived(("temb", steps, b, str(device), self.cfg.loss == "flow"), deps,
                             lambda: [(t_emb(t), r_emb(r), dt) for r, t, dt in times])

    def sample(self, cond, steps=1, noise=None):
        """K-step sampling from noise (t=1) to data (t=0) with t_i = linspace(1, 0, K+1):
            MeanFlow: z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_{i+1}, t_i)   (exact for a perfect u, any K)
            flow:     z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_i, t_i)       (Euler with the instantaneous velocity)
        K = 1 with MeanFlow is a = z - u(z, 0, 1). Clamped to [-1, 1] after every step, as the reference does.
        Without autograd (inference) the time embeddings of the schedule are cached; with autograd (fine-tuning's
        BC loss) they are recomputed so gradients reach the time MLPs. Same numbers either way."""
        steps = check_steps(steps)
        b = int(cond.shape[0])              # (a tensor while tracing: the captured graph has a fixed batch)
        if noise is None:
            z = torch.randn(b, self.cfg.chunk, self.cfg.act_dim, device=cond.device)
        elif torch.is_tensor(noise) and noise.device == cond.device:
            z = noise
        else:
            z = torch.as_tensor(noise, device=cond.device)
        if torch.is_grad_enabled():
            for r, t, dt in self._times(steps, b, cond.device):
                u = self.velocity(z, r, t, cond)
                z = (z - u if dt == 1.0 else z - dt * u).clamp(-1, 1)   # dt = 1 (K = 1): the product is u itself
            return z
        return self.run_schedule(z, cond, self._time_embs(steps, b, cond.device))

    def run_schedule(self, z, cond, embs):
        """The K jumps of sampling given the schedule's [(t_emb(t_i), r_emb(r_i), dt_i)]: z <- clamp(z - dt_i u, -1, 1)
        (dt = 1, i.e. K = 1: the product is u itself). Shared by `sample` and the captured act."""
        for te, re, dt in embs:
            u = self.head_from_emb(z, te, re, cond)
            z = (z - u if dt == 1.0 else z - dt * u).clamp_(-1, 1)
        return z

    def denoise_step(self, z, t, t_next, cond):
        """One jump from t to t_next < t (both (B,)): clamp(z - (t - t_next) u(z, r, t), -1, 1) with r = t_next
        (MeanFlow's average velocity) or r = t (flow matching's instantaneous velocity, i.e. an Euler step).
        The one step rule shared by sampling and by finetune.py's noise-injected chain."""
        r = t if self.cfg.loss == "flow" else t_next
        return (z - (t - t_next)[:, None, None] * self.velocity(z, r, t, cond)).clamp(-1, 1)

    def obs_tensors(self, obs):
        """(state (B, S) float32, rgb (B, C, H, W) or None, single) on the policy's device, from numpy or torch,
        batched or not. On CUDA the host arrays travel in one host-to-device copy (one pinned staging buffer)."""
        dev = self.state_min.device
        s = obs["state"]
        image = self.cfg.obs_mode == "image"
        if image and "rgb" not in obs:
            raise ValueError("image policy needs obs['rgb'] (uint8, C x H x W)")
        rgb = obs["rgb"] if image else None
        single = len(s.shape if hasattr(s, "shape") else np.shape(s)) == 1
        if (s.shape[-1] if hasattr(s, "shape") else np.shape(s)[-1]) != self.cfg.obs_width:
            raise ValueError(f"obs['state'] has {np.shape(s)[-1]} dims, the policy expects {self.cfg.obs_width}"
                             + (f" (the last {self.cfg.obs_steps} states of {self.cfg.state_dim}, oldest first: "
                                "tasks.ObsHistory)" if self.cfg.obs_steps > 1 else ""))
        if dev.type != "cpu":
            host = [x for x in (s, rgb) if x is not None and not (torch.is_tensor(x) and x.device == dev)]
            if len(host) == 2:              # state and image both on the host: pack them, copy once
                st = np.asarray(s.cpu() if torch.is_tensor(s) else s, dtype=np.float32)
                im = np.asarray(rgb.cpu() if torch.is_tensor(rgb) else rgb)
                if single:
                    st, im = st[None], im[None]
                state, rgb = self.to_device_once([st, im])
                return state, rgb, single
        state = s.to(dev, torch.float32) if torch.is_tensor(s) else torch.as_tensor(s, dtype=torch.float32, device=dev)
        if rgb is not None:
            rgb = torch.as_tensor(rgb, device=dev)
        if single:
            state = state[None]
            rgb = rgb[None] if rgb is not None else None
        return state, rgb, single

    def to_device_once(self, arrays):
        """Numpy arrays -> tensors on the policy's CUDA device in one host-to-device copy: packed into a cached
        pinned buffer (16-byte aligned slots), copied asynchronously, viewed back per array. The next call can
        refill the buffer safely because `act` ends with a device-to-host copy on the same stream."""
        dev = self.state_min.device
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offs, n = [], 0
        for a in arrays:
            offs.append(n)
            n += -(-a.nbytes // 16) * 16
        cache = self.__dict__.setdefault("_pinned", {})
        host = cache.get(n)
        if host is None:
            host = cache[n] = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        h = host.numpy()
        for a, o in zip(arrays, offs):
            h[o:o + a.nbytes] = a.reshape(-1).view(np.uint8)
        d = host.to(dev, non_blocking=True)
        return [d[o:o + a.nbytes].view(torch.from_numpy(a[:0].reshape(-1)).dtype).view(a.shape)
                for a, o in zip(arrays, offs)]

    @torch.inference_mode()
    def act(self, obs, steps=None, noise=None):
        """Action chunk(s) in environment units for observation(s) in environment units.

        obs: {"state": (B, S) or (S,), "rgb": (B, C, H, W) or (C, H, W) uint8 (image mode)}; numpy or torch. With
        cfg.obs_steps = N > 1, S = N * state_dim and C = N * 3 * n_cameras: the last N observations, oldest first, as
        tasks.ObsHistory and ChunkVecEnv(obs_steps=N) give them (an episode's first observation repeated at its start).
        The encoder runs once per call whatever the step count K (default cfg.inference_steps, 1 = one network
        evaluation). noise: (B, Ta, Da), best on the policy's device. Returns numpy (B, Ta, Da), or (Ta, Da) for an
        unbatched observation. Per call: the encoder, K head evaluations and a handful of fused ops (normalization
        and un-normalization are one op each on cached constants, the schedule's time embeddings are cached); on
        CUDA one host-to-device and one device-to-host copy."""
        k = check_steps(self.cfg.inference_steps if steps is None else steps)
        state, rgb, single = self.obs_tensors(obs)
        cond = self.encode(self.normalize_state(state), rgb)
        a = self.unnormalize_action(self.sample(cond, k, noise)).cpu().numpy()
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


# ----------------------------------------------------------------------------- captured one-step act (deployment)

class _ActCore(nn.Module):
    """The tensor part of `act` for a fixed batch and step count: normalize -> encode -> K steps from the given
    noise -> un-normalize, the same arithmetic as `act`. Noise is an input, so a captured graph holds no random state;
    the normalization constants and the schedule's time embeddings are snapshots taken here (no caches to check, so
    tracing, torch.compile and CUDA graph capture see plain tensor code)."""

    def __init__(self, policy, steps, batch, device):
        super().__init__()
        self.policy = policy
        with torch.no_grad():
            self.s_lo = policy.state_min.detach().clone()
            self.s_scale, self.s_off = (x.clone() for x in policy._norm_coefs("state", policy.state_min, policy.state_max))
            lo, hi = policy.action_min.detach(), policy.action_max.detach()
            self.a_half, self.a_mid = (hi - lo) / 2, (hi + lo) / 2
            self.times = [(te.clone(), re.clone(), dt) for te, re, dt in policy._time_embs(steps, batch, device)]

    def forward(self, state, noise, rgb=None):
        p = self.policy
        cond = p.encode(p.normalize_frames(state, self.s_lo, self.s_scale, self.s_off), rgb)
        return torch.addcmul(self.a_mid, p.run_schedule(noise, cond, self.times), self.a_half)


CAPTURE_MODES = ("auto", "trace", "compile", "graph")


class CapturedAct:
    """`act` for one batch size and step count, run through a captured graph (see compile_act). Call it like
    `policy.act(obs, steps=None, noise=None)` -> numpy; `.act` is the same method and `.cfg` the policy's config, so it
    stands in for the policy in a control loop. The weights are a snapshot: capture again after changing them."""

    def __init__(self, policy, fn, batch, steps, mode, static=None):
        self.policy, self.cfg, self._fn = policy, policy.cfg, fn
        self.batch, self.steps, self.mode = batch, steps, mode
        self._static = static               # graph mode: (pinned host buffer, device buffer, views, output)

    def __call__(self, obs, steps=None, noise=None):
        if steps is not None and check_steps(steps) != self.steps:
            raise ValueError(f"this captured act runs K={self.steps} steps, got steps={steps}; capture another")
        p = self.policy
        with torch.inference_mode():
            if self._static is not None:
                return self._call_graph(obs, noise)
            state, rgb, single = p.obs_tensors(obs)
            if state.shape[0] != self.batch:
                raise ValueError(f"this captured act takes batch {self.batch}, got {state.shape[0]}; capture another")
            dev = state.device
            z = (torch.randn(self.batch, self.cfg.chunk, self.cfg.act_dim, device=dev) if noise is None
                 else torch.as_tensor(noise, dtype=torch.float32, device=dev))
            a = (self._fn(state, z) if rgb is None else self._fn(state, z, rgb)).cpu().numpy()
        return a[0] if single else a

    act = __call__

    def _call_graph(self, obs, noise):
        host, shapes, out, graph, dev_buf = self._static
        s = np.asarray(obs["state"].cpu() if torch.is_tensor(obs["state"]) else obs["state"], dtype=np.float32)
        single = s.ndim == 1
        s = s.reshape(-1, self.cfg.obs_width)
        if s.shape[0] != self.batch:
            raise ValueError(f"this captured act takes batch {self.batch}, got {s.shape[0]}; capture another")
        # noise=None: drawn from torch's CPU generator (eager act on CUDA draws from the CUDA one)
        z = torch.randn(shapes[1]) if noise is None else noise
        arrays = [s, np.asarray(z.cpu() if torch.is_tensor(z) else z, dtype=np.float32).reshape(shapes[1])]
        if shapes[2] is not None:
            rgb = obs["rgb"]
            arrays.append(np.asarray(rgb.cpu() if torch.is_tensor(rgb) else rgb, dtype=np.uint8).reshape(shapes[2]))
        h = host.numpy()
        for (o, nbytes), a in zip(shapes[3], arrays):      # fill the pinned staging buffer ...
            h[o:o + nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        dev_buf.copy_(host, non_blocking=True)              # ... one host-to-device copy into the graph's inputs
        graph.replay()
        a = out.cpu().numpy()                               # one device-to-host copy
        return a[0] if single else a


def _example_inputs(policy, batch, dev):
    cfg = policy.cfg
    g = torch.Generator().manual_seed(0)
    state = (torch.rand(batch, cfg.obs_width, generator=g) * 2 - 1).to(dev)
    noise = torch.randn(batch, cfg.chunk, cfg.act_dim, generator=g).to(dev)
    rgb = None
    if cfg.obs_mode == "image":
        rgb = torch.randint(0, 256, (batch, cfg.rgb_channels, cfg.img_size, cfg.img_size), generator=g,
                            dtype=torch.uint8).to(dev)
    return state, noise, rgb


def compile_act(policy, batch=1, steps=None, mode="auto"):
    """A captured `act` for deployment: same inputs and outputs as `policy.act` (numpy or torch observations, batched
    or not, `noise=`), for one batch size and step count K (default cfg.inference_steps). Modes:
      trace   (CPU default) torch.jit.trace + torch.jit.freeze of normalize -> encoder -> K head evals ->
              un-normalize: weights, normalization and the schedule's time embeddings become constants, convolutions
              are pre-packed for oneDNN; same numbers as eager `act` up to float round-off (a test checks 1e-5).
      compile torch.compile (CPU: default mode; CUDA: mode="reduce-overhead", i.e. CUDA graphs); slow to compile.
      graph   (CUDA default) a CUDA graph of the whole call, replayed on static device buffers: one host-to-device
              copy of a pinned buffer holding state, noise and image, one replay, one device-to-host copy.
    The policy is put in eval mode. Capture again after the weights change."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"capture mode must be one of {CAPTURE_MODES}, got {mode!r}")
    steps = check_steps(policy.cfg.inference_steps if steps is None else steps)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    policy.eval()
    dev = policy.state_min.device
    if mode == "auto":
        mode = "graph" if dev.type == "cuda" else "trace"
    if mode == "graph" and dev.type != "cuda":
        raise ValueError("capture mode 'graph' needs the policy on a CUDA device; use 'trace' or 'compile' on CPU")
    core = _ActCore(policy, steps, batch, dev).eval()
    state, noise, rgb = _example_inputs(policy, batch, dev)
    inputs = (state, noise) if rgb is None else (state, noise, rgb)
    with torch.no_grad():                   # not inference_mode: tracing would bake inference tensors in as inputs
        if mode == "trace":
            with warnings.catch_warnings():     # batch and K are fixed by design (CapturedAct checks them)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
                fn = torch.jit.freeze(torch.jit.trace(core, inputs, check_trace=False))
                for _ in range(2):          # the profiling executor optimizes on the first calls
                    fn(*inputs)
            return CapturedAct(policy, fn, batch, steps, mode)
        if mode == "compile":
            fn = torch.compile(core, mode="reduce-overhead" if dev.type == "cuda" else None, fullgraph=True)
            for _ in range(3):
                fn(*inputs)
            return CapturedAct(policy, fn, batch, steps, mode)
        # graph: static device buffer = [state | noise | rgb], each slot 16-byte aligned, views as graph inputs
        arrays = [state, noise] + ([rgb] if rgb is not None else [])
        slots, n = [], 0
        for a in arrays:
            nbytes = a.numel() * a.element_size()
            slots.append((n, nbytes))
            n += -(-nbytes // 16) * 16
        dev_buf = torch.zeros(n, dtype=torch.uint8, device=dev)
        views = [dev_buf[o:o + nb].view(a.dtype).view(a.shape) for (o, nb), a in zip(slots, arrays)]
        for v, a in zip(views, arrays):
            v.copy_(a)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):       # warm-up on a side stream (cuBLAS / cuDNN workspaces), as the docs ask
            for _ in range(3):
                core(*views)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = core(*views)
        torch.cuda.synchronize(dev)
        shapes = (views[0].shape, views[1].shape, views[2].shape if rgb is not None else None, slots)
        return CapturedAct(policy, None, batch, steps, mode, static=(host, shapes, out, graph, dev_buf))


# ----------------------------------------------------------------------------- device set-up for training

def setup_device(device):
    """Per-process settings for training on `device` (returns it as a torch.device). CUDA: TF32 tensor-core matmuls
    and convolutions (10-bit mantissa inputs, fp32 accumulation) and cuDNN autotuning for the fixed training
    shapes. CPU: nothing. Uses the legacy allow_tf32 flags only: mixing them with the newer fp32_precision API
    makes torch.get_float32_matmul_precision() raise."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def make_optimizer(params, lr, weight_decay=0.0, device="cpu"):
    """AdamW; on CUDA the fused kernel (one launch for all parameters), on CPU the default implementation."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


# ----------------------------------------------------------------------------- checkpoints

def first_nonfinite(state, label):
    """Name of the first floating tensor of a state dict (or flat dict of tensors) holding NaN or inf, else None:
    e.g. "ema['head.inp.weight']"."""
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            return f"{label}[{k!r}]"
    return None


def save_checkpoint(path, policy, ema=None, step=0, extra=None):
    """One dict, readable with torch.load(weights_only=True): config, weights, EMA weights, normalization, step,
    plus `extra` (optimizer / scheduler state, args) for --resume. Written to a temp file then renamed, so a
    killed run never leaves a half-written checkpoint under the final name; a failed write removes its temp file.
    Refuses (ValueError) weights or normalization with NaN or inf: a diverged run must not replace a good checkpoint."""
    ckpt = {
        "config": asdict(policy.cfg),
        "model": policy.state_dict(),
        "ema": (ema if ema is not None else policy).state_dict(),
        "normalization": {k: getattr(policy, k).detach().cpu().clone() for k in ("state_min", "state_max", "action_min", "action_max")},
        "step": int(step),
    }
    for key in ("model", "ema", "normalization"):
        bad = first_nonfinite(ckpt[key], key)
        if bad:
            raise ValueError(f"refusing to save checkpoint {path}: {bad} contains NaN or inf (a diverged run?)")
    if extra:
        ckpt.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _looks_like_torch_file(path):
    """torch.save writes a zip archive (or, in the legacy format, a pickle stream starting with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or a one-line ValueError: unreadable file, not a DMPO checkpoint, or weights /
    normalization holding NaN or inf."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if not _looks_like_torch_file(path):
            raise ValueError("not a torch checkpoint: neither a zip archive nor a pickle stream")
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # corrupted / not a torch file
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why.split(". ")[0][:200]       # torch's unpickler appends a paragraph of advice
        if not isinstance(e, ValueError) or not why.startswith("not a torch checkpoint"):
            why = f"not a torch checkpoint: {type(e).__name__}: {why}" if isinstance(e, (IndexError, EOFError, KeyError)) \
                else f"{type(e).__name__}: {why}"
        raise ValueError(f"checkpoint {path} could not be read ({why})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a DMPO checkpoint dict")
    missing = {"config", "model", "ema", "normalization", "step"} - set(ckpt)
    if missing:
        raise ValueError(f"checkpoint {path} lacks keys {sorted(missing)}; expected a DMPO checkpoint")
    for key in ("model", "ema", "normalization"):
        if not isinstance(ckpt[key], dict):
            raise ValueError(f"checkpoint {path}: {key} is a {type(ckpt[key]).__name__}, expected a dict of tensors")
        bad = first_nonfinite(ckpt[key], key)
        if bad:
            what = "weights" if key != "normalization" else "normalization"
            raise ValueError(f"checkpoint {path}: {what} {bad} contain NaN or inf (a diverged run?); refusing to load")
    return ckpt


def load_policy(path, device="cpu", use_ema=True):
    """Rebuild the policy from a checkpoint alone (no flags). Uses the EMA weights by default, as fine-tuning does."""
    ckpt = load_checkpoint(path, device)
    try:
        cfg = PolicyConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path} has an invalid config: {e}") from None
    policy = make_policy(cfg, device)
    try:
        policy.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:
        # "Error(s) in loading state_dict for MeanFlowPolicy:\n\tsize mismatch for head.inp.weight: ..." -> keep the
        # first line that names an actual mismatch
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines[1:]), lines[0] if lines else type(e).__name__)
        raise ValueError(f"checkpoint {path} weights do not match its config: {detail}") from None
    for k, v in ckpt["normalization"].items():
        if not torch.equal(getattr(policy, k).cpu(), v.cpu()):
            raise ValueError(f"checkpoint {path}: normalization {k} disagrees with the weights' buffers")
    return policy.eval(), ckpt
