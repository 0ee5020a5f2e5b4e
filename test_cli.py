"""Reliability of the stage scripts: bad flags and inputs give one-line errors, non-finite training stops, resume is
exact (cli.py and its use in pretrain.py / finetune.py / evaluate.py). Seeded, CPU-only, a few seconds each."""
import csv
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import cli
import evaluate
import finetune
import models
import pretrain
import tasks

REPO = Path(__file__).resolve().parent


def hopper_file(path, episodes=(40, 40), seed=0):
    """A small D4RL-layout hopper file (11-D observations, 3-D actions) with the given episode lengths."""
    rng = np.random.default_rng(seed)
    n = sum(episodes)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[np.cumsum(episodes) - 1] = True
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, 11))
        f["actions"] = rng.uniform(-1, 1, size=(n, 3))
        f["rewards"] = rng.normal(size=n)
        f["terminals"] = np.zeros(n, dtype=bool)
        f["timeouts"] = timeouts
    return str(path)


def run_pretrain(data, out, *extra):
    return pretrain.main(["--task", "hopper", "--dataset", data, "--out", str(out), "--batch-size", "16",
                          "--hidden-dim", "32", "--warmup", "2", "--eval-episodes", "0", "--log-every", "5",
                          "--save-every", "10", *extra])


def error_line(capsys, exc=None):
    """The one line a failed run shows: sys.exit("error: ...") carries it in the exception (the interpreter prints
    it at exit), argparse writes it to stderr."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()
    if exc is not None and isinstance(exc.value.code, str):
        err = exc.value.code.splitlines()          # stderr above it holds the progress bar only
    assert len(err) == 1, err
    return err[0]


def steps_in(path, key="step"):
    with open(path) as f:
        return [int(float(r[key])) for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("main, argv, needle", [
    (pretrain.main, ["--lr", "nan"], "--lr: expected a finite number > 0"),
    (pretrain.main, ["--lr", "-1"], "--lr: expected a finite number > 0"),
    (pretrain.main, ["--flow-ratio", "5"], "--flow-ratio: expected a number in [0, 1]"),
    (pretrain.main, ["--alpha-disp", "-1"], "--alpha-disp: expected a finite number >= 0"),
    (pretrain.main, ["--disp-temp", "-0.5"], "--disp-temp: expected a finite number > 0"),
    (pretrain.main, ["--disp-temp", "0"], "--disp-temp: expected a finite number > 0"),
    (pretrain.main, ["--inference-steps", "-1"], "--inference-steps: expected an integer >= 1"),
    (pretrain.main, ["--eval-episodes", "-3"], "--eval-episodes: expected an integer >= 0"),
    (pretrain.main, ["--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N"),
    (pretrain.main, ["--out", "README.md"], "README.md is a file"),
    (finetune.main, ["--out", "README.md"], "README.md is a file"),
    (finetune.main, ["--gamma", "1.5"], "--gamma: expected a number in (0, 1]"),
    (finetune.main, ["--n-envs", "0"], "--n-envs: expected an integer >= 1"),
    (evaluate.main, ["--ckpt", "x.pt", "--n-envs", "0"], "--n-envs: expected an integer >= 1"),
    (evaluate.main, ["--ckpt", "x.pt", "--csv", "."], "is a directory; expected a file name"),
    (evaluate.main, ["--ckpt", "x.pt", "--inference-steps", "1", "0"], "--inference-steps: expected an integer >= 1"),
])
def test_bad_flags_fail_in_one_line_naming_the_flag_and_range(main, argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = error_line(capsys)
    assert line.startswith("error: argument") and needle in line, line


def test_cli_types_accept_their_range():
    assert cli.positive_int("3") == 3 and cli.nonneg_int("0") == 0 and cli.probability("1") == 1.0
    assert cli.positive_float("1e-4") == 1e-4 and cli.device("cuda:1") == "cuda:1" and cli.device("auto") == "auto"
    for fn, text in ((cli.positive_int, "0"), (cli.positive_float, "inf"), (cli.probability, "-0.1"),
                     (cli.fraction_open, "1"), (cli.positive_int, "2.5"), (cli.device, "tpu")):
        with pytest.raises(Exception):
            fn(text)


def test_explicit_flags_sees_only_typed_flags():
    parser = pretrain.make_parser()
    assert cli.explicit_flags(parser, ["--lr", "1e-3", "--resume", "--cond-dims", "8", "8"]) == {"lr", "resume", "cond_dims"}
    assert cli.explicit_flags(parser, []) == set()


# ----------------------------------------------------------------------------- data and non-finite training

def test_dataset_without_enough_chunks_is_refused_before_the_run_dir(tmp_path, capsys):
    data = hopper_file(tmp_path / "short.hdf5", episodes=(3, 2))           # chunk 4: no complete chunk
    with pytest.raises(SystemExit) as e:
        run_pretrain(data, tmp_path / "run")
    line = error_line(capsys, e)
    assert "short.hdf5" in line and "0 complete action chunks" in line
    assert not (tmp_path / "run").exists()
    data = hopper_file(tmp_path / "few.hdf5", episodes=(10,))              # 7 chunks < batch 16
    with pytest.raises(SystemExit) as e:
        run_pretrain(data, tmp_path / "run")
    assert "--batch-size 16" in error_line(capsys, e) and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    data = hopper_file(tmp_path / "d.hdf5")
    real_loss, calls = models.MeanFlowPolicy.loss, {"n": 0}

    def loss_nan_at_step_13(self, *a, **k):
        calls["n"] += 1
        total, info = real_loss(self, *a, **k)
        if calls["n"] == 13:
            info = dict(info, loss_flow=torch.tensor(float("nan")))
            total = total * float("nan")
        return total, info
    monkeypatch.setattr(models.MeanFlowPolicy, "loss", loss_nan_at_step_13)
    with pytest.raises(SystemExit) as e:
        run_pretrain(data, tmp_path / "run", "--steps", "20")
    line = error_line(capsys, e)
    assert "step 13: loss_flow is nan" in line and "latest.pt (step 10)" in line, line
    ck = models.load_checkpoint(str(tmp_path / "run" / "latest.pt"))
    assert ck["step"] == 10 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- resume

def test_pretrain_resume_keeps_each_step_once_and_refuses_changed_settings(tmp_path, capsys):
    data = hopper_file(tmp_path / "d.hdf5")
    out = tmp_path / "run"
    run_pretrain(data, out, "--steps", "20", "--lr", "1e-3")
    assert steps_in(out / "log.csv") == [5, 10, 15, 20]
    # a run killed after logging steps 15 and 20 but before its save at 20: latest.pt is still step 10
    (out / "step_10.pt").replace(out / "latest.pt")
    (out / "latest.pt.tmp4242").write_bytes(b"partial")                       # killed during a save
    capsys.readouterr()

    for extra, needle in ((["--lr", "0.5"], "--lr 0.5 differs from the run's 0.001"),
                          (["--batch-size", "7"], "--batch-size 7 differs from the run's 16"),
                          (["--steps", "10"], "--steps 10 is not beyond the run's step 10")):
        with pytest.raises(SystemExit) as e:
            run_pretrain(data, out, "--steps", "20", "--resume", *extra)
        assert needle in error_line(capsys, e)

    run_pretrain(data, out, "--steps", "30", "--resume", "--lr", "1e-3")       # same value: fine
    assert steps_in(out / "log.csv") == [5, 10, 15, 20, 25, 30]                 # every step exactly once
    assert not list(out.glob("*.tmp*"))
    ck = models.load_checkpoint(str(out / "latest.pt"))
    assert ck["step"] == 30 and ck["stage"] == "pretrain" and ck["args"]["lr"] == 1e-3

    # the other script's checkpoint is named as such
    with pytest.raises(SystemExit) as e:
        finetune.main(["--out", str(out), "--resume", "--iterations", "5"])
    assert "is a pretrain.py checkpoint" in error_line(capsys, e)


def test_finetune_resume_refuses_changed_flags_and_pretrain_refuses_its_checkpoint(tmp_path, capsys):
    data = hopper_file(tmp_path / "d.hdf5")
    run_pretrain(data, tmp_path / "pre", "--steps", "10")
    out = tmp_path / "ft"
    common = ["--n-envs", "1", "--n-steps", "4", "--minibatch-size", "4", "--update-epochs", "1",
              "--critic-warmup", "0", "--eval-episodes", "0", "--max-episode-steps", "8"]
    finetune.main(["--ckpt", str(tmp_path / "pre" / "latest.pt"), "--out", str(out), "--iterations", "2", *common])
    capsys.readouterr()
    for argv, needle in ((["--iterations", "3", "--actor-lr", "0.1"], "--actor-lr 0.1 differs"),
                         (["--iterations", "2"], "--iterations 2 is not beyond the run's iteration 2")):
        with pytest.raises(SystemExit) as e:
            finetune.main(["--out", str(out), "--resume", *argv])
        assert needle in error_line(capsys, e)
    (out / "latest.pt.tmp99").write_bytes(b"")
    finetune.main(["--out", str(out), "--resume", "--iterations", "3"])
    assert steps_in(out / "log.csv", "iteration") == [1, 2, 3] and not list(out.glob("*.tmp*"))
    with pytest.raises(SystemExit) as e:
        run_pretrain(data, out, "--steps", "50", "--resume")
    assert "is a finetune.py checkpoint" in error_line(capsys, e)
    (out / "latest.pt").write_bytes(b"\x00garbage")                           # a corrupt checkpoint: one line
    with pytest.raises(SystemExit) as e:
        finetune.main(["--out", str(out), "--resume", "--iterations", "5"])
    line = error_line(capsys, e)
    assert line.startswith("error: checkpoint") and "latest.pt" in line


def test_evaluate_names_checkpoint_task_and_requested_task(tmp_path, capsys):
    data = hopper_file(tmp_path / "d.hdf5")
    run_pretrain(data, tmp_path / "pre", "--steps", "5", "--save-every", "5")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(tmp_path / "pre" / "latest.pt"), "--task", "lift", "--episodes", "1"])
    line = error_line(capsys, e)
    assert "trained for hopper" in line and "task lift" in line and "latest.pt" in line


def test_stage_script_errors_are_one_line_without_traceback(tmp_path):
    data = hopper_file(tmp_path / "short.hdf5", episodes=(3,))
    for cmd, needle in ((["pretrain.py", "--lr", "nan"], "--lr"),
                        (["pretrain.py", "--task", "hopper", "--dataset", data, "--out", str(tmp_path / "r")], "short.hdf5"),
                        (["finetune.py", "--out", str(tmp_path / "none"), "--resume"], "latest.pt")):
        r = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr[-500:]


# ----------------------------------------------------------------------------- defaults in one place, presets

def test_defaults_table_per_task_and_preset_reach_the_flags_and_help(capsys):
    a = pretrain.parse_args(["--task", "hopper"])
    assert (a.loss, a.steps, a.lr, a.batch_size, a.hidden_dim, a.cond_dims) == ("imf", 30_000, 1e-3, 128, 512, [64, 16])
    a = pretrain.parse_args(["--task", "lift", "--obs", "image"])
    assert (a.loss, a.steps, a.hidden_dim) == ("meanflow", 100_000, 768)
    a = pretrain.parse_args(["--task", "walker2d", "--preset", "paper"])
    assert (a.epochs, a.warmup_epochs, a.lr, a.min_lr_ratio) == (80, 10, 1e-3, 0.1)
    a = pretrain.parse_args(["--task", "square", "--preset", "paper", "--lr", "3e-4"])
    assert (a.epochs, a.lr, a.batch_size) == (2000, 3e-4, 256)              # a typed flag beats the table
    a = pretrain.parse_args(["--task", "square"])                             # the measured per-task changes
    assert (a.lr, a.dagger_rounds, a.orientation) == (3e-4, 5, "rot6d")
    a = pretrain.parse_args(["--task", "transport"])                          # DART data instead of DAgger rounds
    assert (a.lr, a.dagger_rounds, a.orientation, a.obs_steps, a.steps, a.alpha_disp) == (3e-4, 0, "rot6d", 2, 100_000, 0.0)
    a = pretrain.parse_args(["--task", "transport", "--alpha-disp", "0.9"])  # the headline command: the released form
    assert (a.alpha_disp, a.disp_loss) == (0.9, "infonce_l2_released")
    assert pretrain.parse_args(["--task", "square"]).disp_loss == "infonce_l2"      # the paper's form elsewhere
    a = pretrain.parse_args(["--task", "kitchen-complete"])
    assert (a.hidden_dim, a.batch_size, a.steps, a.dagger_rounds, a.alpha_disp) == (512, 128, 150_000, 0, 0.0)
    a = pretrain.parse_args(["--task", "can"])
    assert (a.lr, a.demos, a.alpha_disp) == (3e-4, 300, 0.5)
    assert pretrain.parse_args(["--task", "lift"]).alpha_disp == 0.0                # dropped where it cost success
    for argv in (["--task", "lift", "--obs", "image"], ["--task", "kitchen-partial"], ["--task", "lift", "--preset", "paper"]):
        assert pretrain.parse_args(argv).alpha_disp == 0.5, argv                 # the released configs' weight
    for argv in (["--task", "square", "--obs", "image"], ["--task", "square", "--preset", "paper"], ["--task", "lift"]):
        a = pretrain.parse_args(argv)
        assert (a.lr, a.dagger_rounds, a.orientation) == (1e-4, 0, "quat"), argv
    a = finetune.parse_args(["--task", "can", "--preset", "paper"])
    assert (a.n_envs, a.n_steps, a.actor_lr, a.critic_lr, a.iterations, a.bc_coef) == (25, 500, 2.5e-6, 4e-4, 301, 0.05)
    a = finetune.parse_args(["--task", "square"])
    assert (a.n_envs, a.actor_lr, a.bc_coef, a.bc_coef_final, a.gamma) == (20, 2.5e-6, 0.2, 0.05, 0.999)
    a = finetune.parse_args(["--task", "lift"])
    assert (a.n_envs, a.actor_lr, a.bc_coef) == (10, 1e-5, 0.05)
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--task", "kitchen-mixed", "--preset", "paper", "--help"])
    out = capsys.readouterr().out
    assert "(default: 5000)" in out and "--preset paper" in out                 # --help shows the effective values


def test_epochs_become_steps_once_the_data_is_loaded(tmp_path):
    data = hopper_file(tmp_path / "d.hdf5", episodes=(40, 40))                # 2 x 37 chunks of 4
    run_pretrain(data, tmp_path / "run", "--epochs", "2", "--warmup-epochs", "1")
    ck = models.load_checkpoint(str(tmp_path / "run" / "latest.pt"))
    per_epoch = 74 // 16
    assert ck["step"] == 2 * per_epoch and ck["args"]["steps"] == 2 * per_epoch and ck["args"]["warmup"] == per_epoch


def test_evaluate_act_steps_replans_after_part_of_each_chunk():
    torch.manual_seed(0)
    t = tasks.get_task("hopper")
    cfg = models.PolicyConfig(state_dim=t.obs_dim, act_dim=t.act_dim, chunk=t.chunk, cond_mlp_dims=(16, 8), hidden_dim=32)
    policy = models.make_policy(cfg)
    calls = {"n": 0}
    real_act = policy.act

    def counting_act(obs, steps=None, noise=None):
        calls["n"] += 1
        return real_act(obs, steps=steps, noise=noise)
    policy.act = counting_act
    for act_steps in (None, 1, 3):
        calls["n"] = 0
        row = evaluate.evaluate_policy(policy, "hopper", "state", episodes=1, n_envs=1, max_episode_steps=12,
                                       progress=False, act_steps=act_steps)[0]
        assert row["act_steps"] == (act_steps or 4)
        assert calls["n"] == -(-int(row["length_mean"]) // (act_steps or 4))     # one plan per executed part
    with pytest.raises(ValueError, match="--act-steps 5: expected 1..4"):
        evaluate.evaluate_policy(policy, "hopper", "state", episodes=1, n_envs=1, progress=False, act_steps=5)


def test_collapse_statistics_in_the_log_and_for_a_checkpoint(tmp_path, capsys):
    data = hopper_file(tmp_path / "d.hdf5", episodes=(40, 40, 40))
    run_pretrain(data, tmp_path / "run", "--steps", "10", "--holdout-episodes", "1", "--probe-size", "30")
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert all(1.0 <= float(r["emb_eff_rank"]) <= 16 and 0 < float(r["emb_nn_ratio"]) < 1 and float(r["emb_norm"]) > 0
               for r in rows)
    assert "2 episodes, 80 steps" in capsys.readouterr().out                  # the held-out episode is not trained on
    out = evaluate.main(["--ckpt", str(tmp_path / "run" / "latest.pt"), "--episodes", "0", "--embedding-data", data])
    assert out[0]["emb_n"] == 120 and 1.0 <= out[0]["emb_eff_rank"] <= 16
    assert "effective rank" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs --embedding-data"):              # no rollouts and nothing else: refused
        evaluate.main(["--ckpt", str(tmp_path / "run" / "latest.pt"), "--episodes", "0"])
