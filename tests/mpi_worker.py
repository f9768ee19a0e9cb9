"""The MPI side of tests/test_distributed.py: run under ``mpiexec -n N``.

    python tests/mpi_worker.py train CASES.json OUT_DIR     # every case; rank 0 writes OUT/<id>.npz
    python tests/mpi_worker.py save CASE.json CKPT OUT.npz  # fit(a), save, fit(b) (uninterrupted)
    python tests/mpi_worker.py resume CASE.json CKPT OUT.npz  # load, fit(b)
    python tests/mpi_worker.py bad_input CASE.json          # the last rank passes a NaN
    python tests/mpi_worker.py bad_callback CASE.json       # on_update raises on rank 1 at update 2
    python -m mpi4py tests/mpi_worker.py crash CASE.json    # rank 1 dies before a collective call

The single-process expectations are computed by the test itself (a plain
``tb.Trainer`` on the whole batch); this file only runs the distributed side
and gathers what every rank holds onto rank 0.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import tbptt_fast as tb
from tbptt_fast.distributed import DistributedTrainer, shard

EXTRA = 3  # steps after the case's T, fed one at a time with step()


def case_data(c: dict):
    """The whole batch of a case: x, target, mask [T + EXTRA, B] float, resets [T + EXTRA, B] bool."""
    rng = np.random.default_rng(c["seed"])
    T, B = c["T"] + EXTRA, c["B"]
    if c.get("vocab"):
        x = rng.integers(0, c["vocab"], size=(T, B))
    else:
        x = rng.normal(size=(T, B, c["D"]))
    if c["loss"] == "mse":
        target = rng.normal(size=(T, B, c["O"]))
    else:
        target = rng.integers(0, c["O"], size=(T, B))
    mask = (rng.random((T, B)) >= c["mask_p"]).astype(np.float64)
    for b in c.get("masked_streams", []):  # whole streams without a target in the first block
        mask[: c["k1"], b] = 0.0
    resets = rng.random((T, B)) < c["reset_p"]
    return x, target, mask, resets


def make_model(c: dict, seed: int) -> tb.Model:
    return tb.Model(
        c["cell"], input_size=c["D"], hidden_size=c["H"], output_size=c["O"],
        num_layers=c["L"], dtype="float64", seed=seed, vocab_size=c.get("vocab"),
    )  # fmt: skip


def make_optimizer(c: dict):
    if c["optimizer"] == "adam":
        return tb.Adam(lr=0.01)
    return tb.SGD(lr=0.1, momentum=0.9)


def trainer_kwargs(c: dict) -> dict:
    return dict(
        k1=c["k1"], k2=c["k2"], loss=c["loss"], optimizer=make_optimizer(c),
        clip_grad_norm=c["clip"], overlap=c["overlap"],
    )  # fmt: skip


def streams(c: dict, rank: int, size: int) -> slice:
    """This rank's streams: the case's explicit split (local data), else shard()."""
    if c.get("split"):
        sizes = c["split"][str(size)]  # JSON keys are strings
        lo = sum(sizes[:rank])
        return slice(lo, lo + sizes[rank])
    return shard(c["B"], rank, size)


def parts(c: dict):
    """(the first fit's data, the second fit's, the steps' [EXTRA, B, ...])."""
    data = case_data(c)
    cut, T = c["cut"], c["T"]
    return tuple(tuple(a[lo:hi] for a in data) for lo, hi in ((0, cut), (cut, T), (T, None)))


def initial_state(c: dict):
    """PyTorch's form: h0 [L, B, H] (and c0 for cells with a cell state), or None."""
    if not c.get("init"):
        return None
    rng = np.random.default_rng(c["seed"] + 7)
    h0 = rng.normal(size=(c["L"], c["B"], c["H"]))
    if c["cell"] in ("lstm", "cifg"):
        return (h0, rng.normal(size=h0.shape))
    return h0


def local_state(c: dict, state, rank: int, size: int):
    if state is None or c["data"] == "global":
        return state
    sl = streams(c, rank, size)
    return tuple(a[:, sl] for a in state) if isinstance(state, tuple) else state[:, sl]


def local(c: dict, arrays, rank: int, size: int):
    """What this rank passes: the whole batch (data="global") or its streams."""
    if c["data"] == "global":
        return arrays
    sl = streams(c, rank, size)
    return tuple(a[:, sl] for a in arrays)


def flat(state) -> list[np.ndarray]:
    return [a for e in state for a in (e if isinstance(e, tuple) else (e,))]


def train(cases_path: str, out: str) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    for c in json.load(open(cases_path)):
        # every rank starts from another seed: the broadcast makes them rank 0's
        model = make_model(c, c["seed"] + 1000 * rank)
        t = DistributedTrainer(model, **trainer_kwargs(c), comm=comm, data=c["data"])
        a, b, steps = parts(c)
        init = local_state(c, initial_state(c), rank, size)
        r1 = t.fit(
            *local(c, a, rank, size), initial_state=init, flush=False, return_grads=True,
            return_outputs=True,
        )  # fmt: skip
        r2 = t.fit(*local(c, b, rank, size), flush=False, return_grads=True, return_outputs=True)
        mine = local(c, steps, rank, size)
        stepped = [t.step(*(a[i] for a in mine)) for i in range(EXTRA)]
        last = t.flush()
        ev = t.evaluate(*local(c, tuple(a[: c["T"]] for a in case_data(c)), rank, size))
        outputs = comm.gather(np.concatenate([r1.outputs, r2.outputs]), root=0)
        states = comm.gather(flat(t.state), root=0)
        params = comm.gather(model.state_dict(), root=0)
        if rank == 0:
            res = {
                "losses": np.concatenate(
                    [r1.losses, r2.losses, [np.nan if last is None else last]]
                ),
                "stepped": np.array([np.nan if v is None else v for v in stepped]),
                "steps": np.concatenate([r1.update_steps, r2.update_steps]),
                "outputs": np.concatenate(outputs, axis=1),
                "eval": np.array([ev.loss, ev.count]),
            }
            for i, g in enumerate(r1.grads + r2.grads):
                for k, v in g.items():
                    res[f"grad{i}/{k}"] = v
            for i in range(len(states[0])):
                res[f"state{i}"] = np.concatenate([s[i] for s in states], axis=0)
            for k, v in params[0].items():
                res[f"param/{k}"] = v
                for r in range(1, size):  # every rank holds exactly rank 0's parameters
                    assert np.array_equal(params[r][k], v), f"rank {r} differs in {k}"
            np.savez(f"{out}/{c['id']}.npz", **res)


def save_or_resume(mode: str, case_path: str, ckpt: str, out: str) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    c = json.load(open(case_path))
    a, b, _ = parts(c)
    if mode == "save":
        t = DistributedTrainer(make_model(c, c["seed"]), **trainer_kwargs(c), data=c["data"])
        t.fit(*local(c, a, rank, size), flush=False)
        t.save(ckpt)
    else:
        t = DistributedTrainer.load(ckpt)
    r = t.fit(*local(c, b, rank, size), flush=True)
    states = comm.gather(flat(t.state), root=0)
    if rank == 0:
        res = {"losses": r.losses, "steps": r.update_steps}
        res.update({f"param/{k}": v for k, v in t.model.state_dict().items()})
        for i in range(len(states[0])):
            res[f"state{i}"] = np.concatenate([s[i] for s in states], axis=0)
        np.savez(out, **res)


def failures(mode: str, case_path: str) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    c = json.load(open(case_path))
    t = DistributedTrainer(make_model(c, c["seed"]), **trainer_kwargs(c), data="global")
    x, target, mask, resets = (a[: c["T"]] for a in case_data(c))
    if mode == "crash":
        if rank == 1:
            raise RuntimeError("rank 1 dies here")  # python -m mpi4py aborts every rank
        t.fit(x, target, mask, resets)
        return
    on_update = None
    if mode == "bad_input":
        if rank == size - 1:
            x = x.copy()
            x[3, -1, 0] = np.nan
    else:

        def on_update(info):
            if rank == 1 and info.index == 2:
                raise KeyError("on_update of rank 1 fails")

    before = t.model.state_dict()
    try:
        t.fit(x, target, mask, resets, on_update=on_update)
    except Exception as e:
        after = t.model.state_dict()
        same = all(np.array_equal(before[k], after[k]) for k in before)
        print(
            f"rank {rank} stopped: {type(e).__name__}: {e} | step_count={t.step_count} "
            f"params_unchanged={same}",
            flush=True,
        )
        sys.exit(3)
    print(f"rank {rank} finished without an error", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        train(sys.argv[2], sys.argv[3])
    elif mode in ("save", "resume"):
        save_or_resume(mode, sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        failures(mode, sys.argv[2])
