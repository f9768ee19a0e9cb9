"""Checkpoints (contract: checkpoints): one versioned, checksummed file for a trainer or a model.

The file
--------
A checkpoint is a **zip archive** (stored, uncompressed) whose members are

- ``manifest.json``: ``{"format": "tbptt_fast-checkpoint", "version": 1,
  "kind": "trainer" | "model", "model": {cell, input_size, hidden_size,
  output_size, num_layers, dtype, vocab_size}, "arrays": {name: {"sha256",
  "dtype", "shape"}}}``, and for ``kind = "trainer"`` also ``"trainer"`` (k1,
  k2 (null: unbounded), loss, overlap, clip_grad_norm, backend, the stream's
  batch sizes, and batch_first where the trainer has it), ``"optimizer"``
  (``SGD.config()`` / ``Adam.config()``: kind and hyperparameters) and
  ``"engine"`` (the engine snapshot's scalars: step_count, pending,
  last_update, batch, history_steps, has_state, has_init, pending_loss,
  pending_count, adam_step);
- one ``.npy`` member per array: the parameters as ``params/<state_dict
  name>.npy`` and, in a trainer checkpoint, the engine's arrays as
  ``engine/<name>.npy`` in the backend-independent layout of
  ``EngineSnapshot`` (``csrc/tbptt/engine_api.h``): forward and initial state,
  optimizer moments, and the stored history of the last ``history_steps``
  steps that the next windows reach into;
- the zip **comment** ``tbptt_fast-checkpoint sha256:<64 hex digits>``: the
  SHA-256 of every byte of the file before those digits.

Why this format: every standard tool opens it (``unzip -l``, Python's
``zipfile``, ``numpy.load(path)`` reads it as an ``.npz``; the manifest is
plain JSON), nothing in it is executable (arrays are read with
``numpy.load(allow_pickle=False)``; no pickle anywhere), the manifest is
versioned so that a newer file is refused rather than misread, and the
checksums make corruption an error instead of a silently different model: the
file-level SHA-256 catches any changed or missing byte, zip's CRC-32 and the
manifest's per-array SHA-256 say which member is damaged. Identical states
give identical files (fixed member order and timestamps).

Saving is atomic: the bytes go to a temporary file in the destination's folder
(``.<name>.<pid>.<random>.tmp``), which is flushed and ``fsync``-ed, then
``os.replace``-d onto the path, and the folder is ``fsync``-ed. An interrupted
save leaves the previous file at the path intact (a killed process may leave
its temporary file behind; nothing reads it).

Loading checks everything before building anything, and refuses a truncated,
corrupted, foreign or newer-format file with a one-line
``ValueError("<path>: <what is wrong>")``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import zipfile

import numpy as np

__all__ = [
    "FORMAT",
    "VERSION",
    "load_model",
    "load_trainer",
    "pack",
    "read",
    "save_model",
    "save_trainer",
    "write",
    "write_atomic",
]

FORMAT = "tbptt_fast-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("trainer", "model")
_TRAILER = b"tbptt_fast-checkpoint sha256:"  # the zip comment, then 64 hex digits
_DIGEST_LEN = 64
_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same state gives the same bytes
_CHUNK = 1 << 20  # bytes per write() of a save
_PARAMS = "params/"
_ENGINE = "engine/"
_MODEL_INTS = ("input_size", "hidden_size", "output_size", "num_layers")
_ENGINE_INTS = ("step_count", "pending", "last_update", "batch", "history_steps", "adam_step")
_ENGINE_BOOLS = ("has_state", "has_init")
_ENGINE_FLOATS = ("pending_loss", "pending_count")


class _Refused(ValueError):
    """A checkpoint refused; the message already names the path."""


def _refuse(path: str, what: str) -> _Refused:
    return _Refused(f"{path}: {' '.join(str(what).split())}")  # one line


# ----------------------------------------------------------------------------
# The container: pack / write / read
# ----------------------------------------------------------------------------


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _pack_members(manifest: dict, members: dict[str, bytes]) -> bytes:
    """The file's bytes: ``manifest.json`` (as given), the members in order, the trailer."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        _member(zf, MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
        for name, data in members.items():
            _member(zf, name, data)
        zf.comment = _TRAILER + b"0" * _DIGEST_LEN
    data = bytearray(buf.getvalue())
    # the comment ends the file (it closes the end-of-central-directory record)
    assert data.endswith(_TRAILER + b"0" * _DIGEST_LEN)
    digest = hashlib.sha256(memoryview(data)[:-_DIGEST_LEN]).hexdigest()
    data[-_DIGEST_LEN:] = digest.encode("ascii")
    return bytes(data)


def pack(manifest: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """A checkpoint file's bytes.

    ``manifest``: the JSON-able fields besides ``format``, ``version`` and
    ``arrays`` (which this adds); ``arrays``: {name: ndarray}, stored as
    ``<name>.npy`` with their SHA-256 in the manifest.
    """
    members, meta = {}, {}
    for name, a in arrays.items():
        a = np.asarray(a)
        data = _npy(a)
        members[name + ".npy"] = data
        meta[name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "dtype": a.dtype.str,
            "shape": list(a.shape),
        }
    full = {"format": FORMAT, "version": VERSION, **manifest, "arrays": meta}
    return _pack_members(full, members)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse it
        pass
    finally:
        os.close(fd)


def _fspath(path) -> str:
    """``os.fspath(path)`` with a TypeError that names the argument."""
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: the file appears complete or not at all.

    A temporary file in the same folder is written, flushed and fsync-ed, then
    renamed onto ``path`` (``os.replace``), and the folder is fsync-ed. On an
    error the temporary file is removed and an existing file at ``path`` is
    left as it was.
    """
    path = _fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    )
    # 0o666 before the umask, as open() would create the file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            for lo in range(0, len(view), _CHUNK):
                f.write(view[lo : lo + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def write(path, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    """Save a checkpoint atomically (see :func:`pack` and :func:`write_atomic`)."""
    write_atomic(path, pack(manifest, arrays))


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a checkpoint: ``(manifest, {name: ndarray})``.

    Checks, in order: not empty; the file-level SHA-256 trailer (any changed
    byte); a zip archive with ``manifest.json`` (else foreign); the format name;
    the version (newer is refused); the trailer's presence (truncation); the
    members against the manifest, each array's SHA-256, dtype and shape.
    Anything wrong is a one-line ``ValueError`` naming the path. Arrays are
    read with ``allow_pickle=False``.
    """
    p = _fspath(path)
    with open(p, "rb") as f:
        data = f.read()
    return read_bytes(data, p)


def read_bytes(data: bytes, p: str = "<bytes>") -> tuple[dict, dict[str, np.ndarray]]:
    """:func:`read` of a checkpoint held in memory (``p`` names it in messages)."""
    if not data:
        raise _refuse(p, "empty file, not a tbptt_fast checkpoint")
    tail = len(_TRAILER) + _DIGEST_LEN
    has_trailer = len(data) > tail and data[-tail:].startswith(_TRAILER)
    if has_trailer:
        digest = hashlib.sha256(memoryview(data)[:-_DIGEST_LEN]).hexdigest().encode("ascii")
        if digest != data[-_DIGEST_LEN:]:
            raise _refuse(p, "corrupted checkpoint: the file's SHA-256 does not match its contents")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise _refuse(
            p,
            "not a tbptt_fast checkpoint: not a readable zip archive "
            f"(truncated, corrupted or another kind of file: {e})",
        ) from None
    if MANIFEST not in names:
        raise _refuse(p, "not a tbptt_fast checkpoint: a zip archive without manifest.json")
    try:
        manifest = json.loads(zf.read(MANIFEST).decode("utf-8"))
    except Exception as e:  # CRC error, bad UTF-8 or JSON, a damaged header
        raise _refuse(p, f"corrupted checkpoint: manifest.json cannot be read ({e})") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise _refuse(p, f"not a tbptt_fast checkpoint: manifest.json names format {fmt!r}")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _refuse(p, f"corrupted checkpoint: invalid format version {version!r}")
    if version > VERSION:
        raise _refuse(
            p,
            f"checkpoint format version {version} is newer than this tbptt_fast reads "
            f"(version {VERSION}); upgrade tbptt_fast to load it",
        )
    if not has_trailer:
        raise _refuse(p, "truncated or corrupted checkpoint: its SHA-256 trailer is missing")
    meta = manifest.get("arrays")
    if not isinstance(meta, dict):
        raise _refuse(p, "corrupted checkpoint: manifest.json has no array list")
    expected = {MANIFEST} | {name + ".npy" for name in meta}
    if len(names) != len(set(names)) or set(names) != expected:
        extra = sorted(set(names) - expected)
        missing = sorted(expected - set(names))
        raise _refuse(
            p,
            f"corrupted checkpoint: members do not match the manifest "
            f"(missing {missing}, unexpected {extra})",
        )
    arrays = {}
    for name, m in meta.items():
        try:
            raw = zf.read(name + ".npy")
        except Exception as e:
            raise _refuse(p, f"corrupted checkpoint: array {name!r} cannot be read ({e})") from None
        if not isinstance(m, dict) or hashlib.sha256(raw).hexdigest() != m.get("sha256"):
            raise _refuse(p, f"corrupted checkpoint: array {name!r} fails its SHA-256 check")
        try:
            a = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:
            raise _refuse(p, f"array {name!r} is not a valid .npy array ({e})") from None
        if a.dtype.str != m.get("dtype") or list(a.shape) != m.get("shape"):
            raise _refuse(
                p,
                f"array {name!r} is {a.dtype.str} {list(a.shape)}, the manifest says "
                f"{m.get('dtype')} {m.get('shape')}",
            )
        arrays[name] = a
    return manifest, arrays


# ----------------------------------------------------------------------------
# Manifest fields
# ----------------------------------------------------------------------------


def _get(p: str, section: dict, key: str, kind: str, where: str):
    """``section[key]``, checked to be of ``kind``: "int", "bool", "float", "str",
    "dict", or with "?" (e.g. "int?") also None (JSON null)."""
    if not isinstance(section, dict) or key not in section:
        raise _refuse(p, f"invalid checkpoint: {where} has no field {key!r}")
    v = section[key]
    base = kind.rstrip("?")
    ok = (kind.endswith("?") and v is None) or {
        "int": lambda: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda: isinstance(v, bool),
        "float": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda: isinstance(v, str),
        "dict": lambda: isinstance(v, dict),
    }[base]()
    if not ok:
        what = {"int": "an int", "bool": "a bool", "float": "a number", "str": "a string"}
        expected = what.get(base, "an object") + (" or null" if kind.endswith("?") else "")
        raise _refuse(p, f"invalid checkpoint: {where}.{key} must be {expected}, got {v!r}")
    return v


def _model_meta(model) -> dict:
    return {
        "cell": model.cell,
        "input_size": model.input_size,
        "hidden_size": model.hidden_size,
        "output_size": model.output_size,
        "num_layers": model.num_layers,
        "dtype": model.dtype,
        "vocab_size": int(getattr(model, "vocab_size", 0) or 0),
    }


def _build_model(p: str, manifest: dict, arrays: dict):
    from .model import Model

    m = _get(p, manifest, "model", "dict", "manifest")
    kwargs = {k: _get(p, m, k, "int", "model") for k in _MODEL_INTS}
    kwargs["cell"] = _get(p, m, "cell", "str", "model")
    kwargs["dtype"] = _get(p, m, "dtype", "str", "model")
    vocab = _get(p, m, "vocab_size", "int", "model") if "vocab_size" in m else 0
    if vocab:
        kwargs["vocab_size"] = vocab
    try:
        model = Model(**kwargs)
    except (TypeError, ValueError) as e:
        raise _refuse(p, f"invalid model in the checkpoint: {e}") from None
    params = {k[len(_PARAMS) :]: a for k, a in arrays.items() if k.startswith(_PARAMS)}
    shapes = model.shapes()
    if list(params) != list(shapes):
        raise _refuse(
            p,
            f"the checkpoint's parameters {list(params)} do not match the model's {list(shapes)}",
        )
    for name, shape in shapes.items():
        a = params[name]
        if a.dtype != np.dtype(model.dtype) or a.shape != tuple(shape):
            raise _refuse(
                p,
                f"parameter {name} is {a.dtype} {list(a.shape)}, the model needs "
                f"{model.dtype} {list(shape)}",
            )
    model.load_state_dict(params)
    return model


def _kind(p: str, manifest: dict) -> str:
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise _refuse(p, f"invalid checkpoint: unknown kind {kind!r}")
    return kind


# ----------------------------------------------------------------------------
# Models and trainers
# ----------------------------------------------------------------------------


def save_model(model, path) -> None:
    """Save ``model``'s architecture and parameters to ``path`` atomically (``Model.save``)."""
    params = model.state_dict()  # pulls from the devices of trainers on cuda
    write(
        path,
        {"kind": "model", "model": _model_meta(model)},
        {_PARAMS + k: a for k, a in params.items()},
    )


def load_model(path):
    """The :class:`~tbptt_fast.Model` saved at ``path`` by ``Model.save`` or
    ``Trainer.save`` (``Model.load``)."""
    p = _fspath(path)
    manifest, arrays = read(p)
    _kind(p, manifest)
    return _build_model(p, manifest, arrays)


def _json_scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return float(v)


def save_trainer(trainer, path) -> None:
    """Save everything ``trainer`` needs to continue to ``path`` atomically (``Trainer.save``)."""
    write_atomic(path, dumps_trainer(trainer))


def dumps_trainer(trainer) -> bytes:
    """The checkpoint of ``trainer`` as bytes (what :func:`save_trainer` writes)."""
    sync = getattr(trainer, "_sync_optimizer", None)
    if sync is not None:  # optimizer fields changed since the last call reach the engine now
        sync()
    model = trainer.model
    params = model.state_dict()  # for cuda: pulls the device parameters first
    snap = trainer._engine.snapshot()
    engine = {k: _json_scalar(snap[k]) for k in (*_ENGINE_INTS, *_ENGINE_BOOLS, *_ENGINE_FLOATS)}
    conf = {
        "k1": trainer.k1,
        "k2": trainer.k2,
        "loss": trainer.loss,
        "overlap": trainer.overlap,
        "clip_grad_norm": trainer.clip_grad_norm,
        "backend": trainer.backend,
        "batch": trainer._batch,
        "last_batch": trainer._last_batch,
    }
    if hasattr(trainer, "batch_first"):
        conf["batch_first"] = bool(trainer.batch_first)
    if getattr(trainer, "max_history", None) is not None:
        conf["max_history"] = int(trainer.max_history)
    opt = {
        k: _json_scalar(v) if k != "optimizer" else v for k, v in trainer.optimizer.config().items()
    }
    arrays = {_PARAMS + k: a for k, a in params.items()}
    arrays.update({_ENGINE + k: snap["arrays"][k] for k in sorted(snap["arrays"])})
    manifest = {
        "kind": "trainer",
        "model": _model_meta(model),
        "trainer": conf,
        "optimizer": opt,
        "engine": engine,
    }
    return pack(manifest, arrays)


def _build_optimizer(p: str, o: dict):
    from .optim import SGD, Adam

    kind = _get(p, o, "optimizer", "str", "optimizer")
    f = {k: _get(p, o, k, "float", "optimizer") for k in ("lr", "weight_decay")}
    try:
        if kind == "sgd":
            return SGD(
                lr=f["lr"],
                momentum=_get(p, o, "momentum", "float", "optimizer"),
                nesterov=_get(p, o, "nesterov", "bool", "optimizer"),
                weight_decay=f["weight_decay"],
            )
        if kind == "adam":
            return Adam(
                lr=f["lr"],
                betas=(
                    _get(p, o, "beta1", "float", "optimizer"),
                    _get(p, o, "beta2", "float", "optimizer"),
                ),
                eps=_get(p, o, "eps", "float", "optimizer"),
                weight_decay=f["weight_decay"],
            )
    except (TypeError, ValueError) as e:
        raise _refuse(p, f"invalid optimizer in the checkpoint: {e}") from None
    raise _refuse(p, f"invalid checkpoint: unknown optimizer {kind!r}")


def _check_engine_values(p: str, arrays: dict, model) -> None:
    """Values every engine trusts (shapes and dtypes each engine's restore checks)."""
    flags = {"mask": (0, 2), "resets": (0, 2), "label": (0, model.output_size)}
    if getattr(model, "vocab_size", None):
        flags["ids"] = (0, model.vocab_size)
    for name, (lo, hi) in flags.items():
        a = arrays.get(name)
        if a is None or a.size == 0:
            continue
        if name == "mask":
            ok = np.all((a == 0) | (a == 1))
        else:
            ok = np.issubdtype(a.dtype, np.integer) and a.min() >= lo and a.max() < hi
        if not ok:
            what = "0 or 1" if hi == 2 else f"integers in [{lo}, {hi})"
            raise _refuse(p, f"invalid checkpoint: engine array {name!r} must hold {what}")


def load_trainer(path, backend: str | None = None):
    """The :class:`~tbptt_fast.Trainer` saved at ``path`` (``Trainer.load``), with
    its model, on ``backend`` (default: the backend it was saved from)."""
    from . import _validation as V
    from ._backend import BACKENDS

    if backend is not None:
        V.check_choice("backend", backend, BACKENDS)
    p = _fspath(path)
    return _trainer_from(p, *read(p), backend)


def loads_trainer(data: bytes, backend: str | None = None):
    """The trainer of a checkpoint held in memory (from :func:`dumps_trainer`)."""
    from . import _validation as V
    from ._backend import BACKENDS

    if backend is not None:
        V.check_choice("backend", backend, BACKENDS)
    return _trainer_from("<bytes>", *read_bytes(data), backend)


def _trainer_from(p: str, manifest: dict, arrays: dict, backend: str | None):
    from ._backend import BACKENDS
    from .trainer import Trainer

    if _kind(p, manifest) != "trainer":
        raise _refuse(
            p,
            f"a {manifest['kind']} checkpoint holds no trainer state: load it with "
            "tbptt_fast.Model.load",
        )
    model = _build_model(p, manifest, arrays)
    t = _get(p, manifest, "trainer", "dict", "manifest")
    optimizer = _build_optimizer(p, _get(p, manifest, "optimizer", "dict", "manifest"))
    e = _get(p, manifest, "engine", "dict", "manifest")
    snap = {k: _get(p, e, k, "int", "engine") for k in _ENGINE_INTS}
    snap.update({k: _get(p, e, k, "bool", "engine") for k in _ENGINE_BOOLS})
    snap.update({k: float(_get(p, e, k, "float", "engine")) for k in _ENGINE_FLOATS})
    snap["arrays"] = {k[len(_ENGINE) :]: a for k, a in arrays.items() if k.startswith(_ENGINE)}
    batch = _get(p, t, "batch", "int?", "trainer")
    last_batch = _get(p, t, "last_batch", "int?", "trainer")
    for name, b in (("batch", batch), ("last_batch", last_batch)):
        if b is not None and b < 1:
            raise _refuse(p, f"invalid checkpoint: trainer.{name} must be >= 1, got {b}")
    clip = _get(p, t, "clip_grad_norm", "float?", "trainer")
    kwargs = {
        "k1": _get(p, t, "k1", "int", "trainer"),
        "k2": _get(p, t, "k2", "int?", "trainer"),
        "loss": _get(p, t, "loss", "str", "trainer"),
        "optimizer": optimizer,
        "clip_grad_norm": clip,
        "overlap": _get(p, t, "overlap", "str", "trainer"),
        "backend": backend or _get(p, t, "backend", "str", "trainer"),
    }
    if "batch_first" in t:
        kwargs["batch_first"] = _get(p, t, "batch_first", "bool", "trainer")
    if "max_history" in t:
        kwargs["max_history"] = _get(p, t, "max_history", "int", "trainer")
    if backend is None and kwargs["backend"] not in BACKENDS:
        raise _refuse(p, f"invalid checkpoint: unknown backend {kwargs['backend']!r}")
    try:
        trainer = Trainer(model, **kwargs)
    except (TypeError, ValueError) as err:  # a RuntimeError (no GPU, no native module) passes
        raise _refuse(p, f"invalid trainer configuration in the checkpoint: {err}") from None
    if not math.isfinite(snap["pending_count"]) or snap["pending_count"] < 0:
        raise _refuse(p, f"invalid checkpoint: engine.pending_count {snap['pending_count']}")
    _check_engine_values(p, snap["arrays"], model)
    try:
        trainer._engine.restore(snap)
    except (TypeError, ValueError) as err:
        raise _refuse(p, f"the engine state does not fit: {err}") from None
    trainer._batch = batch
    trainer._last_batch = last_batch
    return trainer
