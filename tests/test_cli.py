"""The command line through its entry function and as a subprocess.

Each task must learn to a threshold derived from the task itself: the echo's
chance level is the input's variance (1) and only k2 > delay may beat it; the
adding problem's mean predictor scores 1/6; the Reber stream's optimum is the
exact Bayes-optimal loss on the very validation streams (tests/test_tasks.py
checks that number); text must beat its character frequencies. Sizes are small
so that the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast import checkpoint
from tbptt_fast.cli import build_parser, main, read_run_meta
from tbptt_fast.progress import make_progress
from tbptt_fast.tasks import reber_optimum

NATIVE = tb.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="native module not built (sizes need cpu)")
HAS_MPL = True
try:
    import matplotlib  # noqa: F401
except ImportError:
    HAS_MPL = False


def run_cli(*args, env=None, timeout=180):
    """``python -m tbptt_fast ARGS`` in a subprocess."""
    full = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tbptt_fast", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
    )


def summary(folder) -> dict:
    return json.loads((Path(folder) / "summary.json").read_text())


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    return lines[0]


# ----------------------------------------------------------------------------
# The default run and the tasks
# ----------------------------------------------------------------------------


@needs_native
def test_default_run_shows_that_only_the_longer_window_learns_the_echo():
    t0 = time.perf_counter()
    proc = run_cli("train", env={"OMP_NUM_THREADS": "2"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert elapsed < 60, f"the default run took {elapsed:.0f} s"
    # the side-by-side table: validation mse of TBPTT(5, 5) and TBPTT(5, 20)
    assert "TBPTT(k1=5, k2=5)" in out and "TBPTT(k1=5, k2=20)" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("validation mse"))
    short, long = (float(v) for v in row.split()[-2:])
    assert short > 0.9, f"k2=5 < delay 10 should stay at chance (1.0), got {short}"
    assert long < 0.25, f"k2=20 > delay 10 should learn the echo, got {long}"
    assert "k2 = 20 > 10: learned the echo" in out
    assert "k2 = 5 <= 10: stayed near chance" in out
    # plain progress lines, not a bar, when stdout is a pipe
    assert "\r" not in out and re.search(r"\[k2=20\] step +\d", out)


@needs_native
def test_adding_problem_learns(tmp_path, capsys):
    args = ["--task", "adding", "--length", "10", "--steps", "8000", "--batch", "8"]
    assert main(["train", *args, "--hidden", "16", "--out", tmp_path, "--progress", "none"]) == 0
    s = summary(tmp_path)
    baseline = s["baselines"]["predicting the mean, 1 (no memory)"]
    assert baseline == pytest.approx(1 / 6)
    assert s["val_loss"] < 0.1 * baseline, s
    assert "predicting the mean, 1 (no memory) 0.1667" in capsys.readouterr().out


@needs_native
def test_reber_gets_within_a_margin_of_its_optimum(tmp_path, capsys):
    assert main(["train", "--task", "reber", "--steps", "12000", "--out", tmp_path]) == 0
    s = summary(tmp_path)
    opt = reber_optimum()
    bayes = s["bayes_optimal_on_validation"]
    assert abs(bayes - opt["bayes"]) < 0.02  # the validation streams' own optimum
    # within 0.02 nats of the optimum: well below the best loss without the
    # long-range memory (0.058 nats above it)
    assert s["val_loss"] - bayes < 0.02, s
    assert s["val_loss"] < opt["no_memory"] - 0.03
    out = capsys.readouterr().out
    assert "Bayes-optimal on these validation streams" in out


def _text(n=6000, seed=0) -> str:
    rng = np.random.default_rng(seed)
    words = ["the cat", "a dog", "sat on", "the mat", "ran to", "my house", "and", "then"]
    parts = []
    while sum(map(len, parts)) < n:
        parts.append(" ".join(rng.choice(words, size=rng.integers(3, 7))) + ".\n")
    return "".join(parts)[:n]


@needs_native
def test_text_learns_then_evaluate_and_generate(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(_text())
    out = tmp_path / "run"
    args = ["--text", book, "--batch", "8", "--hidden", "32", "--k1", "16", "--k2", "32"]
    assert main(["train", *args, "--epochs", "6", "--out", out, "--progress", "none"]) == 0
    s = summary(out)
    unigram = s["baselines"]["character frequencies (no context)"]
    assert s["val_loss"] < unigram - 0.5 * math.log(2), s  # half a bit per char better
    assert "bits/char" in capsys.readouterr().out

    assert main(["evaluate", out / "best.ckpt"]) == 0
    got = capsys.readouterr().out
    assert "validation part" in got and re.search(r"= \d\.\d+ bits/char, accuracy", got)

    assert main(["generate", out / "best.ckpt", "--prime", "the c", "-n", "40", "--seed", "1"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", out / "best.ckpt", "--prime", "the c", "-n", "40", "--seed", "1"]) == 0
    assert capsys.readouterr().out == a  # a seed gives the same text
    assert a.startswith("the c") and len(a.rstrip("\n")) >= 45
    assert set(a) <= set(_text()) | {"\n"}

    assert main(["generate", out / "best.ckpt", "--prime", "the Q"]) == 2
    assert "'Q'" in error_line(capsys.readouterr().err)


@needs_native
def test_arrays_learn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 4, 2))
    np.savez(tmp_path / "d.npz", x=x, y=np.roll(x[..., :1], 2, axis=0))  # the input 2 steps ago
    assert (
        main(["train", "--data", tmp_path / "d.npz", "--out", tmp_path / "r", "--epochs", "3"]) == 0
    )
    s = summary(tmp_path / "r")
    assert s["val_loss"] < 0.3 * s["baselines"]["predicting the mean"], s
    rows = ["a,b,c"] + [f"{math.sin(i / 5):.4f},{math.cos(i / 7):.4f},{i}" for i in range(800)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    csv_args = ["--data", tmp_path / "s.csv", "--columns", "a,b", "--epochs", "8"]
    assert main(["train", *csv_args, "--out", tmp_path / "c", "--progress", "none"]) == 0
    s = summary(tmp_path / "c")
    assert s["val_loss"] < 0.5 * s["baselines"]["predicting the mean"], s
    capsys.readouterr()
    assert main(["evaluate", tmp_path / "c" / "latest.ckpt"]) == 0
    assert "mse" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------

COMMON = ["--steps", "6000", "--batch", "8", "--hidden", "16", "--save-every", "4"]
COMMON += ["--val-every", "40", "--progress", "plain"]
RUNS = {  # token inputs and cross-entropy; real inputs and mse
    "reber": ["train", "--task", "reber", *COMMON],
    "echo": ["train", "--task", "echo", "--k2", "20", *COMMON],
}


def _same_run(a: Path, b: Path) -> None:
    """Two finished runs have the same history, checkpoints and logs."""
    for name in ("losses.csv", "validation.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    for name in ("latest.ckpt", "best.ckpt"):
        ma, xa = checkpoint.read(a / name)
        mb, xb = checkpoint.read(b / name)
        assert list(xa) == list(xb)
        for k in xa:
            assert np.array_equal(xa[k], xb[k], equal_nan=True), f"{name}: {k}"
        pa, pb = ma["cli"]["progress"], mb["cli"]["progress"]
        for k in ("steps_done", "updates", "best_val", "best_update", "finished"):
            assert pa[k] == pb[k], (name, k)
        assert ma.get("engine") == mb.get("engine")


def _start_and_wait_for_checkpoint(run: list, folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbptt_fast", *run, "--out", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = folder / "latest.ckpt"
    deadline = time.monotonic() + 120
    while not latest.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    return proc


@needs_native
@pytest.mark.parametrize(
    "task, sig", [("reber", signal.SIGKILL), ("echo", signal.SIGTERM)], ids=["SIGKILL", "SIGTERM"]
)
def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, capsys, task, sig):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main([*RUNS[task], "--out", whole]) == 0
    assert read_run_meta(whole / "latest.ckpt")[0]["progress"]["finished"]

    proc = _start_and_wait_for_checkpoint(RUNS[task], stopped)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # stops after its chunk, writes latest.ckpt, says how to continue
        assert proc.returncode == 130, err
        assert f"continue with: tbptt-fast train --resume {stopped}" in out
    meta, _ = read_run_meta(stopped / "latest.ckpt")
    assert not meta["progress"]["finished"], "the run ended before the signal: make it longer"
    assert 0 < meta["progress"]["steps_done"] < meta["progress"]["total_steps"]

    capsys.readouterr()
    assert main(["train", "--resume", stopped, "--progress", "plain"]) == 0
    assert "resuming at step" in capsys.readouterr().out
    _same_run(whole, stopped)
    # a finished run resumes to nothing new
    assert main(["train", "--resume", stopped]) == 0
    _same_run(whole, stopped)


@needs_native
def test_checkpoints_load_as_trainer_and_model(tmp_path):
    assert (
        main(["train", "--task", "echo", "--k2", "20", "--steps", "2000", "--out", tmp_path]) == 0
    )
    trainer = tb.Trainer.load(tmp_path / "latest.ckpt")
    assert (trainer.k1, trainer.k2) == (5, 20) and trainer.step_count == 2000
    model = tb.Model.load(tmp_path / "best.ckpt")
    assert model.hidden_size == 32
    meta, history = read_run_meta(tmp_path / "latest.ckpt")
    assert meta["config"]["source"] == {"kind": "task", "task": "echo", "delay": 10}
    assert len(history["losses"]) == 400 == len(history["lrs"])
    assert history["lrs"][0] == 0.01 and history["lrs"][-1] < 1e-4  # the cosine schedule
    assert (tmp_path / "run.json").exists() and (tmp_path / "losses.csv").exists()


@needs_native
def test_step_schedule_and_sgd(tmp_path):
    args = ["--task", "echo", "--k2", "20", "--steps", "2000", "--optimizer", "sgd"]
    args += ["--momentum", "0.9", "--schedule", "step", "--lr-step", "100", "--lr-gamma", "0.1"]
    assert main(["train", *args, "--lr", "0.05", "--out", tmp_path, "--progress", "none"]) == 0
    _, history = read_run_meta(tmp_path / "latest.ckpt")
    lrs = history["lrs"]
    assert set(np.round(lrs, 12)) == {0.05, 0.005, 0.0005, 5e-05}  # changed between chunks
    assert np.all(np.diff(lrs) <= 0)


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


@pytest.fixture
def no_matplotlib(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    return {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("command", [["train"], ["bench", "--tiny"]], ids=["train", "bench"])
def test_plot_without_matplotlib_is_an_error(tmp_path, no_matplotlib, command):
    target = [] if command[0] == "train" else [tmp_path / "b.png"]
    proc = run_cli(*command, "--plot", *target, env=no_matplotlib)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "matplotlib" in error_line(proc.stderr)
    assert not list(tmp_path.glob("*.png"))


@needs_native
@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_plot_of_a_k2_sweep(tmp_path, capsys):
    args = ["--task", "echo", "--delay", "4", "--k2", "2,8", "--steps", "3000"]
    assert main(["train", *args, "--plot", "--out", tmp_path, "--progress", "none"]) == 0
    for name in ("loss.png", "k2_sweep.png", "sweep.csv", "k2-2/latest.ckpt", "k2-8/summary.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "plots: " in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Usage errors, failures, help
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--k1", "0"], "argument --k1: expected an int >= 1"),
        (["train", "--k2", "4,x"], "argument --k2"),
        (["train", "--task", "copy"], "invalid choice: 'copy'"),
        (["train", "--val", "1"], "argument --val"),
        (["train", "--delay", "3", "--task", "reber"], "--delay applies to --task echo only"),
        (["train", "--momentum", "0.9"], "--momentum applies to --optimizer sgd only"),
        (["train", "--text", "missing.txt"], "missing.txt: no such file"),
        (["train", "--data", "missing.npz"], "missing.npz: no such file"),
        (["train", "--resume", "nowhere"], "no run to resume here"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["evaluate", "missing.ckpt"], "missing.ckpt: no such file"),
        (["generate"], "the following arguments are required: CKPT"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, args, expected):
    assert main(args) == 2
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert expected in line and line.startswith("tbptt-fast")
    assert captured.out == ""


def test_bad_files_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 truncated")
    cases = [
        (["train", "--data", tmp_path / "bad.csv"], "line 3, column 'b': 'x' is not a number"),
        (["train", "--data", tmp_path / "bad.npy"], "is not a .npy or .npz file"),
        (["train", "--text", tmp_path / "bad.txt"], "is not UTF-8 text"),
        (["evaluate", tmp_path / "bad.ckpt"], "not a tbptt_fast checkpoint"),
        (["generate", tmp_path / "bad.ckpt"], "not a tbptt_fast checkpoint"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        assert expected in error_line(capsys.readouterr().err)
    # through the real process too: the exit status and nothing but one line
    proc = run_cli("train", "--data", tmp_path / "bad.csv")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "is not a number" in error_line(proc.stderr)


def test_checkpoint_without_a_record_of_its_data(tmp_path, capsys):
    model = tb.Model("lstm", 4, 8, 4, vocab_size=4)
    model.save(tmp_path / "m.ckpt")
    assert main(["evaluate", tmp_path / "m.ckpt"]) == 2
    assert "holds no record of its data" in error_line(capsys.readouterr().err)
    assert main(["generate", tmp_path / "m.ckpt"]) == 2
    assert "holds no vocabulary; pass --text FILE" in error_line(capsys.readouterr().err)
    (tmp_path / "t.txt").write_text("abcd" * 10)
    assert main(["generate", tmp_path / "m.ckpt", "--text", tmp_path / "t.txt", "-n", "5"]) == 0
    assert len(capsys.readouterr().out.strip()) == 6  # the prime "a" and 5 characters


@needs_native
def test_failure_exits_1_and_debug_shows_the_traceback(capsys):
    args = [
        "train",
        "--task",
        "echo",
        "--k2",
        "20",
        "--steps",
        "500",
        "--lr",
        "1e9",
        "--clip",
        "none",
    ]
    assert main([*args, "--progress", "none"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "training diverged" in line and "--lr" in line
    assert main([*args, "--progress", "none", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_every_option_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subs.choices.items():
        if name == "bench":
            continue
        for action in sub._actions:
            assert action.help and action.help.strip(), (
                f"{name} {action.option_strings} has no help"
            )
        text = sub.format_help()
        assert "%(" not in text and "[/" not in text and "\x1b" not in text


def test_help_exits_0():
    proc = run_cli("train", "--help")
    assert (
        proc.returncode == 0 and "--k2 K2[,K2...]" in proc.stdout and "--resume DIR" in proc.stdout
    )
    for cmd in ("evaluate", "generate"):
        assert main([cmd, "--help"]) == 0


# ----------------------------------------------------------------------------
# Progress display
# ----------------------------------------------------------------------------


class _Tty:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_plain_lines_when_not_a_terminal(capsys):
    p = make_progress("auto", total=1000, batch=4, label="[x]")
    for done in range(100, 1001, 100):
        p.update(done, loss="0.5", rate=1234.0)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[x] step 1,000/1,000 (100%)")
    assert "loss 0.5" in lines[0] and "1,234 timesteps/s" in lines[0] and "ETA" in lines[0]


def test_progress_bar_in_a_terminal_without_rich_or_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    tty = _Tty()
    p = make_progress("auto", total=100, batch=1, stream=tty)
    p.update(50, loss="0.25", validated=True)
    p.message("a line of its own")
    p.close()
    assert "\r[##########..........]" in tty.text
    assert re.search(r"\ra line of its own *\n", tty.text)
    assert tty.text.endswith("\n")
