"""One place for argument checks: each raises a clear ``ValueError``/``TypeError`` that names the
argument and the value, before anything is traced or compiled."""

from __future__ import annotations

import difflib
import numbers
import os
import tempfile
from typing import Any

import jax
import numpy as np


def traced(value: Any) -> bool:
  """True for a value traced by JAX (a hyper-parameter swept by ``fs.sweep``), whose checks
  ran on every concrete lane value before tracing."""
  return isinstance(value, jax.core.Tracer)


def _range_text(low, high, low_open, high_open) -> str:
  if low is None and high is None:
    return "be a finite number"
  if high is None:
    return f"be {'>' if low_open else '>='} {low:g} (a finite number)"
  if low is None:
    return f"be {'<' if high_open else '<='} {high:g} (a finite number)"
  return f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def hyperparameter(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
  """The one check of a float hyper-parameter of an algorithm, aggregator or optimizer factory
  (learning rates, momenta, mu, clip norms, noise multipliers, weight caps, ...).

  Accepted: a Python int/float, a NumPy number or 0-d real array, or a 0-d real ``jax.Array``.
  A concrete value must be finite and lie between ``low`` and ``high`` (each bound included
  unless ``low_open`` / ``high_open``). A traced ``jax.Array`` (``fs.sweep`` builds every lane
  with traced float32 scalars, after building it once with the concrete values, which meet this
  check) passes with only its shape and dtype checked, since its value is not known. Refused
  with a ``TypeError``: a bool, a string (``"0.1"`` is text: YAML reads ``1e-5`` and quoted
  numbers as text), a complex number, a sequence, None.

  Args:
    name: the argument's name, for the message.
    value: the value passed.
    low: the lower bound (None: unbounded).
    high: the upper bound (None: unbounded).
    low_open: exclude ``low`` itself.
    high_open: exclude ``high`` itself.

  Returns:
    the value as a Python float, or the traced array itself.

  Examples:
    >>> from fedjax_sim import _validation
    >>> _validation.hyperparameter("mu", 0.1, low=0)
    0.1
    >>> _validation.hyperparameter("mu", "0.1", low=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: mu must be >= 0 (a finite number); got the string '0.1'. Pass the number itself...
  """
  rule = f"{name} must {_range_text(low, high, low_open, high_open)}"
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{rule}; got the bool {value!r}.")
  if isinstance(value, (str, bytes)):
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    raise TypeError(f"{rule}; got the string {value!r}. Pass the number itself "
                    f"({name}={text.strip()}), not text.")
  if isinstance(value, (jax.Array, np.ndarray)):
    if np.ndim(value) != 0:
      raise ValueError(f"{rule}, one scalar; got an array of shape {tuple(np.shape(value))}.")
    if np.dtype(value.dtype).kind not in "iuf":
      raise TypeError(f"{rule}; got an array of dtype {value.dtype}.")
    if traced(value):
      return value
    v = float(value)
  elif isinstance(value, numbers.Real):  # int, float, NumPy numbers, Fraction
    try:
      v = float(value)
    except OverflowError:  # an int beyond float range
      raise ValueError(f"{rule}; got {value!r}.") from None
  else:
    raise TypeError(f"{rule}; got {type(value).__name__} {value!r}.")
  if not (np.isfinite(v) and (low is None or (v > low if low_open else v >= low))
          and (high is None or (v < high if high_open else v <= high))):
    raise ValueError(f"{rule}; got {value!r}.")
  return v


def positive(name: str, value: Any) -> float:
  """A finite number > 0 (:func:`hyperparameter`)."""
  return hyperparameter(name, value, low=0, low_open=True)


def non_negative(name: str, value: Any) -> float:
  """A finite number >= 0 (:func:`hyperparameter`)."""
  return hyperparameter(name, value, low=0)


def probability(name: str, value: Any) -> float:
  """A number in [0, 1] (:func:`hyperparameter`)."""
  return hyperparameter(name, value, low=0, high=1)


def learning_rate(name: str, value: Any) -> Any:
  """A learning rate: a number > 0 (checked by :func:`hyperparameter`) or an optax schedule
  (a callable ``step -> rate``, passed through).

  Returns:
    the schedule itself, or the rate as a float (a traced array itself).
  """
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
    return value
  return positive(name, value)


def memory_budget(value: Any) -> int | None:
  """``Simulation(memory_budget=)``: bytes for the client pass, a Python/NumPy int >= 1, or
  None (automatic: a fraction of the device memory).

  Returns:
    the budget as an int, or None.
  """
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    hint = ""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and value >= 1:
      hint = f" (memory_budget={int(value)}, or e.g. 2 * 2**30 for 2 GiB)"
    raise TypeError(
        f"memory_budget must be an int number of bytes >= 1{hint}, or None for the automatic "
        f"budget; got {type(value).__name__} {value!r}."
    )
  if value < 1:
    raise ValueError(
        f"memory_budget must be >= 1 byte (e.g. 2 * 2**30 for 2 GiB), or None for the "
        f"automatic budget; got {value!r}."
    )
  return int(value)


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


def writable_directory(directory: str, what: str) -> None:
  """Refuses a directory in which a file cannot be created, by creating and removing one.

  ``os.access`` is not enough: for root it answers "writable" from the permission bits alone,
  also where a write fails (a process without ``CAP_DAC_OVERRIDE``, ``/sys``, a read-only
  bind mount in some sandboxes); a run would then fail only at its first save.
  """
  try:
    fd, probe = tempfile.mkstemp(prefix=".fedjax_sim_probe_", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{what}={directory!r} is not writable (creating a file in it failed: "
                     f"{e.strerror or e}); pass a writable directory.") from None


def boolean(name: str, value: Any) -> bool:
  """A Python/NumPy bool; text such as ``"false"`` (truthy!) and numbers are refused."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  got = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
  raise TypeError(f"{name} must be true or false (a bool, unquoted in YAML); got {got}.")


def text(name: str, value: Any, *, allow_none: bool = False) -> str | None:
  """A non-empty string (a path, a name)."""
  if value is None and allow_none:
    return None
  if not isinstance(value, str) or not value:
    raise TypeError(f"{name} must be a non-empty string; got {type(value).__name__} {value!r}.")
  return value


def choice(name: str, value: Any, options) -> Any:
  """One of ``options`` (a registry's names); the message suggests the nearest."""
  if not isinstance(value, str) or value not in options:
    close = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{name}={value!r} is not one of {list(options)}.{hint}")
  return value


def positive_ints(name: str, value: Any) -> list[int]:
  """A non-empty list of ints >= 1 (layer widths)."""
  if not isinstance(value, (list, tuple)):
    example = f"[{value}]" if isinstance(value, int) and not isinstance(value, bool) else "[64]"
    raise TypeError(f"{name} must be a list of positive ints (e.g. {example}); got "
                    f"{type(value).__name__} {value!r}.")
  if not value or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                      for v in value):
    raise ValueError(f"{name} must be a non-empty list of positive ints (e.g. [64]); got "
                     f"{value!r}.")
  return [int(v) for v in value]


def seed(name: str, value: Any) -> int:
  """An int seed in [0, 2**32) (what ``jax.random.key`` takes without wrapping)."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
      or not 0 <= value < 2**32):
    raise ValueError(f"{name} must be an int in [0, 2**32); got {value!r}.")
  return int(value)
