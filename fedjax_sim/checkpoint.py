"""Checkpoint / resume (orbax) and per-round metric logs (JSON lines).

A checkpoint holds the whole :class:`~fedjax_sim.ServerState` (round, params, optimizer and
aggregator state, per-client population state, server-side algorithm state, run key) plus a
fingerprint of the configuration. Because every random draw derives from ``(key, round)``, a
resumed run continues **bit-identically** to an uninterrupted one. orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never replaces the last
good checkpoint; ``max_to_keep`` earlier steps are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class SimulationInterrupted(KeyboardInterrupt):
  """Raised by ``Simulation.run`` after SIGINT/SIGTERM, once the current block is checkpointed.

  Attributes:
    state: the state after the last completed block (also in the checkpoint, if one was set).
    metrics: the metrics of the completed rounds.
  """

  def __init__(self, state, metrics, message: str):
    super().__init__(message)
    self.state = state
    self.metrics = metrics


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written during ``Simulation.run``; the run's state is kept.

  Attributes:
    state: the state after the last completed round (the donated input is gone; use this).
    metrics: the metrics of the completed rounds.
  """

  def __init__(self, state, metrics, message: str):
    super().__init__(message)
    self.state = state
    self.metrics = metrics


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


def _spec(tree) -> dict[str, str]:
  return {jax.tree_util.keystr(path): f"{tuple(np.shape(x))}:{np.dtype(x.dtype).name}"
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def fingerprint(sim, state) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed by ``sim``: names, shapes, settings, a
  digest of the round's computation (hyper-parameters), a digest of the population's contents,
  and the run's identity (``run_id``: all of these and the run key; see :mod:`fedjax_sim.run_dir`).

  Returns:
    a JSON-able dict.
  """
  from fedjax_sim import run_dir

  pop = sim.population
  fp = {
      "algorithm": sim.algorithm.name,
      "num_clients": pop.num_clients,
      "total_examples": pop.total_examples,
      "features": {k: f"{tuple(v.shape[1:])}:{np.dtype(v.dtype).name}"
                   for k, v in pop.features.items()},
      "sampler": repr(sim.sampler) if len(repr(sim.sampler)) < 500 else
      hashlib.sha256(repr(sim.sampler).encode()).hexdigest(),
      "aggregator_tags": sorted(sim.algorithm.aggregator.tags),
      "noise_multiplier": sim.algorithm.aggregator.noise_multiplier,
      "params": _spec(state.params),
      "state": _spec(_to_savable(state)),
      "algorithm_digest": run_dir.algorithm_digest(sim, state),
      "population_digest": run_dir.population_digest(pop),
      "digest_jax": jax.__version__,
      "digest_engine": run_dir.ENGINE_DIGEST,
      "digest_libs": run_dir.traced_library_versions(),
  }
  fp["run_id"] = run_dir.run_id(fp, state.key)
  return fp


def config_hash(fp: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_savable(state):
  """The state with the typed key as raw key data (orbax stores plain arrays)."""
  import dataclasses

  return dataclasses.replace(state, key=jax.random.key_data(state.key))


def _from_savable(saved, impl_template):
  import dataclasses

  return dataclasses.replace(
      saved, key=jax.random.wrap_key_data(jnp.asarray(saved.key),
                                          impl=jax.random.key_impl(impl_template)))


def _manager(directory: str, max_to_keep: int = 3):
  import orbax.checkpoint as ocp

  # Synchronous: save() waits for every write anyway, and an async save that fails (the
  # directory gone or unwritable mid-run) leaves orbax's non-daemon signalling threads waiting
  # for a signal that never comes, which kept the process from exiting for orbax's 300 s
  # coordination timeout.
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False),
  )


def save(directory: str, state, fp: dict[str, Any], *, max_to_keep: int = 3) -> int:
  """Saves ``state`` as step ``state.round`` under ``directory``; returns the step."""
  import orbax.checkpoint as ocp

  step = int(state.round)
  mngr = _manager(directory, max_to_keep)
  tree = jax.tree.map(np.asarray, _to_savable(state))
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                            meta=ocp.args.JsonSave(fp)), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return step


def restore(directory: str, template_state, fp: dict[str, Any], *, step: int | None = None):
  """Restores the latest (or ``step``) checkpoint into the structure of ``template_state``.

  Raises:
    FileNotFoundError: no checkpoint in ``directory``.
    ValueError: the checkpoint comes from another configuration (the differences are named)
      or cannot be read (the steps still available are named).
  """
  import orbax.checkpoint as ocp

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory!r}.")
  mngr = _manager(directory)
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory!r}.")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint step {step} in {directory!r}; steps: {steps}.")
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001
    raise ValueError(
        f"checkpoint step {step} in {directory!r} cannot be read ({type(e).__name__}: {e}); "
        f"other steps: {[s for s in steps if s != step]} (pass step=...)."
    ) from e
  from fedjax_sim import run_dir

  missing = [k for k in run_dir.NEW_FIELDS if k not in meta and k not in run_dir.NOT_COMPARED]
  if missing:
    warnings.warn(f"checkpoint step {step} in {directory!r} was written by an older version "
                  f"without {missing}; restoring it without those checks.", stacklevel=3)
  skip = set(run_dir.NOT_COMPARED) | set(missing)
  if ("algorithm_digest" in meta and meta["algorithm_digest"] != fp.get("algorithm_digest")
      and run_dir.digests_incomparable(meta, fp)):
    skip.add("algorithm_digest")  # traced programs differ across jax / engine versions
    warnings.warn(f"checkpoint step {step} was written with jax {meta.get('digest_jax')}, "
                  f"engine {meta.get('digest_engine', '1')} and {meta.get('digest_libs', '?')} "
                  f"(now {fp.get('digest_jax')}, {fp.get('digest_engine')} and "
                  f"{fp.get('digest_libs')}): the algorithm's hyper-parameters cannot be "
                  "compared; check them yourself.", stacklevel=3)
  diffs = [k for k in sorted(set(fp) | set(meta)) if k not in skip and json.dumps(
      fp.get(k), default=str, sort_keys=True) != json.dumps(meta.get(k), default=str,
                                                            sort_keys=True)]
  if diffs:
    detail = "; ".join(f"{k}: checkpoint {meta.get(k)!r} vs this run {fp.get(k)!r}"
                       for k in diffs[:4])
    raise ValueError(
        f"checkpoint step {step} in {directory!r} comes from another configuration ({detail}). "
        "Resume with the same algorithm and hyper-parameters (algorithm_digest: client and "
        "server optimizers, clip, batch size, local work), population data "
        "(population_digest), sampler and model, or use a new directory."
    )
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                          _to_savable(template_state))
  try:
    saved = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # noqa: BLE001
    raise ValueError(
        f"checkpoint step {step} in {directory!r} cannot be read ({type(e).__name__}: {e}); "
        f"other steps: {[s for s in steps if s != step]} (pass step=...)."
    ) from e
  mngr.close()
  saved = jax.tree.map(jnp.asarray, saved)
  return _from_savable(saved, template_state.key)


class MetricsLog:
  """Appends one JSON object per round to ``<log_dir>/metrics.jsonl`` (with the config hash),
  and with ``tensorboard=True`` the same scalars as TensorBoard event files (tensorboardX).

  ``config.json`` records the run's identity, fingerprint, versions, run key, the caller's
  ``settings`` and one entry per session (``run`` call); a resumed run extends it, never
  replaces it (``existing``: its current contents, from :func:`run_dir.prepare_log_dir`).
  """

  def __init__(self, log_dir: str, fp: dict[str, Any], seed_info: dict[str, Any] | None = None,
               *, tensorboard: bool = False, existing: dict[str, Any] | None = None,
               settings: dict[str, Any] | None = None, session: dict[str, Any] | None = None):
    os.makedirs(log_dir, exist_ok=True)
    self.tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as e:
        raise ImportError("tensorboard=True needs tensorboardX: pip install "
                          "'fedjax-sim[tensorboard]'.") from e
      self.tb = SummaryWriter(log_dir)
    self.path = os.path.join(log_dir, "metrics.jsonl")
    self.hash = config_hash(fp)
    config = dict(existing) if existing else {
        "config_hash": self.hash, "run_id": fp.get("run_id"), "fingerprint": fp,
        "versions": _versions(), **(seed_info or {}), "sessions": []}
    if settings is not None:
      config.setdefault("settings", settings)
    config.setdefault("sessions", []).append(
        {**(session or {}), **{k: v for k, v in (seed_info or {}).items() if k == "start_round"},
         "versions": _versions()})
    path = os.path.join(log_dir, "config.json")
    with open(path + ".tmp", "w") as f:
      json.dump(config, f, indent=1, default=str)
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated config.json

  def write(self, first_round: int, block: dict[str, np.ndarray]) -> None:
    n = len(next(iter(block.values())))
    with open(self.path, "a") as f:
      for i in range(n):
        row = {"round": first_round + i + 1, "config_hash": self.hash}
        row.update({k: _json_float(v[i]) for k, v in block.items()})
        f.write(json.dumps(row) + "\n")
        if self.tb is not None:
          for k, v in row.items():
            if k not in ("round", "config_hash") and v is not None:
              self.tb.add_scalar(k, v, row["round"])
    if self.tb is not None:
      self.tb.flush()


def _json_float(x):
  x = float(x)
  return x if np.isfinite(x) else None


def _versions() -> dict[str, str]:
  import optax

  import fedjax_sim

  return {"fedjax_sim": fedjax_sim.__version__, "jax": jax.__version__,
          "optax": optax.__version__, "numpy": np.__version__}


def read_log(log_dir: str) -> dict[str, np.ndarray]:
  """Reads ``metrics.jsonl`` back into ``{name: array over rounds}`` (NaN where missing).

  A row that does not parse (a write cut short by a kill) is dropped with a warning, as a
  resumed run drops it.
  """
  path = os.path.join(log_dir, "metrics.jsonl")
  rows, torn = [], 0
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        torn += 1
  if torn:
    warnings.warn(f"{path}: skipped {torn} unreadable row(s) (a write cut short).", stacklevel=2)
  keys = sorted({k for r in rows for k in r if k != "config_hash"})
  return {k: np.asarray([np.nan if r.get(k) is None else r[k] for r in rows], float)
          for k in keys}


def to_csv(log_dir: str, path: str | None = None) -> str:
  """Writes the JSONL log as CSV (``metrics.csv`` beside it by default); returns the path."""
  cols = read_log(log_dir)
  path = path or os.path.join(log_dir, "metrics.csv")
  names = ["round"] + [k for k in cols if k != "round"]
  with open(path, "w") as f:
    f.write(",".join(names) + "\n")
    for i in range(len(cols["round"])):
      f.write(",".join("" if np.isnan(cols[k][i]) else repr(float(cols[k][i])) for k in names)
              + "\n")
  return path
