"""Edges that used to crash or corrupt: impossible sizes, interrupts, a
trainer used from two threads. Each test checks the trainer stays usable and
unchanged (or consistently advanced) afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import tbptt_fast as tb

pytestmark = pytest.mark.skipif(not tb.native_available(), reason="native module not built")


def _data(T=6, B=3, D=4, O=2, seed=0):
    r = np.random.default_rng(seed)
    return (
        r.standard_normal((T, B, D)).astype(np.float32),
        r.standard_normal((T, B, O)).astype(np.float32),
    )


def _params(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("k1", "k2", "error"),
    [
        (10**9, None, MemoryError),  # more than this machine's memory: refused up front
        (10**9, 10**9, MemoryError),
        (2**61, 2**61, ValueError),  # the size overflows
        (2**62, None, ValueError),
    ],
)
def test_impossible_ring_sizes_are_refused_and_change_nothing(k1, k2, error):
    model = tb.Model("lstm", 4, 4, 2)
    before = _params(model)
    trainer = tb.Trainer(model, k1=k1, k2=k2, backend="cpu")
    x, y = _data()
    for _ in range(2):  # the second call must not crash either
        with pytest.raises(error, match=r"k1=.*bytes"):
            trainer.fit(x, y)
    with pytest.raises(error):
        trainer.step(x[0], y[0])
    trainer.reset_state()
    assert trainer._engine.step_count == 0
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    # a sane trainer on the same model still works, and so does the same one after a reset
    ok = tb.Trainer(model, k1=3, backend="cpu")
    assert len(ok.fit(x, y).losses) == 2


def test_unbounded_history_growth_is_checked_before_the_call():
    # k2=None keeps every step: a stream whose history cannot fit in memory is
    # refused before the call runs (H = 2048: ~130 kB of history per step).
    model = tb.Model("lstm", 1, 2048, 1, seed=0)
    trainer = tb.Trainer(model, k1=4, k2=None, backend="cpu")
    x, y = np.zeros((8, 1, 1), np.float32), np.zeros((8, 1, 1), np.float32)
    trainer.fit(x, y, flush=False)
    before = _params(model)
    T = 400_000  # ~50 GB of history, more than this kind of machine has
    with pytest.raises(MemoryError, match="k2=None"):
        trainer.fit(np.zeros((T, 1, 1), np.float32), np.zeros((T, 1, 1), np.float32))
    assert trainer._engine.step_count == 8
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    assert len(trainer.fit(x, y).losses) == 2


def _in_engine(thread_id) -> bool:
    """Whether that thread is inside an engine call (``Trainer._run``), read from
    its Python frame: polling the engine's own counters from here would be the
    very data race (ThreadSanitizer reports it) that the trainer refuses."""
    frame = sys._current_frames().get(thread_id)
    return frame is not None and frame.f_code.co_name == "_run"


def test_a_second_thread_gets_a_clear_error_not_a_race():
    model = tb.Model("lstm", 16, 32, 4)
    trainer = tb.Trainer(model, k1=8, backend="cpu")
    x = np.random.default_rng(0).standard_normal((40000, 4, 16)).astype(np.float32)
    y = np.zeros((40000, 4, 4), np.float32)
    errors: list[str] = []
    started = threading.Event()

    def long_fit():
        started.set()
        trainer.fit(x, y)

    th = threading.Thread(target=long_fit)
    th.start()
    started.wait()
    while not _in_engine(th.ident):  # the long fit is inside the engine
        time.sleep(0.001)
    deadline = time.monotonic() + 5
    while not errors and th.is_alive() and time.monotonic() < deadline:
        try:
            trainer.fit(x[:16], y[:16])
        except RuntimeError as e:
            errors.append(str(e))
        time.sleep(0.01)
    # reading what the engine writes (without the GIL) is refused too, not a race
    reads = []
    for prop in ("step_count", "pending", "state"):
        try:
            getattr(trainer, prop)
        except RuntimeError as e:
            reads.append(str(e))
    alive = th.is_alive()
    th.join()
    assert errors and "not thread-safe" in errors[0]
    assert not alive or (len(reads) == 3 and all("not thread-safe" in e for e in reads))
    # the long fit ran to the end, undisturbed
    assert trainer._engine.step_count == 40000


def test_ctrl_c_stops_a_native_fit_quickly_and_leaves_it_consistent():
    script = textwrap.dedent(
        """
        import os, signal, sys, threading, time
        import numpy as np, tbptt_fast as tb
        m = tb.Model("lstm", 16, 32, 4)
        t = tb.Trainer(m, k1=8, backend="cpu")
        x = np.random.default_rng(0).standard_normal((2_000_000, 4, 16)).astype(np.float32)
        y = np.zeros((2_000_000, 4, 4), np.float32)
        sent = []
        main = threading.get_ident()
        def interrupt():  # once the fit is inside the engine (Trainer._run)
            while sys._current_frames()[main].f_code.co_name != "_run":
                time.sleep(0.001)
            time.sleep(0.2)
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=interrupt, daemon=True).start()
        try:
            t.fit(x, y)
            print("FINISHED")
        except KeyboardInterrupt:
            n = t._engine.step_count
            print("INTERRUPTED", round(time.perf_counter() - sent[0], 3), n, t._engine.pending)
            # consistent: the stream continues from where it stopped
            r = t.fit(x[:16], y[:16], flush=False)
            print("NEXT", int(r.update_steps[0]), n)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    ).stdout.split()
    assert out[0] == "INTERRUPTED", out
    elapsed, steps, pending = float(out[1]), int(out[2]), int(out[3])
    assert elapsed < 1.0  # seen within ~100 ms of work, not at the end of the fit
    assert 0 < steps < 2_000_000 and pending == steps % 8
    assert out[4] == "NEXT"
    # the next updates are at the next multiples of k1 after the step reached
    first_next = (steps // 8 + 1) * 8
    assert int(out[5]) == first_next


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_signal_handler_is_python_s():
    # the engine only polls; a custom handler still runs
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
    try:
        model = tb.Model("gru", 8, 16, 2)
        trainer = tb.Trainer(model, k1=8, backend="cpu")
        x = np.zeros((300000, 2, 8), np.float32)
        y = np.zeros((300000, 2, 2), np.float32)
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
        trainer.fit(x, y)
        assert seen == [1]
    finally:
        signal.signal(signal.SIGUSR1, old)


# -- numpy backend: an interrupt inside an update ----------------------------------


def _twins(backend="numpy", k1=4, **kw):
    return [
        tb.Trainer(tb.Model("lstm", 4, 5, 2, seed=1), k1=k1, backend=backend, **kw)
        for _ in range(2)
    ]


def _interrupt_once(monkeypatch, obj, name, *, after=0, partial=None):
    """Make ``obj.name`` raise KeyboardInterrupt on its ``after``-th call (0-based)."""
    real = getattr(obj, name)
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 1:
            if partial is not None:
                partial(*args)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, fake)
    return calls


@pytest.mark.parametrize("where", ["gradient", "optimizer step"])
def test_numpy_interrupt_inside_an_update_rolls_back_that_step(monkeypatch, where):
    import tbptt_fast.reference as ref

    a, b = _twins(optimizer=tb.Adam(lr=0.01))
    x, y = _data(T=20, seed=3)
    ra = a.fit(x, y)
    if where == "gradient":
        _interrupt_once(monkeypatch, ref, "window_start", after=1)  # in the 2nd update
    else:

        def scribble(params, *rest):  # half an optimizer step, then the interrupt
            params[0][...] = 7.0

        _interrupt_once(monkeypatch, b._engine, "step_fn", after=1, partial=scribble)
    with pytest.raises(KeyboardInterrupt):
        b.fit(x, y)
    monkeypatch.undo()
    # the first update is kept; the stream is positioned after step 7, the last completed
    assert b.step_count == 7 and b.pending == 3
    rb = b.fit(x[7:], y[7:])
    np.testing.assert_array_equal(rb.losses, ra.losses[1:])
    np.testing.assert_array_equal(rb.update_steps, ra.update_steps[1:])
    for k, v in a.model.state_dict().items():
        np.testing.assert_array_equal(b.model.state_dict()[k], v, err_msg=k)
    assert b.step_count == a.step_count and b.pending == a.pending == 0


def test_numpy_interrupt_in_a_flush_keeps_the_block(monkeypatch):
    a, b = _twins()
    x, y = _data(T=6)
    a.fit(x, y, flush=False)
    b.fit(x, y, flush=False)
    before = _params(b.model)
    _interrupt_once(monkeypatch, b._engine, "step_fn")
    with pytest.raises(KeyboardInterrupt):
        b.flush()
    monkeypatch.undo()
    assert b.pending == 2 and all(
        np.array_equal(before[k], v) for k, v in b.model.state_dict().items()
    )
    assert a.flush() == b.flush()
    for k, v in a.model.state_dict().items():
        np.testing.assert_array_equal(b.model.state_dict()[k], v)


def test_numpy_trainer_from_a_second_thread_is_refused():
    model = tb.Model("lstm", 4, 8, 2)
    trainer = tb.Trainer(model, k1=4, backend="numpy")
    x, y = np.zeros((3000, 2, 4), np.float32), np.zeros((3000, 2, 2), np.float32)
    errors: list[str] = []
    th = threading.Thread(target=trainer.fit, args=(x, y))
    th.start()
    while not trainer._busy.locked():
        time.sleep(0.001)
    for call in (
        lambda: trainer.fit(x[:4], y[:4]),
        lambda: trainer.step(x[0], y[0]),
        trainer.flush,
        trainer.reset_state,
        lambda: trainer.step_count,
        lambda: trainer.pending,
        lambda: trainer.state,
    ):
        try:
            call()
        except RuntimeError as e:
            errors.append(str(e))
    th.join()
    assert len(errors) == 7 and all("not thread-safe" in e for e in errors)
    assert trainer.step_count == 3000  # the long fit ran undisturbed


def test_numpy_reentrant_call_from_on_update_is_refused():
    trainer = tb.Trainer(tb.Model("gru", 4, 5, 2), k1=2, backend="numpy")
    x, y = _data()
    with pytest.raises(RuntimeError, match="not thread-safe"):
        trainer.fit(x, y, on_update=lambda info: trainer.fit(x, y))
    assert trainer.fit(x, y).losses.size == 3  # usable afterwards


# -- finiteness after the cast to the model dtype ------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("where", ["x", "target", "initial_state"])
def test_values_overflowing_the_model_dtype_are_refused_up_front(backend, where):
    model = tb.Model("lstm", 4, 5, 2, seed=0)  # float32
    trainer = tb.Trainer(model, k1=2, backend=backend)
    x, y = (a.astype(np.float64) for a in _data(T=6))
    trainer.fit(x[:3], y[:3], flush=False)
    before, steps, pending = _params(model), trainer.step_count, trainer.pending
    state = [tuple(np.zeros((3, 5)) for _ in range(2))]
    if where == "x":
        x[4, 1, 2] = 1e39
    elif where == "target":
        y[4, 1, 0] = -1e39
    else:
        state[0][1][2, 3] = 1e39
    kw = {"initial_state": state} if where == "initial_state" else {}
    with pytest.raises(ValueError, match=rf"^{where}.*must be finite.*float32.*1e\+39"):
        trainer.fit(x, y, **kw)
    assert (trainer.step_count, trainer.pending) == (steps, pending)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    if where == "target":  # where the mask hides it, the target is not read
        mask = np.ones((6, 3))
        mask[4, 1] = 0
        trainer.fit(x, y, mask=mask)


def test_predict_and_evaluate_refuse_values_overflowing_the_model_dtype():
    model = tb.Model("gru", 4, 5, 2, seed=0)
    x, y = (a.astype(np.float64) for a in _data(T=5))
    x[3, 0, 1] = 1e39
    for backend in ("numpy", "cpu"):
        with pytest.raises(ValueError, match=r"^x.*must be finite.*float32"):
            model.predict(x, backend=backend)
        with pytest.raises(ValueError, match=r"^x.*must be finite.*float32"):
            model.evaluate(x, y, backend=backend)
    with pytest.raises(ValueError, match=r"^state.*must be finite.*float32"):
        model.predict(x[:, :, :], state=[np.full((3, 5), 1e39)])


# -- smaller holes: refused up front, in Python's words ---------------------------------


def test_adam_eps_zero_is_refused():
    with pytest.raises(ValueError, match=r"eps must be > 0.*0/0"):
        tb.Adam(eps=0)
    opt = tb.Adam(eps=1e-8)
    with pytest.raises(ValueError, match="eps must be > 0"):
        opt.eps = 0.0
    assert opt.eps == 1e-8


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("flag", ["flush", "return_grads", "return_outputs"])
def test_fit_checks_flags_before_resetting(backend, flag):
    model = tb.Model("lstm", 4, 5, 2, seed=0)
    trainer = tb.Trainer(model, k1=4, backend=backend)
    x, y = _data(T=6)
    trainer.fit(x, y, flush=False)
    before, state = _params(model), trainer.state
    s = [tuple(np.ones((3, 5), np.float32) for _ in range(2))]
    with pytest.raises(TypeError, match=f"^{flag} must be a bool"):
        trainer.fit(x, y, initial_state=s, **{flag: np.array([1, 2])})
    assert (trainer.step_count, trainer.pending) == (6, 2)
    for a, b in zip(trainer.state[0], state[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())


def test_model_sizes_and_dtype_are_refused_before_allocating():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"bytes.*num_layers=1000000000"):
        tb.Model("lstm", 4, 4, 2, num_layers=10**9)
    with pytest.raises(ValueError, match="bytes"):
        tb.Model("gru", 4, 10**6, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        tb.Model("gru", 10**6, 4, 2, vocab_size=10**9)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(TypeError, match="dtype"):
        tb.Model("lstm", 4, 4, 2, dtype=None)


@pytest.mark.parametrize("n", ["2", 2.7, True, None])
def test_set_num_threads_takes_only_ints(n):
    before = tb.get_num_threads()
    with pytest.raises(TypeError, match="int"):
        tb.set_num_threads(n)
    assert tb.get_num_threads() == before


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("k", [2**63, 2**64 + 5, 10**30])
def test_huge_k_is_a_python_value_error_naming_it(backend, k):
    model = tb.Model("lstm", 4, 4, 2)
    for kw, name in (({"k1": k}, "k1"), ({"k1": 2, "k2": k}, "k2")):
        with pytest.raises(ValueError, match=f"^{name} must be < 2\\*\\*63") as e:
            tb.Trainer(model, backend=backend, **kw)
        assert "Unable to cast" not in str(e.value) and "std::" not in str(e.value)


# -- copying ---------------------------------------------------------------------


def test_model_pickles_and_deep_copies_with_trainers_and_forward_engines():
    import copy
    import pickle

    model = tb.Model("lstm", 4, 5, 2, seed=3)
    x, y = _data(T=8, seed=1)
    clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]  # a fresh model
    tb.Trainer(model, k1=4, backend="cpu").fit(x, y)  # holds a cpu trainer ...
    model.predict(x, backend="cpu")  # ... and a cached forward engine
    clones += [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for clone in clones[2:]:
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[k], v)
            assert clone._params[k] is not model._params[k]
    # the unpickled parameters work on the cpu engine (dtype checked by identity there)
    # and train exactly as the original's
    for backend in ("cpu", "numpy"):
        results = []
        for m in (
            pickle.loads(pickle.dumps(clones[0])),
            clones[1],
            tb.Model("lstm", 4, 5, 2, seed=3),
        ):
            results.append(tb.Trainer(copy.deepcopy(m), k1=4, backend=backend).fit(x, y).losses)
        np.testing.assert_array_equal(results[0], results[2])
        np.testing.assert_array_equal(results[1], results[2])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "copy"])
def test_trainer_copies_continue_identically_and_leave_the_original(backend, how):
    import copy
    import pickle

    model = tb.Model("gru", 4, 5, 2, seed=2, num_layers=2)
    trainer = tb.Trainer(
        model, k1=3, k2=5, backend=backend, optimizer=tb.Adam(lr=0.01), clip_grad_norm=1.0
    )
    x, y = _data(T=11, seed=4)
    trainer.fit(x, y, flush=False)  # mid-block: pending steps, history, Adam moments
    before = _params(model)
    twin = {"deepcopy": copy.deepcopy, "copy": copy.copy}.get(
        how, lambda t: pickle.loads(pickle.dumps(t))
    )(trainer)
    assert twin.model is not model and twin._engine is not trainer._engine
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    assert (twin.step_count, twin.pending, twin.backend) == (11, 2, backend)
    ra, rb = trainer.fit(x, y), twin.fit(x, y)
    np.testing.assert_array_equal(ra.losses, rb.losses)
    np.testing.assert_array_equal(ra.update_steps, rb.update_steps)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(twin.model.state_dict()[k], v, err_msg=k)
    # independent: training the copy further leaves the original alone
    after = _params(model)
    twin.fit(x, y)
    assert all(np.array_equal(after[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_max_history_caps_an_unbounded_window(backend, tmp_path):
    """k2=None grows with the stream; max_history refuses a call that would
    pass the cap, before anything runs, and survives a checkpoint."""
    if backend == "cpu" and not tb.native_available():
        pytest.skip("native module not built")
    model = tb.Model("gru", 4, 5, 2, dtype="float64", seed=0)
    trainer = tb.Trainer(model, k1=3, k2=None, backend=backend, max_history=10)
    x, y = _data(T=12)
    x, y = x.astype(np.float64), y.astype(np.float64)
    trainer.fit(x[:8], y[:8], flush=False)
    before = _params(model)
    with pytest.raises(ValueError, match=r"12 steps of history.*max_history=10"):
        trainer.fit(x[:4], y[:4])
    assert trainer.step_count == 8
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    trainer.fit(x[:2], y[:2], flush=False)  # exactly at the cap
    with pytest.raises(ValueError, match="max_history"):
        trainer.step(x[0], y[0])
    trainer.reset_state()
    trainer.fit(x[:10], y[:10])  # a reset starts the count afresh
    trainer.save(tmp_path / "t.ckpt")
    assert tb.Trainer.load(tmp_path / "t.ckpt").max_history == 10
    with pytest.raises(ValueError, match="k2=None only"):
        tb.Trainer(model, k1=3, k2=4, max_history=10)
    with pytest.raises(ValueError, match="max_history"):
        tb.Trainer(model, k1=3, k2=None, max_history=0)
