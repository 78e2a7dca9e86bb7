"""One place for argument checks: each raises a clear ``ValueError``/``TypeError`` that names the
argument and the value, before anything is traced or compiled."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def traced(value: Any) -> bool:
  """True for a value traced by JAX (a hyper-parameter swept by ``fs.sweep``), whose checks
  ran on every concrete lane value before tracing."""
  return isinstance(value, jax.core.Tracer)


def _number(name: str, value: Any, what: str) -> float:
  if isinstance(value, bool):
    raise TypeError(f"{name} must be {what}; got the bool {value!r}.")
  try:
    v = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be {what}; got {value!r}.") from None
  if v.ndim != 0 or not np.isfinite(v):
    raise ValueError(f"{name} must be {what}; got {value!r}.")
  return float(v)


def positive(name: str, value: Any) -> float:
  """A finite number > 0."""
  if traced(value):
    return value
  v = _number(name, value, "a finite number > 0")
  if not v > 0:
    raise ValueError(f"{name} must be > 0 (a finite number); got {value!r}.")
  return v


def non_negative(name: str, value: Any) -> float:
  """A finite number >= 0."""
  if traced(value):
    return value
  v = _number(name, value, "a finite number >= 0")
  if not v >= 0:
    raise ValueError(f"{name} must be >= 0 (a finite number); got {value!r}.")
  return v


def probability(name: str, value: Any) -> float:
  """A number in [0, 1]."""
  if traced(value):
    return value
  v = _number(name, value, "a probability in [0, 1]")
  if not 0 <= v <= 1:
    raise ValueError(f"{name} must lie in [0, 1]; got {value!r}.")
  return v


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
  """A Python/NumPy int >= 1 (not a bool)."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {value!r}.")
  return int(value)


def non_negative_int(name: str, value: Any) -> int:
  """A Python/NumPy int >= 0 (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
  return int(value)


def per_client(name: str, values: Any, *, max_value: float | None = None) -> np.ndarray:
  """A 1-D array of finite, non-negative per-client values (at most ``max_value``)."""
  a = np.asarray(values, dtype=np.float64)
  if a.ndim != 1:
    raise ValueError(f"{name} must be 1-D with one entry per client; got shape {a.shape}.")
  if a.size == 0 or not np.all(np.isfinite(a)) or a.min() < 0:
    raise ValueError(f"{name} must be finite and non-negative, one entry per client.")
  if max_value is not None and a.max() > max_value:
    raise ValueError(f"{name} must lie in [0, {max_value:g}]; got values up to {a.max():g}.")
  return a


def same_length(name: str, arrays: dict[str, Any]) -> int:
  """All arrays share one leading length; returns it."""
  lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
  if None in lengths.values() or len(set(lengths.values())) != 1:
    raise ValueError(f"{name}: every feature needs the same number of examples (leading "
                     f"dimension); got {lengths}.")
  return next(iter(lengths.values()))


def not_donated(name: str, tree: Any) -> None:
  """Refuses a pytree whose arrays were donated to (consumed by) an earlier compiled call."""
  if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree)):
    raise ValueError(
        f"{name} was donated to an earlier sim.run / sim.round, which consumed its arrays; pass "
        f"the {name} that call returned ({name}, metrics = sim.run({name}, ...))."
    )


def checkpointable(name: str, tree: Any) -> None:
  """Refuses, before any round runs, a state orbax cannot save: zero-size arrays."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if np.size(leaf) == 0:
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} has zero size {np.shape(leaf)}; checkpoints "
          "(orbax) cannot store zero-size arrays. Drop that parameter from the model, or run "
          "without checkpoint_dir."
      )
