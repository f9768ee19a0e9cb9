"""CUDA arrays fed to the cuda backend in place, checked against NumPy inputs on a GPU.

The same engine runs once on NumPy inputs (host path: cast and copied by the
host) and once on CuPy / PyTorch / DLPack arrays of other dtypes and strides
(device path: csrc/cuda/inputs.cuh). Both must train bit for bit alike and
refuse bad values with the same error. Skipped without a GPU, CuPy or PyTorch;
the host side is tested everywhere by tests/test_device_arrays.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import make_data
from fake_cuda import FakeCuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not tb.cuda_available(), reason="no CUDA GPU"),
]


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def _trainers(dtype, loss, **kw):
    out = []
    for _ in range(2):
        m = tb.Model("gru", input_size=3, hidden_size=5, output_size=4, dtype=dtype, seed=1)
        out.append(
            tb.Trainer(m, k1=3, k2=7, loss=loss, optimizer=tb.Adam(lr=0.01), backend="cuda", **kw)
        )
    return out


def _assert_same(r1, r2, m1, m2):
    np.testing.assert_array_equal(r1.losses, r2.losses)
    np.testing.assert_array_equal(r1.update_steps, r2.update_steps)
    if r1.outputs is not None:
        np.testing.assert_array_equal(r1.outputs, r2.outputs)
    for g1, g2 in zip(r1.grads or [], r2.grads or [], strict=True):
        for k in g1:
            np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    for k, v in m1.state_dict().items():
        np.testing.assert_array_equal(v, m2.state_dict()[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("overlap", ["stored", "recompute"])
def test_cuda_cupy_inputs_train_as_numpy_inputs(cp, dtype, loss, overlap):
    host, dev = _trainers(dtype, loss, overlap=overlap)
    T, B = 13, 3
    x, y, mask, resets = make_data(4, T, B, 3, 4, loss, mask_p=0.3, reset_p=0.15)
    if loss == "mse":
        y[~mask] = np.nan
        y_dev = cp.asarray(y.astype(np.float16 if dtype == "float32" else np.float64))
        y = y_dev.get()  # the host path sees the same values
    else:
        y = y.astype(np.int32)
        y[~mask] = -7
        y_dev = cp.asarray(y)
    x_dev = cp.asarray(np.repeat(x, 3, axis=1))[:, ::3]  # float64, non-contiguous
    r1 = host.fit(x, y, mask=mask, resets=resets, return_grads=True, return_outputs=True)
    r2 = dev.fit(
        x_dev,
        y_dev,
        mask=cp.asarray(mask.astype(np.float32)),
        resets=cp.asarray(resets.astype(np.uint8)),
        return_grads=True,
        return_outputs=True,
    )
    _assert_same(r1, r2, host.model, dev.model)
    for t in range(4):  # streaming: one step at a time, crossing an update
        a = host.step(x[t], y[t], mask_t=mask[t], reset_t=resets[t])
        b = dev.step(x_dev[t], y_dev[t], cp.asarray(mask[t]), cp.asarray(resets[t]))
        assert a == b
    assert host.flush() == dev.flush()
    _assert_same(r1, r2, host.model, dev.model)


class _DLPackOnly:
    """Hides __cuda_array_interface__ so that the DLPack route is taken."""

    def __init__(self, a):
        self.a = a

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)


def test_cuda_dlpack_inputs(cp):
    host, dev = _trainers("float32", "mse")
    x, y, _, _ = make_data(5, 8, 2, 3, 4, "mse")
    r1 = host.fit(x, y, return_outputs=True)
    r2 = dev.fit(_DLPackOnly(cp.asarray(x)), _DLPackOnly(cp.asarray(y)), return_outputs=True)
    _assert_same(r1, r2, host.model, dev.model)


def test_cuda_torch_tensors_in_place():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    host, dev = _trainers("float32", "cross_entropy")
    x, y, mask, _ = make_data(6, 9, 2, 3, 4, "cross_entropy", mask_p=0.2)
    xt = torch.tensor(x, device="cuda", requires_grad=True)  # read through .detach()
    r1 = host.fit(x, y, mask=mask)
    r2 = dev.fit(xt, torch.tensor(y, device="cuda"), mask=torch.tensor(mask, device="cuda"))
    _assert_same(r1, r2, host.model, dev.model)


@pytest.mark.parametrize(
    "case",
    [
        "x_nan",
        "target_inf_read",
        "mask_nan",
        "label",
        "x_overflow",
        "target_overflow_read",
    ],
)
def test_cuda_device_validation_matches_host(cp, case):
    loss = "cross_entropy" if case == "label" else "mse"
    host, dev = _trainers("float32", loss)
    x, y, mask, _ = make_data(7, 6, 2, 3, 4, loss, mask_p=0.3)
    mask = mask.astype(np.float64)
    if case == "x_nan":
        x[4, 1, 2] = np.nan
    elif case == "target_inf_read":
        r, b = np.argwhere(mask)[-1]
        y[r, b, 1] = -np.inf
    elif case == "mask_nan":
        mask[3, 0] = np.nan
    elif case == "x_overflow":  # finite as float64, Inf in the float32 model
        x = x.astype(np.float64)
        x[4, 1, 2] = 1e39
    elif case == "target_overflow_read":
        y = y.astype(np.float64)
        r, b = np.argwhere(mask)[-1]
        y[r, b, 1] = -1e39
    else:
        r, b = np.argwhere(mask)[2]
        y[r, b] = 4
    with pytest.raises(ValueError) as e1:
        host.fit(x, y, mask=mask)
    with pytest.raises(ValueError) as e2:
        dev.fit(cp.asarray(x), cp.asarray(y), mask=cp.asarray(mask))
    assert str(e1.value) == str(e2.value)
    assert dev.step_count == 0


class _Shifted:
    """A float32 CUDA array whose pointer is 2 bytes off its element size."""

    def __init__(self, a):
        self.a = a

    @property
    def __cuda_array_interface__(self):
        iface = dict(self.a.__cuda_array_interface__)
        iface["data"] = (iface["data"][0] + 2, False)
        return iface


def test_cuda_misaligned_arrays_are_refused(cp):
    _, dev = _trainers("float32", "mse")
    x, y, _, _ = make_data(8, 4, 2, 3, 4, "mse")
    x_dev = cp.asarray(np.concatenate([x.astype(np.float32).ravel(), [0]])).reshape(-1)
    shifted = _Shifted(x_dev[:-1].reshape(x.shape))
    with pytest.raises(ValueError, match="aligned to its element size"):
        dev.fit(shifted, cp.asarray(y.astype(np.float32)))
    assert dev.step_count == 0


def test_cuda_host_memory_posing_as_device_memory_is_refused():
    _, dev = _trainers("float32", "mse")
    x, y, _, _ = make_data(8, 4, 2, 3, 4, "mse")
    with pytest.raises(ValueError, match="does not point to CUDA device memory"):
        dev.fit(FakeCuda(x.astype(np.float32)), FakeCuda(y.astype(np.float32)))
    assert dev.step_count == 0
