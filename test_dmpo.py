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


def test_infonce_l2_is_bounded():
    z = torch.randn(32, 8) * 100
    assert m.dispersive_loss(z, "infonce_l2") >= -math.log(32) - 1e-5


# ----------------------------------------------------------------------------- networks

def test_image_parameter_counts():
    lift = m.make_policy(m.PolicyConfig(state_dim=9, act_dim=7, chunk=4, obs_mode="image", n_cameras=1))
    assert abs(m.count_params(lift) - 1.78e6) / 1.78e6 < 0.02
    assert m.count_params(lift) == 1_776_636                  # method.md §2, computed from the reference dims
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
    p.set_normalization(s_min, s_max, a_min, a_max)
    a = torch.tensor(rng.uniform(a_min, a_max, (10, 3)), dtype=torch.float32)
    an = p.normalize_action(a)
    assert an.min() >= -1 - 1e-5 and an.max() <= 1 + 1e-5
    assert torch.allclose(p.unnormalize_action(an), a, atol=1e-5)
    sn = p.normalize_state(torch.tensor([[0.5, 1, 1.5, 2, 7.0]]))
    assert torch.allclose(sn, torch.tensor([[0.0, 0, 0, 0, 0]]), atol=1e-6)
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
    with pytest.raises(ValueError, match="do not match"):
        m.load_policy(str(path))


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
    one = [x for x in rows if x["method"] == "meanflow" and x["steps"] == "1"]
    assert all(float(x["ratio"]) == 1.0 and float(x["median_ms"]) > 0 for x in one)
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
    assert rows[-1]["success_rate"] != "" and rows[0]["success_rate"] == ""
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
