"""Data-parallel training over MPI (tbptt_fast.distributed) equals one process on the whole batch.

Each test starts ``mpiexec -n N`` on tests/mpi_worker.py in a subprocess, with
a timeout (a hang fails the test instead of stalling the suite), and compares
what the ranks computed with a plain single-process ``tb.Trainer`` run here on
the whole batch, to the float64 tolerance of the contract. 2 ranks split the
batch evenly or not, 3 ranks always unevenly (and oversubscribe a 2-core
machine). Skipped, with the reason, when mpi4py or mpiexec is missing
(``pip install 'tbptt-fast[mpi]'``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import TOL, assert_close

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"
sys.path.insert(0, str(HERE))
import mpi_worker as W  # noqa: E402

MPIEXEC = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
MISSING = (
    "mpi4py is not installed"
    if importlib.util.find_spec("mpi4py") is None
    else "no mpiexec on PATH"
    if MPIEXEC is None
    else None
)
pytestmark = [
    pytest.mark.skipif(
        MISSING is not None, reason=f"{MISSING}: install the extra, pip install 'tbptt-fast[mpi]'"
    ),
    pytest.mark.skipif(
        not tb.native_available(), reason="native module tbptt_fast._core not built"
    ),
]
TIMEOUT = 60  # seconds per mpiexec: a rank that waits forever fails the test

BASE = dict(
    cell="lstm", D=3, H=5, O=2, L=2, T=23, B=7, cut=10, k1=4, k2=7, loss="mse",
    overlap="stored", clip=0.5, optimizer="sgd", mask_p=0.3, reset_p=0.08, seed=1,
    data="global",
)  # fmt: skip
CASES = [
    # overlapping windows (k2 > k1), masks, resets, clipping, an uneven split,
    # a partial block flushed, two streams with no target in the first block
    dict(BASE, id="lstm_stored", masked_streams=[0, 1, 2, 3], init=True),
    dict(BASE, id="gru_recompute_adam", cell="gru", overlap="recompute", optimizer="adam",
         clip=None, seed=2),
    # token ids and cross entropy, k2 < k1, an explicit uneven split of local data
    dict(BASE, id="cifg_tokens_ce", cell="cifg", vocab=6, D=4, O=5, loss="cross_entropy",
         k1=5, k2=3, seed=3, data="local", split={"2": [1, 6], "3": [3, 1, 3]}, init=True),
]  # fmt: skip


def mpiexec(
    n: int, *args: str, runner: tuple[str, ...] = (), script=WORKER
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [
        MPIEXEC,
        "-n",
        str(n),
        sys.executable,
        *runner,
        *([str(script)] if script else []),
        *args,
    ]
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=HERE
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT} s (a rank hangs)\n{e.stdout}")


def single(c: dict):
    """The expectation: one process, the whole batch, the same calls."""
    model = W.make_model(c, c["seed"])
    t = tb.Trainer(model, **W.trainer_kwargs(c))
    a, b, steps = W.parts(c)
    init = W.initial_state(c)
    r1 = t.fit(*a, initial_state=init, flush=False, return_grads=True, return_outputs=True)
    r2 = t.fit(*b, flush=False, return_grads=True, return_outputs=True)
    stepped = [t.step(*(a[i] for a in steps)) for i in range(W.EXTRA)]
    last = t.flush()
    ev = model.evaluate(*(a[: c["T"]] for a in W.case_data(c)), loss=c["loss"])
    return t, r1, r2, stepped, last, ev


def _cases_json(tmp_path: Path, cases) -> str:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    return str(path)


@pytest.mark.parametrize("ranks", [2, 3])
def test_distributed_equals_one_process(tmp_path, ranks):
    p = mpiexec(ranks, "train", _cases_json(tmp_path, CASES), str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    tol = TOL["float64"]
    for c in CASES:
        got = np.load(tmp_path / f"{c['id']}.npz")
        t, r1, r2, stepped, last, ev = single(c)
        what = f"{c['id']} on {ranks} ranks"
        want_losses = np.concatenate([r1.losses, r2.losses, [np.nan if last is None else last]])
        assert np.array_equal(got["steps"], np.concatenate([r1.update_steps, r2.update_steps]))
        assert_close(got["losses"][:-1], want_losses[:-1], tol, f"{what}: losses")
        assert np.isnan(got["losses"][-1]) == np.isnan(want_losses[-1])
        if not np.isnan(want_losses[-1]):
            assert_close(got["losses"][-1:], want_losses[-1:], tol, f"{what}: flush loss")
        want_stepped = np.array([np.nan if v is None else v for v in stepped])
        assert np.array_equal(np.isnan(got["stepped"]), np.isnan(want_stepped)), what
        assert_close(
            np.nan_to_num(got["stepped"]), np.nan_to_num(want_stepped), tol, f"{what}: step()"
        )
        grads = r1.grads + r2.grads
        assert len(grads) == len(got["steps"]) > 3
        for i, g in enumerate(grads):
            for k, v in g.items():
                assert_close(got[f"grad{i}/{k}"], v, tol, f"{what}: update {i} gradient {k}")
        for k, v in t.model.state_dict().items():
            assert_close(got[f"param/{k}"], v, tol, f"{what}: final {k}")
        want_out = np.concatenate([r1.outputs, r2.outputs])
        assert_close(got["outputs"], want_out, tol, f"{what}: outputs")
        for i, s in enumerate(W.flat(t.state)):
            assert_close(got[f"state{i}"], s, tol, f"{what}: state {i}")
        assert_close(got["eval"], [ev.loss, ev.count], tol, f"{what}: evaluate")


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    c = dict(CASES[0], overlap="recompute", optimizer="adam")
    case = tmp_path / "case.json"
    case.write_text(json.dumps(c))
    ckpt = str(tmp_path / "run.ckpt")
    p = mpiexec(3, "save", str(case), ckpt, str(tmp_path / "straight.npz"))
    assert p.returncode == 0, p.stdout + p.stderr
    p = mpiexec(3, "resume", str(case), ckpt, str(tmp_path / "resumed.npz"))
    assert p.returncode == 0, p.stdout + p.stderr
    straight, resumed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(straight.files) == sorted(resumed.files)
    for k in straight.files:  # the same ranks and calls: bit for bit
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    # and the same as one process doing fit(a), fit(b) on the whole batch
    t = tb.Trainer(W.make_model(c, c["seed"]), **W.trainer_kwargs(c))
    a, b, _ = W.parts(c)
    t.fit(*a, flush=False)
    r = t.fit(*b)
    assert_close(resumed["losses"], r.losses, TOL["float64"], "resumed losses")
    for k, v in t.model.state_dict().items():
        assert_close(resumed[f"param/{k}"], v, TOL["float64"], f"resumed {k}")
    # a checkpoint of 3 ranks refuses 2, on every rank, naming the path
    p = mpiexec(2, "resume", str(case), ckpt, str(tmp_path / "no.npz"))
    assert p.returncode != 0
    assert p.stderr.count("saved by 3 ranks, loaded on 2") == 2, p.stderr


@pytest.mark.parametrize("mode", ["bad_input", "bad_callback"])
def test_a_failing_rank_stops_every_rank(tmp_path, mode):
    case = tmp_path / "case.json"
    case.write_text(json.dumps(dict(CASES[0], id=mode)))
    p = mpiexec(3, mode, str(case))
    assert p.returncode != 0
    # the ranks' lines may come interleaved: one match per rank
    lines = sorted(re.findall(r"rank \d+ stopped: .*?params_unchanged=(?:True|False)", p.stdout))
    assert len(lines) == 3, p.stdout + p.stderr
    culprit = 2 if mode == "bad_input" else 1
    for line in lines:
        r = int(line.split()[1])
        if r == culprit:
            want = "ValueError" if mode == "bad_input" else "KeyError"
            assert f"stopped: {want}" in line, line
        else:
            assert "stopped: RuntimeError: " in line and f"rank {culprit}" in line, line
    if mode == "bad_input":  # agreed before anything ran: nothing changed anywhere
        assert all("step_count=0 params_unchanged=True" in line for line in lines), lines
    else:  # every rank stopped after the same update (the third, index 2)
        assert all(f"step_count={3 * CASES[0]['k1']} " in line for line in lines), lines


def test_a_rank_that_dies_does_not_hang_the_others(tmp_path):
    case = tmp_path / "case.json"
    case.write_text(json.dumps(dict(CASES[0], id="crash")))
    p = mpiexec(2, "crash", str(case), runner=("-m", "mpi4py"))
    assert p.returncode != 0
    assert "rank 1 dies here" in p.stderr


def test_shard_splits_evenly_and_refuses_empty_ranks():
    from tbptt_fast.distributed import shard

    for batch in range(3, 12):
        for size in (1, 2, 3):
            got = [shard(batch, r, size) for r in range(size)]
            want = np.array_split(np.arange(batch), size)
            assert [list(range(batch))[s] for s in got] == [w.tolist() for w in want]
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        shard(2, 0, 3)


def test_cli_train_distributed_equals_one_process(tmp_path):
    import csv

    opts = ["--task", "adding", "--length", "6", "--steps", "240", "--batch", "5", "--hidden",
            "6", "--dtype", "float64", "--k1", "4", "--k2", "9", "--clip", "0.5", "--val", "0.2",
            "--epochs", "2", "--progress", "none", "--threads", "1"]  # fmt: skip
    one = subprocess.run(
        [sys.executable, "-m", "tbptt_fast", "train", *opts, "--out", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert one.returncode == 0, one.stdout + one.stderr
    two = mpiexec(
        2, "train", "--distributed", *opts, "--out", str(tmp_path / "two"),
        runner=("-m", "tbptt_fast"), script=None,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("done: ") == 1  # rank 0 speaks for all

    def losses(run):
        with open(tmp_path / run / "losses.csv") as f:
            return np.array([float(r["loss"]) for r in csv.DictReader(f)])

    want = tb.Trainer.load(tmp_path / "one" / "latest.ckpt").model.state_dict()
    got = tb.Model.load(tmp_path / "two" / "model.ckpt").state_dict()
    for k, v in want.items():
        assert_close(got[k], v, TOL["float64"], f"cli: final {k}")
    assert_close(losses("two"), losses("one"), TOL["float64"], "cli: losses")
    # the run's checkpoint is a distributed one: a plain Trainer.load refuses it
    with pytest.raises(ValueError, match="unknown kind 'distributed_trainer'"):
        tb.Trainer.load(tmp_path / "two" / "latest.ckpt")


def test_cli_a_rank_with_a_bad_option_stops_every_rank():
    # MPMD: rank 1 gets an invalid --lr and fails before MPI starts on it; rank 0 would
    # wait for it in the first collective call, unless the failing rank aborts the job
    opts = ["train", "--distributed", "--task", "echo", "--k2", "12", "--steps", "200",
            "--batch", "4", "--hidden", "4", "--progress", "none"]  # fmt: skip
    cli = [sys.executable, "-m", "tbptt_fast", *opts]
    cmd = [MPIEXEC, "-n", "1", *cli, ":", "-n", "1", *cli, "--lr", "-1"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 0 still waits for the failed rank after {TIMEOUT} s")
    assert p.returncode != 0
    assert "argument --lr: expected a number" in p.stderr, p.stderr
