"""Gradient checks of every implementation against tbptt_fast's NumPy reference."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .configs import Config
from .runners import IMPLS, TbRunner, make_data, make_params


def max_rel_err(got: dict, ref: dict) -> float:
    """Max over arrays of ``max|a-b| / max(1, max|b|)``: the relative error the tests use."""
    err = 0.0
    for k, b in ref.items():
        a = np.asarray(got[k], dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return math.inf
        err = max(err, float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b)))))
    return err


@functools.lru_cache(maxsize=16)
def _reference(c: Config, overlap: str, lr: float, steps: int):
    """Parameters, data and the NumPy reference's gradients of one check; shared by
    every implementation checked on the same row (they copy what they are given)."""
    params = make_params(c)
    x, target = make_data(c, steps, seed=2)
    _, ref = TbRunner(c, params, "numpy", overlap, lr).fit(x, target, True)
    return params, x, target, ref


def check_plan(cfg: Config) -> list[tuple[str, Config, int, float]]:
    """The two checks of a row, as (tag, config, steps, tolerance): float64 on a
    small model (H = D <= 16, B <= 3, O <= 4) over enough steps for several
    overlapping windows (1e-8), and float32 at the row's size, one update (1e-4)."""
    small = dataclasses.replace(
        cfg,
        hidden=min(cfg.hidden, 16),
        batch=min(cfg.batch, 3),
        out=min(cfg.out, 4),
        dtype="float64",
    )
    return [
        ("float64", small, cfg.k1 * (math.ceil(cfg.k2 / cfg.k1) + 2), 1e-8),
        ("float32", cfg, cfg.k1, 1e-4),
    ]


def updates_err(got: list, ref: list) -> float:
    """The largest relative gradient error over the updates (inf if their counts differ)."""
    if len(got) != len(ref):
        return math.inf
    return max(max_rel_err(g, r) for g, r in zip(got, ref, strict=True))


def check_impl(name: str, cfg: Config, lr: float = 0.01) -> dict:
    """Check an implementation's gradients against tbptt_fast backend "numpy".

    Two checks, same cell and (k1, k2) as the row:

    1. float64 on a small model (H = D <= 16, B <= 3, O <= 4) over
       ``k1 * (ceil(k2/k1) + 2)`` steps, so several overlapping windows occur: every
       update's gradient must agree to 1e-8 (relative, ``max_rel_err``);
    2. float32 at the row's own size: the first update's gradient to 1e-4.

    The reference uses the overlap rule the implementation follows ("recompute" for the
    torch recompute loop and cpu-recompute, "stored" otherwise). Returns a dict with
    ``ok`` (bool), ``err64``, ``err32`` and ``message``.
    """
    impl = IMPLS[name]
    out = {"ok": True, "err64": None, "err32": None, "message": "ok"}
    for tag, c, steps, tol in check_plan(cfg):
        params, x, target, ref = _reference(c, impl.overlap, lr, steps)
        _, got = impl.build(c, params, lr).fit(x, target, True)
        err = updates_err(got, ref)
        out["err64" if tag == "float64" else "err32"] = err
        if not err <= tol:
            out["ok"] = False
            out["message"] = (
                f"{name} disagrees with tbptt_fast numpy (overlap={impl.overlap!r}) in "
                f"{tag}: max relative gradient error {err:.3g} > {tol:g} over "
                f"{len(ref)} updates ({c.cell} H={c.hidden} B={c.batch} k1={c.k1} k2={c.k2})"
            )
            return out
    return out
