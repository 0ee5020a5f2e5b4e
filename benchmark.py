"""Latency, speed-up, training throughput and success-versus-latency for DMPO policies.

So that anyone can check the paper's efficiency claims (0.6 ms, 1770 Hz on an RTX 4090, 5-20x over multi-step
samplers; arXiv 2601.20701 and its project page) on their own hardware. Read top to bottom: machine description -> policies under test ->
samplers (MeanFlow / flow matching via `act`, our own loop for "encoder every step" and for DDPM) -> timing ->
latency rows -> training throughput -> targets -> Pareto table and plot -> main.

    python benchmark.py                         # fresh lift image + lift state policies, CPU, 1 thread (< 2 min)
    python benchmark.py --ckpt runs/lift/ckpt.pt --compile --torchscript
    python benchmark.py --quick                 # a few seconds, for smoke tests
    python benchmark.py --pareto runs/eval_*.csv   # table + PNG of success rate against latency (no timing)

Rows per policy: the encoder alone, one velocity-head evaluation alone, the two back to back (the bare network),
`policy.act` for MeanFlow K = 1, 2, 5 and flow matching K = 20, DDPM, the "encoder every step" loops, and the captured
one-step act of deployment (`models.compile_act`: TorchScript trace + freeze on CPU, a CUDA graph on CUDA). The act
overhead is `act` minus encoder minus one head evaluation, against the two timed apart (the issue's definition) and
against the two run back to back (which includes the cache effect of running the head right after the encoder).

Latency does not depend on the weights, so without --ckpt the policies are freshly initialized. The DDPM rows use
an untrained epsilon head on the same backbone: they measure latency only, their actions mean nothing.
Timing: batch 1, after warm-up, one thread by default; each row is measured --repeats times, round-robin over
all rows (so a burst of outside load does not hit every repeat of one row), and the repeat with the lowest median
is reported together with its own p90 / p99.
"""
import argparse
import copy
import csv
import dataclasses
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

import cli
from models import PolicyConfig, compile_act, count_params, load_policy, make_policy
from tasks import TASKS, obs_dims

# ----------------------------------------------------------------------------- machine description


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average():
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except (OSError, AttributeError):
        return "n/a"


def machine_lines(devices):
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, {usable} usable by this process)",
        f"- torch {torch.__version__}, python {platform.python_version()}, "
        f"intra-op threads {torch.get_num_threads()}, inter-op threads {torch.get_num_interop_threads()}",
        f"- devices timed: {', '.join(str(d) for d in devices)}",
    ]
    for d in devices:
        if d.type == "cuda":
            lines.append(f"- {d}: {torch.cuda.get_device_name(d)}")
    lines.append(f"- load average at start (1/5/15 min): {load_average()}")
    return lines


def pick_devices(name):
    """'auto' = CPU always, plus CUDA when present; otherwise exactly the named device."""
    if name == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name}: CUDA is not available on this machine (use cpu or auto)")
    return [dev]


# ----------------------------------------------------------------------------- policies under test


def lift_configs():
    """The two policies the paper-size claims are about: lift image (1.78M) and lift state."""
    sd_img, cams = obs_dims("lift", "image")
    sd_state, _ = obs_dims("lift", "state")
    task = TASKS["lift"]
    # The state policy pretrain.py trains on lift by default (robomimic state: head 512, encoder [obs, 128, 32];
    # pretrain.PRESETS["cpu"]["robomimic"]). Written out here because a stage script does not import another one.
    return [
        ("lift-image", PolicyConfig(state_dim=sd_img, act_dim=task.act_dim, chunk=task.chunk, obs_mode="image",
                                    n_cameras=cams)),
        ("lift-state", PolicyConfig(state_dim=sd_state, act_dim=task.act_dim, chunk=task.chunk, obs_mode="state",
                                    hidden_dim=512, cond_mlp_dims=(128, 32))),
    ]


def build_policies(args, device):
    """[(name, policy)] in eval mode on `device`; the same weights on every device (seeded init)."""
    if args.ckpt:
        try:
            policy, _ = load_policy(args.ckpt, device)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        name = os.path.splitext(os.path.basename(args.ckpt))[0] + f"-{policy.cfg.obs_mode}"
        return [(name, policy.eval())]
    out = []
    for name, cfg in lift_configs():
        torch.manual_seed(args.seed)
        out.append((name, make_policy(cfg, device).eval()))
    return out


def with_loss(policy, loss):
    """The same network and weights, sampled as `loss` prescribes (`sample` keys r = t on cfg.loss == 'flow')."""
    is_flow = policy.cfg.loss == "flow"
    if (loss == "flow") == is_flow:
        return policy
    twin = make_policy(dataclasses.replace(policy.cfg, loss=loss), policy.state_min.device)
    twin.load_state_dict(policy.state_dict())
    return twin.eval()


def weights_mb(policy):
    """Size on disk of the deployable weights (state_dict, fp32) -- a checkpoint also carries EMA and optimizer."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.pt")
        torch.save(policy.state_dict(), path)
        return os.path.getsize(path) / 2**20


def example_obs(policy, seed=0):
    """One observation in environment units, batch of one, the way the env loop hands it to `act`."""
    rng = np.random.default_rng(seed)
    cfg = policy.cfg
    obs = {"state": rng.uniform(-1, 1, (1, cfg.obs_width)).astype(np.float32)}
    if cfg.obs_mode == "image":
        obs["rgb"] = rng.integers(0, 256, (1, cfg.rgb_channels, cfg.img_size, cfg.img_size), dtype=np.uint8)
    return obs


# ----------------------------------------------------------------------------- samplers


def ddpm_schedule(n_steps, kind="cosine"):
    """Per-step constants of a discrete DDPM with `n_steps` noise levels, as python floats (computed once, like any
    real sampler does at init, so the timed loop pays only for the network and the update).
    cosine: alpha_bar(s) = cos^2((s/T + 0.008)/1.008 * pi/2) / alpha_bar(0), betas clipped at 0.999 (improved DDPM).
    linear: betas evenly from 1e-4 to 0.02, rescaled by 1000/T so T steps reach the same final noise as 1000."""
    if kind == "cosine":
        f = [math.cos((s / n_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(n_steps + 1)]
        betas = [min(1 - f[k + 1] / f[k], 0.999) for k in range(n_steps)]
    elif kind == "linear":
        scale = 1000.0 / n_steps
        betas = list(np.linspace(1e-4 * scale, 0.02 * scale, n_steps))
    else:
        raise ValueError(f"unknown DDPM schedule {kind!r}")
    steps, abar = [], 1.0
    for k, beta in enumerate(betas):
        abar_prev, abar = abar, abar * (1 - beta)
        steps.append({
            "t": (k + 1) / n_steps,                                   # time fed to the head's t and r embeddings
            "sqrt_abar": math.sqrt(abar), "sqrt_1m_abar": math.sqrt(1 - abar),
            # posterior q(x_{k-1} | x_k, x0) = N(c_x0 * x0 + c_xk * x_k, var)
            "c_x0": math.sqrt(abar_prev) * beta / (1 - abar),
            "c_xk": math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar),
            "std": math.sqrt(beta * (1 - abar_prev) / (1 - abar)),
        })
    return steps                                                      # index k = noise level k+1; sample k = T-1 .. 0


def ddpm_sample(velocity, encode, state_n, rgb, cond, z, sched, reencode=False):
    """Ancestral DDPM sampling with an epsilon-predicting head (the `velocity` head evaluated at r = t = k/T):
    predict eps, form x0 = (x - sqrt(1-abar) eps) / sqrt(abar) clipped to [-1, 1] (Diffusion Policy's clip_sample),
    step to the posterior mean and add posterior noise except at the last step."""
    b = z.shape[0]
    for i, k in enumerate(range(len(sched) - 1, -1, -1)):
        s = sched[k]
        if reencode and i > 0:
            cond = encode(state_n, rgb)
        t = torch.full((b,), s["t"], device=z.device)
        eps = velocity(z, t, t, cond)
        x0 = ((z - s["sqrt_1m_abar"] * eps) / s["sqrt_abar"]).clamp(-1, 1)
        z = s["c_x0"] * x0 + s["c_xk"] * z
        if k > 0:
            z = z + s["std"] * torch.randn_like(z)
    return z


@torch.inference_mode()
def loop_act(policy, obs, method, steps, reencode, encode=None, velocity=None, sched=None):
    """`policy.act` written out, so the encoder can be re-run at every step (what multi-step baselines do) and the
    network can be swapped for a compiled / traced one. Same preprocessing, noise draw and output as `act`."""
    encode = encode or policy.encode
    velocity = velocity or policy.velocity
    dev = policy.state_min.device
    state = torch.as_tensor(obs["state"], dtype=torch.float32, device=dev)
    rgb = torch.as_tensor(obs["rgb"], device=dev) if policy.cfg.obs_mode == "image" else None
    state_n = policy.normalize_state(state)
    cond = encode(state_n, rgb)
    b = state.shape[0]
    z = torch.randn(b, policy.cfg.chunk, policy.cfg.act_dim, device=dev)
    if method == "ddpm":
        z = ddpm_sample(velocity, encode, state_n, rgb, cond, z, sched, reencode)
    else:                                   # MeanFlow (r = next time) or flow matching Euler (r = t), t: 1 -> 0
        ts = torch.linspace(1.0, 0.0, steps + 1, device=dev)
        for i in range(steps):
            if reencode and i > 0:
                cond = encode(state_n, rgb)
            t = ts[i].expand(b)
            r = t if method == "flow" else ts[i + 1].expand(b)
            z = (z - (ts[i] - ts[i + 1]) * velocity(z, r, t, cond)).clamp(-1, 1)
    return policy.unnormalize_action(z).cpu().numpy()


def check_loop_matches_act(policy, obs):
    """Our loop must be the same computation as `act`, or the 'encoder every step' rows would not be comparable."""
    for method, steps in (("meanflow", 2), ("flow", 3)):
        p = with_loss(policy, method)
        torch.manual_seed(1)
        ref = p.act(obs, steps)
        torch.manual_seed(1)
        mine = loop_act(p, obs, method, steps, reencode=True)
        if not np.allclose(ref, mine, atol=1e-5):
            raise RuntimeError(f"benchmark loop disagrees with act() for {method} K={steps}; fix loop_act")


def compiled_net(policy, obs, how):
    """(encode, velocity) callables made with torch.compile or TorchScript (trace + freeze) for `loop_act`."""
    if how == "compile":
        return torch.compile(policy.encode), torch.compile(policy.velocity)
    dev = policy.state_min.device
    state_n = policy.normalize_state(torch.as_tensor(obs["state"], device=dev))
    rgb = torch.as_tensor(obs["rgb"], device=dev) if policy.cfg.obs_mode == "image" else None
    with torch.no_grad():                   # tracing records ops; inference tensors would be baked in as constants
        cond = policy.encode(state_n, rgb)
        z = torch.zeros(1, policy.cfg.chunk, policy.cfg.act_dim, device=dev)
        t = torch.ones(1, device=dev)
        enc_in = (state_n, rgb) if rgb is not None else (state_n,)
        traced = torch.jit.trace_module(policy, {"encode": enc_in, "velocity": (z, t * 0, t, cond)})
        traced = torch.jit.freeze(traced.eval(), preserved_attrs=["encode", "velocity"])
    encode = traced.encode if rgb is not None else (lambda s, _rgb: traced.encode(s))
    return encode, traced.velocity


# ----------------------------------------------------------------------------- timing


def sync_fn(device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_calls(fn, calls, warmup, sync):
    """Milliseconds of each of `calls` calls after `warmup` untimed ones; the device is synchronized around each
    call so asynchronous CUDA work is counted where it happens."""
    for _ in range(warmup):
        fn()
    sync()
    out = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        sync()
        out[i] = time.perf_counter_ns() - t0
    return out / 1e6


def n_calls(est_ms, calls, budget_s, floor=20):
    """Calls for one repeat of a row: `calls`, unless that would take longer than `budget_s` (slow baselines such
    as DDPM-100 with the encoder re-run); then what fits, but never fewer than min(calls, floor)."""
    if budget_s <= 0 or est_ms * calls <= budget_s * 1e3:
        return calls
    return max(min(calls, floor), int(budget_s * 1e3 / max(est_ms, 1e-3)))


def probe(fn, warmup, budget_s, sync):
    """Warm-up calls, timed: `warmup` of them, or fewer once `budget_s` is spent (at least 2), so a 200 ms baseline
    does not spend seconds warming up."""
    out, start = [], time.perf_counter()
    for i in range(warmup):
        out.append(time_calls(fn, 1, 0, sync)[0])
        if i >= 1 and budget_s > 0 and time.perf_counter() - start > budget_s:
            break
    return np.array(out)


def measure(rows, args, sync_of, label, floor=20):
    """Best-of-repeats timing of every row, round-robin over rows. Fills median/p90/p99/n into each row."""
    for rep in range(args.repeats):
        for row in rows:
            sync = sync_of(row)
            if rep == 0:                    # size the row from its warm-up calls, which also give the estimate
                warm = probe(row["fn"], max(args.warmup, 2), 0.25 * args.row_budget, sync)
                row["calls"] = n_calls(float(np.median(warm[len(warm) // 2:])), args.calls, args.row_budget, floor)
                w = 0
            else:                           # other rows ran in between: a few calls to re-warm caches
                w = min(args.warmup, max(1, row["calls"] // 10))
            ms = time_calls(row["fn"], row["calls"], w, sync)
            med = float(np.median(ms))
            if "median_ms" not in row or med < row["median_ms"]:
                row.update(median_ms=med, p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)))
        print(f"[{label}] repeat {rep + 1}/{args.repeats} done, load average {load_average()}", file=sys.stderr)


# ----------------------------------------------------------------------------- latency rows


def latency_rows(name, policy, device, args):
    """The row list for one policy on one device: components, then every sampler with the encoder once / every step."""
    obs = example_obs(policy, args.seed)
    mf, fm = with_loss(policy, "meanflow"), with_loss(policy, "flow")
    check_loop_matches_act(policy, obs)
    sched = ddpm_schedule(args.ddpm_steps, args.ddpm_schedule)
    base = dict(device=str(device), policy=name, variant="eager")
    rows = []

    # components, for "where does the time go": the encoder alone and one evaluation of the velocity head,
    # under inference_mode like `act`
    dev = policy.state_min.device
    with torch.inference_mode():
        state_n = policy.normalize_state(torch.as_tensor(obs["state"], device=dev))
        rgb = torch.as_tensor(obs["rgb"], device=dev) if policy.cfg.obs_mode == "image" else None
        cond = policy.encode(state_n, rgb)
        z = torch.zeros(1, policy.cfg.chunk, policy.cfg.act_dim, device=dev)
        t1, r0 = torch.ones(1, device=dev), torch.zeros(1, device=dev)
    rows.append(dict(base, method="encoder only", steps=0, encoder="once",
                     fn=torch.inference_mode()(lambda: policy.encode(state_n, rgb))))
    rows.append(dict(base, method="velocity head only", steps=1, encoder="-",
                     fn=torch.inference_mode()(lambda: policy.velocity(z, r0, t1, cond))))
    # the bare network of one call, back to back (the head runs after the encoder has used the caches): what
    # `act` costs without any of its own work
    rows.append(dict(base, method="encoder + head", steps=1, encoder="once",
                     fn=torch.inference_mode()(lambda: policy.velocity(z, r0, t1, policy.encode(state_n, rgb)))))

    # the real `act` (encoder once per call, by design) for MeanFlow and flow matching
    for k in (1, 2, 5):
        rows.append(dict(base, method="meanflow", steps=k, encoder="once", fn=lambda k=k: mf.act(obs, k)))
    rows.append(dict(base, method="flow", steps=20, encoder="once", fn=lambda: fm.act(obs, 20)))
    rows.append(dict(base, method="ddpm", steps=args.ddpm_steps, encoder="once",
                     fn=lambda: loop_act(policy, obs, "ddpm", args.ddpm_steps, False, sched=sched)))
    # the whole network every step, as the paper's multi-step baselines run (K = 1 is the same call as above)
    for method, k, p in (("meanflow", 2, mf), ("meanflow", 5, mf), ("flow", 20, fm), ("ddpm", args.ddpm_steps, policy)):
        rows.append(dict(base, method=method, steps=k, encoder="every step",
                         fn=lambda p=p, method=method, k=k: loop_act(p, obs, method, k, True, sched=sched)))

    # the captured one-step act deployment uses (models.compile_act: TorchScript trace + freeze on CPU, a CUDA
    # graph on CUDA), called exactly like policy.act
    try:
        cap = compile_act(mf, batch=1, steps=1)
        rows.append(dict(base, variant=f"captured ({cap.mode})", method="meanflow", steps=1, encoder="once",
                         fn=lambda cap=cap: cap(obs)))
    except Exception as e:                  # report and go on without the row
        print(f"warning: compile_act failed for {name}: {str(e).splitlines()[0]}", file=sys.stderr)

    for how, on in (("compile", args.compile), ("torchscript", args.torchscript)):
        if not on:
            continue
        for method, k, p in (("meanflow", 1, mf), ("meanflow", 5, mf), ("flow", 20, fm)):
            try:
                enc, vel = compiled_net(p, obs, how)
            except Exception as e:              # an optional row: report and go on without it
                print(f"warning: {how} failed for {name} {method} K={k}: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            rows.append(dict(base, variant=how, method=method, steps=k, encoder="once",
                             fn=lambda p=p, method=method, k=k, enc=enc, vel=vel:
                             loop_act(p, obs, method, k, False, enc, vel, sched)))

    params, mb = count_params(policy), weights_mb(policy)
    for row in rows:
        row.update(params=params, disk_mb=mb)
    return rows


def smoke(rows):
    """Call every row once; drop (with a warning) optional rows that fail, e.g. torch.compile without a compiler.
    With torch.compile this first call is also the (slow) compilation, kept out of the timing."""
    kept = []
    for row in rows:
        try:
            t0 = time.perf_counter()
            row["fn"]()
            if row["variant"] != "eager":
                print(f"[{row['variant']}] {row['policy']} {row['method']} K={row['steps']} "
                      f"prepared in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            kept.append(row)
        except Exception as e:
            if row["variant"] == "eager":
                raise
            print(f"warning: dropping {row['variant']} row {row['method']} K={row['steps']}: "
                  f"{str(e).splitlines()[0]}", file=sys.stderr)
    return kept


def add_speedups(rows):
    """Speed-up of the eager one-step policy over each row: row median / one-step median, same policy and device."""
    ref = {(r["device"], r["policy"]): r["median_ms"] for r in rows
           if r["method"] == "meanflow" and r["steps"] == 1 and r["variant"] == "eager"}
    for r in rows:
        r["hz"] = 1e3 / r["median_ms"]
        timed_call = r["method"] in ("meanflow", "flow", "ddpm")
        r["speedup"] = r["median_ms"] / ref[(r["device"], r["policy"])] if timed_call else float("nan")


# ----------------------------------------------------------------------------- training throughput


def train_rows(name, policy, device, args):
    """One optimizer step (AdamW, forward + backward) of flow matching, MeanFlow (the JVP) and MeanFlow + dispersive,
    all on the same batch, in train mode (random-shift augmentation on for images, as in pretraining)."""
    cfg = policy.cfg
    batch = args.image_batch if cfg.obs_mode == "image" else args.train_batch
    g = torch.Generator().manual_seed(args.seed)
    state = (torch.rand(batch, cfg.input_dim, generator=g) * 2 - 1).to(device)   # normalized: the encoder's input
    action = (torch.rand(batch, cfg.chunk, cfg.act_dim, generator=g) * 2 - 1).to(device)
    rgb = None
    if cfg.obs_mode == "image":
        rgb = torch.randint(0, 256, (batch, cfg.rgb_channels, cfg.img_size, cfg.img_size),
                            generator=g, dtype=torch.uint8).to(device)
    rows = []
    for loss, alpha, label in (("flow", 0.0, "flow matching"), ("meanflow", 0.0, "meanflow (JVP)"),
                               ("meanflow", cfg.alpha_disp or 0.5, "meanflow + dispersive")):
        torch.manual_seed(args.seed)
        p = make_policy(dataclasses.replace(cfg, loss=loss, alpha_disp=alpha), device).train()
        p.load_state_dict(policy.state_dict())
        opt = torch.optim.AdamW(p.parameters(), lr=1e-4)

        def step(p=p, opt=opt):
            opt.zero_grad(set_to_none=True)
            total, _ = p.loss(state, action, rgb)
            total.backward()
            opt.step()
        rows.append(dict(device=str(device), policy=name, method=label, steps=1, batch=batch, variant="eager",
                         encoder="once", fn=step, params=count_params(p)))
    return rows


def add_train_ratios(rows):
    ref = {(r["device"], r["policy"]): r["median_ms"] for r in rows if r["method"] == "flow matching"}
    for r in rows:
        r["hz"] = 1e3 / r["median_ms"]
        r["speedup"] = r["median_ms"] / ref[(r["device"], r["policy"])]   # cost relative to flow matching


# ----------------------------------------------------------------------------- targets


def pick(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def act_overhead(rows, dev, pol):
    """(act ms, encoder ms, head ms, back-to-back encoder + head ms) for the eager one-step act, or None."""
    get = lambda **kw: pick(rows, device=dev, policy=pol, **kw)
    act, enc = get(method="meanflow", steps=1, variant="eager"), get(method="encoder only")
    head, both = get(method="velocity head only"), get(method="encoder + head")
    if None in (act, enc, head):
        return None
    return act["median_ms"], enc["median_ms"], head["median_ms"], both["median_ms"] if both else float("nan")


def breakdown(rows, dev, pol):
    """Where the one-step call's time goes: encoder, one head evaluation, and the rest (python, normalization,
    noise draw, numpy conversion, and cache effects of running the head after the encoder) -- the profile the issue
    asks for when a target is missed."""
    act, enc, head, both = act_overhead(rows, dev, pol)
    rest = act - enc - head
    line = (f"one-step {act:.3f} ms = encoder {enc:.3f} ms ({100 * enc / act:.0f}%) + one head eval {head:.3f} ms "
            f"({100 * head / act:.0f}%) + act overhead {rest:.3f} ms ({100 * rest / act:.0f}%); "
            f"act overhead = {100 * rest / (enc + head):+.1f}% of encoder + head timed apart")
    if not math.isnan(both):
        line += f", {100 * (act - both) / both:+.1f}% of encoder + head run back to back ({both:.3f} ms)"
    cap = next((r for r in rows if r["device"] == dev and r["policy"] == pol and r["variant"].startswith("captured")), None)
    if cap:
        line += f"; {cap['variant']} act {cap['median_ms']:.3f} ms"
    return line


def target_lines(rows, policies, threads, train=()):
    """PASS/MISS per target of the issue, on CPU rows only (the targets are stated for the 2-core CPU, one thread)."""
    lines = []
    note = "" if threads == 1 else f" (targets are stated for 1 thread; this run used {threads})"
    for name, policy in policies:
        one = pick(rows, device="cpu", policy=name, method="meanflow", steps=1, variant="eager")
        if one is None:
            continue
        limit = 1.2 if policy.cfg.obs_mode == "image" else 0.3
        cap = next((r for r in rows if r["device"] == "cpu" and r["policy"] == name
                    and r["variant"].startswith("captured")), None)
        best = min([one] + ([cap] if cap else []), key=lambda r: r["median_ms"])
        ok = best["median_ms"] <= limit
        line = (f"{'PASS' if ok else 'MISS'}  {name}: one-step median {one['median_ms']:.3f} ms eager"
                + (f", {cap['median_ms']:.3f} ms {cap['variant']}" if cap else "") + f" <= {limit} ms{note}")
        if not ok:
            line += f"\n      profile: {breakdown(rows, 'cpu', name)}"
        lines.append(line)
        act, enc, head, both = act_overhead(rows, "cpu", name)
        ratio = (act - enc - head) / (enc + head)
        line = (f"{'PASS' if ratio <= 0.10 else 'MISS'}  {name}: act overhead {100 * ratio:+.1f}% of encoder + one "
                f"head eval timed apart ({act:.3f} vs {enc:.3f} + {head:.3f} ms; need <= 10%)")
        if not math.isnan(both):
            line += f"; {100 * (act - both) / both:+.1f}% of the two run back to back ({both:.3f} ms)"
        lines.append(line)
        for enc_mode, need in (("every step", 10.0), ("once", 3.0)):
            fm = pick(rows, device="cpu", policy=name, method="flow", steps=20, encoder=enc_mode, variant="eager")
            ok = fm["speedup"] >= need
            line = (f"{'PASS' if ok else 'MISS'}  {name}: one-step is {fm['speedup']:.1f}x faster than 20-step flow "
                    f"matching, encoder {enc_mode} (need >= {need:g}x)")
            if not ok:
                line += f"\n      profile: {breakdown(rows, 'cpu', name)}; 20 head evals cost about " \
                        f"{20 * pick(rows, device='cpu', policy=name, method='velocity head only')['median_ms']:.3f} ms"
            lines.append(line)
        if policy.cfg.obs_mode == "state":
            mf = pick(list(train), device="cpu", policy=name, method="meanflow (JVP)")
            if mf is not None:
                ok = mf["speedup"] <= 1.4
                lines.append(f"{'PASS' if ok else 'MISS'}  {name}: a MeanFlow training step costs {mf['speedup']:.2f}x a "
                             f"flow-matching step (batch {mf['batch']}; need <= 1.4x)")
    return lines


# ----------------------------------------------------------------------------- output


def fmt(x, nd=3):
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def markdown(header, table):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in table]
    return "\n".join(out)


CSV_COLUMNS = ["section", "device", "policy", "method", "steps", "encoder", "variant", "batch", "calls",
               "median_ms", "p90_ms", "p99_ms", "rate_hz", "ratio", "params", "disk_mb",
               "threads", "torch", "cpu_model"]


def write_csv(path, lat, train, threads):
    """One row per table row. ratio = speed-up of the one-step policy over this row (latency) or cost relative to
    flow matching (train); rate_hz = policy calls per second (latency) or optimizer steps per second (train)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS)
        w.writeheader()
        for section, rows in (("latency", lat), ("train", train)):
            for r in rows:
                w.writerow({"section": section, "device": r["device"], "policy": r["policy"], "method": r["method"],
                            "steps": r["steps"], "encoder": r["encoder"], "variant": r["variant"],
                            "batch": r.get("batch", 1), "calls": r["calls"],
                            "median_ms": f"{r['median_ms']:.4f}", "p90_ms": f"{r['p90_ms']:.4f}",
                            "p99_ms": f"{r['p99_ms']:.4f}", "rate_hz": f"{r['hz']:.2f}",
                            "ratio": "" if math.isnan(r["speedup"]) else f"{r['speedup']:.3f}",
                            "params": r.get("params", ""), "disk_mb": f"{r['disk_mb']:.3f}" if "disk_mb" in r else "",
                            "threads": threads, "torch": torch.__version__, "cpu_model": cpu_model()})


def profile_one_step(policy, name, calls=50):
    """Op-level profile of the one-step `act` (torch.profiler), for --profile."""
    obs = example_obs(policy)
    for _ in range(10):
        policy.act(obs, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            policy.act(obs, 1)
    print(f"\n### torch.profiler: {name}, {calls} one-step act calls (self CPU time)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ----------------------------------------------------------------------------- Pareto: success rate vs latency

PARETO_NEED = ("ckpt", "steps", "success_rate", "policy_ms")


def read_eval_csvs(paths):
    """evaluate.py rows -> one point per (ckpt, task, steps): mean success rate, median policy latency. evaluate.py
    appends every run to its CSV, so repeated evaluations of one checkpoint are pooled here. Optional columns `task`
    and `n_envs` (observations per batched call, which is what its policy_ms times) are carried along."""
    groups = {}
    for path in paths:
        if not os.path.isfile(path):
            sys.exit(f"error: --pareto: {path} does not exist")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in PARETO_NEED if c not in (reader.fieldnames or [])]
            if missing:
                sys.exit(f"error: --pareto: {path} lacks column(s) {', '.join(missing)}; expected evaluate.py output "
                         f"with at least {', '.join(PARETO_NEED)}")
            for i, rec in enumerate(reader, start=2):
                try:
                    steps, sr, ms = int(float(rec["steps"])), float(rec["success_rate"]), float(rec["policy_ms"])
                except (TypeError, ValueError):
                    print(f"warning: {path} line {i}: non-numeric steps/success_rate/policy_ms, skipped", file=sys.stderr)
                    continue
                if not (math.isfinite(sr) and math.isfinite(ms)):
                    print(f"warning: {path} line {i}: NaN success_rate/policy_ms, skipped", file=sys.stderr)
                    continue
                g = groups.setdefault((rec["ckpt"], rec.get("task") or "", steps), {"sr": [], "ms": [], "envs": set()})
                g["sr"].append(sr)
                g["ms"].append(ms)
                g["envs"].add(rec.get("n_envs") or "?")
    if not groups:
        sys.exit("error: --pareto: no usable rows in " + ", ".join(paths))
    points = [{"ckpt": c, "task": task, "steps": k, "success_rate": float(np.mean(g["sr"])),
               "policy_ms": float(np.median(g["ms"])), "n_rows": len(g["sr"]), "n_envs": "/".join(sorted(g["envs"]))}
              for (c, task, k), g in groups.items()]
    # evaluate.py may write a fraction or a percentage; show percent either way
    if max(p["success_rate"] for p in points) <= 1.0:
        for p in points:
            p["success_rate"] *= 100
    short = short_names(sorted({p["ckpt"] for p in points}))
    several_tasks = len({p["task"] for p in points}) > 1
    for p in points:
        p["label"] = short[p["ckpt"]] + (f" [{p['task']}]" if several_tasks else "")
    return sorted(points, key=lambda p: (p["policy_ms"], -p["success_rate"]))


def short_names(paths):
    """Drop the directory prefix all checkpoints share, so labels stay readable in the table and the legend."""
    if len(paths) == 1:
        return {paths[0]: os.path.basename(paths[0]) or paths[0]}
    try:
        common = os.path.commonpath(paths)
    except ValueError:
        common = ""
    return {p: (os.path.relpath(p, common) if common else p) for p in paths}


def mark_front(points):
    """Pareto-optimal: no other point of the same task is at least as fast and at least as successful, and strictly
    better in one (success rates of different tasks do not compete)."""
    for p in points:
        p["front"] = not any(q is not p and q["task"] == p["task"]
                             and q["policy_ms"] <= p["policy_ms"] and q["success_rate"] >= p["success_rate"]
                             and (q["policy_ms"] < p["policy_ms"] or q["success_rate"] > p["success_rate"])
                             for q in points)


def plot_pareto(points, png):
    try:
        import matplotlib
        matplotlib.use("Agg")                   # headless: no display on a server or in CI
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        sys.exit("error: the Pareto plot needs matplotlib: pip install matplotlib (the table above was still written)")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in sorted({p["label"] for p in points}):
        pts = sorted((p for p in points if p["label"] == label), key=lambda p: p["steps"])
        ax.plot([p["policy_ms"] for p in pts], [p["success_rate"] for p in pts], "o-", label=label, alpha=0.85)
        for p in pts:
            ax.annotate(f"K={p['steps']}", (p["policy_ms"], p["success_rate"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    for i, task in enumerate(sorted({p["task"] for p in points})):
        front = sorted((p for p in points if p["front"] and p["task"] == task), key=lambda p: p["policy_ms"])
        ax.step([p["policy_ms"] for p in front], [p["success_rate"] for p in front], where="post", color="k",
                lw=1, ls="--", label="Pareto front" if i == 0 else None)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))   # 0.5 1 2 5 10 ... ms
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("policy latency per call, ms (log)")
    ax.set_ylabel("success rate, %")
    ax.set_title("Success rate against latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=150)
    plt.close(fig)


def run_pareto(args):
    points = read_eval_csvs(args.pareto)
    mark_front(points)
    print("\n## Success rate against latency (from " + ", ".join(args.pareto) + ")\n")
    print("policy ms is evaluate.py's median per `act` call, which batches n_envs observations.\n")
    print(markdown(["ckpt", "K", "success %", "policy ms", "calls/s", "n_envs", "Pareto", "eval rows"],
                   [[p["label"], p["steps"], f"{p['success_rate']:.1f}", p["policy_ms"],
                     f"{1e3 / p['policy_ms']:.0f}" if p["policy_ms"] > 0 else "-", p["n_envs"],
                     "yes" if p["front"] else "",
                     p["n_rows"]] for p in points]))
    table_csv = os.path.splitext(args.out_png)[0] + ".csv"
    os.makedirs(os.path.dirname(os.path.abspath(table_csv)), exist_ok=True)
    with open(table_csv, "w", newline="") as f:
        w = csv.DictWriter(f, ["ckpt", "task", "steps", "success_rate_pct", "policy_ms", "n_envs", "pareto", "n_rows"])
        w.writeheader()
        for p in points:
            w.writerow({"ckpt": p["ckpt"], "task": p["task"], "n_envs": p["n_envs"], "steps": p["steps"], "success_rate_pct": f"{p['success_rate']:.2f}",
                        "policy_ms": f"{p['policy_ms']:.4f}", "pareto": int(p["front"]), "n_rows": p["n_rows"]})
    print(f"\nwrote {table_csv}")
    plot_pareto(points, args.out_png)
    print(f"wrote {args.out_png}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="benchmark this trained checkpoint instead of fresh lift image + lift state policies")
    ap.add_argument("--calls", type=cli.positive_int, help="timed calls per row and repeat (default 200; --quick 30)")
    ap.add_argument("--warmup", type=cli.nonneg_int, help="untimed calls before a row is timed (default 20; --quick 3)")
    ap.add_argument("--threads", type=cli.positive_int, default=1, help="torch intra-op threads, fixed for the whole run")
    ap.add_argument("--device", type=cli.device, default="auto", help="auto = cpu plus cuda when present; or one device (cpu, cuda:0)")
    ap.add_argument("--repeats", type=cli.positive_int, help="measure each row N times and keep the best median (default 3; --quick 1)")
    ap.add_argument("--row-budget", type=cli.positive_float, help="seconds per row and repeat before a slow row gets fewer calls "
                                                     "(never < 20); 0 = always --calls (default 1.5; --quick 0.3)")
    ap.add_argument("--quick", action="store_true", help="short run for smoke tests (fewer calls, one repeat)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (compilation time not counted)")
    ap.add_argument("--torchscript", action="store_true", help="add TorchScript (trace + freeze) rows")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler op table of each one-step act")
    ap.add_argument("--ddpm-steps", type=cli.positive_int, default=100, help="denoising steps of the DDPM baseline sampler")
    ap.add_argument("--ddpm-schedule", default="cosine", choices=("cosine", "linear"), help="DDPM beta schedule")
    ap.add_argument("--skip-train", action="store_true", help="skip the training-throughput rows")
    ap.add_argument("--train-batch", type=cli.positive_int, default=256, help="batch of the state-policy training steps")
    ap.add_argument("--image-batch", type=cli.positive_int, help="batch of the image-policy training steps (default 32; --quick 4)")
    ap.add_argument("--train-steps", type=cli.positive_int, help="timed optimizer steps per loss and repeat, fewer if over --row-budget "
                                                      "(never < 3) (default 20; --quick 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fresh weights and example observations")
    ap.add_argument("--out-csv", type=cli.out_file, default="runs/benchmark.csv", help="CSV with the same rows as the tables")
    ap.add_argument("--pareto", nargs="+", metavar="CSV", help="evaluate.py CSV(s): success-vs-latency table and PNG only")
    ap.add_argument("--out-png", type=cli.out_file, default="runs/pareto.png", help="Pareto plot path (its table goes next to it as .csv)")
    args = ap.parse_args(argv)
    quick = args.quick
    for key, normal, short in (("calls", 200, 30), ("warmup", 20, 3), ("repeats", 3, 1), ("row_budget", 1.5, 0.3),
                               ("image_batch", 32, 4), ("train_steps", 20, 2)):
        if getattr(args, key) is None:
            setattr(args, key, short if quick else normal)
    for key in ("calls", "repeats", "threads", "ddpm_steps", "train_batch", "image_batch", "train_steps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.row_budget < 0:
        ap.error("--warmup and --row-budget must be >= 0")
    if args.train_batch < 2 or args.image_batch < 2:
        ap.error("training batches need at least 2 samples (the dispersive loss compares samples)")
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:                                    # one inter-op thread too, so nothing else competes for the 2 cores
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    devices = pick_devices(args.device)

    print("# DMPO benchmark\n")
    print("\n".join(machine_lines(devices)))
    if args.pareto:
        run_pareto(args)
        return

    lat, train, by_device = [], [], {}
    for device in devices:
        policies = build_policies(args, device)
        by_device[device.type] = policies
        rows = []
        for name, policy in policies:
            rows += latency_rows(name, policy, device, args)
        rows = smoke(rows)
        measure(rows, args, lambda r, d=device: sync_fn(d), f"latency {device}")
        add_speedups(rows)
        lat += rows
        if not args.skip_train:
            trows = []
            for name, policy in policies:
                trows += train_rows(name, policy, device, args)
            targs = copy.copy(args)             # a training step is long: fewer calls, same best-of-repeats logic
            targs.calls, targs.warmup = args.train_steps, min(args.warmup, 2)
            measure(trows, targs, lambda r, d=device: sync_fn(d), f"train {device}", floor=3)
            add_train_ratios(trows)
            train += trows

    print(f"- policy calls are batch 1; best of {args.repeats} medians; up to {args.calls} timed calls per row after "
          f"{args.warmup} warm-up (slow rows capped at ~{args.row_budget:g} s per repeat; see n)")
    if args.ckpt:
        print(f"- checkpoint: {args.ckpt} ({os.path.getsize(args.ckpt) / 2**20:.2f} MB on disk with EMA and extras)")

    print("\n## Policies\n")
    seen, prow = set(), []
    for r in lat:
        if r["policy"] not in seen:
            seen.add(r["policy"])
            p = dict(next(iter(by_device.values())))[r["policy"]]
            prow.append([r["policy"], p.cfg.obs_mode, p.cfg.state_dim, f"{p.cfg.chunk}x{p.cfg.act_dim}",
                         f"{r['params']:,}", f"{r['disk_mb']:.2f}"])
    print(markdown(["policy", "obs", "state dim", "chunk x act", "params", "weights MB on disk"], prow))

    print("\n## Batch-1 latency\n")
    print("`x one-step` = this row's median / the one-step MeanFlow median (same policy, device and run). "
          "`encoder once` rows time the real `policy.act`, `every step` rows re-run the whole network per step. "
          f"ddpm = {args.ddpm_steps}-step ancestral sampler ({args.ddpm_schedule} betas) on the same backbone with an "
          "untrained epsilon head: latency only.\n")
    print(markdown(["device", "policy", "method", "K", "encoder", "variant", "n", "median ms", "p90 ms", "p99 ms",
                    "Hz", "x one-step"],
                   [[r["device"], r["policy"], r["method"], r["steps"] or "-", r["encoder"], r["variant"], r["calls"],
                     r["median_ms"], r["p90_ms"], r["p99_ms"], f"{r['hz']:.0f}",
                     "-" if math.isnan(r["speedup"]) else f"{r['speedup']:.2f}x"] for r in lat]))
    print()
    for d in sorted({r["device"] for r in lat}):
        for pol in sorted({r["policy"] for r in lat if r["device"] == d}):
            print(f"- where the time goes, {pol} on {d}: {breakdown(lat, d, pol)}")

    if train:
        print("\n## Training throughput (AdamW step, forward + backward, same batch)\n")
        print("`cost vs flow` = ms per step / flow-matching ms per step: the price of the JVP (and of the dispersive "
              "loss). Image steps run with random-shift augmentation, as in pretraining.\n")
        print(markdown(["device", "policy", "loss", "batch", "n", "ms/step", "steps/s", "cost vs flow"],
                       [[r["device"], r["policy"], r["method"], r["batch"], r["calls"], f"{r['median_ms']:.1f}",
                         f"{r['hz']:.2f}", f"{r['speedup']:.2f}x"] for r in train]))

    if "cpu" in by_device:                  # the targets are CPU targets; a CUDA-only run has none
        print("\n## Targets (CPU)\n")
        print("\n".join(target_lines(lat, by_device["cpu"], args.threads, train)))

    if args.profile:
        for name, policy in by_device.get("cpu") or next(iter(by_device.values())):
            profile_one_step(with_loss(policy, "meanflow"), name)

    write_csv(args.out_csv, lat, train, args.threads)
    print(f"\nwrote {args.out_csv}; load average at end {load_average()}; "
          f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
