"""The command line's main job: ``tbptt-fast train`` on the built-in task."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import tbptt_fast as tb
from tbptt_fast.cli import delayed_echo, main


def test_delayed_echo_data():
    x, target, mask = delayed_echo(50, 3, delay=4, seed=1)
    assert x.shape == target.shape == (50, 3, 1) and mask.shape == (50, 3)
    np.testing.assert_array_equal(target[4:], x[:-4])
    assert not mask[:4].any() and mask[4:].all()


def test_train_prints_updates_and_a_summary(capsys):
    assert main(["train", "--steps", "160", "--backend", "numpy", "--log-every", "5"]) == 0
    out = capsys.readouterr().out
    assert "TBPTT(k1=8, k2=16)" in out
    assert out.count("update ") == 4  # 20 updates, every 5th printed
    assert "done: 20 updates" in out


def test_default_training_learns_the_echo(capsys):
    backend = "cpu" if tb.native_available() else "numpy"
    assert main(["train", "--backend", backend]) == 0
    assert "learned the echo" in capsys.readouterr().out


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "tbptt_fast", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--k2" in proc.stdout
