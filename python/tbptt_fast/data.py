"""The command line's user data: a text file, NumPy arrays or a CSV time series.

Each loader returns a :class:`~tbptt_fast.tasks.TaskData` (training streams,
a held-out validation tail and a baseline) or raises :class:`DataError`, a
one-line message naming the file and what is wrong.

- **Text** (``--text FILE``, character-level language modelling): the
  vocabulary is the set of characters in the file (sorted); the last ``val``
  share of the text is the validation tail; the rest is cut into B contiguous
  streams (stream b is the b-th of B equal pieces), the standard batching of
  language models. Inputs are character ids (token inputs through the
  embedding), targets the next character; the loss is cross-entropy, reported
  in bits per character too.
- **Arrays** (``--data FILE.npy`` or ``FILE.npz``): ``x`` [T, D] (one series,
  cut into B contiguous streams) or [T, B, D] (B streams), floating; an
  ``.npz`` may hold ``y`` (or ``target``) [T, O] / [T, B, O] floating (mse)
  or integer classes [T] / [T, B] (cross-entropy), and ``mask`` and
  ``resets`` of x's leading shape. Without targets (and for an ``.npy``,
  which holds ``x`` alone) the task is next-step prediction: the target of
  step t is ``x[t+1]``. The validation tail is the last ``val`` share of the
  steps of every stream.
- **CSV** (``--data FILE.csv``): one row per time step, comma-separated
  numbers, with an optional header row; ``columns`` picks the inputs (names
  or 0-based indices; default: every column) and ``target_columns`` the
  targets (default: next-step prediction of the inputs).
"""

from __future__ import annotations

import csv
import hashlib
import os

import numpy as np

from .tasks import Baseline, Split, TaskData

__all__ = ["DataError", "file_digest", "load_arrays", "load_text", "text_ids"]


class DataError(ValueError):
    """A data file that cannot be used; the message is one line naming the file."""


def _fail(path, what: str) -> DataError:
    return DataError(f"{path}: {' '.join(str(what).split())}")


def file_digest(path) -> str:
    """The SHA-256 of a file's bytes (a resumed run checks its data did not change)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a folder, not a file") from None
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None


def _val_steps(total: int, val: float) -> int:
    return round(total * val) if val > 0 else 0


def _streams(a: np.ndarray, batch: int) -> np.ndarray:
    """[N, ...] cut into ``batch`` contiguous pieces of equal length: [N // batch, batch, ...]."""
    n = a.shape[0] // batch
    return np.swapaxes(a[: n * batch].reshape(batch, n, *a.shape[1:]), 0, 1)


# ----------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------


def _read_text(path) -> str:
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"is not UTF-8 text (byte {e.start} cannot be decoded)") from None


def text_ids(text: str, vocab: str, where) -> np.ndarray:
    """The ids of ``text``'s characters in ``vocab``; a character outside it is a DataError."""
    lookup = {c: i for i, c in enumerate(vocab)}
    missing = sorted({c for c in text if c not in lookup})
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise _fail(where, f"has characters the model's vocabulary lacks: {shown}")
    return np.fromiter((lookup[c] for c in text), np.int64, len(text))


def load_text(path, batch: int, val: float, vocab: str | None = None) -> TaskData:
    """Character-level language modelling on a text file (see the module doc).

    ``vocab``: the characters of a trained model (``evaluate``); None takes
    them from the file. The validation tail is split into up to ``batch``
    streams of at least 256 characters.
    """
    text = _read_text(path)
    if vocab is None:
        vocab = "".join(sorted(set(text)))
    ids = text_ids(text, vocab, path)
    n_val = _val_steps(len(ids), val)
    n_train = len(ids) - n_val
    if n_train - 1 < batch * 2:
        raise _fail(
            path,
            f"is too short: {len(ids)} characters give {max(0, n_train)} to train on, "
            f"too few for {batch} streams (--batch) of at least 2 steps",
        )
    if val > 0 and n_val < 2:
        raise _fail(path, f"is too short for a validation tail of {val:g} of it (--val)")
    pieces = _streams(ids[:n_train], batch)  # [n, B]
    train = Split(pieces[:-1], pieces[1:])
    val_split = None
    if n_val:
        tail = ids[n_train - 1 :]  # the tail's first input is the last training character
        vb = max(1, min(batch, (len(tail) - 1) // 256))
        s = _streams(tail, vb)
        val_split = Split(s[:-1], s[1:])
    V = len(vocab)
    counts = np.bincount(ids[:n_train], minlength=V).astype(np.float64)
    freq = counts / counts.sum()
    unigram = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
    return TaskData(
        name="text",
        title=(
            f"character-level language model on {os.path.basename(os.fspath(path))} "
            f"({len(ids):,} characters, {len(set(text))} distinct)"
        ),
        loss="cross_entropy",
        input_size=V,
        output_size=V,
        vocab_size=V,
        train=train,
        val=val_split,
        baselines=[Baseline("character frequencies (no context)", unigram)],
        vocab=vocab,
    )


# ----------------------------------------------------------------------------
# Arrays
# ----------------------------------------------------------------------------


def _load_npy_npz(path) -> dict[str, np.ndarray]:
    head = _read_bytes(path)[:6]  # also the one-line errors of a missing or unreadable file
    if not (head.startswith(b"\x93NUMPY") or head.startswith(b"PK")):
        raise _fail(path, "is not a .npy or .npz file (it starts with neither's signature)")
    try:
        f = np.load(path, allow_pickle=False)
        if isinstance(f, np.ndarray):  # .npy: x alone
            return {"x": f}
        with f:
            return {k: np.asarray(f[k]) for k in f.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise _fail(
                path, "holds Python objects (pickled): only plain arrays are read"
            ) from None
        raise _fail(path, f"is not a readable .npy/.npz file ({e})") from None
    except Exception as e:
        raise _fail(path, f"is not a readable .npy/.npz file ({e})") from None


def _load_csv(path, columns, target_columns) -> dict[str, np.ndarray]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(path, f"is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise _fail(path, "has no rows")

    def number(c: str) -> bool:
        try:
            float(c)
            return True
        except ValueError:
            return False

    header = None
    if not all(number(c) for c in rows[0]):
        header = [c.strip() for c in rows[0]]
        rows = rows[1:]
    if not rows:
        raise _fail(path, "has a header but no data rows")
    width = len(header) if header else len(rows[0])
    names = header or [str(i) for i in range(width)]

    def pick(spec, option):
        if spec is None:
            return None
        out = []
        for item in spec.split(","):
            item = item.strip()
            if header and item in header:
                out.append(header.index(item))
            elif item.lstrip("-").isdigit() and 0 <= int(item) < width:
                out.append(int(item))
            else:
                known = ", ".join(names)
                raise _fail(path, f"has no column {item!r} ({option}; its columns: {known})")
        return out

    cols = pick(columns, "--columns") or list(range(width))
    tcols = pick(target_columns, "--target-columns")
    values = np.empty((len(rows), width), np.float64)
    first = 2 if header else 1
    for i, r in enumerate(rows):
        if len(r) != width:
            raise _fail(path, f"line {i + first} has {len(r)} fields, expected {width}")
        for j, c in enumerate(r):
            try:
                values[i, j] = float(c)
            except ValueError:
                raise _fail(
                    path, f"line {i + first}, column {names[j]!r}: {c.strip()!r} is not a number"
                ) from None
    out = {"x": values[:, cols]}
    if tcols is not None:
        out["y"] = values[:, tcols]
    return out


def load_arrays(
    path,
    batch: int,
    val: float,
    *,
    columns: str | None = None,
    target_columns: str | None = None,
    standardize: bool | None = None,
    scaler: dict | None = None,
) -> TaskData:
    """User arrays from an ``.npy``, ``.npz`` or ``.csv`` file (see the module doc).

    ``standardize``: scale inputs and floating targets by the training part's
    mean and standard deviation (None: yes for CSV, no for arrays);
    ``scaler``: a trained model's ``{"mean", "std", "target_mean",
    "target_std"}`` to apply instead (``evaluate``).
    """
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    if ext == ".csv":
        arrays = _load_csv(p, columns, target_columns)
        if standardize is None:
            standardize = True
    elif ext in (".npy", ".npz"):
        if columns is not None or target_columns is not None:
            raise _fail(p, "--columns and --target-columns apply to CSV files only")
        arrays = _load_npy_npz(p)
    else:
        raise _fail(
            p, f"unknown kind of data file {ext or '(no extension)'!r}: use .npy, .npz or .csv"
        )
    if "x" not in arrays:
        raise _fail(p, f"holds no array 'x' (it holds {sorted(arrays)})")
    x = arrays["x"]
    y = arrays.get("y", arrays.get("target"))
    mask, resets = arrays.get("mask"), arrays.get("resets")
    tokens = np.issubdtype(x.dtype, np.integer) and x.ndim in (1, 2)
    if not tokens and not np.issubdtype(x.dtype, np.floating):
        raise _fail(p, f"x must be floating (or integer token ids), got dtype {x.dtype}")
    if not tokens and x.ndim not in (2, 3):
        raise _fail(p, f"x must have shape [T, D] or [T, B, D], got {list(x.shape)}")
    if x.shape[0] < 2 or x.size == 0:
        raise _fail(p, f"x has {x.shape[0]} steps: at least 2 are needed")
    if not tokens and not np.isfinite(x).all():
        raise _fail(p, "x holds NaN or Inf")
    single = x.ndim == (1 if tokens else 2)  # one series: cut into `batch` streams
    lead = x.shape[:1] if single else x.shape[:2]
    for name, a in (("mask", mask), ("resets", resets)):
        if a is not None and a.shape != lead:
            raise _fail(
                p, f"{name} must have shape {list(lead)} (x's leading axes), got {list(a.shape)}"
            )
    vocab_size = None
    if tokens:
        if x.min() < 0:
            raise _fail(p, "token ids in x must be >= 0")
        vocab_size = int(x.max()) + 1
    next_step = y is None
    if next_step:  # the target of step t is x[t+1]
        y = x[1:]
        x = x[:-1]
        mask = None if mask is None else mask[1:]
        resets = None if resets is None else resets[:-1]
        lead = x.shape[:1] if single else x.shape[:2]
    if y.shape[: len(lead)] != lead:
        raise _fail(p, f"y must have x's leading shape {list(lead)}, got {list(y.shape)}")
    classes = np.issubdtype(y.dtype, np.integer)
    if classes:
        if y.ndim != len(lead):
            raise _fail(p, f"integer targets y must have shape {list(lead)}, got {list(y.shape)}")
        if y.min() < 0:
            raise _fail(p, "class targets in y must be >= 0")
        output_size = int(y.max()) + 1
    elif np.issubdtype(y.dtype, np.floating):
        if y.ndim != len(lead) + 1:
            raise _fail(
                p, f"floating targets y must have shape {[*lead, 'O']}, got {list(y.shape)}"
            )
        if not np.isfinite(y).all():
            raise _fail(p, "y holds NaN or Inf")
        output_size = int(y.shape[-1])
    else:
        raise _fail(p, f"y must be floating or integer classes, got dtype {y.dtype}")
    if single:
        steps = x.shape[0] // batch
        if steps < 2:
            raise _fail(p, f"has {x.shape[0]} steps: too few for {batch} streams (--batch)")
        x, y = _streams(x, batch), _streams(y, batch)
        mask = None if mask is None else _streams(mask, batch)
        resets = None if resets is None else _streams(resets, batch)
    T = x.shape[0]
    n_val = _val_steps(T, val)
    if T - n_val < 1 or (val > 0 and n_val < 1):
        raise _fail(p, f"has {T} steps per stream: too few to hold out {val:g} of them (--val)")
    meta: dict = {}
    if scaler is not None:
        standardize = True
    if standardize and not tokens:
        if scaler is None:
            part = x[: T - n_val].reshape(-1, x.shape[-1]).astype(np.float64)
            scaler = {"mean": part.mean(0).tolist(), "std": _std(part)}
            if not classes:
                ypart = y[: T - n_val].reshape(-1, y.shape[-1]).astype(np.float64)
                scaler.update(target_mean=ypart.mean(0).tolist(), target_std=_std(ypart))
        if len(scaler["mean"]) != x.shape[-1]:
            raise _fail(
                p, f"x has {x.shape[-1]} features, the model's scaler {len(scaler['mean'])}"
            )
        x = (x - np.asarray(scaler["mean"])) / np.asarray(scaler["std"])
        if not classes and "target_mean" in scaler:
            y = (y - np.asarray(scaler["target_mean"])) / np.asarray(scaler["target_std"])
        meta["scaler"] = scaler
    if not tokens:
        x = x.astype(np.float32)
    if not classes:
        y = y.astype(np.float32)
    mask = None if mask is None else mask.astype(bool)
    resets = None if resets is None else resets.astype(bool)
    full = Split(x, y, mask, resets)
    train = full.window(0, T - n_val)
    val_split = full.window(T - n_val, T) if n_val else None
    baselines = [_baseline(train, classes)]
    if next_step and not tokens:  # the classic reference of next-step forecasts
        m = np.ones(train.x.shape[:2], bool) if train.mask is None else train.mask
        err = (train.x[m].astype(np.float64) - train.target[m]) ** 2
        baselines.append(Baseline("repeating the current value", float(err.mean())))
    what = "next-step prediction" if next_step else ("classes" if classes else "regression")
    shape = "x".join(str(s) for s in x.shape)
    shape += " (steps x streams)" if tokens else " (steps x streams x features)"
    return TaskData(
        name="data",
        title=f"{os.path.basename(p)}: {what}, {shape}",
        loss="cross_entropy" if classes else "mse",
        input_size=vocab_size if tokens else int(x.shape[-1]),
        output_size=output_size,
        vocab_size=vocab_size,
        train=train,
        val=val_split,
        baselines=baselines,
        meta=meta,
    )


def _std(a: np.ndarray) -> list[float]:
    s = a.std(0)
    return np.where(s > 0, s, 1.0).tolist()


def _baseline(train: Split, classes: bool) -> Baseline:
    """The loss of the best constant prediction on the training part."""
    m = np.ones(train.target.shape[:2], bool) if train.mask is None else train.mask
    if classes:
        t = train.target[m]
        freq = np.bincount(t).astype(np.float64) / max(1, t.size)
        ent = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
        return Baseline("predicting the class frequencies", ent)
    t = train.target[m].astype(np.float64)
    var = float(t.var(0).mean()) if t.size else 0.0
    return Baseline("predicting the mean", var)
