"""Tests of the DMPO core (models.py). Seeded and CPU-only; `python -m pytest -q` runs everything."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models as m


def small_cfg(**kw):
    base = dict(state_dim=5, act_dim=3, chunk=4, cond_mlp_dims=(32, 16), hidden_dim=64)
    base.update(kw)
    return m.PolicyConfig(**base)


# ----------------------------------------------------------------------------- MeanFlow identity / JVP

def test_jvp_matches_finite_difference():
    """du/dt along (v, 0, 1) from torch.func.jvp equals a central finite difference of the same path."""
    torch.manual_seed(0)
    p = m.make_policy(small_cfg()).double().eval()
    b = 6
    cond = p.encode(torch.rand(b, 5, dtype=torch.float64) * 2 - 1)
    z = torch.randn(b, 4, 3, dtype=torch.float64)
    v = torch.randn_like(z)
    r, t = torch.rand(b, dtype=torch.float64) * 0.4, 0.5 + torch.rand(b, dtype=torch.float64) * 0.4
    fn = lambda z_, r_, t_: p.velocity(z_, r_, t_, cond)
    _, dudt = torch.func.jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    h = 1e-5
    fd = (fn(z + h * v, r, t + h) - fn(z - h * v, r, t - h)) / (2 * h)
    assert torch.allclose(dudt, fd, atol=1e-6, rtol=1e-5)
    # the hand-written forward mode the losses use gives the same derivative (also with two residual blocks)
    assert torch.allclose(p.velocity_dt(z, r, t, cond, v), dudt, atol=1e-12)
    p2 = m.make_policy(small_cfg(n_res_blocks=2)).double()
    fn2 = lambda z_, r_, t_: p2.velocity(z_, r_, t_, cond)
    _, d2 = torch.func.jvp(fn2, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    assert torch.allclose(p2.velocity_dt(z, r, t, cond, v), d2, atol=1e-12)
    # and the tangent really matters: dropping the z-direction changes the derivative
    _, dudt_t_only = torch.func.jvp(fn, (z, r, t), (torch.zeros_like(v), torch.zeros_like(r), torch.ones_like(t)))
    assert not torch.allclose(dudt, dudt_t_only, atol=1e-4)


def test_meanflow_loss_trains_encoder_and_head():
    torch.manual_seed(0)
    for loss in m.LOSSES:
        p = m.make_policy(small_cfg(loss=loss))
        total, info = p.loss(torch.rand(16, 5) * 2 - 1, torch.rand(16, 4, 3) * 2 - 1)
        total.backward()
        assert torch.isfinite(total)
        assert p.encoder.net[0].weight.grad.abs().sum() > 0, loss
        assert p.head.inp.weight.grad.abs().sum() > 0, loss
        assert set(info) == {"loss_flow", "loss_disp"}


def test_time_sampling_fraction_and_order():
    torch.manual_seed(0)
    p = m.make_policy(small_cfg(flow_ratio=0.25))
    t, r = p.sample_t_r(1000, "cpu")
    assert (r <= t).all() and (t <= 1).all() and (r >= 0).all()
    assert (r == t).sum().item() == 250                     # exactly round(flow_ratio * B) items with r = t
    p = m.make_policy(small_cfg(loss="flow"))
    t, r = p.sample_t_r(100, "cpu")
    assert torch.equal(t, r)                                # flow matching: always instantaneous velocity


def test_alpha_zero_is_plain_meanflow():
    """alpha_disp = 0 gives exactly the gradients of the MeanFlow loss alone (the MP1-style ablation)."""
    state, act = torch.rand(32, 5) * 2 - 1, torch.rand(32, 4, 3) * 2 - 1
    grads = []
    for alpha in (0.0, 0.5):
        torch.manual_seed(1)
        p = m.make_policy(small_cfg(alpha_disp=alpha))
        torch.manual_seed(2)
        total, info = p.loss(state, act)
        if alpha == 0:
            assert torch.equal(total.detach(), info["loss_flow"])
        total.backward()
        grads.append(p.encoder.net[0].weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])              # the dispersive term does act on the encoder


def test_k1_sampling_is_z_minus_u():
    torch.manual_seed(0)
    for loss in ("meanflow", "imf"):
        p = m.make_policy(small_cfg(loss=loss)).eval()
        cond = p.encode(torch.rand(8, 5) * 2 - 1)
        z = torch.randn(8, 4, 3)
        with torch.no_grad():
            ref = (z - p.velocity(z, torch.zeros(8), torch.ones(8), cond)).clamp(-1, 1)
            assert torch.equal(p.sample(cond, 1, z), ref)
            # K = 2 is two such average-velocity jumps, 1 -> 0.5 -> 0
            h = (z - 0.5 * p.velocity(z, torch.full((8,), 0.5), torch.ones(8), cond)).clamp(-1, 1)
            two = (h - 0.5 * p.velocity(h, torch.zeros(8), torch.full((8,), 0.5), cond)).clamp(-1, 1)
            assert torch.allclose(p.sample(cond, 2, z), two)


def _old_full_batch_loss(p, state_n, action_n, rgb=None):
    """Reference: the loss as it was before the r = t / r < t split (one JVP over the whole batch)."""
    cfg = p.cfg
    x = action_n.clamp(-1, 1)
    cond = p.encode(state_n, rgb)
    eps = torch.randn_like(x)
    t, r = p.sample_t_r(x.shape[0], x.device)
    tb, rb = t[:, None, None], r[:, None, None]
    z = (1 - tb) * x + tb * eps
    v = eps - x
    u_fn = lambda z_, r_, t_: p.velocity(z_, r_, t_, cond)
    if cfg.loss == "meanflow":
        u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        err = (u - (v - (tb - rb) * dudt).detach()).pow(2)
    else:
        with torch.no_grad():
            v_pred = u_fn(z, t, t)
        u, dudt = torch.func.jvp(u_fn, (z, r, t), (v_pred, torch.zeros_like(r), torch.ones_like(t)))
        err = (u + (tb - rb) * dudt.detach() - v).pow(2)
    per_item = err.flatten(1).mean(1)
    if cfg.adaptive_weight:
        per_item = per_item / (per_item.detach() + cfg.adaptive_c).pow(cfg.adaptive_p)
    loss_flow = per_item.mean()
    return loss_flow + cfg.alpha_disp * m.dispersive_loss(cond, cfg.disp_loss, cfg.disp_temp), loss_flow


@pytest.mark.parametrize("loss", ["meanflow", "imf"])
@pytest.mark.parametrize("flow_ratio", [0.0, 0.5, 1.0])
def test_split_loss_matches_full_batch_jvp(loss, flow_ratio):
    """JVP only for the r < t items (hand-written forward mode or torch.func.jvp): same loss and gradients as the
    full-batch torch.func.jvp formulation, same RNG consumption."""
    g = torch.Generator().manual_seed(3)
    state, act = torch.rand(24, 5, generator=g) * 2 - 1, torch.rand(24, 4, 3, generator=g) * 2 - 1
    for adaptive, impl in ((False, "manual"), (True, "manual"), (False, "func")):
        torch.manual_seed(0)
        p = m.make_policy(small_cfg(loss=loss, flow_ratio=flow_ratio, adaptive_weight=adaptive))
        p.jvp_impl = impl                                  # hand-written forward mode, or torch.func.jvp
        torch.manual_seed(7)
        total, info = p.loss(state, act)
        after = torch.randn(3)                             # the RNG stream continues where it did before
        total.backward()
        new_grads = {k: v.grad.clone() for k, v in p.named_parameters()}
        p.zero_grad()
        torch.manual_seed(7)
        ref_total, ref_flow = _old_full_batch_loss(p, state, act)
        assert torch.equal(after, torch.randn(3))
        ref_total.backward()
        assert torch.allclose(total, ref_total, rtol=1e-5, atol=1e-7), (total.item(), ref_total.item())
        assert torch.allclose(info["loss_flow"], ref_flow.detach(), rtol=1e-5, atol=1e-7)
        for k, v in p.named_parameters():
            assert torch.allclose(new_grads[k], v.grad, rtol=1e-4, atol=1e-6), k
        assert new_grads["encoder.net.0.weight"].abs().sum() > 0        # the encoder still gets gradients


def test_act_matches_straightforward_computation():
    """act = unnormalize(clamp(z - u(z, 0, 1 | encode(normalize(s))))) exactly, batched or not, numpy or torch
    input, state and image policies; K = 2 is two average-velocity jumps."""
    torch.manual_seed(0)
    for cfg in (small_cfg(), m.PolicyConfig(state_dim=9, act_dim=7, chunk=4, obs_mode="image", rot_quats=(3,)),
                m.PolicyConfig(state_dim=23, act_dim=7, chunk=4, rot_quats=(3, 12, 19), cond_mlp_dims=(16, 8), hidden_dim=32)):
        p = m.make_policy(cfg).eval()
        sd, da = cfg.state_dim, cfg.act_dim
        p.set_normalization(-np.arange(1, sd + 1), np.arange(1, sd + 1) * 2.0, -np.ones(da) * 3, np.ones(da) * 0.5)
        rng = np.random.default_rng(0)
        obs = {"state": rng.uniform(-2, 2, (3, sd)).astype(np.float32)}
        if cfg.obs_mode == "image":
            obs["rgb"] = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
        z = torch.randn(3, cfg.chunk, da)
        with torch.no_grad():
            rgb = torch.as_tensor(obs["rgb"]) if "rgb" in obs else None
            cond = p.encode(p.normalize_state(torch.as_tensor(obs["state"])), rgb)
            one = (z - p.velocity(z, torch.zeros(3), torch.ones(3), cond)).clamp(-1, 1)
            h = (z - 0.5 * p.velocity(z, torch.full((3,), 0.5), torch.ones(3), cond)).clamp(-1, 1)
            two = (h - 0.5 * p.velocity(h, torch.zeros(3), torch.full((3,), 0.5), cond)).clamp(-1, 1)
        assert np.array_equal(p.act(obs, 1, noise=z), p.unnormalize_action(one).numpy())
        assert np.allclose(p.act(obs, 2, noise=z), p.unnormalize_action(two).numpy(), atol=1e-6)
        tobs = {k: torch.as_tensor(v) for k, v in obs.items()}
        assert np.array_equal(p.act(tobs, 1, noise=z), p.act(obs, 1, noise=z))
        single = {k: v[1] for k, v in obs.items()}
        # (batch 1 vs batch 3 may round differently inside the matmuls)
        assert np.allclose(p.act(single, 1, noise=z[1:2]), p.act(obs, 1, noise=z)[1], atol=1e-5)
        torch.manual_seed(4)
        a = p.act(obs)                                      # noise=None draws randn(B, Ta, Da) as before
        torch.manual_seed(4)
        assert np.array_equal(a, p.act(obs, noise=torch.randn(3, cfg.chunk, da)))


def test_act_caches_follow_weight_and_normalization_changes():
    """act caches the normalization constants and the schedule's time embeddings; they must track in-place weight
    updates (optimizer, load_state_dict), set_normalization and device / dtype moves."""
    torch.manual_seed(0)
    p, q = m.make_policy(small_cfg()).eval(), m.make_policy(small_cfg()).eval()
    obs, z = {"state": np.full((2, 5), 0.3, np.float32)}, torch.randn(2, 4, 3)
    p.act(obs, 1, noise=z)
    p.act(obs, 3, noise=z)
    p.load_state_dict(q.state_dict())                       # in-place copies into every parameter and buffer
    assert np.array_equal(p.act(obs, 1, noise=z), q.act(obs, 1, noise=z))
    assert np.array_equal(p.act(obs, 3, noise=z), q.act(obs, 3, noise=z))
    r = m.make_policy(small_cfg()).eval()
    p.load_state_dict(r.state_dict(), assign=True)          # parameters replaced outright
    assert np.array_equal(p.act(obs, 1, noise=z), r.act(obs, 1, noise=z))
    p.load_state_dict(q.state_dict())
    with torch.no_grad():
        p.t_emb[1].weight.add_(0.5)                         # e.g. an optimizer step on the time MLP
    fresh = m.make_policy(small_cfg()).eval()
    fresh.load_state_dict(p.state_dict())
    assert np.array_equal(p.act(obs, 1, noise=z), fresh.act(obs, 1, noise=z))
    assert not np.array_equal(p.act(obs, 1, noise=z), q.act(obs, 1, noise=z))
    p.set_normalization(np.zeros(5), np.ones(5), np.full(3, 10.0), np.full(3, 20.0))
    a = p.act(obs, 1, noise=z)
    assert a.min() >= 10 - 1e-4 and a.max() <= 20 + 1e-4
    d = p.double()
    assert d.act(obs, 1, noise=z.double()).dtype == np.float64


def test_steps_below_one_are_refused():
    p = m.make_policy(small_cfg()).eval()
    obs = {"state": np.zeros((2, 5), np.float32)}
    for k in (0, -1):
        with pytest.raises(ValueError, match=f"inference steps K must be >= 1, got {k}"):
            p.act(obs, steps=k)
        with pytest.raises(ValueError, match="K must be >= 1"):
            p.sample(p.encode(torch.zeros(2, 5)), k)
        with pytest.raises(ValueError, match="K must be >= 1"):
            m.compile_act(p, 2, k)
    for field, bad in (("inference_steps", 0), ("inference_steps", -1), ("alpha_disp", -0.1),
                       ("alpha_disp", float("nan")), ("disp_temp", 0.0), ("disp_temp", float("inf"))):
        with pytest.raises(ValueError, match=field):
            small_cfg(**{field: bad})


def test_observation_history_policy():
    """obs_steps = N: act takes the last N states back to back (oldest first), each normalized like a single state
    (rotation features included), the encoder sees all of them, and a single state is refused in one line."""
    torch.manual_seed(0)
    cfg = m.PolicyConfig(state_dim=11, act_dim=3, chunk=4, obs_steps=2, rot_quats=(3,), cond_mlp_dims=(16, 8),
                         hidden_dim=32)
    assert (cfg.obs_width, cfg.feature_dim, cfg.input_dim) == (22, 13, 26)
    p = m.make_policy(cfg).eval()
    p.set_normalization(-np.ones(11) * 2, np.ones(11) * 3, -np.ones(3), np.ones(3))
    rng = np.random.default_rng(0)
    old, new = (torch.as_tensor(rng.uniform(-2, 3, (5, 11)), dtype=torch.float32) for _ in range(2))
    both = p.normalize_state(torch.cat([old, new], 1))
    assert both.shape == (5, 26)
    torch.testing.assert_close(both, torch.cat([p.normalize_state(old), p.normalize_state(new)], 1))
    z = torch.randn(5, 4, 3)
    a = p.act({"state": torch.cat([old, new], 1).numpy()}, noise=z)
    a_other = p.act({"state": torch.cat([new, new], 1).numpy()}, noise=z)
    assert a.shape == (5, 4, 3) and not np.allclose(a, a_other)      # the older state changes the action
    with pytest.raises(ValueError, match="expects 22.*last 2 states"):
        p.act({"state": new.numpy()})
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="obs_steps"):
            m.PolicyConfig(state_dim=11, act_dim=3, chunk=4, obs_steps=bad)


def test_captured_act_matches_eager_act():
    """compile_act (CPU: torch.jit.trace + freeze) gives the eager act's actions for the same noise, takes the same
    inputs, and refuses another batch size or K."""
    torch.manual_seed(0)
    for cfg in (small_cfg(), m.PolicyConfig(state_dim=9, act_dim=7, chunk=4, obs_mode="image", rot_quats=(3,)),
                m.PolicyConfig(state_dim=23, act_dim=7, chunk=4, rot_quats=(3, 12, 19), cond_mlp_dims=(16, 8), hidden_dim=32),
                m.PolicyConfig(state_dim=9, act_dim=7, chunk=4, obs_mode="image", rot_quats=(3,), obs_steps=2),
                m.PolicyConfig(state_dim=23, act_dim=7, chunk=4, rot_quats=(3, 12), obs_steps=3, cond_mlp_dims=(16, 8),
                               hidden_dim=32)):
        p = m.make_policy(cfg).eval()
        p.set_normalization(-np.ones(cfg.state_dim), np.ones(cfg.state_dim) * 3, -np.ones(cfg.act_dim), np.ones(cfg.act_dim) * 2)
        rng = np.random.default_rng(1)
        obs = {"state": rng.uniform(-1, 3, (1, cfg.obs_width)).astype(np.float32)}
        if cfg.obs_mode == "image":
            obs["rgb"] = rng.integers(0, 256, (1, 3 * cfg.obs_steps, 96, 96), dtype=np.uint8)
        for k in (1, 3):
            cap = m.compile_act(p, batch=1, steps=k)
            assert cap.mode == "trace" and cap.cfg is p.cfg
            z = torch.randn(1, cfg.chunk, cfg.act_dim)
            np.testing.assert_allclose(cap(obs, noise=z), p.act(obs, k, noise=z), rtol=1e-5, atol=1e-5)
            single = {key: v[0] for key, v in obs.items()}
            out = cap.act(single, steps=k, noise=z)
            assert out.shape == (cfg.chunk, cfg.act_dim)
            np.testing.assert_allclose(out, p.act(single, k, noise=z), rtol=1e-5, atol=1e-5)
            torch.manual_seed(9)
            a = cap(obs)
            torch.manual_seed(9)
            np.testing.assert_allclose(a, p.act(obs, k), rtol=1e-5, atol=1e-5)   # same noise draw as act
        with pytest.raises(ValueError, match="batch 1"):
            cap({key: np.concatenate([v, v]) for key, v in obs.items()})
        with pytest.raises(ValueError, match="K=3"):
            cap(obs, steps=2)
    with pytest.raises(ValueError, match="CUDA"):
        m.compile_act(p, mode="graph")


def test_training_helpers_on_cpu():
    assert m.setup_device("cpu") == torch.device("cpu")
    p = m.make_policy(small_cfg())
    opt = m.make_optimizer(p.parameters(), 1e-3, 1e-6, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 1e-6


# ----------------------------------------------------------------------------- the paper's claim in miniature

def _toy_batch(n, g):
    """Two action modes per observation: a = (+-0.6, 0.5 s), P(+) = 0.3, plus noise 0.02."""
    s = torch.rand(n, 1, generator=g) * 2 - 1
    mode = (torch.rand(n, generator=g) < 0.3).float() * 2 - 1
    a = torch.stack([0.6 * mode, 0.5 * s[:, 0]], -1) + 0.02 * torch.randn(n, 2, generator=g)
    return s, a[:, None, :]


def _train_toy(loss, steps=1500, hidden=256):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    p = m.make_policy(m.PolicyConfig(state_dim=1, act_dim=2, chunk=1, cond_mlp_dims=(32, 16), hidden_dim=hidden,
                                     loss=loss, alpha_disp=0.0))
    opt = torch.optim.Adam(p.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        s, a = _toy_batch(256, g)
        total, _ = p.loss(s, a)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
    return p.eval()


def _toy_eval(p, steps):
    """(fraction within 0.2 of a mode -- modes are 1.2 apart --, frequency of the + mode)."""
    g = torch.Generator().manual_seed(123)
    s = torch.rand(2000, 1, generator=g) * 2 - 1
    with torch.no_grad():
        a = p.sample(p.encode(s), steps, torch.randn(2000, 1, 2, generator=g))[:, 0]
    modes = torch.stack([torch.stack([torch.full_like(s[:, 0], x), 0.5 * s[:, 0]], -1) for x in (-0.6, 0.6)], 1)
    near = (a[:, None, :] - modes).norm(dim=-1).min(1).values < 0.2
    return near.float().mean().item(), (a[:, 0] > 0).float().mean().item()


def test_one_step_meanflow_is_multimodal_flow_matching_is_not():
    torch.set_num_threads(1)
    mf = _train_toy("meanflow")
    near, freq = _toy_eval(mf, 1)
    assert abs(freq - 0.3) < 0.05, f"one-step MeanFlow mode frequency {freq:.3f}, data 0.3"
    assert near > 0.6, f"only {near:.2f} of one-step MeanFlow samples lie near a mode"
    fm = _train_toy("flow")
    near1, _ = _toy_eval(fm, 1)
    near20, freq20 = _toy_eval(fm, 20)
    assert near20 > 0.6 and abs(freq20 - 0.3) < 0.07, (near20, freq20)   # the baseline works with 20 steps ...
    assert near1 < 0.2, near1                                                # ... and collapses to the mean at 1
    assert near > near1 + 0.4


# ----------------------------------------------------------------------------- dispersive losses

@pytest.mark.parametrize("kind", m.DISP_LOSSES)
def test_dispersive_prefers_spread_and_spreads(kind):
    g = torch.Generator().manual_seed(0)
    collapsed = torch.ones(64, 16) + 0.01 * torch.randn(64, 16, generator=g)
    spread = torch.randn(64, 16, generator=g)
    assert m.dispersive_loss(spread, kind) < m.dispersive_loss(collapsed, kind) - 0.05

    def spread_stat(z):
        if kind == "covariance":     # decorrelation: mean squared off-diagonal correlation goes down
            c = torch.corrcoef(z.T)
            return -(c - torch.diag(torch.diagonal(c))).pow(2).mean()
        if kind == "infonce_cosine":
            zn = torch.nn.functional.normalize(z, dim=-1)
            return -(zn @ zn.T).mean()
        return torch.pdist(z).mean()

    # a few gradient steps on the loss alone move embeddings apart
    z = (torch.randn(64, 16, generator=g) * 0.3 + torch.randn(1, 16, generator=g) * (kind == "infonce_cosine")
         + 0.5 * torch.randn(64, 1, generator=g) * (kind == "covariance")).requires_grad_()
    before = spread_stat(z.detach())
    opt = torch.optim.SGD([z], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        m.dispersive_loss(z, kind).backward()
        opt.step()
    assert spread_stat(z.detach()) > before


def test_released_infonce_form_matches_its_definition_and_saturates():
    """The released code's form: -mean_i log sum_j exp(min(d_ij / tau, 10)), diagonal fixed at e^10, unsquared d."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 5, generator=g, dtype=torch.float64)
    d = torch.cdist(z, z)
    ref = -torch.log(torch.exp(torch.where(torch.eye(12, dtype=torch.bool), torch.full_like(d, 10.0),
                                           (d / 0.5).clamp(max=10.0))).sum(1)).mean()
    assert torch.allclose(m.dispersive_loss(z, "infonce_l2_released", 0.5), ref)
    # its gradient at near-collapse is tiny next to the paper's form (the e^10 diagonal dominates every row)
    c = (torch.ones(32, 8) + 0.01 * torch.randn(32, 8, generator=g)).requires_grad_()
    g_rel = torch.autograd.grad(m.dispersive_loss(c, "infonce_l2_released"), c)[0].norm()
    g_pap = torch.autograd.grad(m.dispersive_loss(c, "infonce_l2"), c)[0].norm()
    assert g_rel < 0.05 * g_pap


def test_embedding_stats_separate_collapsed_from_spread():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 16, generator=g)
    line = torch.randn(512, 1, generator=g) * torch.randn(1, 16, generator=g) + 1e-3 * torch.randn(512, 16, generator=g)
    clumps = torch.randn(4, 16, generator=g).repeat(128, 1) + 1e-3 * torch.randn(512, 16, generator=g)
    s, c_line, c_clumps = m.embedding_stats(spread), m.embedding_stats(line), m.embedding_stats(clumps)
    assert s["eff_rank"] > 12 and c_line["eff_rank"] < 1.1                    # one direction left
    assert s["nn_ratio"] > 0.5 and c_clumps["nn_ratio"] < 0.01                 # distinct inputs, same embedding
    assert abs(m.embedding_stats(3 * spread)["norm"] - 3 * s["norm"]) < 1e-6 * s["norm"] * 3
    assert m.embedding_stats(torch.ones(8, 4)) == {"eff_rank": 0.0, "nn_ratio": 0.0, "norm": 2.0}
    p = m.make_policy(small_cfg()).train()
    stats = p.embedding_stats(torch.rand(300, 5) * 2 - 1, batch=64)
    assert p.training and set(stats) == {"eff_rank", "nn_ratio", "norm"} and stats["eff_rank"] > 1


def test_infonce_l2_is_bounded():
    z = torch.randn(32, 8) * 100
    assert m.dispersive_loss(z, "infonce_l2") >= -math.log(32) - 1e-5


# ----------------------------------------------------------------------------- networks

def test_image_parameter_counts():
    lift = m.make_policy(m.PolicyConfig(state_dim=9, act_dim=7, chunk=4, obs_mode="image", n_cameras=1))
    assert abs(m.count_params(lift) - 1.78e6) / 1.78e6 < 0.02
    assert m.count_params(lift) == 1_776_636                  # the paper's 1.78M, computed from the released dims
    transport = m.make_policy(m.PolicyConfig(state_dim=18, act_dim=14, chunk=8, obs_mode="image", n_cameras=2))
    assert m.count_params(transport) == 1_938_384
    assert transport.encoder.vit.n_tokens == 121


def test_image_policy_forward_and_augmentation():
    torch.manual_seed(0)
    p = m.make_policy(m.PolicyConfig(state_dim=18, act_dim=14, chunk=8, obs_mode="image", n_cameras=2))
    rgb = torch.randint(0, 256, (3, 6, 96, 96), dtype=torch.uint8)
    total, _ = p.loss(torch.rand(3, 18) * 2 - 1, torch.rand(3, 8, 14) * 2 - 1, rgb)
    total.backward()
    assert p.encoder.vit.stem[0].weight.grad.abs().sum() > 0
    img = torch.arange(2 * 3 * 96 * 96, dtype=torch.float32).view(2, 3, 96, 96)
    shifted = m.random_shift(img)
    assert shifted.shape == img.shape
    # every output pixel comes from the replicate-padded input at one integer offset in [0, 8]
    pad = torch.nn.functional.pad(img, (4, 4, 4, 4), mode="replicate")
    for i in range(2):
        assert any(torch.equal(shifted[i], pad[i, :, dy:dy + 96, dx:dx + 96]) for dy in range(9) for dx in range(9))
    out = p.eval().act({"state": np.zeros(18, np.float32), "rgb": np.zeros((6, 96, 96), np.uint8)})
    assert out.shape == (8, 14)


# ----------------------------------------------------------------------------- policy object

def test_normalization_round_trip_and_constant_dims():
    p = m.make_policy(small_cfg())
    rng = np.random.default_rng(0)
    a_min, a_max = -rng.random(3) * 5, rng.random(3) * 5 + 0.1
    s_min, s_max = np.zeros(5), np.array([1, 2, 3, 4, 0.0])         # last state dim is constant in the data
    s_max[3] = 1e-4            # and the one before it only noise (e.g. a kitchen object no subtask touches)
    p.set_normalization(s_min, s_max, a_min, a_max)
    a = torch.tensor(rng.uniform(a_min, a_max, (10, 3)), dtype=torch.float32)
    an = p.normalize_action(a)
    assert an.min() >= -1 - 1e-5 and an.max() <= 1 + 1e-5
    assert torch.allclose(p.unnormalize_action(an), a, atol=1e-5)
    sn = p.normalize_state(torch.tensor([[0.5, 1, 1.5, 0.3, 7.0]]))   # far outside both: still 0, not 6e3
    assert torch.allclose(sn, torch.tensor([[0.0, 0, 0, 0, 0]]), atol=1e-6)
    p.set_normalization(s_min, s_max * 0 + 2e-3, a_min, a_max)        # a 2e-3 span is a real signal: scaled
    assert torch.allclose(p.normalize_state(torch.full((1, 5), 1e-3)), torch.zeros(1, 5), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        p.set_normalization(s_min[:4], s_max, a_min, a_max)
    with pytest.raises(ValueError, match="NaN"):
        p.set_normalization(s_min, s_max, a_min * np.nan, a_max)


def test_act_steps_and_units():
    torch.manual_seed(0)
    p = m.make_policy(small_cfg()).eval()
    p.set_normalization(-np.ones(5), np.ones(5), np.full(3, 10.0), np.full(3, 20.0))
    obs = {"state": np.zeros((7, 5), np.float32)}
    for k in (1, 2, 5):
        a = p.act(obs, steps=k)
        assert a.shape == (7, 4, 3) and a.min() >= 10 - 1e-4 and a.max() <= 20 + 1e-4
    assert p.act({"state": np.zeros(5, np.float32)}).shape == (4, 3)
    with pytest.raises(ValueError, match="expects 5"):
        p.act({"state": np.zeros((2, 6), np.float32)})


def test_encoder_runs_once_per_act_call():
    p = m.make_policy(small_cfg()).eval()
    calls = []
    p.encoder.register_forward_hook(lambda *a: calls.append(1))
    p.act({"state": np.zeros((2, 5), np.float32)}, steps=8)
    assert len(calls) == 1


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = m.PolicyConfig(state_dim=9, act_dim=7, chunk=4, obs_mode="image", loss="imf", alpha_disp=0.9)
    p = m.make_policy(cfg)
    p.set_normalization(-np.ones(9), np.ones(9) * 2, -np.ones(7) * 3, np.ones(7))
    ema = m.make_policy(cfg)
    ema.load_state_dict(p.state_dict())
    with torch.no_grad():
        for prm in p.parameters():
            prm.add_(0.01)                          # model and EMA differ; loading must pick EMA by default
    path = tmp_path / "ckpt.pt"
    m.save_checkpoint(str(path), p, ema, step=123, extra={"task": "lift"})
    raw = torch.load(path, weights_only=True)      # plain tensors and Python types only
    assert raw["step"] == 123 and raw["config"]["loss"] == "imf" and raw["task"] == "lift"
    q, _ = m.load_policy(str(path))
    assert q.cfg == cfg
    obs = {"state": np.random.default_rng(0).random((2, 9)).astype(np.float32),
           "rgb": np.random.default_rng(1).integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)}
    noise = torch.randn(2, 4, 7)
    assert np.array_equal(ema.eval().act(obs, noise=noise), q.act(obs, noise=noise))
    q_model, _ = m.load_policy(str(path), use_ema=False)
    assert not np.array_equal(q_model.act(obs, noise=noise), q.act(obs, noise=noise))
    assert not list(tmp_path.glob("*.tmp*"))       # atomic write leaves no temp file


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        m.load_policy(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        m.load_policy(str(bad))
    p = m.make_policy(small_cfg())
    path = tmp_path / "c.pt"
    m.save_checkpoint(str(path), p)
    ck = torch.load(path, weights_only=True)
    ck["config"]["hidden_dim"] = 32                 # config no longer matches the weights
    torch.save(ck, path)
    with pytest.raises(ValueError, match="do not match its config: size mismatch for head.inp.weight"):
        m.load_policy(str(path))
    ck["config"]["hidden_dim"] = 64
    ck["config"]["act_dim"] = 4                     # the message names the first mismatching tensor, not just a header
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"do not match its config: size mismatch for action_min.*torch.Size\(\[3\]\)"):
        m.load_policy(str(path))


def test_checkpoint_refuses_non_finite_and_junk(tmp_path):
    torch.manual_seed(0)
    p = m.make_policy(small_cfg())
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ValueError) as e:
        m.load_policy(str(junk))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {junk} could not be read (not a torch checkpoint")
    # NaN / inf in EMA weights, model weights or normalization: refused on load, naming the tensor
    path = tmp_path / "c.pt"
    m.save_checkpoint(str(path), p, m.make_policy(small_cfg()))
    for key, name, val in (("ema", "head.inp.weight", float("nan")), ("model", "encoder.net.0.bias", float("inf")),
                           ("normalization", "state_max", float("nan"))):
        ck = torch.load(path, weights_only=True)
        ck[key][name].view(-1)[0] = val
        bad = tmp_path / f"bad_{key}.pt"
        torch.save(ck, bad)
        with pytest.raises(ValueError) as e:
            m.load_checkpoint(str(bad))
        assert f"checkpoint {bad}: " in str(e.value) and f"{key}['{name}'] contain NaN or inf" in str(e.value)
        assert "refusing to load" in str(e.value) and "\n" not in str(e.value)
    # saving diverged weights is refused, and the good checkpoint under that name stays
    with torch.no_grad():
        p.head.out.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save.*model\['head.out.bias'\] contains NaN"):
        m.save_checkpoint(str(path), p)
    assert m.load_checkpoint(str(path))["step"] == 0
    # a failing torch.save leaves no temp file behind
    ok = m.make_policy(small_cfg())
    with pytest.raises(Exception):
        m.save_checkpoint(str(tmp_path / "x.pt"), ok, extra={"unpicklable": lambda: 0})
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "x.pt").exists()


def test_config_validation_and_device():
    with pytest.raises(ValueError, match="loss"):
        small_cfg(loss="ddpm")
    with pytest.raises(ValueError, match="disp_loss"):
        small_cfg(disp_loss="l1")
    assert m.resolve_device("cpu").type == "cpu"
    assert m.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            m.resolve_device("cuda")


def test_ema_update():
    a, b = m.make_policy(small_cfg()), m.make_policy(small_cfg())
    pa0 = [x.clone() for x in a.parameters()]
    m.ema_update(a, b, 0.9)
    for x0, x, y in zip(pa0, a.parameters(), b.parameters()):
        assert torch.allclose(x, 0.9 * x0 + 0.1 * y, atol=1e-6)


# ----------------------------------------------------------------------------- benchmark.py

REPO = Path(m.__file__).resolve().parent


def test_ddpm_sampler_shape_range_and_loop_matches_act():
    """The benchmark's DDPM baseline returns one action chunk in env units (its last step is the clipped x0, so it
    stays inside the action range) and its hand-written loop is the same computation as `act`."""
    import benchmark as bm
    torch.manual_seed(0)
    p = m.make_policy(small_cfg()).eval()
    p.set_normalization(-np.ones(5), np.ones(5), -2 * np.ones(3), 2 * np.ones(3))
    sched = bm.ddpm_schedule(10, "cosine")
    abar = np.array([s["sqrt_abar"] ** 2 for s in sched])
    assert len(sched) == 10 and (np.diff(abar) < 0).all() and abar[0] > 0.9 and abar[-1] < 1e-3  # data -> noise
    obs = {"state": np.zeros((1, 5), np.float32)}
    for reencode in (False, True):
        a = bm.loop_act(p, obs, "ddpm", 10, reencode, sched=sched)
        assert a.shape == (1, 4, 3) and np.isfinite(a).all() and np.abs(a).max() <= 2 + 1e-5
    bm.check_loop_matches_act(p, obs)     # raises if the "encoder every step" loop drifts from act()


def test_benchmark_quick_writes_expected_rows(tmp_path):
    out = tmp_path / "bench.csv"
    r = subprocess.run([sys.executable, "benchmark.py", "--quick", "--calls", "5", "--out-csv", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "## Batch-1 latency" in r.stdout and "lift-image" in r.stdout and "intra-op threads 1" in r.stdout
    rows = list(csv.DictReader(out.open()))
    got = {(x["section"], x["policy"], x["method"], x["steps"], x["encoder"]) for x in rows}
    for pol in ("lift-image", "lift-state"):
        for method, k, enc in (("meanflow", "1", "once"), ("meanflow", "2", "once"), ("meanflow", "5", "every step"),
                               ("flow", "20", "once"), ("flow", "20", "every step"),
                               ("ddpm", "100", "once"), ("ddpm", "100", "every step")):
            assert ("latency", pol, method, k, enc) in got, (pol, method, k, enc)
        assert {("train", pol, l) for l in ("flow matching", "meanflow (JVP)", "meanflow + dispersive")} <= \
            {(x["section"], x["policy"], x["method"]) for x in rows}
    one = [x for x in rows if x["method"] == "meanflow" and x["steps"] == "1" and x["variant"] == "eager"]
    assert len(one) == 2 and all(float(x["ratio"]) == 1.0 and float(x["median_ms"]) > 0 for x in one)
    for pol in ("lift-image", "lift-state"):              # the captured act and the bare network have rows too
        assert ("latency", pol, "meanflow", "1", "captured (trace)") in \
            {(x["section"], x["policy"], x["method"], x["steps"], x["variant"]) for x in rows}
        assert ("latency", pol, "encoder + head", "1", "once") in got
    assert "act overhead" in r.stdout and "flow-matching step" in r.stdout
    assert all(x["calls"] == "5" for x in rows if x["section"] == "latency")
    assert {x["params"] for x in rows if x["policy"] == "lift-image"} == {"1776636"}


# ----------------------------------------------------------------------------- pretrain.py / evaluate.py end to end

@pytest.fixture(scope="module")
def lift_demos(tmp_path_factory):
    import collect_demos
    path = tmp_path_factory.mktemp("demos") / "lift.hdf5"
    collect_demos.collect("lift", 3, out=str(path), workers=1, seed=0)
    return str(path)


def test_pretrain_resume_and_evaluate(lift_demos, tmp_path, capsys):
    import evaluate
    import pretrain
    out = tmp_path / "run"
    common = ["--task", "lift", "--dataset", lift_demos, "--batch-size", "32", "--log-every", "10",
              "--save-every", "10", "--eval-episodes", "2", "--eval-envs", "2", "--out", str(out), "--warmup", "5"]
    pretrain.main(common + ["--steps", "20"])
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["step"] for r in rows] == ["10", "20"]
    assert rows[-1]["eval_success_rate"] != "" and rows[0]["eval_success_rate"] == ""   # pretrain.py's CSV_COLS
    assert all(math.isfinite(float(r["loss_flow"])) for r in rows)
    with pytest.raises(SystemExit, match="--resume"):              # never silently overwrite a run
        pretrain.main(common + ["--steps", "20"])
    pretrain.main(common + ["--steps", "30", "--resume"])
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["step"] for r in rows] == ["10", "20", "30"]           # same CSV, same step counter
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["step"] == 30 and ck["task"] == "lift" and "optimizer" in ck
    assert (out / "step_10.pt").exists() and (out / "step_20.pt").exists()

    # evaluate.py needs only the checkpoint, and two runs give identical numbers
    argv = ["--ckpt", str(out / "latest.pt"), "--episodes", "2", "--n-envs", "2", "--inference-steps", "1", "2",
            "--max-episode-steps", "24", "--csv", str(tmp_path / "eval.csv")]
    first, second = evaluate.main(argv), evaluate.main(argv)
    for a, b in zip(first, second):
        for key in ("success_rate", "return_mean", "length_mean"):
            assert a[key] == b[key]
    assert [r["steps"] for r in first] == [1, 2] and first[0]["length_mean"] == 24
    assert len(list(csv.DictReader(open(tmp_path / "eval.csv")))) == 4
    assert "| K |" in capsys.readouterr().out


def test_wilson_interval():
    import evaluate
    lo, hi = evaluate.wilson_interval(100, 100)
    assert hi == 1.0 and 0.96 < lo < 0.97
    lo, hi = evaluate.wilson_interval(50, 100)
    assert abs(lo - 0.404) < 0.002 and abs(hi - 0.596) < 0.002


def test_stage_scripts_fail_in_one_line(tmp_path):
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"junk")
    for cmd, needle in ((["pretrain.py", "--task", "lift", "--dataset", str(bad), "--out", str(tmp_path / "r")], "bad.hdf5"),
                        (["evaluate.py", "--ckpt", str(tmp_path / "missing.pt")], "missing.pt"),
                        (["pretrain.py", "--task", "lift", "--device", "cuda:7", "--out", str(tmp_path / "r")], "cuda")):
        r = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and needle in last, r.stderr[-500:]


def test_pretrain_evaluate_finetune_with_observation_history(lift_demos, tmp_path, monkeypatch):
    """--obs-steps 2: every training input is (previous state, state) of one episode, the first state repeated at an
    episode's start; the checkpoint carries N; evaluate.py and finetune.py feed the policy its history."""
    import evaluate
    import finetune
    import pretrain
    import tasks
    seen = []
    loss = m.MeanFlowPolicy.loss

    def spy(self, state_n, action_n, rgb=None):
        seen.append(state_n.detach().clone())
        return loss(self, state_n, action_n, rgb)
    monkeypatch.setattr(m.MeanFlowPolicy, "loss", spy)
    out = tmp_path / "run"
    pretrain.main(["--task", "lift", "--dataset", lift_demos, "--batch-size", "64", "--steps", "5", "--obs-steps", "2",
                   "--orientation", "rot6d", "--eval-episodes", "0", "--out", str(out), "--warmup", "2"])
    policy, ck = m.load_policy(str(out / "latest.pt"))
    assert policy.cfg.obs_steps == 2 and ck["args"]["obs_steps"] == 2
    data = tasks.load_dataset(lift_demos, "lift")
    norm = policy.normalize_state(torch.as_tensor(data.states))        # (N, F) per step
    first = set(np.cumsum(data.episode_lengths) - data.episode_lengths)
    f = policy.cfg.feature_dim
    batch = seen[0]
    assert batch.shape == (64, 2 * f)
    at_start = 0
    for row in batch:
        steps = [int(j) for j in torch.nonzero((norm == row[f:]).all(1))]    # the step whose chunk this is
        assert any(torch.equal(row[:f], norm[j if j in first else j - 1]) for j in steps)
        at_start += all(j in first for j in steps)
    assert at_start < len(batch)                                        # mostly real histories, not repeats
    rows = evaluate.main(["--ckpt", str(out / "latest.pt"), "--episodes", "2", "--n-envs", "2", "--max-episode-steps",
                          "12", "--csv", str(tmp_path / "eval.csv")])
    assert rows[0]["episodes"] == 2
    finetune.main(["--ckpt", str(out / "latest.pt"), "--out", str(tmp_path / "ft"), "--iterations", "1", "--n-envs",
                   "2", "--n-steps", "3", "--minibatch-size", "3", "--update-epochs", "1", "--critic-warmup", "0",
                   "--max-episode-steps", "8", "--eval-episodes", "0"])
    tuned, ck = m.load_policy(str(tmp_path / "ft" / "latest.pt"))
    assert tuned.cfg.obs_steps == 2 and ck["step"] == 1
