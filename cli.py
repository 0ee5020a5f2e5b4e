"""Command-line and run-directory plumbing shared by the stage scripts (pretrain, finetune, evaluate, benchmark,
deploy_franka, collect_demos), so that every script checks its input the same way.

    p = cli.ArgumentParser(description=...)            # a bad flag is one line, "error: argument --lr: ...", exit 2
    p.add_argument("--lr", type=cli.positive_float)     # typed checks say the accepted range in the message
    args = p.parse_args(argv)

Resume rule (pretrain.py and finetune.py alike): `--resume` takes every training setting from the run's checkpoint;
only the run-control flags a script names may change. A training flag typed on the command line that differs from the
run's value is an error (never silently ignored, never silently applied). `explicit_flags` tells which were typed.
"""
import argparse
import csv
import math
import os
import sys
from pathlib import Path

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (`error: argument --x: ...`) instead of usage + error; exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists each flag's effective default (the stage scripts build their parser with the run's defaults)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def selectors(argv, choices=None, **defaults):
    """First pass over argv for the flags that choose a script's defaults (e.g. --task, --obs, --preset). A missing
    or unknown value gives the default here; the full parser then reports an unknown one in one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    for name in defaults:
        pre.add_argument("--" + name.replace("_", "-"), dest=name, default=defaults[name])
    known, _ = pre.parse_known_args(argv)
    out = {}
    for name, val in vars(known).items():
        allowed = (choices or {}).get(name)
        out[name] = val if allowed is None or val in allowed else defaults[name]
    return out


def format_settings(args):
    """'key=value' for every setting, sorted, wrapped at 116 columns: what a run prints when it starts."""
    items = [f"{k}={v}" for k, v in sorted(vars(args).items())]
    lines, line = [], "settings:"
    for it in items:
        if len(line) + 1 + len(it) > 116:
            lines.append(line)
            line = "   "
        line += " " + it
    return "\n".join(lines + [line])


# ----------------------------------------------------------------------------- typed flag checks

def _number(kind, text, ok, rng):
    try:
        val = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {rng}, got {text!r}") from None
    if not ok(val):
        raise argparse.ArgumentTypeError(f"expected {rng}, got {text!r}")
    return val


def positive_int(text):
    return _number(int, text, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(text):
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def nonneg_float(text):
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def finite_float(text):
    return _number(float, text, math.isfinite, "a finite number")


def probability(text):
    return _number(float, text, lambda v: math.isfinite(v) and 0 <= v <= 1, "a number in [0, 1]")


def fraction_open(text):
    """A decay in [0, 1) (the EMA decay): 1 would never move."""
    return _number(float, text, lambda v: math.isfinite(v) and 0 <= v < 1, "a number in [0, 1)")


def unit_interval_closed_above(text):
    """A discount in (0, 1]."""
    return _number(float, text, lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]")


def device(text):
    """auto, cpu, cuda or cuda:N (checked for availability when the run resolves it)."""
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def out_dir(text):
    """A run directory: may not exist yet, but must not be a file, and its nearest existing parent must be writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a directory for the run")
    _check_writable(path, text)
    return text


def out_file(text):
    """A file to write (CSV, video, log): not a directory, parent writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; expected a file name")
    _check_writable(path.parent, text)
    return text


def _check_writable(path, text):
    probe = Path(os.path.abspath(path))
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {probe} is a file")
    if not os.access(probe, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write under {probe}")


def explicit_flags(parser, argv):
    """The dests of the flags typed in argv (parsing again with every default suppressed)."""
    argv = sys.argv[1:] if argv is None else argv
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kw = {"dest": action.dest, "nargs": action.nargs} if action.nargs is not None else {"dest": action.dest}
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kw = {"dest": action.dest, "action": "store_const", "const": action.const}
            elif isinstance(action, argparse.BooleanOptionalAction):
                kw = {"dest": action.dest, "action": argparse.BooleanOptionalAction}
            quiet.add_argument(*action.option_strings, **kw)
    known, _ = quiet.parse_known_args(argv)
    return set(vars(known))


# ----------------------------------------------------------------------------- resume

def resume_settings(parser, argv, args, saved, run_control, latest, defaults):
    """Settings of a resumed run: the checkpoint's saved args (flags added since it started take `defaults`, the
    run's task/preset defaults), with the run-control flags from the command line. A training flag typed on the
    command line that differs from the run's value raises ValueError naming both values."""
    merged = {**defaults, **saved}
    for dest in sorted(explicit_flags(parser, argv) - set(run_control)):
        new, old = getattr(args, dest), merged.get(dest)
        if _differs(new, old):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"--resume: {flag} {new} differs from the run's {old} ({latest}); a resumed run keeps its "
                             f"training settings: drop {flag} or start a new run with another --out")
    merged.update({k: getattr(args, k) for k in run_control})
    return argparse.Namespace(**merged)


def _differs(new, old):
    if isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
        return list(new) != list(old)
    if isinstance(new, float) or isinstance(old, float):
        try:
            return not math.isclose(float(new), float(old), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return True
    return new != old


def checkpoint_stage(ckpt):
    """'pretrain' or 'finetune' for a checkpoint written by those scripts (older files: told apart by their keys)."""
    if "stage" in ckpt:
        return ckpt["stage"]
    return "finetune" if "noise_net" in ckpt else "pretrain"


def require_stage(ckpt, stage, path):
    found = checkpoint_stage(ckpt)
    if found != stage:
        hint = ("resume it with finetune.py --out DIR --resume" if found == "finetune"
                else "resume it with pretrain.py --resume, or fine-tune it with finetune.py --ckpt")
        raise ValueError(f"--resume: {path} is a {found}.py checkpoint, not a {stage}.py run; {hint}")


def remove_stale_tmp(out):
    """Delete the partial `*.pt.tmp<pid>` files a run killed while saving leaves behind (save_checkpoint writes to a
    temp name, then renames). Returns the names removed."""
    removed = []
    for p in Path(out).glob("*.pt.tmp*"):
        if p.is_file():
            p.unlink()
            removed.append(p.name)
    return removed


def trim_csv(path, columns, key, upto):
    """Rewrite the CSV with its header and only the rows whose `key` <= upto (the rows logged after the last
    checkpoint belong to work a resumed run repeats, so each step appears exactly once). A missing file is created."""
    rows = []
    if Path(path).exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get(key) not in (None, "") and float(r[key]) <= upto]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def append_csv(path, columns, row):
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, columns).writerow(row)


# ----------------------------------------------------------------------------- training faults

class NonFiniteError(ValueError):
    pass


def check_finite(step, unit="step", **terms):
    """Raise NonFiniteError naming the step and the first non-finite term (loss or gradient norm)."""
    for name, val in terms.items():
        v = float(val)
        if not math.isfinite(v):
            raise NonFiniteError(f"{unit} {step}: {name} is {v} (non-finite)")


def nonfinite_exit(err, latest, unit="step"):
    """The one line a training run exits with at a non-finite term: what went wrong and the checkpoint kept."""
    latest = Path(latest)
    if latest.exists():
        kept = f"the last good checkpoint is {latest} ({unit} {torch.load(latest, weights_only=True)['step']})"
    else:
        kept = "no checkpoint was written"
    return f"error: {err}; training stopped, {kept}"


def policy_fits_task(cfg, task, state_dim, where):
    """One-line refusal when a checkpoint's policy does not fit the task (other action/state size)."""
    if cfg.act_dim != task.act_dim or cfg.chunk != task.chunk or cfg.state_dim != state_dim:
        raise ValueError(f"{where}: the policy takes state {cfg.state_dim}-D and returns {cfg.chunk} x {cfg.act_dim} "
                         f"actions; task {task.name} ({cfg.obs_mode}) has state {state_dim}-D and {task.chunk} x "
                         f"{task.act_dim} actions")
