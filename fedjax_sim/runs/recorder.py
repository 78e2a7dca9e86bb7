"""One run's bookkeeping: :class:`RunRecorder` (metrics, evaluation, log rows, checkpoints),
the signal flag, and the errors that stop a run, all under one base class carrying the state
(:class:`RunStopped`: :class:`SimulationInterrupted`, :class:`CheckpointSaveError`,
:class:`~fedjax_sim.nonfinite.NonFiniteError`)."""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fedjax_sim import nonfinite as nf
from fedjax_sim import privacy
from fedjax_sim.nonfinite import NonFiniteError, RunStopped
from fedjax_sim.plan import RoundPlan
from fedjax_sim.runs import identity, ownership, store
from fedjax_sim.runs.log import MetricsLog
from fedjax_sim.runs.ownership import check_savable, prepare_checkpoint_dir, prepare_log_dir

__all__ = ["CheckpointSaveError", "DirectoryTakenError", "NonFiniteError", "RunOptions",
           "RunRecorder", "RunStopped", "SignalFlag", "SimulationInterrupted"]


class SimulationInterrupted(RunStopped, KeyboardInterrupt):
  """Raised by ``Simulation.run`` after SIGINT/SIGTERM, once the current block is checkpointed.

  Attributes:
    state: the state after the last completed block (also in the checkpoint, if one was set).
    metrics: the metrics of the completed rounds.
  """

  def __init__(self, state, metrics, message: str):
    super().__init__(message)
    self.state = state
    self.metrics = metrics


class CheckpointSaveError(RunStopped, RuntimeError):
  """A checkpoint could not be written during ``Simulation.run``; the run's state is kept.

  Attributes:
    state: the state after the last completed round (the donated input is gone; use this).
    metrics: the metrics of the completed rounds.
  """

  def __init__(self, state, metrics, message: str):
    super().__init__(message)
    self.state = state
    self.metrics = metrics


class DirectoryTakenError(CheckpointSaveError):
  """Another run claimed this run's ``checkpoint_dir`` or ``log_dir`` while it ran (e.g. with
  ``overwrite=True``): this run writes nothing more there and stops, keeping its state.

  Attributes:
    state: the state after the last completed round (save it elsewhere: ``sim.save``).
    metrics: the metrics of the completed rounds.
  """


class SignalFlag:
  """Records SIGINT / SIGTERM during a run (main thread only) so that the block in flight can
  finish and be checkpointed; :meth:`restore` puts the previous handlers back."""

  def __init__(self):
    self.raised = None
    self._old = {}
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.raised = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}


class RunRecorder:
  """What :meth:`fedjax_sim.Simulation.run` keeps and writes down, block by block.

  On creation it fingerprints the run (:func:`fedjax_sim.runs.identity.fingerprint` of its
  plan, population and state), prepares its ``checkpoint_dir`` and ``log_dir`` (refusing what
  this run may not use, before any round) and, with a checkpoint directory, records SIGINT /
  SIGTERM (:class:`SignalFlag`). Then, after each block: :meth:`check_finite`,
  :meth:`record` (metrics, evaluation, log rows) and
  :meth:`checkpoint` (saves when due; raises ``SimulationInterrupted`` after a signal).
  Everything shown on screen (metrics and eval) lands in the log too.
  """

  def __init__(self, plan: RoundPlan, population, state, num_rounds: int, options: RunOptions,
               *, block_size: int, eval_every: int | None, checkpoint_every: int | None):
    o = options
    eval_fn, checkpoint_dir, log_dir, overwrite = (o.eval_fn, o.checkpoint_dir, o.log_dir,
                                                   o.overwrite)
    self.start, self.num_rounds, self.done = int(state.round), num_rounds, 0
    self.eval_fn, self.eval_every = eval_fn, eval_every
    self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
    self.log_dir = log_dir
    self.blocks: list[dict[str, np.ndarray]] = []
    self.evals: dict[int, dict[str, float]] = {}
    if checkpoint_dir is not None:
      check_savable(state)  # before the fingerprint's trace: the cheap refusal first
    self.fp = (identity.fingerprint(plan, population, state) if (checkpoint_dir or log_dir)
               else None)
    if checkpoint_dir is not None:  # everything that could fail at save time: checked now
      prepare_checkpoint_dir(checkpoint_dir, state, self.fp, overwrite=overwrite)
    self.log = None
    if log_dir:
      def open_log():
        existing = prepare_log_dir(log_dir, self.fp, self.start, overwrite=overwrite)
        seed_info = {"run_key_data": np.asarray(jax.random.key_data(state.key)).tolist(),
                     "start_round": self.start}
        session = {"num_rounds": num_rounds, "block_size": block_size,
                   "eval_every": eval_every, "checkpoint_every": checkpoint_every,
                   "delta": o.delta, "accountant": o.accountant, "chunk_size": plan.chunk_size,
                   "processes": jax.process_count()}
        if plan.performance.tuning is not None:  # chunk_size="auto": what was measured
          session["chunk_tuning"] = plan.performance.tuning.as_dict()
        return MetricsLog(log_dir, self.fp, seed_info, tensorboard=o.tensorboard,
                          existing=existing, settings=o.settings, session=session)

      # Several processes (python -m fedjax_sim.launch, hosts): the metrics are the same on
      # every one, so process 0 alone writes the log; all stop if it refuses the directory.
      self.log = on_process_zero(open_log, f"log_dir={log_dir!r}")
    self.stop = SignalFlag() if checkpoint_dir is not None else None
    self.epsilons = None if o.delta is None else privacy.epsilon_column(  # ε on the host
        plan.sampler, population.num_clients, plan.algorithm.aggregator.noise_multiplier,
        plan.system, self.start, num_rounds, o.delta, o.accountant,
        num_bands=getattr(plan.algorithm.aggregator, "num_bands", 1),
        strategy_gram=getattr(plan.algorithm.aggregator, "strategy_gram", None))

  @property
  def rounds_done(self) -> int:
    """Rounds completed in total (the run's start included)."""
    return self.start + self.done

  def metrics(self, blocks=None) -> dict[str, np.ndarray]:
    """The run's metrics so far: one array per name, ``eval_*`` columns NaN where not run."""
    blocks = self.blocks if blocks is None else blocks
    out = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    rows = len(next(iter(out.values())))
    for name in {n for e in self.evals.values() for n in e}:
      col = np.full(rows, np.nan)
      for r, e in self.evals.items():
        if r < rows:
          col[r] = e.get(name, np.nan)
      out["eval_" + name] = col
    return out

  def check_finite(self, block: dict[str, np.ndarray], state, policy: str) -> None:
    """``on_nonfinite``: ``"raise"`` logs the finite rounds, then raises with the last finite
    state; ``"warn"`` warns."""
    bad = nf.first_nonfinite(block)
    if bad is None or policy == "ignore":
      return
    if policy == "warn":
      nf.warn(self.rounds_done, block)
      return
    if self.log is not None and bad:
      self._write_log(self.rounds_done, {k: v[:bad] for k, v in block.items()}, state)
    # The signal handlers and the progress bar are restored / closed by run()'s `finally`.
    metrics = self.metrics([*self.blocks, {k: v[: bad + 1] for k, v in block.items()}])
    number = self.rounds_done + bad + 1
    row = {k: float(v[bad]) for k, v in block.items()}
    raise nf.NonFiniteError(
        f"{nf.describe(number, row)}. The run stopped there; the error's .state is the last "
        f"finite state ({int(state.round)} rounds done) and .metrics the rounds so far. Lower "
        "the learning rate (or clip updates), or pass on_nonfinite='warn' to skip such rounds.",
        round=number, state=state, metrics=metrics,
    )

  def record(self, block: dict[str, np.ndarray], state) -> dict[str, float] | None:
    """Adds the ε spent (with ``delta``) to the block's metrics, keeps them, evaluates when
    due, appends the log rows.

    Returns:
      The evaluation after this block, or None.
    """
    active = len(next(iter(block.values())))
    if self.epsilons is not None:
      block["epsilon"] = self.epsilons(self.done, self.done + active)
    self.blocks.append(block)
    self.done += active
    evals = None
    if self.eval_fn is not None and (self.done == self.num_rounds or (
        self.eval_every is not None and self.rounds_done % self.eval_every == 0)):
      evals = {k: float(v) for k, v in self.eval_fn(state.params).items()}
      self.evals[self.done - 1] = evals
    if self.log is not None:  # after eval_fn: the evaluated round's row holds its eval_* values
      logged = dict(block)
      for k, v in (evals or {}).items():
        logged["eval_" + k] = np.full(active, np.nan)
        logged["eval_" + k][-1] = v
      self._write_log(self.rounds_done - active, logged, state)
    return evals

  def _taken(self, directory: str, name: str, state, what: str) -> None:
    other = ownership.claimed_by_other(directory, self.fp, name=name)
    if other is not None:
      raise DirectoryTakenError(
          state, self.metrics(),
          f"{what}={directory!r} was claimed by another run (run {other}; this run is "
          f"{self.fp['run_id']}) while this run was running, so this run wrote nothing more "
          f"there and stopped after round {self.rounds_done}. Its state is this exception's "
          ".state (sim.save(e.state, other_dir) keeps it).")

  def _write_log(self, first_round: int, rows: dict[str, np.ndarray], state) -> None:
    if self.log is None:  # not process 0 of a multi-process run: it writes the log
      return
    self._taken(self.log_dir, "config.json", state, "log_dir")  # still this run's log?
    self.log.write(first_round, rows)

  def checkpoint(self, state, active: int) -> None:
    """Saves the state when a checkpoint is due (or a signal arrived); then raises
    ``SimulationInterrupted`` if one did. A failed save raises :class:`CheckpointSaveError`
    holding the state (the donated input is gone)."""
    if self.checkpoint_dir is None:
      return
    at, every = self.rounds_done, self.checkpoint_every
    interrupted = self.stop.raised
    crossed = every is None or at // every > (at - active) // every
    if self.done == self.num_rounds or interrupted or crossed:
      self._taken(self.checkpoint_dir, ownership.OWNER_FILE, state, "checkpoint_dir")
      try:
        store.save(self.checkpoint_dir, state, self.fp)
      except Exception as e:  # noqa: BLE001 - the donated state must not be lost
        raise CheckpointSaveError(
            state, self.metrics(),
            f"saving checkpoint step {at} in {self.checkpoint_dir!r} failed "
            f"({type(e).__name__}: {e}). The state after round {at} is this "
            "exception's .state (sim.save(e.state, other_dir) keeps it)."
        ) from e
    if interrupted:
      raise SimulationInterrupted(
          state, self.metrics(),
          f"{interrupted} received: stopped after round {at}, checkpoint saved in "
          f"{self.checkpoint_dir!r} (resume with sim.restore)."
      )

  def close(self) -> None:
    """Restores the signal handlers (never leave SIGINT swallowed in a notebook kernel)."""
    if self.stop is not None:
      self.stop.restore()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
  """How :meth:`fedjax_sim.Simulation.run` runs and records its rounds (one value; the same
  names are accepted as keyword arguments of ``run``).

  Attributes:
    block_size: rounds per compiled block; default ``eval_every`` or ``min(num_rounds, 100)``.
    eval_every: evaluate every this many rounds (must divide into blocks; sets the default
      ``block_size``).
    eval_fn: ``eval_fn(params) -> dict of floats``, called on the host after rounds that are
      multiples of ``eval_every`` and after the last round.
    callback: ``callback(rounds_done, block_metrics)`` after each block (progress, logging).
    delta: for a central-DP aggregator (``dp_mean``, ``adaptive_dp_mean``), report the
      user-level ε spent so far at this δ as ``metrics["epsilon"]`` (and in each block's
      callback), computed on the host for the sampler actually used (``fs.privacy``).
    checkpoint_dir: save the state there (orbax) after blocks that end on a multiple of
      ``checkpoint_every`` rounds (default: every block), at the end, and after SIGINT /
      SIGTERM (the block in flight finishes, then ``SimulationInterrupted`` is raised).
      ``Simulation.restore`` continues bit-identically. The run owns the directory
      (:mod:`fedjax_sim.runs.ownership`): another run's checkpoints are refused unless
      ``overwrite``; this run's later steps (a rollback) are deleted with a warning.
    checkpoint_every: rounds between checkpoints (a multiple of ``block_size`` is exact).
    log_dir: append each round's metrics and ``eval_*`` results to
      ``<log_dir>/metrics.jsonl``; ``config.json`` records the fingerprint, versions, XLA
      flags, run key, ``settings`` and each session. Owned like ``checkpoint_dir``.
    progress: show progress per block: a tqdm bar (loss, accuracy, ε, client-updates/s of
      the clients that took part) on a terminal, one plain line per block otherwise (CI logs).
    tensorboard: with ``log_dir``, also write TensorBoard event files there (tensorboardX).
    accountant: ``"rdp"`` or ``"pld"``, the accountant behind ``metrics["epsilon"]``.
    overwrite: delete another run's checkpoints / log in ``checkpoint_dir`` / ``log_dir``
      (explicitly, with a warning) instead of refusing them.
    settings: a JSON-able dict recorded in ``config.json`` (the CLI records its config).
    on_nonfinite: a non-finite round (its server step would make the state NaN / Inf, or
      every client diverged; :mod:`fedjax_sim.nonfinite`) is never applied. ``"raise"``
      (default): stop and raise ``NonFiniteError`` with the last finite state and the metrics
      so far; ``"warn"`` / ``"ignore"``: skip it (``metrics["nonfinite"]`` marks it).
  """

  block_size: int | None = None
  eval_every: int | None = None
  eval_fn: Callable[[Any], dict[str, float]] | None = None
  callback: Callable[[int, dict[str, np.ndarray]], None] | None = None
  delta: float | None = None
  checkpoint_dir: str | None = None
  checkpoint_every: int | None = None
  log_dir: str | None = None
  progress: bool = False
  tensorboard: bool = False
  accountant: str = "rdp"
  overwrite: bool = False
  settings: dict[str, Any] | None = None
  on_nonfinite: str = "raise"


def on_process_zero(fn: Callable[[], Any], what: str) -> Any:
  """Runs ``fn()`` on process 0 only; every process raises when it failed there, so that none
  of them goes on into the run's collectives alone.

  Args:
    fn: what process 0 runs (opening a log directory).
    what: names the setting in the other processes' error.

  Returns:
    ``fn()``'s result on process 0; None on the others.

  Raises:
    Exception: whatever ``fn`` raised, on process 0.
    ValueError: on the other processes when it failed there (naming ``what``).
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils

  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
      error = e
  ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise ValueError(f"{what}: process 0 refused it (its error says why); no process ran.")
  return result
