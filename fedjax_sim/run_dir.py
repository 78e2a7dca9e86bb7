"""Run identity and run-directory integrity: a run owns its checkpoint and log directories.

A run is identified by its configuration fingerprint (algorithm, hyper-parameters, population
contents, sampler, model shapes) together with its run key: two runs with the same identity
compute the same rounds bit for bit, so they may share a directory; any other run may not.

Before the first round, :meth:`fedjax_sim.Simulation.run` checks its ``checkpoint_dir`` and
``log_dir`` with :func:`prepare_checkpoint_dir` and :func:`prepare_log_dir`:

* a directory holding another run's checkpoints or log is refused (the differences are named)
  unless ``overwrite=True``, which deletes them explicitly and says so;
* the same run's checkpoints and log rows *after* the starting round (a rollback with
  ``restore(step=k)``, or a restart from round 0) are deleted with a warning naming them, so no
  step collides and ``restore()`` never returns a stale later round;
* anything that would fail at save time (an unwritable directory, a zero-size leaf that orbax
  cannot store) is refused before any round runs.

Checkpoints written before run ids existed (no ``run_id`` in their fingerprint) are accepted with
a warning.

Examples:
  >>> import tempfile, jax, jax.numpy as jnp, numpy as np, optax, fedjax_sim as fs
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(60, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
  >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 6, 60))
  >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"])
  >>> algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.5), batch_size=8,
  ...                             local_epochs=1)
  >>> sim = fs.Simulation(algo, pop, cohort_size=3)
  >>> d = tempfile.mkdtemp()
  >>> _ = sim.run(sim.init({"w": jnp.zeros((3, 2))}, jax.random.key(0)), 2, checkpoint_dir=d)
  >>> other = sim.init({"w": jnp.zeros((3, 2))}, jax.random.key(1))   # another seed
  >>> try:
  ...   sim.run(other, 2, checkpoint_dir=d)
  ... except ValueError as e:
  ...   print(str(e)[:52])
  checkpoint_dir holds checkpoints of another run (ste
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
import weakref
from typing import Any

import jax
import numpy as np

from fedjax_sim.checkpoint import CheckpointSaveError

__all__ = ["CheckpointSaveError", "algorithm_digest", "check_savable", "population_digest",
           "prepare_checkpoint_dir", "prepare_log_dir", "run_id"]

# Fingerprint fields added after the first release: a checkpoint without them still restores
# (with a warning), since it cannot be checked against them.
NEW_FIELDS = ("run_id", "algorithm_digest", "population_digest")
# Not compared on restore: the restored run adopts the checkpoint's identity, and the digest's
# jax version only tells whether the algorithm digests are comparable.
NOT_COMPARED = ("run_id", "digest_jax", "digest_engine", "digest_libs")
#: The version of the traced round behind ``algorithm_digest``: raised whenever a change to the
#: engine's code (not to what it computes) changes the traced program, so that checkpoints of
#: older engines are recognised as such instead of as another configuration.
ENGINE_DIGEST = "3"  # 3: fs.zoo CPU conv with a custom_vmap rule (issue 22)


# -- identity --------------------------------------------------------------------------------


def _uint32_words(x):
  """The array's bits as uint32 words (NumPy stays on the host, JAX arrays on device)."""
  xp = np if isinstance(x, np.ndarray) else jax.numpy
  x = xp.asarray(x)
  if x.dtype == bool:
    return x.astype(xp.uint32).reshape(-1)
  size = np.dtype(x.dtype).itemsize
  if size == 8:  # host-only (JAX runs without x64): fold the halves
    return x.reshape(-1).view(np.uint32)
  unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[size]
  if xp is np:
    return x.reshape(-1).view(unsigned).astype(np.uint32)
  return jax.lax.bitcast_convert_type(x.reshape(-1), unsigned).astype(xp.uint32)


def _checksum(x) -> list[int]:
  """Two position-weighted sums of the array's bits, mod 2**32 (order-independent integer
  sums, so the same on every device and chunking; cheap: one pass over the data)."""
  w = _uint32_words(x)
  xp = np if isinstance(w, np.ndarray) else jax.numpy
  i = xp.arange(w.shape[0], dtype=xp.uint32)
  a = xp.sum(w * (i * xp.uint32(2654435761) + xp.uint32(1)), dtype=xp.uint32)
  b = xp.sum((w ^ (w >> 13)) * (i + xp.uint32(0x9E3779B9)), dtype=xp.uint32)
  return [int(a), int(b)]


def population_digest(population) -> str:
  """A hash of the population's contents (every feature value, the client sizes and offsets).

  Returns:
    16 hex digits; equal for equal data however the population is placed.
  """
  try:
    return _population_digest(population)
  except Exception:  # noqa: BLE001 - e.g. arrays spanning processes: a digest never stops a run
    return "unavailable"


def _population_digest(population) -> str:
  h = hashlib.sha256()
  for name in sorted(population.features):
    x = population.features[name]
    h.update(f"{name}:{tuple(np.shape(x))}:{np.dtype(x.dtype).name}".encode())
    h.update(json.dumps(_checksum(x)).encode())
  h.update(np.asarray(population.num_examples).astype(np.int64).tobytes())
  h.update(np.asarray(population.offsets).astype(np.int64).tobytes())
  return h.hexdigest()[:16]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def algorithm_digest(sim, state) -> str:
  """A hash of the round's computation: the traced program of one round (every literal:
  learning rates, clip norms, batch sizes, local steps, server optimizer) and its constants.

  The round is traced with one chunk, no mesh and the default ordering, so the digest does not
  depend on the speed-only settings (chunk size, device count, ``sort_by_size``,
  ``unbatched_single_client``), which do not change results.

  Returns:
    16 hex digits, or ``"unavailable"`` if the round cannot be traced abstractly.
  """
  spec = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)
  cache = _DIGESTS.setdefault(sim, {})
  key = (id(sim.algorithm), id(sim.sampler), str(jax.tree.structure(state)),
         str(jax.tree.leaves(spec(state))), str(jax.tree.leaves(spec(sim.population))))
  if key not in cache:  # one trace per simulation and state layout (~0.5 s on a CPU)
    cache[key] = _trace_digest(sim, state, spec)
  return cache[key]


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trace_digest(sim, state, spec) -> str:
  from fedjax_sim import core

  plan = dataclasses.replace(sim.plan, chunk_size=sim.max_cohort_size, mesh=None,
                             sort_by_size=True, unbatched_single_client=True)  # speed only
  try:
    closed = jax.make_jaxpr(lambda s, p: core.round_step(plan, s, p))(
        spec(state), spec(sim.population))
  except Exception:  # noqa: BLE001 - a digest must never stop a run
    return "unavailable"
  h = hashlib.sha256(_ADDRESS.sub("", str(closed.jaxpr)).encode())
  for c in closed.consts:
    c = np.asarray(c) if not jax.dtypes.issubdtype(getattr(c, "dtype", None),
                                                   jax.dtypes.prng_key) else np.asarray(
        jax.random.key_data(c))
    h.update(f"{c.shape}:{c.dtype}".encode())
    h.update(np.ascontiguousarray(c).tobytes())
  return h.hexdigest()[:16]


def run_id(fp: dict[str, Any], key) -> str:
  """The run's identity: its fingerprint (without ``run_id``) and its run key."""
  body = {k: v for k, v in fp.items() if k not in NOT_COMPARED}
  data = np.asarray(jax.random.key_data(key)).tolist()
  blob = json.dumps([body, data], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- checkpoint directory --------------------------------------------------------------------


def traced_library_versions() -> str:
  """Versions of the libraries whose code is traced into the round besides jax (the optimizers
  and, for flax models, the layers): a digest traced under other versions cannot be compared.

  Returns:
    e.g. ``"optax 0.2.8, flax 0.12.0"``.
  """
  import flax
  import optax

  return f"optax {optax.__version__}, flax {flax.__version__}"


def digests_incomparable(meta: dict[str, Any], fp: dict[str, Any]) -> bool:
  """Whether ``meta``'s algorithm digest was traced by another jax, engine or library version."""
  return (meta.get("digest_jax") != fp.get("digest_jax")
          or meta.get("digest_engine", "1") != fp.get("digest_engine", "1")
          or ("digest_libs" in meta and meta["digest_libs"] != fp.get("digest_libs")))


def _same_but_digest(meta: dict[str, Any], fp: dict[str, Any]) -> bool:
  """Same configuration as ``fp`` except an algorithm digest of another jax / engine version."""
  if not digests_incomparable(meta, fp):
    return False
  skip = set(NOT_COMPARED) | {"algorithm_digest"}
  return all(json.dumps(fp.get(k), sort_keys=True, default=str)
             == json.dumps(meta.get(k), sort_keys=True, default=str)
             for k in set(fp) | set(meta) if k not in skip)


def _steps(directory: str) -> list[int]:
  """Finished checkpoint steps (orbax names a finished step's folder by its number)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _meta(directory: str, step: int) -> dict[str, Any] | None:
  """A step's saved fingerprint (orbax's JSON item), or None if unreadable."""
  path = os.path.join(directory, str(step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _check_writable(directory: str, what: str) -> None:
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{what}={directory!r} is a file, not a directory; pass a directory path.")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{what}={directory!r} cannot be created ({e.strerror}); pass a "
                     "writable directory.") from None
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ValueError(f"{what}={directory!r} is not writable; pass a writable directory.")


def check_savable(state) -> None:
  """Refuses a state orbax cannot save (zero-size leaves), naming the leaf."""
  from fedjax_sim.checkpoint import _to_savable

  for path, x in jax.tree_util.tree_leaves_with_path(_to_savable(state)):
    if np.size(x) == 0:
      raise ValueError(
          f"state{jax.tree_util.keystr(path)} has zero size (shape {np.shape(x)}); "
          "orbax cannot checkpoint zero-size arrays. Remove the empty leaf from params (or "
          "the optimizer state), or run without checkpoint_dir."
      )


def prepare_checkpoint_dir(directory: str, state, fp: dict[str, Any], *,
                           overwrite: bool = False) -> None:
  """Makes ``directory`` safe for this run to save steps after ``state.round`` into.

  Raises:
    ValueError: the directory holds another run's checkpoints (without ``overwrite``), is
      not writable, or the state has a leaf orbax cannot save.
  """
  check_savable(state)
  _check_writable(directory, "checkpoint_dir")
  start = int(state.round)
  steps = _steps(directory)
  if not steps:
    return
  metas = {s: _meta(directory, s) for s in steps}
  foreign = [s for s, m in metas.items()
             if m is not None and m.get("run_id") not in (None, fp["run_id"])]
  older = [s for s in foreign if _same_but_digest(metas[s], fp)]
  if older:  # written by another jax / engine version: its run id cannot be compared
    warnings.warn(f"checkpoint steps {older} in {directory!r} were written by another jax or "
                  "engine version (their algorithm digest cannot be compared); they are taken "
                  "to belong to this run.", stacklevel=3)
    foreign = [s for s in foreign if s not in older]
  if foreign and not overwrite:
    m = metas[foreign[-1]]
    diffs = [k for k in sorted(set(fp) | set(m)) if k not in NOT_COMPARED
             and json.dumps(fp.get(k), sort_keys=True, default=str)
             != json.dumps(m.get(k), sort_keys=True, default=str)]
    what = (f"differences: {', '.join(diffs[:5])}" if diffs else
            "same configuration, another run key (seed)")
    raise ValueError(
        f"checkpoint_dir holds checkpoints of another run (steps {foreign}, run "
        f"{m.get('run_id')}; this run is {fp['run_id']}; {what}) in {directory!r}. Resume it "
        "with sim.restore(...), use a new directory, or pass overwrite=True to delete them."
    )
  if foreign:
    _delete(directory, steps)
    warnings.warn(f"overwrite=True: deleted checkpoint steps {steps} of another run in "
                  f"{directory!r}.", stacklevel=3)
    return
  legacy = [s for s, m in metas.items() if m is not None and "run_id" not in m]
  if legacy:
    warnings.warn(f"checkpoint steps {legacy} in {directory!r} predate run ids; they are taken "
                  "to belong to this run.", stacklevel=3)
  later = [s for s in steps if s > start]
  if later:
    _delete(directory, later)
    warnings.warn(f"this run starts at round {start}: deleted its later checkpoint steps "
                  f"{later} in {directory!r} (a rollback or restart replaces them).",
                  stacklevel=3)


def check_save(directory: str, state, fp: dict[str, Any]) -> None:
  """Checks a manual ``Simulation.save`` before writing: a savable state, a usable directory,
  no other run's checkpoints, no existing step ``state.round``, and no later step (orbax keeps
  the highest steps, so an earlier step saved among later ones would be pruned at once).

  Raises:
    ValueError: naming the problem and the fix.
  """
  check_savable(state)
  _check_writable(directory, "directory")
  step = int(state.round)
  steps = _steps(directory)
  foreign = [s for s in steps if (_meta(directory, s) or {}).get("run_id") not in (
      None, fp["run_id"])]
  if foreign:
    raise ValueError(f"{directory!r} holds checkpoints of another run (steps {foreign}); save "
                     "into a new directory.")
  if step in steps:
    raise ValueError(f"{directory!r} already holds step {step}; restore it, or save into a new "
                     "directory.")
  later = [s for s in steps if s > step]
  if later:
    raise ValueError(f"{directory!r} holds later steps {later} than this state's round {step}; "
                     "orbax keeps the latest steps, so this save would be pruned at once. Save "
                     "into a new directory (or run on from this state: run() replaces them).")


def _delete(directory: str, steps: list[int]) -> None:
  for s in steps:
    shutil.rmtree(os.path.join(directory, str(s)))


# -- log directory ---------------------------------------------------------------------------


def prepare_log_dir(log_dir: str, fp: dict[str, Any], start: int, *,
                    overwrite: bool = False) -> dict[str, Any] | None:
  """Makes ``log_dir`` safe for this run to log rounds after ``start`` into.

  Returns:
    the existing ``config.json`` of this run (to be extended, never replaced), or None.

  Raises:
    ValueError: the directory holds another run's log (without ``overwrite``) or is not
      writable.
  """
  _check_writable(log_dir, "log_dir")
  config_path = os.path.join(log_dir, "config.json")
  metrics_path = os.path.join(log_dir, "metrics.jsonl")
  old = None
  if os.path.exists(config_path):
    try:
      with open(config_path) as f:
        old = json.load(f)
    except ValueError:
      old = {}
  owner = None if old is None else old.get("run_id", old.get("fingerprint", {}).get("run_id"))
  exists = old is not None or os.path.exists(metrics_path)
  if exists and owner is None and old and "fingerprint" in old:
    warnings.warn(f"the log in {log_dir!r} predates run ids; it is taken to be this run's.",
                  stacklevel=3)
    owner = fp["run_id"]
  if (exists and owner != fp["run_id"] and old and "fingerprint" in old
      and _same_but_digest(old["fingerprint"], fp)):
    warnings.warn(f"the log in {log_dir!r} was written by another jax or engine version (its "
                  "algorithm digest cannot be compared); it is taken to be this run's.",
                  stacklevel=3)
    owner = fp["run_id"]
  if exists and owner != fp["run_id"]:
    if not overwrite:
      raise ValueError(
          f"log_dir={log_dir!r} holds the log of another run (run {owner}; this run is "
          f"{fp['run_id']}). Use a new directory, or pass overwrite=True to replace it."
      )
    removed = [n for n in os.listdir(log_dir)
               if n in ("config.json", "metrics.jsonl", "metrics.csv")
               or n.startswith("events.out.tfevents")]
    for n in removed:
      os.remove(os.path.join(log_dir, n))
    warnings.warn(f"overwrite=True: deleted {sorted(removed)} of another run in {log_dir!r}.",
                  stacklevel=3)
    return None
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      lines = f.readlines()
    keep, torn = [], 0
    for ln in lines:
      try:
        row = json.loads(ln) if ln.strip() else None
      except ValueError:  # a row cut short by a kill mid-write: dropped, never a parse error
        row, torn = None, torn + 1
      if isinstance(row, dict) and row.get("round", 0) <= start:
        keep.append(ln)
    if torn:
      warnings.warn(f"{metrics_path}: dropped {torn} unreadable row(s) (a write cut short).",
                    stacklevel=3)
    if len(keep) != len(lines):
      with open(metrics_path, "w") as f:
        f.writelines(keep)
      warnings.warn(f"this run starts at round {start}: dropped {len(lines) - len(keep)} later "
                    f"rows of its metrics.jsonl in {log_dir!r}.", stacklevel=3)
  return old


# -- one run's records -----------------------------------------------------------------------


class RunRecorder:
  """What :meth:`fedjax_sim.Simulation.run` keeps and writes down, block by block.

  On creation it fingerprints the run and prepares its ``checkpoint_dir`` and ``log_dir``
  (refusing what this run may not use, before any round) and, with a checkpoint directory,
  records SIGINT / SIGTERM (:class:`~fedjax_sim.checkpoint.SignalFlag`). Then, after each
  block: :meth:`check_finite`, :meth:`record` (metrics, evaluation, log rows) and
  :meth:`checkpoint` (saves when due; raises ``SimulationInterrupted`` after a signal).
  Everything shown on screen (metrics and eval) lands in the log too.
  """

  def __init__(self, sim, state, num_rounds: int, *, block_size: int, eval_every, eval_fn,
               checkpoint_dir, checkpoint_every, log_dir, tensorboard: bool, delta, accountant,
               overwrite: bool, settings):
    from fedjax_sim import checkpoint as ckpt

    self.start, self.num_rounds, self.done = int(state.round), num_rounds, 0
    self.eval_fn, self.eval_every = eval_fn, eval_every
    self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
    self.blocks: list[dict[str, np.ndarray]] = []
    self.evals: dict[int, dict[str, float]] = {}
    if checkpoint_dir is not None:
      check_savable(state)  # before the fingerprint's trace: the cheap refusal first
    self.fp = ckpt.fingerprint(sim, state) if (checkpoint_dir or log_dir) else None
    if checkpoint_dir is not None:  # everything that could fail at save time: checked now
      prepare_checkpoint_dir(checkpoint_dir, state, self.fp, overwrite=overwrite)
    self.log = None
    if log_dir:
      existing = prepare_log_dir(log_dir, self.fp, self.start, overwrite=overwrite)
      seed_info = {"run_key_data": np.asarray(jax.random.key_data(state.key)).tolist(),
                   "start_round": self.start}
      session = {"num_rounds": num_rounds, "block_size": block_size, "eval_every": eval_every,
                 "checkpoint_every": checkpoint_every, "delta": delta,
                 "accountant": accountant}
      self.log = ckpt.MetricsLog(log_dir, self.fp, seed_info, tensorboard=tensorboard,
                                 existing=existing, settings=settings, session=session)
    self.stop = ckpt.SignalFlag() if checkpoint_dir is not None else None

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
    from fedjax_sim import nonfinite as nf

    bad = nf.first_nonfinite(block)
    if bad is None or policy == "ignore":
      return
    if policy == "warn":
      nf.warn(self.rounds_done, block)
      return
    if self.log is not None and bad:
      self.log.write(self.rounds_done, {k: v[:bad] for k, v in block.items()})
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
    """Keeps the block's metrics, evaluates when due, appends the log rows.

    Returns:
      The evaluation after this block, or None.
    """
    active = len(next(iter(block.values())))
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
      self.log.write(self.rounds_done - active, logged)
    return evals

  def checkpoint(self, state, active: int) -> None:
    """Saves the state when a checkpoint is due (or a signal arrived); then raises
    ``SimulationInterrupted`` if one did. A failed save raises :class:`CheckpointSaveError`
    holding the state (the donated input is gone)."""
    from fedjax_sim import checkpoint as ckpt

    if self.checkpoint_dir is None:
      return
    at, every = self.rounds_done, self.checkpoint_every
    interrupted = self.stop.raised
    crossed = every is None or at // every > (at - active) // every
    if self.done == self.num_rounds or interrupted or crossed:
      try:
        ckpt.save(self.checkpoint_dir, state, self.fp)
      except Exception as e:  # noqa: BLE001 - the donated state must not be lost
        raise CheckpointSaveError(
            state, self.metrics(),
            f"saving checkpoint step {at} in {self.checkpoint_dir!r} failed "
            f"({type(e).__name__}: {e}). The state after round {at} is this "
            "exception's .state (sim.save(e.state, other_dir) keeps it)."
        ) from e
    if interrupted:
      raise ckpt.SimulationInterrupted(
          state, self.metrics(),
          f"{interrupted} received: stopped after round {at}, checkpoint saved in "
          f"{self.checkpoint_dir!r} (resume with sim.restore)."
      )

  def close(self) -> None:
    """Restores the signal handlers (never leave SIGINT swallowed in a notebook kernel)."""
    if self.stop is not None:
      self.stop.restore()
