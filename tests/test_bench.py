"""The benchmark peers compute what tbptt_fast computes, and the bench command runs.

Fast (a few seconds): small models; the torch peers skip when torch is absent and the
cpu rows when the native module is not built. The project's targets table
(``benchmarks/targets.py``, not part of the package) is tested on hand-made rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

import tbptt_fast as tb
from tbptt_fast import bench
from tbptt_fast.bench import harness, report, runners
from tbptt_fast.bench.checks import check_impl
from tbptt_fast.bench.configs import Config, flops_per_step
from tbptt_fast.bench.peers import TextbookTBPTT

TARGETS_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "targets.py"

CELLS = ["rnn_tanh", "lstm", "gru"]
KS = [(4, 4), (3, 7), (1, 4), (5, 2)]


def _ids(ks):
    return [f"k{k1}_{k2}" for k1, k2 in ks]


@pytest.mark.parametrize("k1,k2", KS, ids=_ids(KS))
@pytest.mark.parametrize("cell", CELLS)
def test_textbook_matches_numpy_reference(cell, k1, k2):
    res = check_impl("textbook", Config(cell, 6, 3, k1, k2, out=3))
    assert res["ok"], res["message"]
    assert res["err64"] <= 1e-8 and res["err32"] <= 1e-4


def test_check_catches_a_wrong_window(monkeypatch):
    class ShortWindow(TextbookTBPTT):
        def __init__(self, cell, params, k1, k2=None, **kw):
            super().__init__(cell, params, k1, k2 - 1, **kw)

    wrong = dataclasses.replace(runners.IMPLS["textbook"], build=runners._peer(ShortWindow))
    monkeypatch.setitem(runners.IMPLS, "textbook", wrong)
    res = check_impl("textbook", Config("lstm", 6, 2, 3, 7, out=3))
    assert not res["ok"]
    assert "disagrees with tbptt_fast numpy" in res["message"]


TORCH_CASES = [
    ("torch-seq", 4, 4),
    ("torch-cell", 4, 4),
    ("torch-recompute", 3, 7),
    ("torch-recompute", 4, 8),
    ("torch-recompute", 1, 4),
]


@pytest.mark.torch
@pytest.mark.parametrize("impl,k1,k2", TORCH_CASES, ids=[f"{i}-{a}_{b}" for i, a, b in TORCH_CASES])
@pytest.mark.parametrize("cell", CELLS)
def test_torch_peers_match_numpy_reference(cell, impl, k1, k2):
    pytest.importorskip("torch")
    res = check_impl(impl, Config(cell, 6, 3, k1, k2, out=3))
    assert res["ok"], res["message"]


@pytest.mark.parametrize("impl,k1,k2", [("cpu", 4, 4), ("cpu", 3, 7), ("cpu-recompute", 3, 7)])
def test_cpu_backend_matches_numpy_reference(impl, k1, k2):
    if not tb.native_available():
        pytest.skip("the native module tbptt_fast._core is not built")
    res = check_impl(impl, Config("lstm", 6, 3, k1, k2, out=3))
    assert res["ok"], res["message"]


def test_flops_definition():
    # lstm, one layer: forward 2*B*(D+H)*4H, trained as 3x forward when k1 == k2
    cfg = Config("lstm", 64, 8, 16, 16, out=16)
    fwd = 2 * 8 * 128 * 4 * 64
    assert flops_per_step(cfg) == 3 * fwd + 3 * 2 * 8 * 64 * 16
    assert flops_per_step(dataclasses.replace(cfg, k2=64)) == 9 * fwd + 3 * 2 * 8 * 64 * 16


def test_tiny_run_has_documented_keys():
    result = harness.run(
        [Config("lstm", 8, 2, 4, 4)],
        ["numpy", "textbook"],
        repeats=2,
        sample_s=0.01,
        max_retries=0,
        log=lambda msg: None,
    )
    assert set(result) == {"machine", "gemm", "rows"}
    assert result["gemm"]["1"]["gflops"] > 0
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["numpy"]["status"] == "ok" and rows["textbook"]["status"] == "ok"
    for r in rows.values():
        assert set(r) <= set(report.RESULT_KEYS)
        assert len(r["samples_s"]) == 2 and r["throughput"] > 0 and r["gflops"] > 0
        assert 0 < r["gemm_fraction"] < 2
    assert rows["textbook"]["vs_textbook"] == 1.0


def test_cli_tiny(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result) == {"machine", "gemm", "rows"}  # no project targets in the package
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert {"numpy", "textbook"} <= {r["impl"] for r in ok}
    assert not [r for r in result["rows"] if r["status"] == "check_failed"]
    out = capsys.readouterr().out
    assert "| config | impl | timesteps*B/s |" in out and "| target |" not in out


def test_cli_rejects_an_unknown_impl(capsys):
    assert bench.main(["--tiny", "--impls", "numpy,nope"]) == 2
    assert "unknown implementation(s) ['nope']" in capsys.readouterr().out


@pytest.fixture(scope="module")
def targets():
    """``benchmarks/targets.py``, loaded from the repository (it is not in the package)."""
    if not TARGETS_SCRIPT.exists():
        pytest.skip(f"{TARGETS_SCRIPT} is not here (not a source checkout)")
    spec = importlib.util.spec_from_file_location("bench_targets", TARGETS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(**throughput):
    return [
        {**Config("lstm", 64, 8, 16, 16).key(), "impl": impl, "status": "ok", "throughput": v}
        for impl, v in throughput.items()
    ]


def test_targets_evaluate(targets):
    (t,) = targets.evaluate_targets(_rows(cpu=700.0, numpy=100.0))
    assert t["target"] == "cpu >= 6x numpy" and t["pass"] and t["value"] == 7.0


def test_targets_script_reads_a_bench_json(targets, tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine": {}, "gemm": {}, "rows": _rows(cpu=500.0, numpy=100.0)}))
    assert targets.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| cpu >= 6x numpy | lstm H=64 B=8 (16,16) t=1 | 5.00 | MISS |" in out


def test_scaling_preset_sweeps_threads_up_to_the_cpus():
    from tbptt_fast.bench.configs import scaling_configs, thread_sweep

    assert thread_sweep(1) == [1]
    assert thread_sweep(2) == [1, 2]
    assert thread_sweep(5) == [1, 2, 4, 5]
    assert thread_sweep(8) == [1, 2, 4, 8]
    rows = scaling_configs(3)
    assert [c.threads for c in rows if c.hidden == 64] == [1, 2, 3]
    assert {c.hidden for c in rows} == {64, 256, 1024}


def test_thread_targets_compare_with_the_same_row_at_one_thread(targets):
    rows = [
        {**Config("lstm", 64, 32, 16, 16, t).key(), "impl": "cpu", "status": "ok", "throughput": v}
        for t, v in ((1, 100.0), (2, 180.0))
    ]
    got = {t["target"]: t for t in targets.evaluate_targets(rows)}
    two = got["cpu 2 threads >= 1.7x 1 thread"]
    assert two["pass"] and two["value"] == pytest.approx(1.8)
    assert got["cpu more threads >= 0.9x 1 thread"]["pass"]
    rows[1]["throughput"] = 80.0  # slower with 2 threads: both fail
    got = {t["target"]: t for t in targets.evaluate_targets(rows)}
    assert not got["cpu 2 threads >= 1.7x 1 thread"]["pass"]
    assert not got["cpu more threads >= 0.9x 1 thread"]["pass"]
