"""CUDA graphs for the per-step launch sequences (TBPTT_CUDA_GRAPHS), on a GPU.

With graphs on, training must match training without them (same kernels and
products, replayed), and the graphs must really be replayed: the engine's
graph_stats() counts what its cache did. Skipped without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import assert_close, make_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not tb.cuda_available(), reason="no CUDA GPU"),
]


def _fit(monkeypatch, mode, cell, k1, k2, overlap, T=70):
    monkeypatch.setenv("TBPTT_CUDA_GRAPHS", mode)
    m = tb.Model(cell, input_size=3, hidden_size=8, output_size=2, num_layers=2, dtype="float64")
    tr = tb.Trainer(m, k1=k1, k2=k2, optimizer=tb.Adam(lr=0.01), overlap=overlap, backend="cuda")
    x, y, mask, resets = make_data(9, T, 4, 3, 2, "mse", mask_p=0.2, reset_p=0.05)
    res = tr.fit(x, y, mask=mask, resets=resets, return_grads=True)
    for t in range(5):  # streaming steps run directly (1-step chunks), updates replay
        tr.step(x[t], y[t])
    return res, tr


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize(("k1", "k2", "overlap"), [(8, 8, "stored"), (4, 16, "recompute")])
def test_cuda_graphs_train_as_direct_launches(monkeypatch, cell, k1, k2, overlap):
    ref, tr_ref = _fit(monkeypatch, "0", cell, k1, k2, overlap)
    got, tr = _fit(monkeypatch, "strict", cell, k1, k2, overlap)
    assert_close(got.losses, ref.losses, 1e-12, "losses")
    for g1, g2 in zip(got.grads, ref.grads, strict=True):
        for k in g2:
            assert_close(g1[k], g2[k], 1e-12, k)
    for k, v in tr_ref.model.state_dict().items():
        assert_close(tr.model.state_dict()[k], v, 1e-12, k)
    stats = tr._engine.graph_stats()
    assert stats["failed"] == 0, stats["first_failure"]
    assert stats["recorded"] > 0 and stats["replayed"] > stats["recorded"], stats
    assert tr_ref._engine.graph_stats()["recorded"] == 0


def test_cuda_graphs_follow_a_batch_size_change(monkeypatch):
    """Buffers are reallocated for a new batch size: the graphs must be dropped."""
    out = []
    for graphs in ("strict", "0"):
        monkeypatch.setenv("TBPTT_CUDA_GRAPHS", graphs)
        m = tb.Model("lstm", input_size=3, hidden_size=8, output_size=2, dtype="float64")
        tr = tb.Trainer(m, k1=6, k2=6, backend="cuda")
        losses = []
        for B in (4, 7, 4):
            x, y, _, _ = make_data(B, 40, B, 3, 2, "mse")
            tr.reset_state()
            losses.append(tr.fit(x, y).losses)
        out.append(np.concatenate(losses))
    assert_close(out[0], out[1], 1e-12, "losses")
