"""Tests of finetune.py (PPO fine-tuning of the noise-injected MeanFlow chain). Seeded, CPU-only, about a minute.

Run: python -m pytest -q test_finetune.py
"""
import copy
import csv
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import evaluate
import finetune as ft
import models
import tasks


def small_policy(loss="meanflow", seed=0):
    torch.manual_seed(seed)
    cfg = models.PolicyConfig(state_dim=5, act_dim=3, chunk=4, cond_mlp_dims=(32, 16), hidden_dim=64, loss=loss)
    return models.make_policy(cfg).eval()


def small_noise_net(policy, min_std=0.05, max_std=0.12):
    return ft.NoiseNet(policy.encoder.out_dim, policy.cfg.chunk, policy.cfg.act_dim, (32, 32), min_std, max_std)


# ----------------------------------------------------------------------------- the chain and its log-probability

@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("loss", ["meanflow", "flow"])
def test_chain_log_prob_is_the_gaussian_chain_density(k, loss):
    """log pi(chain) = log N(x_0; 0, I) + sum_i log N(x_{i+1}; mu_i, sigma_i^2), computed here step by step with
    torch.distributions from the policy's velocity and the noise net, independently of finetune's batched code."""
    policy = small_policy(loss)
    noise_net = small_noise_net(policy)
    cond = policy.encode(torch.rand(7, 5) * 2 - 1)
    with torch.no_grad():
        chain = ft.sample_chain(policy, noise_net, cond, k)
        lp, ent, std, mu = ft.chain_log_prob(policy, noise_net, cond, chain)
    assert chain.shape == (7, k + 1, 4, 3) and lp.shape == (7,) and std.shape == mu.shape == (7, k, 4, 3)

    ts = torch.linspace(1, 0, k + 1)
    want = Normal(0.0, 1.0).log_prob(chain[:, 0]).sum((1, 2))        # the initial-noise term
    init_term = want.clone()
    want_ent = Normal(0.0, 1.0).entropy() * 12 * torch.ones(7)
    with torch.no_grad():
        for i in range(k):
            t = ts[i].expand(7)
            r = t if loss == "flow" else ts[i + 1].expand(7)
            x = chain[:, i]
            mu = (x - (ts[i] - ts[i + 1]) * policy.velocity(x, r, t, cond)).clamp(-1, 1)
            sigma = noise_net(x, cond, t)
            assert ((chain[:, i + 1] - mu).abs() <= 3 * sigma + 1e-6).all()      # noise clipped to +-3 sigma
            want = want + Normal(mu, sigma).log_prob(chain[:, i + 1]).sum((1, 2))
            want_ent = want_ent + Normal(mu, sigma).entropy().sum((1, 2))
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-4)
    # the x_0 term is really part of it: dropping it changes the value by exactly log N(x_0; 0, I)
    assert (init_term < -5).all()
    torch.testing.assert_close(lp - init_term, want - init_term)
    # normalization of the reference: / ((K + 1) Ta Da), clamped
    torch.testing.assert_close(ft.normalize_log_prob(lp, k, 12, clip=0), lp / ((k + 1) * 12))
    assert ft.normalize_log_prob(torch.tensor([-50.0, 50.0]), k, 1, clip=1.0).tolist() == [-1.0, 1.0]


def test_logratio_splits_into_mean_and_std_parts():
    """The two parts add up to the full (unclipped) normalized log-ratio; each vanishes when its moment is unchanged."""
    torch.manual_seed(0)
    policy = small_policy("meanflow")
    noise_net = small_noise_net(policy)
    cond = policy.encode(torch.rand(9, 5) * 2 - 1)
    with torch.no_grad():
        chain = ft.sample_chain(policy, noise_net, cond, 2)
        lp_old, _, std_old, mu_old = ft.chain_log_prob(policy, noise_net, cond, chain)
        for p in list(policy.head.parameters()) + list(noise_net.parameters()):
            p.add_(0.05 * torch.randn_like(p))
        lp_new, _, std_new, mu_new = ft.chain_log_prob(policy, noise_net, cond, chain)
    full = ft.normalize_log_prob(lp_new, 2, 12, clip=0) - ft.normalize_log_prob(lp_old, 2, 12, clip=0)
    l_mean, l_std = ft.logratio_parts(chain, mu_old, std_old, mu_new, std_new, 2, 12)
    assert torch.allclose(l_mean + l_std, full, atol=1e-6) and l_mean.abs().max() > 0 and l_std.abs().max() > 0
    assert torch.equal(ft.logratio_parts(chain, mu_old, std_old, mu_new, std_old, 2, 12)[1], torch.zeros(9))
    assert torch.equal(ft.logratio_parts(chain, mu_old, std_old, mu_old, std_new, 2, 12)[0], torch.zeros(9))
    assert ft.approx_kl(torch.zeros(5)) == 0 and ft.approx_kl(full) > 0


def test_noise_free_chain_is_the_pretrained_sampler():
    """With the injected noise clipped to 0 the chain reproduces MeanFlowPolicy.sample from the same x_0."""
    policy = small_policy()
    noise_net = small_noise_net(policy)
    cond = policy.encode(torch.rand(6, 5) * 2 - 1)
    with torch.no_grad():
        for k in (1, 3):
            torch.manual_seed(1)
            chain = ft.sample_chain(policy, noise_net, cond, k, noise_clip=0.0)
            torch.testing.assert_close(chain[:, -1], policy.sample(cond, k, noise=chain[:, 0]))


def test_std_stays_in_range():
    policy = small_policy()
    noise_net = small_noise_net(policy, 0.05, 0.12)
    x, cond, t = torch.randn(64, 4, 3) * 10, torch.randn(64, 16) * 10, torch.rand(64)
    with torch.no_grad():
        std = noise_net(x, cond, t)
        assert (std >= 0.05 - 1e-7).all() and (std <= 0.12 + 1e-7).all()
        for bias, bound in ((1e3, 0.12), (-1e3, 0.05)):                    # saturated both ways
            noise_net.net[-1].bias.fill_(bias)
            torch.testing.assert_close(noise_net(x, cond, t), torch.full_like(std, bound))
    with pytest.raises(ValueError):
        ft.NoiseNet(16, 4, 3, (8,), 0.2, 0.1)


# ----------------------------------------------------------------------------- BC regularizer and schedules

def test_bc_coef_schedule():
    f = lambda itr: ft.bc_coef_at(itr, 0.2, 0.05, 20, 50)
    assert f(1) == 0.2 and f(20) == 0.2                                     # before the decay
    assert f(50) == pytest.approx(0.05) and f(300) == pytest.approx(0.05)   # after
    assert f(35) == pytest.approx(0.125)                                    # halfway
    assert 0.05 < f(21) < f(20) and f(49) > 0.05
    assert ft.bc_coef_at(7, 0.05, 0.05, 20, 50) == 0.05                     # constant (lift, gym)
    assert ft.bc_coef_at(99, 0.0, 0.0, 20, 50) == 0.0                       # ablation


def test_critic_lr_schedule():
    f = lambda itr: ft.cosine_warmup_restarts(itr, 4.5e-4, 3e-4, 100, 25)
    assert f(1) == pytest.approx(3e-4) and f(26) == pytest.approx(4.5e-4)
    assert f(100) == pytest.approx(3e-4, rel=1e-3) and f(101) == pytest.approx(3e-4)   # restart
    assert all(3e-4 - 1e-12 <= f(i) <= 4.5e-4 + 1e-12 for i in range(1, 301))


def test_bc_loss_zero_for_identical_actor_and_positive_after_perturbation():
    old = small_policy()
    state_n = torch.rand(16, 5) * 2 - 1
    for k in (1, 2):
        a_old = ft.reference_action(old, state_n, None, k)
        new = copy.deepcopy(old)
        assert ft.bc_loss(new, new.encode(state_n), a_old, k).item() == 0.0
        with torch.no_grad():
            new.head.out.weight.add_(0.05 * torch.randn_like(new.head.out.weight))
        loss = ft.bc_loss(new, new.encode(state_n), a_old, k)
        assert loss.item() > 0
        loss.backward()                                                   # and it trains the fine-tuned actor
        assert new.head.out.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- GAE and reward scaling

def test_gae_termination_truncation_and_continuation():
    g, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])     # (T=2, N=3)
    values = torch.tensor([[0.5, 0.5, 0.5], [0.3, 0.3, 0.3]])
    dones = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])       # env1 terminated at t=0, env2 truncated at t=0
    boot = torch.tensor([[0.0, 0.0, 7.0], [0.0, 0.0, 0.0]])        # V(final obs) of env2's truncated episode
    next_value = torch.tensor([0.4, 0.4, 0.4])
    adv = ft.compute_gae(rewards, values, dones, boot, next_value, g, lam)
    a1 = 2.0 + g * 0.4 - 0.3                                        # last step, all envs continue
    torch.testing.assert_close(adv[1], torch.full((3,), a1))
    d0 = 1.0 + g * 0.3 - 0.5                                        # env0: continues into step 1
    torch.testing.assert_close(adv[0, 0], torch.tensor(d0 + g * lam * a1))
    torch.testing.assert_close(adv[0, 1], torch.tensor(1.0 - 0.5))  # termination: no bootstrap, trace cut
    torch.testing.assert_close(adv[0, 2], torch.tensor(1.0 + g * 7.0 - 0.5))   # truncation: bootstrap, trace cut


def test_episode_chunks_are_marked_by_outcome_and_success_gets_positive_advantage():
    """mark_episode_chunks labels each finished episode's chunks; with a sparse 0/1 success reward and a critic that
    predicts the average outcome, GAE gives the chunks of the successful episode a positive mean advantage and those
    of the failed one a negative mean (the sign check logged as adv_success / adv_failure)."""
    T, N = 5, 2
    outcome, start = torch.zeros(T, N), np.zeros(N, dtype=np.int64)
    ended = {1: [{"env": 0, "success": True}], 3: [{"env": 1, "success": False}], 4: [{"env": 0, "success": False}]}
    for step in range(T):
        ft.mark_episode_chunks(outcome, start, step, ended.get(step, []))
    torch.testing.assert_close(outcome, torch.tensor([[1., -1], [1, -1], [-1, -1], [-1, -1], [-1, 0]]))
    rewards, dones = torch.zeros(T, N), torch.zeros(T, N)
    rewards[1, 0] = dones[1, 0] = dones[3, 1] = dones[4, 0] = 1.0        # env 0 succeeds at chunk 1
    adv = ft.compute_gae(rewards, torch.full((T, N), 0.4), dones, torch.zeros(T, N), torch.full((N,), 0.4), 0.99, 0.95)
    assert adv[outcome == 1].mean() > 0 > adv[outcome == -1].mean()


def test_half_gradient_cosine_separates_signal_from_noise():
    """Advantages that reward one direction of the injected noise give two env halves the same policy gradient
    (cosine near 1); advantages unrelated to the actions give unrelated gradients (cosine near 0)."""
    policy = small_policy()
    noise_net = small_noise_net(policy)
    B, N = 2048, 8
    state = torch.rand(B, 5) * 2 - 1
    with torch.no_grad():
        chain = ft.sample_chain(policy, noise_net, policy.encode(state), 1)
        mu = policy.denoise_step(chain[:, 0], torch.ones(B), torch.zeros(B), policy.encode(state))
    env = torch.arange(B) % N
    signal = (chain[:, 1, :, 0] - mu[:, :, 0]).sum(1)          # first action dim pushed above its mean: good
    cos_signal = ft.half_gradient_cosine(policy, noise_net, state, None, chain, signal, env, N, 1, 12, 1.0)
    cos_noise = ft.half_gradient_cosine(policy, noise_net, state, None, chain, torch.randn(B), env, N, 1, 12, 1.0)
    assert cos_signal > 0.85 and abs(cos_noise) < 0.4
    assert math.isnan(ft.half_gradient_cosine(policy, noise_net, state, None, chain, signal, env * 0, 1, 1, 12, 1.0))


def test_reward_scaler_tracks_the_discounted_return_std():
    rng = np.random.default_rng(0)
    sc = tasks.RewardScaler(n_envs=4, gamma=0.9)
    rets, ret = [], np.zeros(4)
    for step in range(200):
        r = rng.normal(1.0, 2.0, 4)
        done = rng.random(4) < 0.05
        out = sc(r, done)
        ret = ret * 0.9 + r
        rets.append(ret.copy())
        ret[done] = 0
        np.testing.assert_allclose(out, np.clip(r / np.sqrt(np.var(np.concatenate(rets)) + 1e-8), -10, 10), rtol=1e-3)
    sc2 = tasks.RewardScaler(4, 0.9)
    sc2.load_state_dict(sc.state_dict())
    assert sc2.state_dict() == sc.state_dict()


# ----------------------------------------------------------------------------- end to end

def fresh_checkpoint(path, task, obs_mode):
    torch.manual_seed(0)
    t = tasks.get_task(task)
    state_dim, n_cams = tasks.obs_dims(t, obs_mode)
    cfg = models.PolicyConfig(state_dim=state_dim, act_dim=t.act_dim, chunk=t.chunk, obs_mode=obs_mode,
                              n_cameras=max(n_cams, 1), cond_mlp_dims=(32, 16), hidden_dim=64)
    models.save_checkpoint(str(path), models.make_policy(cfg), step=0, extra={"task": task, "obs_mode": obs_mode,
                                                                                 "obs_layout": tasks.OBS_LAYOUT})
    return path


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_hopper_two_iterations_then_resume(tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "pre.pt", "hopper", "state")
    out = tmp_path / "ft"
    common = ["--eval-episodes", "2", "--eval-envs", "2", "--eval-every", "1"]
    # 12-step episodes: time-limit truncations (final_obs bootstrap) happen inside the rollout
    ft.main(["--ckpt", str(ckpt), "--out", str(out), "--iterations", "2", "--n-envs", "2", "--n-steps", "6",
             "--minibatch-size", "4", "--update-epochs", "2", "--critic-warmup", "1", "--max-episode-steps", "12",
             "--target-kl", "0", "--seed", "3", *common])
    rows = read_csv(out / "log.csv")
    assert [r["iteration"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["eval_return_mean"] != "" and rows[0]["policy_loss"] == ""      # baseline row
    assert int(rows[1]["env_steps"]) > 0 and rows[1]["policy_loss"] == ""          # critic warm-up
    r2 = rows[2]
    for col in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "std_mean", "bc_coef", "bc_loss",
                "env_steps_per_s", "eval_success_rate", "episodes", "ratio_dev_first", "approx_kl_mean", "approx_kl_std",
                "grad_cos_halves"):
        assert r2[col] != "" and math.isfinite(float(r2[col])), col
    assert float(r2["ratio_dev_first"]) < 1e-5          # the stored log-probs are the acting policy's (ratio 1)
    assert 0.05 <= float(r2["std_mean"]) <= 0.12 and float(r2["bc_coef"]) == 0.05
    assert int(rows[1]["env_steps"]) < int(r2["env_steps"]) <= 2 * (2 * 6 * 4)    # 2 iterations x 2 envs x 6 chunks x Ta

    # the checkpoint is an ordinary policy checkpoint: load_policy and evaluate_policy take it as is
    policy, saved = models.load_policy(str(out / "latest.pt"))
    pre, _ = models.load_policy(str(ckpt))
    assert saved["task"] == "hopper" and saved["obs_mode"] == "state" and saved["step"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), pre.state_dict().values()))
    for k, v in saved["reference_model"].items():                                  # frozen copy stays pretrained
        assert torch.equal(v, pre.state_dict()[k])
    row = evaluate.evaluate_policy(policy, "hopper", "state", episodes=2, n_envs=2, max_episode_steps=12,
                                   progress=False)[0]
    assert row["episodes"] == 2 and math.isfinite(row["return_mean"])

    with pytest.raises(SystemExit):                 # never overwrite a run by accident
        ft.main(["--ckpt", str(ckpt), "--out", str(out), "--iterations", "2"])
    ft.main(["--out", str(out), "--resume", "--iterations", "3", *common])
    rows = read_csv(out / "log.csv")
    assert [r["iteration"] for r in rows] == ["0", "1", "2", "3"]
    assert int(rows[3]["env_steps"]) > int(rows[2]["env_steps"])
    assert float(rows[3]["wall_s"]) >= float(rows[2]["wall_s"])
    resumed = torch.load(out / "latest.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["args"]["n_steps"] == 6               # settings came from the run
    assert resumed["actor_optimizer"]["state"][0]["step"] > saved["actor_optimizer"]["state"][0]["step"]


def test_bc_ablation_flag(tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "pre.pt", "hopper", "state")
    ft.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "ft"), "--iterations", "1", "--n-envs", "1", "--n-steps", "4",
             "--minibatch-size", "4", "--critic-warmup", "0", "--eval-episodes", "0", "--bc-coef", "0"])
    rows = read_csv(tmp_path / "ft" / "log.csv")
    assert [r["iteration"] for r in rows] == ["1"] and float(rows[0]["bc_coef"]) == 0.0
    assert float(rows[0]["bc_loss"]) >= 0.0


def test_lift_image_end_to_end(tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "pre.pt", "lift", "image")
    out = tmp_path / "ft"
    ft.main(["--ckpt", str(ckpt), "--out", str(out), "--iterations", "1", "--n-envs", "1", "--n-steps", "3",
             "--minibatch-size", "3", "--update-epochs", "1", "--critic-warmup", "0", "--eval-episodes", "0",
             "--max-episode-steps", "8"])
    rows = read_csv(out / "log.csv")
    assert [r["iteration"] for r in rows] == ["1"] and math.isfinite(float(rows[0]["policy_loss"]))
    policy, saved = models.load_policy(str(out / "latest.pt"))
    assert policy.cfg.obs_mode == "image" and saved["task"] == "lift"
    assert any(k.startswith("encoder.vit.") for k in saved["critic"])              # the critic has its own ViT


def test_dense_reward_needs_episodes_that_continue_past_success(tmp_path):
    ckpt = fresh_checkpoint(tmp_path / "pre.pt", "lift", "state")
    with pytest.raises(SystemExit, match="--dense-reward .* --no-terminate-on-success"):
        ft.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "ft"), "--dense-reward"])
