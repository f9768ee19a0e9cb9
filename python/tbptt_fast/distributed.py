"""Data-parallel TBPTT(k1, k2) across processes, over MPI (the optional extra ``tbptt-fast[mpi]``).

The batch of parallel streams is split across the processes (ranks) of an MPI
communicator; every rank runs the same TBPTT schedule on its own streams.
At each update the engine hands this module the block's masked loss sum and
mask count, which are summed over the ranks first (one all-reduce of two
numbers), and then the gradient, already divided by the summed count, which is
summed over the ranks (one all-reduce of the flat gradient) before the
gradient check, clipping and the optimizer step. The block mean therefore
stays the mean over every unmasked pair of the whole batch, and every rank
holds the same parameters after every update, however the streams are split
(uneven splits included): the result equals one process training the whole
batch, up to the order of the floating-point sums.

>>> from mpi4py import MPI                               # doctest: +SKIP
>>> import tbptt_fast as tb
>>> from tbptt_fast.distributed import DistributedTrainer
>>> model = tb.Model("lstm", input_size=3, hidden_size=32, output_size=2, seed=0)
>>> trainer = DistributedTrainer(model, k1=8, k2=16, data="global")   # doctest: +SKIP
>>> res = trainer.fit(x, target)    # x: the whole batch [T, B, 3] on every rank  # doctest: +SKIP

Run it with ``mpiexec -n 2 python script.py`` (see the README).

Failures. Every call validates its input on every rank first, and the ranks
agree on the outcome before anything changes: a bad input on one rank raises
its own error there and a RuntimeError naming that rank on the others, with
nothing changed anywhere. ``on_update`` results are agreed per update too. An
error that happens on one rank only in the middle of a run (out of memory) cannot
be agreed; run scripts with ``python -m mpi4py script.py``, which aborts every
rank on an uncaught exception (``tbptt-fast train --distributed`` does the same).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from . import _validation as V
from .checkpoint import _fspath, _refuse, dumps_trainer, loads_trainer, pack, read, write_atomic
from .inference import EvalResult
from .model import Model
from .trainer import _K1, Trainer, _one_call

__all__ = ["DistributedTrainer", "evaluate", "shard", "world"]

KIND = "distributed_trainer"  # the manifest's "kind" of a distributed checkpoint
_MPI_MISSING = (
    "tbptt_fast.distributed needs mpi4py and an MPI library: pip install 'tbptt-fast[mpi]'"
)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(f"{_MPI_MISSING} ({e})") from None
    return MPI


def world():
    """``MPI.COMM_WORLD`` (imports mpi4py, which initialises MPI)."""
    return _mpi().COMM_WORLD


def shard(batch: int, rank: int, size: int) -> slice:
    """The streams of ``rank`` when ``batch`` streams are split over ``size`` ranks.

    Contiguous and as even as possible: the first ``batch % size`` ranks hold
    one stream more (``numpy.array_split``'s rule). Raises ValueError when a
    rank would get no stream.
    """
    if batch < size:
        raise ValueError(f"a batch of {batch} streams cannot be split over {size} ranks")
    base, extra = divmod(batch, size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def _agreed(e: BaseException) -> BaseException:
    """Mark ``e`` as raised on every rank (the command line then needs no abort)."""
    with contextlib.suppress(AttributeError, TypeError):
        e.tbptt_agreed = True
    return e


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class _Agreement:
    """The ranks' agreement on whether a call may go on: every rank reports
    success or its error once per call (an allgather), so a failure on one
    rank stops every rank instead of leaving the others waiting in a
    collective operation."""

    def __init__(self, comm):
        self.comm = comm
        self.pending = False  # inside a guarded call, before the ranks agreed

    @contextlib.contextmanager
    def call(self):
        outer = self.pending
        self.pending = True
        try:
            yield
        except BaseException as e:
            if self.pending:  # failed before agreeing: tell the others, then raise
                self.pending = False
                self.exchange(e)
                _agreed(e)
            raise
        finally:
            self.pending = outer and self.pending

    def agree(self) -> None:
        """This rank is ready: raise if another rank failed."""
        if self.pending:
            self.pending = False
            self.exchange(None)

    def exchange(self, error: BaseException | None) -> None:
        texts = self.comm.allgather(None if error is None else _error_text(error))
        failed = [(r, t) for r, t in enumerate(texts) if t is not None]
        if failed and error is None:
            r, t = failed[0]
            raise _agreed(
                RuntimeError(
                    f"rank {r} of {len(texts)} failed ({t}); every rank stops, nothing changed"
                )
            )


class DistributedTrainer(Trainer):
    """A :class:`~tbptt_fast.Trainer` whose batch of streams is split across MPI ranks.

    Every rank constructs it with the same arguments (collectively). The
    parameters are broadcast from rank 0 first, so all ranks start equal; the
    configuration (sizes, k1, k2, loss, optimizer, clipping, overlap, data) must
    match on every rank, else every rank raises a ValueError.

    Args:
        model, k1, k2, loss, optimizer, clip_grad_norm, overlap, backend,
            batch_first, max_history: as :class:`~tbptt_fast.Trainer`;
            backend "cpu" or "cuda" (the NumPy reference has no hook for the
            reduction).
        comm: an ``mpi4py`` communicator (default ``MPI.COMM_WORLD``).
        data: "local" (default): ``fit``'s and ``step``'s arrays hold this
            rank's streams only (any split, uneven allowed, at least one stream
            per rank); "global": every rank passes the whole batch and uses its
            share, :func:`shard` ``(B, rank, size)``.

    ``fit``/``step``/``flush`` are collective (every rank calls them, in the
    same order, with the same number of steps). Results: ``losses`` and
    ``grads`` are the whole batch's (the same on every rank), ``outputs`` and
    ``state`` this rank's streams'.

    Attributes:
        rank, size: this process's rank and the number of ranks.
        comm_seconds, comm_calls: time spent in, and number of, the all-reduces
            of the updates (two per update; the time includes waiting for the
            slowest rank), for measurements; may be reset by the caller.
    """

    def __init__(
        self,
        model: Model,
        k1: int,
        k2=_K1,
        loss: str = "mse",
        optimizer=None,
        clip_grad_norm=None,
        overlap: str = "stored",
        backend: str = "cpu",
        batch_first: bool = False,
        max_history: int | None = None,
        *,
        comm=None,
        data: str = "local",
    ):
        comm = world() if comm is None else comm
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self._agreement = _Agreement(comm)
        with self._agreement.call():
            if data not in ("local", "global"):
                raise ValueError(f"data must be 'local' or 'global', got {data!r}")
            if backend not in ("cpu", "cuda"):
                raise ValueError(
                    f"backend must be 'cpu' or 'cuda' for a DistributedTrainer, got {backend!r}"
                )
            if not isinstance(model, Model):
                raise TypeError(f"model must be a tbptt_fast.Model, got {type(model).__name__}")
            self.data = data
            super().__init__(
                model, k1, k2, loss, optimizer, clip_grad_norm, overlap, backend, batch_first,
                max_history,
            )  # fmt: skip
            self._agreement.agree()
        # the same configuration everywhere, then rank 0's parameters everywhere
        mine = (Trainer.__repr__(self), self.model.shapes(), str(self.model.dtype), data)
        configs = comm.allgather(mine)
        bad = [r for r, c in enumerate(configs) if c != configs[0]]
        if bad:
            raise _agreed(
                ValueError(
                    f"DistributedTrainer: rank {bad[0]} has another configuration than rank 0 "
                    f"({configs[bad[0]][0]} vs {configs[0][0]})"
                )
            )
        with self._exclusive():
            params = comm.bcast(model.state_dict() if self.rank == 0 else None, root=0)
            model.load_state_dict(params)
        self._reduce = (self._reduce_block, self._reduce_grad)
        self.comm_seconds = 0.0  # time spent in the reductions (benchmarks)
        self.comm_calls = 0

    # -- the reduction the engine calls at every update ---------------------------------
    def _reduce_block(self, sums: np.ndarray) -> None:
        """[2] float64 (loss sum, mask count) -> their sums over the ranks, in place."""
        self._allreduce(sums)

    def _reduce_grad(self, grad: np.ndarray) -> None:
        """[n] model dtype, the flat gradient -> its sum over the ranks, in place."""
        self._allreduce(grad)

    def _allreduce(self, buf: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.comm.Allreduce(_mpi().IN_PLACE, buf)
        self.comm_seconds += time.perf_counter() - t0
        self.comm_calls += 1

    def _run(self, fn, *args):
        return fn(*args, reduce=self._reduce)

    def _check_params(self) -> None:
        # every call's last check before it changes anything: the ranks agree here
        super()._check_params()
        self._agreement.agree()

    def _run_data(
        self, data, flush: bool, return_grads: bool, return_outputs: bool, on_update=None
    ):
        if on_update is not None:
            on_update = self._agreed_callback(on_update)
        return super()._run_data(data, flush, return_grads, return_outputs, on_update)

    def _agreed_callback(self, on_update):
        """``on_update`` whose stop (a False result or an exception) stops every rank."""
        comm = self.comm

        def call(index, step, loss) -> bool:
            go_on, error = True, None
            try:
                go_on = bool(on_update(index, step, loss))
            except Exception as e:
                error = e
            texts = comm.allgather((go_on, None if error is None else _error_text(error)))
            if error is not None:
                raise _agreed(error)
            failed = [(r, t) for r, (_, t) in enumerate(texts) if t is not None]
            if failed:
                r, t = failed[0]
                raise _agreed(
                    RuntimeError(f"on_update failed on rank {r} ({t}); every rank stopped")
                )
            return all(g for g, _ in texts)

        return call

    # -- the batch split ------------------------------------------------------------------
    def _mine(self, a, time_axis: bool):
        """This rank's streams of a whole-batch array (data="global")."""
        if a is None or self.data == "local":
            return a
        a = np.asarray(a)
        axis = (0 if self.batch_first else 1) if time_axis else 0
        if a.ndim <= axis:
            raise ValueError(f"data='global': an array of shape {list(a.shape)} has no batch axis")
        return a[(slice(None),) * axis + (shard(a.shape[axis], self.rank, self.size),)]

    # -- the public calls: collective -------------------------------------------------------
    def fit(self, x, target, mask=None, resets=None, initial_state=None, **kwargs):
        """:meth:`Trainer.fit` on this rank's streams (collective).

        x, target, mask, resets: this rank's streams ([T, B_r, ...]), or with
        ``data="global"`` the whole batch on every rank; ``initial_state``
        likewise (per layer [B_r, H] / [B, H]). ``on_update`` runs on every rank;
        if it returns False or raises on any rank, every rank stops after that
        update. Returns the whole batch's losses (and grads) and this rank's
        outputs.
        """
        with self._agreement.call():
            x, target, mask, resets = (self._mine(a, True) for a in (x, target, mask, resets))
            if initial_state is not None and self.data == "global":
                initial_state = _map_state(initial_state, lambda a: self._mine(a, False))
            return super().fit(x, target, mask, resets, initial_state, **kwargs)

    def step(self, x_t, target_t, mask_t=None, reset_t=None):
        """:meth:`Trainer.step` (collective): one step of this rank's streams
        ([B_r, ...]; the whole batch [B, ...] with ``data="global"``)."""
        with self._agreement.call():
            x_t, target_t, mask_t, reset_t = (
                self._mine(a, False) for a in (x_t, target_t, mask_t, reset_t)
            )
            return super().step(x_t, target_t, mask_t, reset_t)

    def flush(self):
        """:meth:`Trainer.flush` (collective)."""
        with self._agreement.call():
            return super().flush()

    def reset_state(self, initial_state=None) -> None:
        """:meth:`Trainer.reset_state` (collective)."""
        with self._agreement.call():
            if initial_state is not None and self.data == "global":
                initial_state = _map_state(initial_state, lambda a: self._mine(a, False))
            if initial_state is not None:  # checked on every rank before any rank resets
                V.initial_state(initial_state, self.model, None)
            self._agreement.agree()
            super().reset_state(initial_state)

    def evaluate(self, x, target, mask=None, resets=None, state=None) -> EvalResult:
        """``Model.evaluate`` with this trainer's loss and backend over the ranks
        (collective); see :func:`evaluate`."""
        with self._agreement.call():
            x, target, mask, resets = (self._mine(a, True) for a in (x, target, mask, resets))
            if state is not None and self.data == "global":
                state = _map_state(state, lambda a: self._mine(a, False))
            return _evaluate(
                self._agreement, self.model, x, target, mask, resets, state, self.loss,
                self.backend, self.batch_first,
            )  # fmt: skip

    # -- checkpoints ------------------------------------------------------------------------
    @_one_call
    def save(self, path) -> None:
        """Save every rank's trainer to ``path``, written by rank 0 only, atomically (collective).

        The file holds, per rank, a complete trainer checkpoint of that rank
        (the model and optimizer state, the same on every rank, and that rank's
        streams' state, pending block and stored history), so
        :meth:`load` resumes on the same number of ranks exactly where this
        left off. Every rank raises if the write fails.
        """
        with self._agreement.call():
            path = _fspath(path)
            blob = dumps_trainer(self)
            self._agreement.agree()
        blobs = self.comm.gather(blob, root=0)
        error = None
        if self.rank == 0:
            try:
                manifest = {
                    "kind": KIND,
                    "world_size": self.size,
                    "data": self.data,
                    "ranks": [f"rank{r}" for r in range(self.size)],
                }
                arrays = {f"rank{r}": np.frombuffer(b, dtype=np.uint8) for r, b in enumerate(blobs)}
                write_atomic(path, pack(manifest, arrays))
            except Exception as e:
                error = _error_text(e)
        error = self.comm.bcast(error, root=0)
        if error is not None:
            raise RuntimeError(f"saving {path} on rank 0 failed: {error}")

    @classmethod
    def load(cls, path, backend: str | None = None, *, comm=None) -> DistributedTrainer:
        """The trainer saved by :meth:`save`, on as many ranks as saved it (collective).

        Rank 0 reads and checks the file and sends each rank its part, so the
        other ranks need not see the file. A file saved by another number of
        ranks, or that is not a distributed checkpoint, raises a ValueError
        naming the path on every rank.
        """
        comm = world() if comm is None else comm
        rank, size = comm.Get_rank(), comm.Get_size()
        parts, error = None, None
        if rank == 0:
            try:
                p = _fspath(path)
                manifest, arrays = read(p)
                if manifest.get("kind") != KIND:
                    raise _refuse(
                        p,
                        f"not a distributed checkpoint (kind {manifest.get('kind')!r}); "
                        "load it with tbptt_fast.Trainer.load",
                    )
                n = manifest.get("world_size")
                if n != size or any(f"rank{r}" not in arrays for r in range(size)):
                    raise _refuse(
                        p, f"saved by {n} ranks, loaded on {size}: resume on the same number"
                    )
                parts = [(arrays[f"rank{r}"].tobytes(), manifest.get("data")) for r in range(size)]
            except Exception as e:
                error = e
        error = comm.bcast(None if error is None else (type(error), str(error)), root=0)
        if error is not None:
            kind, text = error
            raise (kind if issubclass(kind, (ValueError, OSError)) else RuntimeError)(text)
        blob, data = comm.scatter(parts, root=0)
        agreement = _Agreement(comm)
        with agreement.call():
            plain = loads_trainer(blob, backend)
            agreement.agree()
        t = cls(
            plain.model, plain.k1, plain.k2, plain.loss, plain.optimizer, plain.clip_grad_norm,
            plain.overlap, plain.backend, plain.batch_first, plain.max_history, comm=comm,
            data=data if data in ("local", "global") else "local",
        )  # fmt: skip
        t._engine.restore(plain._engine.snapshot())
        t._batch, t._last_batch = plain._batch, plain._last_batch
        return t

    def __reduce__(self):
        raise TypeError("a DistributedTrainer cannot be pickled or copied; use save/load")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rank={self.rank}, size={self.size})"


def _map_state(state, f):
    """Apply ``f`` to every [B, H] array of a state in any of ``fit``'s forms."""
    if isinstance(state, (list, tuple)) and not isinstance(state, np.ndarray):
        return type(state)(_map_state(s, f) for s in state)
    a = np.asarray(state)
    if a.ndim == 3:  # PyTorch's h0 [L, B, H]
        return np.ascontiguousarray(
            np.stack([f(layer) for layer in a]) if a.shape[0] else a, dtype=a.dtype
        )
    return f(a)


def _evaluate(agreement, model, x, target, mask, resets, state, loss, backend, batch_first):
    with agreement.call():
        ev = model.evaluate(x, target, mask, resets, state, loss, backend, batch_first)
        agreement.agree()
    correct = 0.0 if ev.accuracy is None else round(ev.accuracy * ev.count)
    sums = np.array([ev.loss * ev.count, float(ev.count), correct], np.float64)
    agreement.comm.Allreduce(_mpi().IN_PLACE, sums)
    count = int(np.rint(sums[1]))
    mean = float(sums[0] / count) if count else 0.0
    acc = None if ev.accuracy is None else (float(sums[2] / count) if count else 0.0)
    return EvalResult(loss=mean, count=count, accuracy=acc, state=ev.state)


def evaluate(
    model: Model,
    x,
    target,
    mask=None,
    resets=None,
    state=None,
    loss: str = "mse",
    backend: str = "cpu",
    batch_first: bool = False,
    *,
    comm=None,
) -> EvalResult:
    """``Model.evaluate`` over the streams of every rank (collective).

    Each rank passes its own streams (x [T, B_r, D] or ids [T, B_r], target,
    mask, resets [T, B_r], state per layer [B_r, H]); the loss sums, pair counts
    and correct counts are summed over the ranks. Returns an
    :class:`~tbptt_fast.EvalResult` whose ``loss``, ``count`` and ``accuracy``
    are the whole batch's (the same on every rank) and whose ``state`` is this
    rank's. A bad input on one rank raises on every rank.
    """
    comm = world() if comm is None else comm
    return _evaluate(
        _Agreement(comm), model, x, target, mask, resets, state, loss, backend, batch_first
    )


# ----------------------------------------------------------------------------
# tbptt-fast train --distributed
# ----------------------------------------------------------------------------

_CLI_COMM = None  # the communicator of a command-line run (abort_unless_agreed)


def abort_unless_agreed(error: BaseException, code: int) -> None:
    """The command line's last resort: an error raised on this rank only (not
    agreed with the others, who may wait for this rank in a collective call)
    aborts every rank with exit status ``code``, instead of a hang."""
    if getattr(error, "tbptt_agreed", False):
        return
    comm = _CLI_COMM
    if comm is None:  # failed before the run started (e.g. a bad option on this rank)
        try:
            comm = world()
        except ImportError:
            return
    if comm.Get_size() == 1:
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    comm.Abort(code)


def cli_train(args, train_run) -> int:
    """``tbptt-fast train --distributed``, under ``mpiexec -n N``: the run of
    ``train`` with its streams split over the ranks (``data="global"``: each
    rank builds the same task and trains its share). Rank 0 prints and writes
    the files; at the end every rank takes part in writing ``latest.ckpt`` (a
    distributed checkpoint, :meth:`DistributedTrainer.load`) and rank 0 writes
    ``model.ckpt`` (``Model.load``), ``losses.csv`` and ``validation.csv``."""
    import os
    import sys

    from .runs import UsageError, make_model, make_optimizer, save_checkpoint

    global _CLI_COMM
    try:
        comm = world()
    except ImportError as e:
        raise UsageError(f"--distributed: {e}") from None
    _CLI_COMM = comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.resume:
        raise _agreed(
            UsageError(
                "--distributed does not continue a run (--resume); load its latest.ckpt "
                "with tbptt_fast.distributed.DistributedTrainer.load"
            )
        )
    folder = comm.bcast(args.out, root=0)
    if rank != 0:  # one voice: rank 0 prints, plots and writes
        sys.stdout = open(os.devnull, "w")  # kept open for the life of the process
        args.out, args.plot = None, False
        args.progress = "none"

    def setup(run, run_dir):
        if len(run.cfg["k2"]) > 1:
            raise _agreed(UsageError("--distributed trains one k2 at a time"))
        if run.cfg["backend"] == "numpy":
            raise _agreed(UsageError("--distributed needs --backend cpu or cuda"))
        if run.task.train.batch < size:
            raise _agreed(
                UsageError(f"--batch {run.task.train.batch} cannot be split over {size} processes")
            )
        run.trainer = DistributedTrainer(
            make_model(run.cfg, run.task),
            k1=run.k1,
            k2=run.k2,
            loss=run.loss,
            optimizer=make_optimizer(run.cfg),
            clip_grad_norm=run.cfg["clip"],
            overlap=run.cfg["overlap"],
            backend=run.cfg["backend"],
            comm=comm,
            data="global",
        )
        sl = shard(run.task.train.batch, rank, size)
        print(
            f"distributed over {size} processes: rank 0 trains streams "
            f"{sl.start}..{sl.stop - 1} of {run.task.train.batch}",
            flush=True,
        )
        inner = run.run

        def run_then_save():
            r = inner()
            if folder:
                run.trainer.save(os.path.join(folder, "latest.ckpt"))
                if rank == 0:  # the model with the run's record, as best.ckpt: evaluate reads it
                    path = os.path.join(folder, "model.ckpt")
                    save_checkpoint(run.trainer.model, path, run.meta(True), run.history())
                    run.out = folder
                    run.write_logs()
                    run.out = None
            return r

        run.run = run_then_save
        return None  # no files during the run (its periodic checkpoints are one rank's)

    return train_run(args, setup)
