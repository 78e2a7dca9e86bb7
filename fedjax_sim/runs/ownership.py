"""Run-directory integrity: a run owns its checkpoint and log directories.

Two runs with the same identity (:mod:`fedjax_sim.runs.identity`: configuration fingerprint
and run key) compute the same rounds bit for bit, so they may share a directory; any other run
may not. Before the first round, :meth:`fedjax_sim.Simulation.run` checks its
``checkpoint_dir`` and ``log_dir`` with :func:`prepare_checkpoint_dir` and
:func:`prepare_log_dir`:

* a directory holding another run's checkpoints or log is refused (the differences are named)
  unless ``overwrite=True``, which deletes them explicitly and says so;
* the same run's checkpoints and log rows *after* the starting round (a rollback with
  ``restore(step=k)``, or a restart from round 0) are deleted with a warning naming them, so no
  step collides and ``restore()`` never returns a stale later round;
* anything that would fail at save time (an unwritable directory, a zero-size leaf that orbax
  cannot store) is refused before any round runs.

Checkpoints written before run ids existed (no ``run_id`` in their fingerprint) are accepted with
a warning; so are those whose algorithm digest another jax / engine version traced.
:func:`restore` reads a step back only when its fingerprint matches.

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

import json
import os
import shutil
import socket
import uuid
import warnings
from typing import Any

import jax
import numpy as np

from fedjax_sim import _validation
from fedjax_sim.runs import identity, store

__all__ = ["OWNER_FILE", "check_save", "check_savable", "claim", "claimed_by_other",
           "prepare_checkpoint_dir", "prepare_log_dir", "restore"]

#: The claim on a checkpoint directory: written atomically (complete, or not at all) before the
#: run's first round, checked before every save.
OWNER_FILE = ".fedjax_sim_owner.json"


def check_writable(directory: str, what: str) -> None:
  """Refuses a path that is a file, cannot be created or is not writable, naming ``what``."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{what}={directory!r} is a file, not a directory; pass a directory path.")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{what}={directory!r} cannot be created ({e.strerror}); pass a "
                     "writable directory.") from None
  _validation.writable_directory(directory, what)  # a probe file: root passes os.access


def check_savable(state) -> None:
  """Refuses a state orbax cannot save (zero-size leaves), naming the leaf."""
  for path, x in jax.tree_util.tree_leaves_with_path(store.to_savable(state)):
    if np.size(x) == 0:
      raise ValueError(
          f"state{jax.tree_util.keystr(path)} has zero size (shape {np.shape(x)}); "
          "orbax cannot checkpoint zero-size arrays. Remove the empty leaf from params (or "
          "the optimizer state), or run without checkpoint_dir."
      )


def _delete(directory: str, steps: list[int]) -> None:
  for s in steps:
    shutil.rmtree(os.path.join(directory, str(s)))


# -- claims ------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
  """The JSON object at ``path``; None if there is no file, ``{}`` if it is unreadable."""
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def _ours(record: dict[str, Any] | None, fp: dict[str, Any]) -> bool:
  """Whether a claim record (``run_id`` and ``fingerprint``) is this run's (or this run's under
  another jax / engine version); an unreadable record is nobody's provably."""
  if not record or record.get("run_id") is None:
    return False
  return identity.compare(record.get("fingerprint", {}), fp,
                          saved_run_id=record["run_id"]).owner in ("same", "older")


def _create_exclusively(path: str, record: dict[str, Any], replace: bool) -> bool:
  """Writes ``record`` to ``path`` whole: a new file (False if one exists), or replacing it."""
  tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=str)
  try:
    if replace:
      os.replace(tmp, path)
      return True
    try:
      os.link(tmp, path)  # atomic, and fails if the path exists
    except FileExistsError:
      return False
    except OSError:  # a file system without hard links: an exclusive create instead
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, default=str)
    return True
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def claim(directory: str, fp: dict[str, Any], *, what: str, overwrite: bool = False) -> None:
  """Claims ``directory`` for the run ``fp`` (:data:`OWNER_FILE`, created atomically).

  A directory claimed by this run (another session of it) stays claimed; one claimed by
  another run is refused, or with ``overwrite`` taken over (with a warning).

  Raises:
    ValueError: another run holds the claim (its run id is named).
  """
  path = os.path.join(directory, OWNER_FILE)
  record = {"run_id": fp["run_id"], "pid": os.getpid(), "host": socket.gethostname(),
            "fingerprint": fp}
  if _create_exclusively(path, record, replace=False):
    return
  held = _read_json(path)
  if held is not None and not _ours(held, fp):
    if not overwrite:
      raise ValueError(
          f"{what}={directory!r} is claimed by another run (run {held.get('run_id', '?')}, "
          f"process {held.get('pid', '?')} on {held.get('host', '?')}; this run is "
          f"{fp['run_id']}): two runs must not share a directory. Use a new directory, or "
          "pass overwrite=True to take it over (the other run then stops at its next save)."
          + identity.settings_hint(held.get("fingerprint") or {}, fp))
    warnings.warn(f"overwrite=True: took {what}={directory!r} over from run "
                  f"{held.get('run_id', '?')}.", stacklevel=4)
  _create_exclusively(path, record, replace=True)


def claimed_by_other(directory: str, fp: dict[str, Any], *,
                     name: str = OWNER_FILE) -> str | None:
  """Checks, before a save, that ``directory`` is still this run's (its :data:`OWNER_FILE`,
  or with ``name="config.json"`` a log directory's config).

  Returns:
    None if it is; otherwise the other run's id (``"?"`` if its record is unreadable).
  """
  held = _read_json(os.path.join(directory, name))
  if held is None or _ours(held, fp):
    return None
  return str(held.get("run_id", "?"))


def prepare_checkpoint_dir(directory: str, state, fp: dict[str, Any], *,
                           overwrite: bool = False) -> None:
  """Makes ``directory`` safe for this run to save steps after ``state.round`` into.

  Raises:
    ValueError: the directory holds another run's checkpoints (without ``overwrite``), is
      not writable, or the state has a leaf orbax cannot save.
  """
  check_savable(state)
  check_writable(directory, "checkpoint_dir")
  start = int(state.round)
  steps = store.steps(directory)
  if not steps:
    claim(directory, fp, what="checkpoint_dir", overwrite=overwrite)
    return
  metas = {s: store.meta_file(directory, s) for s in steps}
  seen = {s: identity.compare(m, fp) for s, m in metas.items() if m is not None}
  older = [s for s, c in seen.items() if c.owner == "older"]
  if older:  # written by another jax / engine version: its run id cannot be compared
    warnings.warn(f"checkpoint steps {older} in {directory!r} were written by another jax or "
                  "engine version (their algorithm digest cannot be compared); they are taken "
                  "to belong to this run.", stacklevel=3)
  foreign = [s for s, c in seen.items() if c.owner == "other"]
  if foreign and not overwrite:
    m, diffs = metas[foreign[-1]], seen[foreign[-1]].diffs
    what = (f"differences: {', '.join(diffs[:5])}" if diffs else
            "same configuration, another run key (seed)")
    raise ValueError(
        f"checkpoint_dir holds checkpoints of another run (steps {foreign}, run "
        f"{m.get('run_id')}; this run is {fp['run_id']}; {what}) in {directory!r}. Resume it "
        "with sim.restore(...), use a new directory, or pass overwrite=True to delete them."
        + identity.settings_hint(m, fp))
  unproven = [s for s in steps if s > start and metas[s] is None]
  if unproven and not overwrite:  # never delete what cannot be proven to be this run's
    raise ValueError(
        f"checkpoint_dir={directory!r} holds steps {unproven} after this run's start (round "
        f"{start}) whose metadata cannot be read, so they cannot be proven to be this run's and "
        "are not deleted. Move them away, use a new directory, or pass overwrite=True to "
        "delete them.")
  claim(directory, fp, what="checkpoint_dir", overwrite=overwrite)
  if foreign:
    _delete(directory, steps)
    warnings.warn(f"overwrite=True: deleted checkpoint steps {steps} of another run in "
                  f"{directory!r}.", stacklevel=3)
    return
  legacy = [s for s, c in seen.items() if c.owner == "legacy"]
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
  check_writable(directory, "directory")
  step = int(state.round)
  steps = store.steps(directory)
  metas = {s: store.meta_file(directory, s) or {} for s in steps}
  foreign = [s for s in steps if identity.compare(metas[s], fp).owner not in ("same", "legacy")]
  if foreign:
    raise ValueError(f"{directory!r} holds checkpoints of another run (steps {foreign}); save "
                     "into a new directory." + identity.settings_hint(metas[foreign[-1]], fp))
  if step in steps:
    raise ValueError(f"{directory!r} already holds step {step}; restore it, or save into a new "
                     "directory.")
  later = [s for s in steps if s > step]
  if later:
    raise ValueError(f"{directory!r} holds later steps {later} than this state's round {step}; "
                     "orbax keeps the latest steps, so this save would be pruned at once. Save "
                     "into a new directory (or run on from this state: run() replaces them).")
  claim(directory, fp, what="directory")


def restore(directory: str, template_state, fp: dict[str, Any], *, step: int | None = None):
  """Restores the latest (or ``step``) checkpoint into the structure of ``template_state``.

  Returns:
    The restored state.

  Raises:
    FileNotFoundError: no checkpoint in ``directory``.
    ValueError: the checkpoint comes from another configuration (the differences are named)
      or cannot be read (the steps still available are named).
  """
  step, steps = store.pick_step(directory, step)
  meta = store.read_meta(directory, step, steps)
  seen = identity.compare(meta, fp)
  if seen.missing:
    warnings.warn(f"checkpoint step {step} in {directory!r} was written by an older version "
                  f"without {seen.missing}; restoring it without those checks.", stacklevel=3)
  if "algorithm_digest" in meta and "algorithm_digest" in seen.diffs and seen.incomparable:
    warnings.warn(f"checkpoint step {step} was written with jax {meta.get('digest_jax')}, "
                  f"engine {meta.get('digest_engine', '1')} and {meta.get('digest_libs', '?')} "
                  f"(now {fp.get('digest_jax')}, {fp.get('digest_engine')} and "
                  f"{fp.get('digest_libs')}): the algorithm's hyper-parameters cannot be "
                  "compared; check them yourself.", stacklevel=3)
  diffs = seen.config_diffs
  if set(identity.JAX_SETTINGS) & set(diffs):
    raise ValueError(f"checkpoint step {step} in {directory!r} comes from another run."
                     + identity.settings_hint(meta, fp))
  if diffs:
    detail = "; ".join(f"{k}: checkpoint {meta.get(k)!r} vs this run {fp.get(k)!r}"
                       for k in diffs[:4])
    raise ValueError(
        f"checkpoint step {step} in {directory!r} comes from another configuration ({detail}). "
        "Resume with the same algorithm and hyper-parameters (algorithm_digest: client and "
        "server optimizers, clip, batch size, local work), population data "
        "(population_digest), sampler and model, or use a new directory."
    )
  return store.read_state(directory, step, steps, template_state)


def _claim_log(log_dir: str, fp: dict[str, Any]) -> None:
  """Claims a log directory by creating its ``config.json`` atomically (a claim record that
  :class:`~fedjax_sim.runs.log.MetricsLog` completes); refuses if another run got there first."""
  path = os.path.join(log_dir, "config.json")
  if _create_exclusively(path, {"run_id": fp["run_id"], "fingerprint": fp}, replace=False):
    return
  held = _read_json(path)
  if held is not None and not _ours(held, fp):
    raise ValueError(
        f"log_dir={log_dir!r} was claimed by another run (run {held.get('run_id', '?')}; this "
        f"run is {fp['run_id']}) while this run was starting: two runs must not share a "
        "directory. Use a new directory."
        + identity.settings_hint(held.get("fingerprint") or {}, fp))


def prepare_log_dir(log_dir: str, fp: dict[str, Any], start: int, *,
                    overwrite: bool = False) -> dict[str, Any] | None:
  """Makes ``log_dir`` safe for this run to log rounds after ``start`` into.

  Returns:
    the existing ``config.json`` of this run (to be extended, never replaced), or None.

  Raises:
    ValueError: the directory holds another run's log (without ``overwrite``) or is not
      writable.
  """
  check_writable(log_dir, "log_dir")
  config_path = os.path.join(log_dir, "config.json")
  metrics_path = os.path.join(log_dir, "metrics.jsonl")
  old = None
  if os.path.exists(config_path):
    try:
      with open(config_path) as f:
        old = json.load(f)
    except ValueError as e:  # a torn or edited file: whose log this is cannot be known
      if not overwrite:
        raise ValueError(
            f"{config_path} is corrupt (not valid JSON: {e}), so the log in log_dir={log_dir!r} "
            "cannot be shown to be this run's. Repair or remove the file, use a new directory, "
            "or pass overwrite=True to replace the log.") from None
      old = {}
  owner = None if old is None else old.get("run_id", old.get("fingerprint", {}).get("run_id"))
  exists = old is not None or os.path.exists(metrics_path)
  if exists and old and "fingerprint" in old:
    seen = identity.compare(old["fingerprint"], fp, saved_run_id=owner)
    if seen.owner == "legacy":
      warnings.warn(f"the log in {log_dir!r} predates run ids; it is taken to be this run's.",
                    stacklevel=3)
      owner = fp["run_id"]
    elif seen.owner == "older":
      warnings.warn(f"the log in {log_dir!r} was written by another jax or engine version (its "
                    "algorithm digest cannot be compared); it is taken to be this run's.",
                    stacklevel=3)
      owner = fp["run_id"]
  if exists and owner != fp["run_id"]:
    if not overwrite:
      raise ValueError(
          f"log_dir={log_dir!r} holds the log of another run (run {owner}; this run is "
          f"{fp['run_id']}). Use a new directory, or pass overwrite=True to replace it."
          + identity.settings_hint((old or {}).get("fingerprint") or {}, fp))
    removed = [n for n in os.listdir(log_dir)
               if n in ("config.json", "metrics.jsonl", "metrics.csv")
               or n.startswith("events.out.tfevents")]
    for n in removed:
      os.remove(os.path.join(log_dir, n))
    warnings.warn(f"overwrite=True: deleted {sorted(removed)} of another run in {log_dir!r}.",
                  stacklevel=3)
    _claim_log(log_dir, fp)
    return None
  if old is None:
    _claim_log(log_dir, fp)
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
