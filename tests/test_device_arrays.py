"""CUDA-array inputs (``__cuda_array_interface__`` / DLPack), host side.

Parsing, routing and validation of device arrays need no GPU: ``FakeCuda``
presents host memory through the CUDA array interface and
``NumpyDeviceEngine`` answers the CUDA engine's ``scan_device`` /
``run_device`` from NumPy (tests/fake_cuda.py). The kernels themselves are
checked against the host path on a GPU by tests/test_cuda_device_inputs.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast import _device
from tbptt_fast._device import CudaArray, cuda_array, from_dlpack_capsule, from_interface

from conftest import CPU, make_data
from fake_cuda import FakeCuda, NumpyDeviceEngine


# -- parsing --------------------------------------------------------------------------------
@pytest.mark.parametrize("explicit_strides", [True, False])
def test_interface_gives_pointer_shape_strides_dtype(explicit_strides):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    v = cuda_array(FakeCuda(a, strides=explicit_strides))
    assert v.ptr == a.ctypes.data
    assert v.shape == (2, 3, 4) and v.strides == (48, 16, 4) and v.dtype == np.float32


def test_interface_keeps_non_contiguous_strides():
    a = np.zeros((5, 6, 7), np.float64)[::2, :, 1::3]
    v = cuda_array(FakeCuda(a))
    assert v.shape == a.shape and v.strides == a.strides and v.ptr == a.ctypes.data


@pytest.mark.parametrize(
    "dtype", ["float16", "float32", "float64", "bool", "int8", "int32", "int64", "uint8", "uint64"]
)
def test_every_supported_dtype_has_its_code(dtype):
    v = cuda_array(FakeCuda(np.zeros(3, dtype)))
    assert v.dtype == np.dtype(dtype)
    assert v.spec("x")[1] == _device.ELEM_CODES[np.dtype(dtype)]


def test_interface_refuses_what_the_kernels_cannot_read():
    base = {"shape": (2,), "typestr": "<f4", "data": (1, False), "version": 3}
    with pytest.raises(TypeError, match="masked"):
        from_interface({**base, "mask": object()}, None, "x")
    with pytest.raises(TypeError, match="complex64 is not supported"):
        from_interface({**base, "typestr": "<c8"}, None, "x")
    with pytest.raises(TypeError, match="big-endian"):
        from_interface({**base, "typestr": ">f4"}, None, "x")
    with pytest.raises(TypeError, match="no 'data'"):
        from_interface({"shape": (2,), "typestr": "<f4"}, None, "x")


def test_dlpack_capsule_is_read_without_consuming_it():
    a = np.arange(60, dtype=np.int32).reshape(3, 4, 5)[:, 1:, ::2]
    capsule = a.__dlpack__()
    v, device = from_dlpack_capsule(capsule, "target")
    assert device == (1, 0)  # kDLCPU: NumPy's own memory
    assert v.ptr == a.ctypes.data and v.shape == a.shape and v.strides == a.strides
    assert v.dtype == np.int32 and v.owner is capsule
    # not consumed: NumPy still accepts the same capsule
    again, _ = from_dlpack_capsule(capsule)
    assert again.ptr == v.ptr


def test_dlpack_bool_and_contiguous_strides():
    a = np.ones((2, 3), bool)
    v, _ = from_dlpack_capsule(a.__dlpack__())
    assert v.dtype == np.bool_ and v.strides == (3, 1)


class _DLPackOn:
    """An object whose DLPack export says it lives on ``device_type``."""

    def __init__(self, a, device_type):
        self.a, self.device_type = a, device_type

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__()


def test_dlpack_routing_by_device_type():
    a = np.zeros((2, 3), np.float32)
    assert cuda_array(a) is None
    assert cuda_array(_DLPackOn(a, 1)) is None  # CPU: the host path takes it
    v = cuda_array(_DLPackOn(a, 2))  # kDLCUDA
    assert isinstance(v, CudaArray) and v.ptr == a.ctypes.data
    assert cuda_array(_DLPackOn(a, 10), "x") is None  # ROCm: the host path copies or refuses


def test_time_axis_for_a_step():
    a = np.zeros((3, 4), np.float32)
    v = cuda_array(FakeCuda(a)).with_time_axis()
    assert v.shape == (1, 3, 4) and v.strides == (0, 16, 4) and v.ptr == a.ctypes.data


# -- routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", CPU])
def test_host_backends_refuse_cuda_arrays(backend):
    m = tb.Model("gru", input_size=2, hidden_size=3, output_size=2, seed=0)
    tr = tb.Trainer(m, k1=2, backend=backend)
    x, y, _, _ = make_data(0, 4, 2, 2, 2, "mse")
    with pytest.raises(TypeError, match=r"x is a CUDA array but backend=.* use backend='cuda'"):
        tr.fit(FakeCuda(x), y)
    with pytest.raises(TypeError, match="mask_t is a CUDA array"):
        tr.step(x[0], y[0], mask_t=FakeCuda(np.ones(2)))
    assert tr.step_count == 0


# -- the device path of Trainer, with the CUDA engine played by NumPy -------------------------
def _device_trainer(model, **kw):
    """A CPU trainer whose engine also answers the CUDA engine's device methods."""
    tr = tb.Trainer(model, backend="cpu", **kw)
    tr.backend = "cuda"
    tr._engine = NumpyDeviceEngine(tr._engine, model, tr.loss)
    return tr


def _pair(loss, seed=3, **kw):
    out = []
    for device in (False, True):
        m = tb.Model("lstm", input_size=3, hidden_size=4, output_size=3, seed=seed)
        args = dict(k1=3, k2=5, loss=loss, optimizer=tb.Adam(lr=0.01), **kw)
        out.append(_device_trainer(m, **args) if device else tb.Trainer(m, backend="cpu", **args))
    return out


pytestmark_native = pytest.mark.skipif(not tb.native_available(), reason="native module not built")


@pytestmark_native
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_device_path_trains_exactly_as_the_host_path(loss):
    host, dev = _pair(loss)
    T, B = 11, 4
    x, y, mask, resets = make_data(1, T, B, 3, 3, loss, mask_p=0.3, reset_p=0.2)
    if loss == "mse":
        y[~mask] = np.nan  # unread targets may hold NaN
    else:
        y = y.astype(np.int32)
        y[~mask] = 99  # unread labels may be out of range
    x_strided = np.repeat(x, 2, axis=2)[:, :, ::2]  # same values, non-contiguous
    r1 = host.fit(x, y, mask=mask, resets=resets, return_grads=True, return_outputs=True)
    r2 = dev.fit(
        FakeCuda(x_strided),
        FakeCuda(y),
        mask=FakeCuda(mask.astype(np.uint8)),
        resets=FakeCuda(resets),
        return_grads=True,
        return_outputs=True,
    )
    np.testing.assert_array_equal(r1.losses, r2.losses)
    np.testing.assert_array_equal(r1.outputs, r2.outputs)
    for g1, g2 in zip(r1.grads, r2.grads, strict=True):
        for k in g1:
            np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    xs = dev._engine.calls[-1][0]
    assert xs[2] == (T, B, 3) and xs[3] == x_strided.strides  # read in place, strided
    # streaming: the step adds a time axis of stride 0
    for t in range(2):
        a = host.step(x[t], y[t], mask_t=mask[t], reset_t=resets[t])
        b = dev.step(FakeCuda(x[t]), FakeCuda(y[t]), FakeCuda(mask[t]), FakeCuda(resets[t]))
        assert a == b
    xs, _, ms, _ = dev._engine.calls[-1]
    assert xs[2] == (1, B, 3) and xs[3][0] == 0 and ms[2] == (1, B)
    for k, v in host.model.state_dict().items():
        np.testing.assert_array_equal(v, dev.model.state_dict()[k], err_msg=k)


def _host_error(tr, *args, **kw):
    with pytest.raises((TypeError, ValueError)) as e:
        tr.fit(*args, **kw)
    return e.type, str(e.value)


@pytestmark_native
@pytest.mark.parametrize(
    "case",
    [
        "x_nan",
        "x_int",
        "x_shape",
        "target_inf_read",
        "mask_nan",
        "resets_shape",
        "label",
        "label_u64",
        "x_overflow",
        "target_overflow_read",
    ],
)
def test_device_validation_says_what_the_host_path_says(case):
    loss = "cross_entropy" if case.startswith("label") else "mse"
    host, dev = _pair(loss)
    x, y, mask, resets = make_data(2, 6, 2, 3, 3, loss, mask_p=0.3)
    kw = {"mask": mask.astype(np.float64), "resets": resets}
    if case == "x_nan":
        x[4, 1, 2] = np.nan
    elif case == "x_int":
        x = x.astype(np.int64)
    elif case == "x_shape":
        x = x[:, :, :2]
    elif case == "target_inf_read":
        r, b = np.argwhere(mask)[-1]
        y[r, b, 1] = -np.inf
    elif case == "mask_nan":
        kw["mask"][3, 0] = np.nan
    elif case == "resets_shape":
        kw["resets"] = resets[:, :1]
    elif case == "label":
        r, b = np.argwhere(mask)[2]
        y[r, b] = -3
    elif case == "label_u64":
        y = y.astype(np.uint64)
        r, b = np.argwhere(mask)[2]
        y[r, b] = 2**64 - 1
    elif case == "x_overflow":  # finite as float64, Inf in the float32 model
        x = x.astype(np.float64)
        x[4, 1, 2] = 1e39
    elif case == "target_overflow_read":
        y = y.astype(np.float64)
        r, b = np.argwhere(mask)[-1]
        y[r, b, 1] = -1e39
    expected = _host_error(host, x, y, **kw)
    dev_kw = {k: FakeCuda(v) for k, v in kw.items()}
    got = _host_error(dev, FakeCuda(x), FakeCuda(y), **dev_kw)
    assert got == expected
    assert dev.step_count == 0 and not dev._engine.calls


@pytestmark_native
def test_mixing_host_and_device_arrays_is_refused():
    _, dev = _pair("mse")
    x, y, mask, _ = make_data(2, 6, 2, 3, 3, "mse")
    with pytest.raises(TypeError, match=r"target is a host array .* x is a CUDA array"):
        dev.fit(FakeCuda(x), y)
    with pytest.raises(TypeError, match=r"x is a host array .* mask is a CUDA array"):
        dev.fit(x, y, mask=FakeCuda(mask))
    with pytest.raises(TypeError, match="target is None"):
        dev.fit(FakeCuda(x), None)
    with pytest.raises(TypeError, match="x is None"):
        dev.fit(None, FakeCuda(y))
    assert dev.step_count == 0


def test_host_only_arguments_refuse_cuda_arrays_clearly():
    """initial_state and load_state_dict read host memory on every backend."""
    m = tb.Model("rnn_tanh", input_size=2, hidden_size=3, output_size=2, seed=0)
    tr = tb.Trainer(m, k1=2, backend="numpy")
    x, y, _, _ = make_data(0, 4, 2, 2, 2, "mse")
    with pytest.raises(TypeError, match=r"got a CUDA array \(FakeCuda\) where a host array"):
        tr.fit(x, y, initial_state=[FakeCuda(np.zeros((2, 3)))])
    sd = m.state_dict()
    with pytest.raises(TypeError, match="where a host array is read"):
        m.load_state_dict({**sd, "readout.bias": FakeCuda(sd["readout.bias"])})
    assert tr.step_count == 0
    np.testing.assert_array_equal(m.state_dict()["readout.bias"], sd["readout.bias"])
