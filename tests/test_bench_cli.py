"""``tbptt-fast bench`` as a user sees it: cross-entropy rows, checked, and the presets' promises."""

from __future__ import annotations

import json

import pytest

import tbptt_fast as tb
from tbptt_fast import bench
from tbptt_fast.bench import harness
from tbptt_fast.bench.configs import PRESETS, Config

CASES = [("cpu", 4, 4), ("cpu", 3, 7), ("cpu-recompute", 3, 7), ("torch-seq", 4, 4)]


@pytest.mark.parametrize("impl, k1, k2", CASES, ids=[f"{i}-{a}_{b}" for i, a, b in CASES])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cross_entropy_rows_are_checked_against_the_reference(impl, k1, k2, cell):
    if impl.startswith("cpu") and not tb.native_available():
        pytest.skip("the native module is not built")
    if impl.startswith("torch"):
        pytest.importorskip("torch")
    res = harness.check_ce(impl, Config(cell, 6, 3, k1, k2, out=5, loss="cross_entropy"))
    assert res["ok"], res["message"]
    assert res["err64"] <= 1e-8 and res["err32"] <= 1e-4


def test_a_wrong_cross_entropy_gradient_is_caught(monkeypatch):
    build, applies, overlap = harness.CE_IMPLS["numpy"]

    def scaled(cfg, params, lr):  # a different gradient: the loss times 2
        runner = build(cfg, params, lr)
        fit = runner.fit

        def fit2(x, target, return_grads=False):
            losses, grads = fit(x, target, return_grads)
            return losses, [{k: 2 * v for k, v in g.items()} for g in grads] if grads else grads

        runner.fit = fit2
        return runner

    monkeypatch.setitem(harness.CE_IMPLS, "textbook", (scaled, applies, overlap))
    res = harness.check_ce("textbook", Config("lstm", 6, 2, 3, 3, out=4, loss="cross_entropy"))
    assert not res["ok"] and "cross-entropy" in res["message"]


def test_tiny_preset_times_both_losses(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    ce = [r for r in rows if r["loss"] == "cross_entropy"]
    assert {r["impl"] for r in ce if r["status"] == "ok"} >= {"numpy"}
    assert not [r for r in rows if r["status"] == "check_failed"]
    assert {r["message"] for r in ce if r["impl"] == "textbook"} == {"times mse only"}
    out = capsys.readouterr().out
    assert "ce O=5 | numpy |" in out and "| target |" not in out
    for name in ("quick", "full"):  # every preset has cross-entropy rows
        assert any(c.loss == "cross_entropy" for c in PRESETS[name]["configs"])


def test_custom_matrix_with_both_losses(capsys):
    args = ["--hidden", "4", "--batch", "2", "--k", "2:2", "--loss", "mse,cross_entropy"]
    configs, _ = harness.configs_from_args(harness.build_parser().parse_args(args))
    assert [c.loss for c in configs] == ["mse", "cross_entropy"]
    assert configs[1].label == "lstm H=4 B=2 (2,2) t=1 ce O=16"
    assert bench.main(["--tiny", "--loss", "hinge"]) == 2
    assert "unknown loss(es) ['hinge']" in capsys.readouterr().out


def test_quick_preset_states_its_time():
    help_text = harness.build_parser().format_help()
    assert "about a minute on 2 cores, under 2 minutes" in " ".join(help_text.split())
    assert PRESETS["quick"]["budget_s"] < 120
