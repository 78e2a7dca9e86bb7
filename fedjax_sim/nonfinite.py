"""Non-finite training: how a run detects it, what the state keeps, and what the host does.

Detection is in the compiled round (no extra host round-trip): a round is **non-finite** when
the server step would make the parameters or the server optimizer state NaN/Inf, or when every
selected client's update was NaN/Inf (``nan_clients > 0`` and ``clients == 0``: training has
diverged). Such a round's server step is never applied, so the state never holds NaN/Inf, and
``metrics["nonfinite"]`` is 1 for it. The host reads that column once per block, with the other
metrics, and applies the run's ``on_nonfinite`` policy:

* ``"raise"`` (default): the block stops at the first non-finite round (later rounds of the
  block are skipped in the program) and :class:`NonFiniteError` names that round; its ``state``
  is the last finite state, exactly as it was before that round (``state.round`` rounds done),
  and ``metrics`` holds every round run until then (the failing one last).
* ``"warn"``: the round is skipped (the server keeps its state; the round counter advances) and
  a ``RuntimeWarning`` names the rounds after each block.
* ``"ignore"``: skipped as for ``"warn"``, silently; ``metrics["nonfinite"]`` still marks them.

Metrics that average over clients or examples are NaN, not 0, in a round where nothing was
measured (no client contributed).

Examples:
  >>> import jax, numpy as np, optax, fedjax_sim as fs
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(40, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
  >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 4, 40))
  >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
  >>> algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(1e30), batch_size=4,
  ...                             local_epochs=1)   # diverges at once
  >>> sim = fs.Simulation(algo, pop, cohort_size=2)
  >>> try:
  ...   sim.run(sim.init(np.zeros((3, 2), np.float32), jax.random.key(0)), num_rounds=5)
  ... except fs.nonfinite.NonFiniteError as e:
  ...   print(e.round, int(e.state.round), float(e.metrics["nan_clients"][-1]))
  1 0 2.0
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: The metric column: 1.0 for a non-finite round (see the module docstring), else 0.0.
NONFINITE = "nonfinite"
POLICIES = ("raise", "warn", "ignore")


class RunStopped(BaseException):
  """Base of the errors that stop a run before its last round and carry what it had
  (:class:`NonFiniteError`, :class:`fedjax_sim.runs.recorder.CheckpointSaveError`,
  :class:`fedjax_sim.runs.recorder.SimulationInterrupted`; each also derives from the built-in
  error it always was, so ``except Exception`` still does not catch an interruption).

  Attributes:
    state: the state to continue from (the donated input is gone).
    metrics: ``{name: array}`` of the rounds completed by the call.
  """

  state: Any = None
  metrics: Any = None


class NonFiniteError(RunStopped, FloatingPointError):
  """A round of :meth:`fedjax_sim.Simulation.run` went non-finite under ``on_nonfinite="raise"``.

  Attributes:
    round: the 1-based number of the failing round (as in ``metrics.jsonl``).
    state: the last finite :class:`~fedjax_sim.ServerState` (``round - 1`` rounds done); resume
      from it, e.g. with a lower learning rate.
    metrics: ``{name: array}`` of the rounds run by this call, the failing round last.
  """

  def __init__(self, message: str, *, round: int, state: Any, metrics: dict[str, np.ndarray]):
    super().__init__(message)
    self.round = round
    self.state = state
    self.metrics = metrics


def check_policy(on_nonfinite: Any) -> str:
  """Checks a policy name.

  Returns:
    ``on_nonfinite`` if it is one of :data:`POLICIES`; raises a ValueError naming it otherwise.
  """
  if not isinstance(on_nonfinite, str) or on_nonfinite not in POLICIES:
    raise ValueError(
        f"on_nonfinite must be one of {POLICIES}; got {on_nonfinite!r}. 'raise' stops at the "
        "first non-finite round and keeps the last finite state; 'warn' / 'ignore' skip such "
        "rounds."
    )
  return on_nonfinite


def stays_finite(new: Any, old: Any) -> jax.Array:
  """True (a traced bool) when no entry of ``new`` is NaN/Inf where ``old`` was finite.

  Entries that were already non-finite are not counted (optimizer states may hold an Inf
  sentinel, e.g. ``optax.contrib.reduce_on_plateau``'s best value); parameters start finite
  (``Simulation.init`` refuses others), so for them this is "all finite".
  """
  ok = jnp.bool_(True)
  for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
    if jnp.issubdtype(jnp.result_type(n), jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(n) | ~jnp.isfinite(o))
  return ok


def first_nonfinite(block_metrics: dict[str, np.ndarray]) -> int | None:
  """Index of the block's first non-finite round, or None."""
  col = block_metrics.get(NONFINITE)
  if col is None:
    return None
  bad = np.flatnonzero(np.asarray(col) > 0)
  return int(bad[0]) if bad.size else None


def describe(round_number: int, row: dict[str, float]) -> str:
  """One sentence on why round ``round_number`` was non-finite, from its metrics row."""
  nan_clients, clients = row.get("nan_clients", 0.0), row.get("clients", 0.0)
  if nan_clients > 0 and clients == 0:
    why = (f"all {int(nan_clients)} selected clients produced a NaN/Inf update (the client "
           "learning rate or the loss diverged)")
  else:
    why = ("the server step made the parameters or the server optimizer state NaN/Inf (the "
           "server learning rate or the aggregate is too large)")
  return f"round {round_number} is non-finite: {why}"


def warn(first_round: int, block_metrics: dict[str, np.ndarray]) -> None:
  """Under ``on_nonfinite="warn"``: one warning naming the block's skipped rounds."""
  bad = np.flatnonzero(np.asarray(block_metrics.get(NONFINITE, ())) > 0)
  if bad.size:
    rounds = [first_round + int(i) + 1 for i in bad]
    shown = ", ".join(map(str, rounds[:10])) + (" ..." if len(rounds) > 10 else "")
    warnings.warn(
        f"{len(rounds)} non-finite round(s) skipped (the server kept its state): {shown}. "
        f"First: {describe(rounds[0], {k: float(v[bad[0]]) for k, v in block_metrics.items()})}.",
        RuntimeWarning, stacklevel=3,
    )
