"""Host-side behaviour of the optional CUDA backend, testable without a GPU.

The numerics of the CUDA engine are checked by the shared backend-parametrised
suite (the ``backend`` fixture includes "cuda", marked ``gpu``), which runs on
a machine with a GPU; tests/gpu/run.sh drives that. Here: the build switch is
reported, the package imports and the CPU engine works whatever the build,
and asking for CUDA without a usable GPU is a clear RuntimeError that changes
nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast import _native

pytestmark = pytest.mark.skipif(_native.core is None, reason="native module not built")

NO_GPU = pytest.mark.skipif(tb.cuda_available(), reason="a usable CUDA GPU is present")


def _config(model: tb.Model) -> dict:
    """The engine config a Trainer builds (k1=3, k2=5, mse, SGD(lr=0.1))."""
    return tb.Trainer(model, k1=3, k2=5, optimizer=tb.SGD(lr=0.1), backend="numpy")._config


def test_build_info_reports_the_cuda_switch():
    info = _native.core.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_info"], str)
    if info["cuda"]:
        assert "cuda" in info["cuda_info"].lower()
        assert hasattr(_native.core, "CudaEngine")
    else:
        assert info["cuda_info"] == ""
        assert not hasattr(_native.core, "CudaEngine")


def test_cuda_available_is_a_bool_and_never_raises():
    assert isinstance(_native.core.cuda_available(), bool)
    assert isinstance(tb.cuda_available(), bool)
    assert tb.cuda_available() == _native.core.cuda_available()
    if not _native.core.build_info()["cuda"]:
        assert tb.cuda_available() is False


@NO_GPU
def test_cuda_available_is_false_without_a_gpu():
    assert tb.cuda_available() is False


@NO_GPU
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_trainer_on_cuda_without_gpu_is_a_clear_error_that_changes_nothing(cell):
    model = tb.Model(cell, input_size=3, hidden_size=4, output_size=2, seed=1)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="cuda"):
        tb.Trainer(model, k1=4, backend="cuda")
    after = model.state_dict()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    # the package and the CPU engine are unaffected
    trainer = tb.Trainer(model, k1=2, optimizer=tb.SGD(lr=0.1), backend="cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    y = rng.standard_normal((5, 2, 2)).astype(np.float32)
    res = trainer.fit(x, y)
    assert res.update_steps.tolist() == [2, 4, 5]
    assert np.all(np.isfinite(res.losses))


@NO_GPU
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_cuda_engine_without_gpu_raises_runtime_error(dtype):
    if not hasattr(_native.core, "CudaEngine"):
        pytest.skip("built without CUDA")
    model = tb.Model("lstm", input_size=3, hidden_size=4, output_size=2, dtype=dtype)
    params = model.param_list()
    before = [p.copy() for p in params]
    for _ in range(2):  # a failed construction leaves nothing behind
        with pytest.raises(RuntimeError, match="CUDA") as info:
            _native.core.CudaEngine(_config(model), params)
        assert "GPU" in str(info.value) or "cuBLAS" in str(info.value)
    for p, b in zip(params, before, strict=True):
        np.testing.assert_array_equal(p, b)


def test_cuda_engine_rejects_a_bad_config_before_touching_the_device():
    if not hasattr(_native.core, "CudaEngine"):
        pytest.skip("built without CUDA")
    model = tb.Model("gru", input_size=3, hidden_size=4, output_size=2)
    cfg = _config(model)
    cfg["k1"] = 0
    with pytest.raises(ValueError, match="k1"):
        _native.core.CudaEngine(cfg, model.param_list())
