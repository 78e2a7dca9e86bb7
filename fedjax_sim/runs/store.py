"""Orbax I/O: a :class:`~fedjax_sim.ServerState` and its fingerprint, one step per round.

Only reading and writing: which steps a run may read or replace is decided by
:mod:`fedjax_sim.runs.ownership`, whether a fingerprint matches by
:mod:`fedjax_sim.runs.identity`. This module imports nothing of the package.

orbax writes each step to a temporary directory and renames it when complete, so an interrupted
save never replaces the last good checkpoint; ``max_to_keep`` earlier steps are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["from_savable", "read_meta", "read_state", "save", "steps", "to_savable"]


def to_savable(state):
  """The state with the typed key as raw key data (orbax stores plain arrays).

  Returns:
    A copy of ``state`` whose ``key`` is ``jax.random.key_data(state.key)``.
  """
  return dataclasses.replace(state, key=jax.random.key_data(state.key))


def from_savable(saved, impl_template):
  """Inverse of :func:`to_savable`: wraps the key data with ``impl_template``'s implementation.

  Returns:
    The state with a typed key.
  """
  return dataclasses.replace(
      saved, key=jax.random.wrap_key_data(jnp.asarray(saved.key),
                                          impl=jax.random.key_impl(impl_template)))


def _manager(directory: str, max_to_keep: int = 3):
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
      os.path.abspath(directory),
      # Synchronous: save() waits for every write anyway, and an async save that fails (the
      # directory gone or unwritable mid-run) leaves orbax's non-daemon signalling threads waiting
      # for a signal that never comes, which kept the process from exiting for orbax's 300 s
      # coordination timeout.
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False),
  )


def save(directory: str, state, fp: dict[str, Any], *, max_to_keep: int = 3) -> int:
  """Saves ``state`` as step ``state.round`` under ``directory`` with its fingerprint ``fp``.

  Returns:
    The step written.
  """
  import orbax.checkpoint as ocp

  step = int(state.round)
  mngr = _manager(directory, max_to_keep)
  tree = jax.tree.map(np.asarray, to_savable(state))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                          meta=ocp.args.JsonSave(fp)), force=True)
  mngr.wait_until_finished()
  mngr.close()
  return step


def steps(directory: str) -> list[int]:
  """Finished checkpoint steps (orbax names a finished step's folder by its number).

  Returns:
    The steps, sorted; ``[]`` when ``directory`` does not exist.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def meta_file(directory: str, step: int) -> dict[str, Any] | None:
  """A step's saved fingerprint read straight from orbax's JSON item, or None if unreadable.

  Returns:
    The fingerprint dict or None.
  """
  path = os.path.join(directory, str(step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _unreadable(directory, step, all_steps, e) -> ValueError:
  return ValueError(
      f"checkpoint step {step} in {directory!r} cannot be read ({type(e).__name__}: {e}); "
      f"other steps: {[s for s in all_steps if s != step]} (pass step=...).")


def pick_step(directory: str, step: int | None) -> tuple[int, list[int]]:
  """The step to restore (the latest when ``step`` is None) and all finished steps.

  Returns:
    ``(step, steps)``.

  Raises:
    FileNotFoundError: no checkpoint (or no such step) in ``directory``.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory!r}.")
  mngr = _manager(directory)
  all_steps = sorted(mngr.all_steps())
  mngr.close()
  if not all_steps:
    raise FileNotFoundError(f"no checkpoint in {directory!r}.")
  step = all_steps[-1] if step is None else int(step)
  if step not in all_steps:
    raise FileNotFoundError(f"no checkpoint step {step} in {directory!r}; steps: {all_steps}.")
  return step, all_steps


def read_meta(directory: str, step: int, all_steps: list[int]) -> dict[str, Any]:
  """The fingerprint saved with ``step`` (through orbax).

  Returns:
    The fingerprint dict.

  Raises:
    ValueError: it cannot be read (the other steps are named).
  """
  import orbax.checkpoint as ocp

  mngr = _manager(directory)
  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001
    raise _unreadable(directory, step, all_steps, e) from e
  finally:
    mngr.close()


def read_state(directory: str, step: int, all_steps: list[int], template_state):
  """The state saved with ``step``, in the structure of ``template_state``.

  Returns:
    The restored state (typed key of ``template_state``'s implementation).

  Raises:
    ValueError: it cannot be read (the other steps are named).
  """
  import orbax.checkpoint as ocp

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                          to_savable(template_state))
  mngr = _manager(directory)
  try:
    saved = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # noqa: BLE001
    raise _unreadable(directory, step, all_steps, e) from e
  finally:
    mngr.close()
  saved = jax.tree.map(jnp.asarray, saved)
  return from_savable(saved, template_state.key)
