"""Checkpoints (contract: checkpoints): resume equals the uninterrupted run, saves are
atomic, and every damaged or foreign file is refused with a ValueError naming it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast import checkpoint

from conftest import CPU, CUDA, TOL, assert_close, make_data

D, H, O, L, B = 2, 3, 3, 2, 2


@dataclass(frozen=True)
class Case:
    """One resume scenario: fit(x[:split], flush=False) [+ `steps` step() calls],
    save, load, fit(the rest); the uninterrupted twin runs the same calls."""

    k1: int
    k2: int | None
    overlap: str
    optimizer: str  # "sgd" (momentum), "nesterov", "adam"
    loss: str
    split: int
    steps: int = 0
    initial_state: bool = False
    clip: float | None = None
    dtype: str = "float32"
    retune: bool = False  # change the learning rate after the first part (optimizer changes)


CASES = {
    # k2 > k1, stored rule, fit 7 steps and stream 1: a pending block of 2 (8 = 2*3 + 2)
    "k2>k1-stored-nesterov-midblock": Case(
        3, 5, "stored", "nesterov", "mse", 7, steps=1, clip=0.5, dtype="float64"
    ),
    "k2>k1-recompute-adam-midblock": Case(3, 6, "recompute", "adam", "cross_entropy", 8),
    "k2<k1-adam-retuned": Case(4, 2, "stored", "adam", "mse", 6, retune=True),
    "k2None-momentum": Case(3, None, "recompute", "sgd", "cross_entropy", 5, dtype="float64"),
    # saved right after an update (nothing pending), with an initial state for the resets
    "initial-state-boundary": Case(4, 4, "stored", "sgd", "mse", 8, initial_state=True),
}


def _optimizer(kind):
    if kind == "adam":
        return tb.Adam(lr=0.05, weight_decay=0.01)
    return tb.SGD(lr=0.1, momentum=0.9, nesterov=kind == "nesterov", weight_decay=0.001)


def _make(case, backend, cell):
    model = tb.Model(cell, D, H, O, num_layers=L, dtype=case.dtype, seed=5)
    return tb.Trainer(
        model,
        k1=case.k1,
        k2=case.k2,
        loss=case.loss,
        optimizer=_optimizer(case.optimizer),
        clip_grad_norm=case.clip,
        overlap=case.overlap,
        backend=backend,
    )


def _data(case, T=17):
    x, target, mask, resets = make_data(11, T, B, D, O, case.loss, mask_p=0.25, reset_p=0.15)
    init = None
    if case.initial_state:
        init = np.random.default_rng(3).normal(size=(L, B, H)) * 0.5
    return x, target, mask, resets, init


def _initial(cell, init):
    if init is None:
        return None
    return (init, init * 0.5) if cell in ("lstm", "cifg") else init


def _first_part(tr, case, cell, data):
    """The calls before the save: one fit without flush, then `steps` step() calls."""
    x, target, mask, resets, init = data
    s, e = case.split, case.split + case.steps
    first = tr.fit(
        x[:s],
        target[:s],
        mask[:s],
        resets[:s],
        initial_state=_initial(cell, init),
        flush=False,
    )
    streamed = [tr.step(x[i], target[i], mask[i], resets[i]) for i in range(s, e)]
    if case.retune:  # not yet handed to the engine when the checkpoint is written
        tr.optimizer.lr = 0.02
    return first, streamed


def _second_part(tr, case, data):
    x, target, mask, resets, _ = data
    e = case.split + case.steps
    return tr.fit(x[e:], target[e:], mask[e:], resets[e:], return_grads=True, return_outputs=True)


def _flat(state):
    return [a for e in state for a in (e if isinstance(e, tuple) else (e,))]


def _assert_equal_runs(a, b, ra, rb):
    """Bit for bit: losses, update steps, gradients, outputs, parameters, state."""
    np.testing.assert_array_equal(ra.losses, rb.losses, err_msg="losses")
    np.testing.assert_array_equal(ra.update_steps, rb.update_steps, err_msg="update steps")
    np.testing.assert_array_equal(ra.outputs, rb.outputs, err_msg="outputs")
    for u, (ga, gb) in enumerate(zip(ra.grads, rb.grads, strict=True)):
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=f"update {u} gradient {k}")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"parameter {k}")
    for i, (x, y) in enumerate(zip(_flat(a.state), _flat(b.state), strict=True)):
        np.testing.assert_array_equal(x, y, err_msg=f"state {i}")
    assert (a.step_count, a.pending) == (b.step_count, b.pending)


@pytest.mark.parametrize("cell", tb.CELLS)
@pytest.mark.parametrize("case_id", list(CASES))
def test_resume_equals_uninterrupted(backend, cell, case_id, tmp_path):
    """fit(a), save, load, fit(b) == fit(a), fit(b), bit for bit on one backend;
    and save(load(file)) writes the same bytes (nothing is lost in a round trip)."""
    case = CASES[case_id]
    data = _data(case)
    twin = _make(case, backend, cell)
    first, streamed = _first_part(twin, case, cell, data)
    expected = _second_part(twin, case, data)

    saved = _make(case, backend, cell)
    first_s, streamed_s = _first_part(saved, case, cell, data)
    np.testing.assert_array_equal(first.losses, first_s.losses)
    assert streamed == streamed_s
    pending = saved.pending
    assert pending == (case.split + case.steps) % case.k1  # mid-block where the case says
    path = tmp_path / "t.ckpt"
    saved.save(path)
    loaded = tb.Trainer.load(path)
    assert loaded.backend == backend and loaded.pending == pending
    assert loaded.optimizer == saved.optimizer and loaded.k2 == case.k2
    loaded.save(tmp_path / "again.ckpt")
    assert (tmp_path / "again.ckpt").read_bytes() == path.read_bytes()
    got = _second_part(loaded, case, data)
    _assert_equal_runs(twin, loaded, expected, got)
    # the saved trainer itself is unchanged by saving
    _assert_equal_runs(twin, saved, expected, _second_part(saved, case, data))


CROSS = [
    pytest.param("cpu", "numpy", marks=CPU.marks, id="cpu->numpy"),
    pytest.param("numpy", "cpu", marks=CPU.marks, id="numpy->cpu"),
    pytest.param("cuda", "cpu", marks=CUDA.marks, id="cuda->cpu"),
    pytest.param("numpy", "cuda", marks=CUDA.marks, id="numpy->cuda"),
]


@pytest.mark.parametrize("cell", tb.CELLS)
@pytest.mark.parametrize(
    "case_id", ["k2>k1-stored-nesterov-midblock", "k2>k1-recompute-adam-midblock"]
)
@pytest.mark.parametrize(("src", "dst"), CROSS)
def test_resume_across_backends(src, dst, cell, case_id, tmp_path):
    """Saved on one backend, continued on another: equals the uninterrupted run on
    the other within the contract (the tolerances) tolerances."""
    case = CASES[case_id]
    data = _data(case)
    twin = _make(case, dst, cell)
    _first_part(twin, case, cell, data)
    expected = _second_part(twin, case, data)
    saved = _make(case, src, cell)
    _first_part(saved, case, cell, data)
    saved.save(tmp_path / "t.ckpt")
    loaded = tb.Trainer.load(tmp_path / "t.ckpt", backend=dst)
    assert loaded.backend == dst
    got = _second_part(loaded, case, data)
    tol = TOL[case.dtype]
    np.testing.assert_array_equal(got.update_steps, expected.update_steps)
    assert_close(got.losses, expected.losses, tol, "losses")
    assert_close(got.outputs, expected.outputs, tol, "outputs")
    sa, sb = loaded.model.state_dict(), twin.model.state_dict()
    for k in sa:
        assert_close(sa[k], sb[k], tol, k)
    for i, (x, y) in enumerate(zip(_flat(loaded.state), _flat(twin.state), strict=True)):
        assert_close(x, y, tol, f"state {i}")


def test_token_model_resumes_across_backends(tmp_path):
    """A vocab_size model (ids, embedding): the history's ids travel too."""
    if not tb.native_available():
        pytest.skip("native module not built")
    T, V = 13, 6
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, V, size=(T, B)), rng.integers(0, O, size=(T, B))

    def make(backend):
        model = tb.Model("gru", 4, H, O, dtype="float64", seed=1, vocab_size=V)
        return tb.Trainer(
            model, k1=3, k2=5, loss="cross_entropy", optimizer=tb.Adam(lr=0.05), backend=backend
        )

    for src, dst in [("cpu", "cpu"), ("cpu", "numpy"), ("numpy", "numpy")]:
        twin, saved = make(dst), make(src)
        twin.fit(ids[:7], labels[:7], flush=False)
        expected = twin.fit(ids[7:], labels[7:])
        saved.fit(ids[:7], labels[:7], flush=False)
        saved.save(tmp_path / "tok.ckpt")
        loaded = tb.Trainer.load(tmp_path / "tok.ckpt", backend=dst)
        got = loaded.fit(ids[7:], labels[7:])
        tol = 0.0 if src == dst else TOL["float64"]
        assert_close(got.losses, expected.losses, tol, f"{src}->{dst} losses")
        for k, a in loaded.model.state_dict().items():
            assert_close(a, twin.model.state_dict()[k], tol, f"{src}->{dst} {k}")
        assert tb.Model.load(tmp_path / "tok.ckpt").vocab_size == V


def test_fresh_and_reset_trainers_round_trip(backend, tmp_path):
    """No step yet, and after reset_state(): the state (None / zeros of the last
    batch size), the step count and the stream's batch size come back as they were."""
    case = CASES["k2<k1-adam-retuned"]
    fresh = _make(case, backend, "lstm")
    fresh.save(tmp_path / "fresh.ckpt")
    loaded = tb.Trainer.load(tmp_path / "fresh.ckpt")
    assert loaded.state is None and loaded.step_count == 0
    data = _data(case)
    ra, rb = _second_part(fresh, case, data), _second_part(loaded, case, data)
    _assert_equal_runs(fresh, loaded, ra, rb)

    loaded.save(tmp_path / "stream.ckpt")
    again = tb.Trainer.load(tmp_path / "stream.ckpt")
    x, target = np.zeros((2, B + 1, D)), np.zeros((2, B + 1, O))
    with pytest.raises(ValueError, match="batch size"):  # the stream's batch size is kept
        again.fit(x, target)
    again.reset_state()
    again.save(tmp_path / "reset.ckpt")
    third = tb.Trainer.load(tmp_path / "reset.ckpt")
    assert third.step_count == 0 and third.pending == 0
    assert [a.shape for a in _flat(third.state)] == [(B, H)] * 2 * L
    assert not any(np.any(a) for a in _flat(third.state))
    third.fit(x, target)  # after the reset a new batch size is fine


def test_model_save_load(tmp_path):
    """Model.save/load: architecture and parameters; a trainer checkpoint holds a
    model too; a model checkpoint is not a trainer checkpoint."""
    model = tb.Model("cifg", 3, 4, 2, num_layers=2, dtype="float64", seed=9)
    model.save(tmp_path / "m.ckpt")
    back = tb.Model.load(tmp_path / "m.ckpt")
    assert repr(back) == repr(model)
    for k, a in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], a)
    trainer = tb.Trainer(model, k1=2, backend="numpy")
    trainer.fit(*make_data(0, 5, 2, 3, 2, "mse")[:2])
    trainer.save(tmp_path / "t.ckpt")
    from_trainer = tb.Model.load(tmp_path / "t.ckpt")
    for k, a in model.state_dict().items():
        np.testing.assert_array_equal(from_trainer.state_dict()[k], a)
    with pytest.raises(ValueError, match=r"m\.ckpt: a model checkpoint holds no trainer state"):
        tb.Trainer.load(tmp_path / "m.ckpt")


def test_standard_tools_read_it(tmp_path):
    """A zip archive: zipfile verifies it, numpy.load opens it as an .npz
    without pickle, the manifest is JSON, the trailer is the file's SHA-256."""
    case = CASES["k2>k1-stored-nesterov-midblock"]
    trainer = _make(case, "numpy", "gru")
    _first_part(trainer, case, "gru", _data(case))
    path = tmp_path / "t.ckpt"
    trainer.save(path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        manifest = json.loads(zf.read("manifest.json"))
        comment = zf.comment
    assert manifest["format"] == "tbptt_fast-checkpoint" and manifest["version"] == 1
    assert manifest["kind"] == "trainer" and manifest["engine"]["pending"] == trainer.pending == 2
    with np.load(path, allow_pickle=False) as npz:
        np.testing.assert_array_equal(
            npz["params/readout.weight"], trainer.model.state_dict()["readout.weight"]
        )
    digest = hashlib.sha256(path.read_bytes()[:-64]).hexdigest().encode()
    assert comment == b"tbptt_fast-checkpoint sha256:" + digest


# ----------------------------------------------------------------------------
# Atomic saves
# ----------------------------------------------------------------------------

_KILLED_SAVE = """
import os, signal, sys
import numpy as np
import tbptt_fast as tb
from tbptt_fast import checkpoint

path, where = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x, y = rng.normal(size=(12, 2, 2)), rng.normal(size=(12, 2, 3))
trainer = tb.Trainer(tb.Model("lstm", 2, 3, 3, seed=0), k1=3, k2=5, backend="numpy")
trainer.fit(x[:7], y[:7], flush=False)
trainer.save(path)  # the checkpoint that must survive: step 7
trainer.fit(x[7:], y[7:])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "mid-write":  # after the first chunks of the temporary file reach the disk
    checkpoint._CHUNK = 512
    real_fdopen = os.fdopen

    class Dying:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.f.write(b)
            self.n += 1
            if self.n == 3:
                self.f.flush()
                os.fsync(self.f.fileno())
                die()
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    os.fdopen = lambda *a, **k: Dying(real_fdopen(*a, **k))
else:  # the temporary file is complete, the rename has not happened
    os.replace = lambda *a, **k: die()
trainer.save(path)
print("not killed")
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_killed_save_leaves_the_previous_checkpoint(where, tmp_path):
    """A process killed (SIGKILL) while saving leaves the previous file at the
    path intact and loadable; its temporary file is never read as a checkpoint."""
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("SIGKILL")
    path = tmp_path / "t.ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(path), where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name != "t.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".t.ckpt.")  # the killed temp
    if where == "mid-write":
        assert 0 < leftovers[0].stat().st_size < path.stat().st_size
    loaded = tb.Trainer.load(path)
    assert (loaded.step_count, loaded.pending) == (7, 1)  # the old checkpoint, not the new state
    if where == "mid-write":  # the partial temporary file is itself refused as truncated
        _refused(leftovers[0], tb.Trainer.load)
    loaded.save(path)  # saving again works beside the leftover
    assert tb.Trainer.load(path).step_count == 7


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    """An exception during the write (disk full, ...) leaves the old file as it
    was and removes the temporary file."""
    path = tmp_path / "m.ckpt"
    model = tb.Model("rnn_tanh", 2, 3, 1, seed=0)
    model.save(path)
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    other = tb.Model("rnn_tanh", 2, 3, 1, seed=1)
    with pytest.raises(OSError, match="No space"):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]


# ----------------------------------------------------------------------------
# Refused files: truncated, corrupted, foreign, newer
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    """The bytes of a real trainer checkpoint (cross-entropy, Adam, mid-block)."""
    case = CASES["k2>k1-recompute-adam-midblock"]
    trainer = _make(case, "numpy", "lstm")
    _first_part(trainer, case, "lstm", _data(case))
    path = tmp_path_factory.mktemp("good") / "good.ckpt"
    trainer.save(path)
    return path.read_bytes()


def _refused(path, *loaders, match=""):
    """Every loader raises a one-line ValueError that names the path."""
    for load in loaders:
        with pytest.raises(ValueError) as info:
            load(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: "), msg
        assert "\n" not in msg, msg
        assert re.search(match, msg), msg


def _offsets(n, dense, stride):
    """Every offset near both ends (headers, manifest, central directory, trailer),
    every `stride`-th in between."""
    return sorted(
        set(range(min(n, dense))) | set(range(max(0, n - dense), n)) | set(range(0, n, stride))
    )


def test_every_flipped_byte_is_refused(good_file, tmp_path):
    data = good_file
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(data)
    dense = set(_offsets(len(data), dense=300, stride=len(data)))
    fd = os.open(bad, os.O_RDWR)  # each byte flipped in place, then put back
    try:
        for i in _offsets(len(data), dense=300, stride=3):
            for mask in (0x01, 0xFF) if i in dense else (0xFF,):
                os.pwrite(fd, bytes([data[i] ^ mask]), i)
                try:
                    tb.Trainer.load(bad)
                except ValueError as e:
                    assert str(e).startswith(f"{bad}: ") and "\n" not in str(e), (i, str(e))
                else:
                    pytest.fail(f"byte {i} ^ {mask:#x} was not detected")
                finally:
                    os.pwrite(fd, data[i : i + 1], i)
    finally:
        os.close(fd)
    assert bad.read_bytes() == data


def test_every_truncation_is_refused(good_file, tmp_path):
    data = good_file
    for n in _offsets(len(data), dense=300, stride=5):
        bad = tmp_path / f"short{n}.ckpt"  # a new file each time: cheaper than truncating one
        bad.write_bytes(data[:n])
        _refused(bad, tb.Trainer.load)
        bad.unlink()
    bad.write_bytes(data + b"\0")  # and one byte too many
    _refused(bad, tb.Trainer.load, tb.Model.load)


def _members(data: bytes) -> tuple[dict, dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    return json.loads(members.pop("manifest.json")), members


def _repack(path, manifest, members):
    """A file with a valid trailer and CRCs around the given manifest and members."""
    path.write_bytes(checkpoint._pack_members(manifest, members))


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_foreign_and_newer_files_are_refused(good_file, tmp_path):
    data = good_file
    manifest, members = _members(data)
    bad = tmp_path / "bad.ckpt"
    loaders = (tb.Trainer.load, tb.Model.load)

    bad.write_bytes(b"")
    _refused(bad, *loaders, match="empty file")
    bad.write_text("k1=3\nk2=5\n")
    _refused(bad, *loaders, match="not a readable zip archive")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    _refused(tmp_path / "plain.npy", *loaders, match="not a readable zip archive")
    with zipfile.ZipFile(bad, "w") as zf:  # a zip, but not ours
        zf.writestr("readme.txt", "hello")
    _refused(bad, *loaders, match="without manifest.json")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    _refused(tmp_path / "arrays.npz", *loaders, match="without manifest.json")
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", "{not json")
    _refused(bad, *loaders, match="manifest.json cannot be read")
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"format": "something-else", "version": 1}))
    _refused(bad, *loaders, match="names format 'something-else'")
    # ours, without the trailer (re-zipped by another tool)
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, raw in members.items():
            zf.writestr(name, raw)
    _refused(bad, *loaders, match="trailer is missing")

    _repack(bad, {**manifest, "version": 2}, members)
    _refused(bad, *loaders, match="version 2 is newer")
    _repack(bad, {**manifest, "version": "1"}, members)
    _refused(bad, *loaders, match="invalid format version")
    _repack(bad, {**manifest, "kind": "optimizer"}, members)
    _refused(bad, *loaders, match="unknown kind")


def test_inconsistent_contents_are_refused(good_file, tmp_path):
    """Files with valid checksums whose contents do not fit: each refused, with the
    path, before any engine sees them."""
    data = good_file
    manifest, members = _members(data)
    bad = tmp_path / "bad.ckpt"
    loaders = (tb.Trainer.load,)

    def variant(edit_manifest=None, edit_members=None, match="", loads=loaders):
        m, mem = json.loads(json.dumps(manifest)), dict(members)
        if edit_manifest:
            edit_manifest(m)
        if edit_members:
            edit_members(m, mem)
        _repack(bad, m, mem)
        _refused(bad, *loads, match=match)

    def stale_hash(m, mem):  # a member changed, its SHA-256 in the manifest not
        mem["params/readout.bias.npy"] = _npy(np.ones(O, np.float32))

    def pickled(m, mem):  # an object array needs pickle: never loaded
        raw = _npy(np.array([{"a": 1}], dtype=object))
        mem["params/readout.bias.npy"] = raw
        m["arrays"]["params/readout.bias"]["sha256"] = hashlib.sha256(raw).hexdigest()

    def missing(m, mem):
        del mem["engine/opt_v.npy"]

    def extra(m, mem):
        mem["extra.npy"] = _npy(np.zeros(1))

    def resigned(name, value):  # a different array with a matching hash and metadata
        def edit(m, mem):
            raw = _npy(value)
            mem[name + ".npy"] = raw
            m["arrays"][name] = {
                "sha256": hashlib.sha256(raw).hexdigest(),
                "dtype": value.dtype.str,
                "shape": list(value.shape),
            }

        return edit

    history = manifest["engine"]["history_steps"]
    both = (tb.Trainer.load, tb.Model.load)
    variant(edit_members=stale_hash, match="fails its SHA-256 check", loads=both)
    variant(edit_members=pickled, match=r"not a valid \.npy array", loads=both)
    variant(edit_members=missing, match="members do not match", loads=both)
    variant(edit_members=extra, match="members do not match", loads=both)
    variant(
        edit_members=resigned("params/readout.bias", np.zeros(O + 1, np.float32)),
        match="parameter readout.bias",
        loads=both,
    )
    variant(
        edit_members=resigned("params/readout.bias", np.zeros(O, np.float64)),
        match="parameter readout.bias",
        loads=both,
    )
    variant(
        edit_members=resigned("engine/h_in_0", np.zeros((history, B, H + 1), np.float32)),
        match="h_in_0",
    )
    variant(
        edit_members=resigned("engine/label", np.full((history, B), O, np.int64)),
        match="engine array 'label'",
    )
    variant(lambda m: m["model"].update(cell="transformer"), match="invalid model")
    variant(lambda m: m["model"].update(hidden_size=H + 1), match="do not match|parameter")
    variant(lambda m: m["trainer"].update(k1=0), match="invalid trainer configuration")
    variant(lambda m: m["trainer"].update(k1="3"), match="trainer.k1 must be an int")
    variant(lambda m: m["trainer"].update(backend="tpu"), match="unknown backend")
    variant(lambda m: m["optimizer"].update(optimizer="rmsprop"), match="unknown optimizer")
    variant(lambda m: m["optimizer"].update(lr=-1.0), match="invalid optimizer")
    variant(lambda m: m["engine"].update(step_count=100), match="engine state does not fit")
    variant(lambda m: m["engine"].pop("pending_loss"), match="no field 'pending_loss'")
    variant(lambda m: m["engine"].update(pending=5), match="engine state does not fit")
    del manifest["trainer"]
    variant(match="no field 'trainer'")


def test_optimizer_changed_before_save(backend, tmp_path):
    """Momentum switched on after training without it, then saved before the next
    call: the checkpoint holds the new optimizer and the resumed run matches."""
    case = CASES["initial-state-boundary"]
    data = _data(case)
    runs = []
    for save in (False, True):
        tr = _make(case, backend, "gru")
        tr.optimizer = tb.SGD(lr=0.1)
        _first_part(tr, case, "gru", data)
        tr.optimizer.momentum = 0.9
        if save:
            tr.save(tmp_path / "t.ckpt")
            tr = tb.Trainer.load(tmp_path / "t.ckpt")
            assert tr.optimizer == tb.SGD(lr=0.1, momentum=0.9)
        runs.append((tr, _second_part(tr, case, data)))
    _assert_equal_runs(runs[0][0], runs[1][0], runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_unit_sizes_round_trip(tmp_path, backend):
    """D = H = O = 1 (every history array has a last axis of size 1): the
    checkpoint keeps those axes and resumes bit for bit."""
    if backend == "cpu" and not tb.native_available():
        pytest.skip("native module not built")
    r = np.random.default_rng(3)
    x, y = r.standard_normal((13, 2, 1)), r.standard_normal((13, 2, 1))

    def trainer():
        m = tb.Model("rnn_tanh", 1, 1, 1, dtype="float64", seed=1)
        return tb.Trainer(m, k1=3, k2=5, optimizer=tb.SGD(lr=0.1), backend=backend)

    a = trainer()
    a.fit(x[:7], y[:7], flush=False)
    a.save(tmp_path / "u.ckpt")
    ra = a.fit(x[7:], y[7:])
    b = tb.Trainer.load(tmp_path / "u.ckpt")
    rb = b.fit(x[7:], y[7:])
    np.testing.assert_array_equal(ra.losses, rb.losses)
    for k, v in a.model.state_dict().items():
        np.testing.assert_array_equal(v, b.model.state_dict()[k])
