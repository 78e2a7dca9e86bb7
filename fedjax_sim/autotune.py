"""A measured chunk size: time a few candidates, keep the fastest, cache the choice on disk.

The automatic chunk of :func:`fedjax_sim.memory.auto_chunk_size` is a model (memory bound, and
on CPU a FLOPs-per-step rule). A model can be wrong by a cliff: on the H100 the EMNIST-CNN at
cohort 1000 ran at 113 client-updates/s at the automatic chunk 334 and ~1,100 at chunks 20-150
(``/work/shared/reference/measured-2026-12.md``). :func:`tune_chunk_size` measures instead:
each candidate is built, compiled and run once, then timed over a few rounds; the fastest
(by time per round) wins. Padding is computed exactly on the host (:func:`padding_factor`) and
recorded beside each time, so a choice can be explained.

The choice is cached as JSON per key (model signature, cohort, device kind, jax version:
:func:`cache_key`). A cache file that cannot be read, or whose entry was written by another jax
version, is ignored with a warning and the candidates are measured again.

:class:`ChunkChoice` is a plain value (``as_dict()``) for a run's ``config.json``.

Example:
  >>> import fedjax_sim as fs
  >>> clock = iter(range(100))
  >>> choice = fs.autotune.tune_chunk_size(
  ...     [1, 2], lambda c: (lambda: None), timer=lambda: float(next(clock)), timed_calls=1)
  >>> choice.choice in (1, 2)
  True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.memory import padding_factor  # its home is memory; re-exported here

__all__ = ["AutoChunk", "ChunkChoice", "cache_key", "cache_path", "candidates_for", "chunk_request",
           "cohort_steps", "padding_factor", "tune_chunk_size", "tune_simulation"]

#: The most candidates one tuning may time (each is a compile).
MAX_CANDIDATES = 8


@dataclasses.dataclass(frozen=True)
class ChunkChoice:
  """The outcome of :func:`tune_chunk_size`.

  Attributes:
    choice: the chunk size chosen.
    candidates: the candidates, in the order given.
    seconds: seconds per timed call for each candidate (None where skipped by the time budget).
    compile_seconds: compile + first call for each candidate (None where skipped).
    padding: exact padding factor of each candidate (None when no step counts were given).
    from_cache: whether the choice was read from the cache instead of measured.
    key: the cache key.
  """

  choice: int
  candidates: tuple[int, ...]
  seconds: tuple[float | None, ...]
  compile_seconds: tuple[float | None, ...]
  padding: tuple[float | None, ...]
  from_cache: bool = False
  key: str = ""

  def as_dict(self) -> dict[str, Any]:
    """The choice as JSON-able values (for ``config.json``)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


def cache_key(signature: Any, device_kind: str | None = None) -> str:
  """A cache key from a model/workload ``signature`` (any ``repr``-able value), the device kind
  (default: the first device's) and the jax version."""
  kind = device_kind or jax.devices()[0].device_kind
  digest = hashlib.sha256(repr(signature).encode()).hexdigest()[:16]
  return f"{digest}|{kind}|jax{jax.__version__}"


def _read_cache(path: str, key: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
    if not isinstance(data, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    warnings.warn(f"chunk-size cache {path!r} is unreadable ({e}); measuring again", stacklevel=3)
    return None
  entry = data.get(key)
  if entry is None:
    prefix = key.rsplit("|", 1)[0] + "|"
    other = [k for k in data if k.startswith(prefix)]
    if other:
      warnings.warn(f"chunk-size cache {path!r} holds this model from another jax version "
                    f"({other[0].rsplit('|', 1)[1]}, now jax{jax.__version__}); measuring again",
                    stacklevel=3)
    return None
  try:
    choice = ChunkChoice(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
    int(choice.choice)
  except (TypeError, ValueError) as e:
    warnings.warn(f"chunk-size cache {path!r}: entry {key!r} is malformed ({e}); measuring again",
                  stacklevel=3)
    return None
  return choice


def _write_cache(path: str, key: str, choice: ChunkChoice) -> None:
  data = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        data = json.load(f)
      if not isinstance(data, dict):
        data = {}
    except (OSError, ValueError):
      data = {}
  data[key] = choice.as_dict()
  tmp = f"{path}.tmp{os.getpid()}"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def tune_chunk_size(candidates: Sequence[int], build: Callable[[int], Callable[[], Any]], *,
                    steps: Sequence[int] | None = None, max_chunk: int | None = None,
                    timed_calls: int = 2, time_budget_s: float = 60.0,
                    cache_path: str | None = None, key: str = "",
                    timer: Callable[[], float] = time.perf_counter) -> ChunkChoice:
  """Times each candidate chunk size and returns the fastest.

  For each candidate (in order): ``run = build(chunk)``; ``run()`` once (compile + first call,
  timed as ``compile_seconds``), then ``timed_calls`` calls of ``run()`` (each must block until
  its result is ready). Once ``time_budget_s`` is spent, the remaining candidates are skipped
  (at least one is always measured). Ties go to the smaller chunk (less memory).

  Args:
    candidates: chunk sizes to try (1 to :data:`MAX_CANDIDATES` of them, each >= 1).
    build: ``chunk -> run``, where ``run()`` runs one timed unit (e.g. a round) and blocks.
    steps: per-client local step counts of a representative cohort, for the recorded exact
      padding (:func:`padding_factor`).
    max_chunk: the largest chunk memory allows (e.g. :func:`fedjax_sim.memory.auto_chunk_size`
      on an accelerator); a candidate above it is an error.
    timed_calls: timed calls per candidate after the first.
    time_budget_s: wall-clock budget for the whole tuning, in seconds.
    cache_path: a JSON file to read the choice from / write it to, or None for no cache.
    key: the cache key (:func:`cache_key`); required with ``cache_path``.
    timer: the clock (injectable for tests).

  Returns:
    A :class:`ChunkChoice`.

  Raises:
    ValueError: empty, too many, non-positive or over-``max_chunk`` candidates; a cache path
      without a key.
  """
  cands = tuple(int(c) for c in candidates)
  if not cands:
    raise ValueError("candidates is empty: give at least one chunk size, e.g. candidates=[1, 8]")
  if len(cands) > MAX_CANDIDATES:
    raise ValueError(f"candidates has {len(cands)} entries; at most {MAX_CANDIDATES} are timed "
                     "(each is a compile): pass fewer")
  if min(cands) < 1:
    raise ValueError(f"candidates must be >= 1, got {list(cands)}")
  if max_chunk is not None and max(cands) > max_chunk:
    raise ValueError(f"candidate chunk {max(cands)} exceeds max_chunk={max_chunk} (the largest "
                     "chunk that fits memory): drop it or raise the memory budget")
  if cache_path is not None:
    if not key:
      raise ValueError("cache_path needs a key: pass key=fedjax_sim.autotune.cache_key(...)")
    cached = _read_cache(cache_path, key)
    if cached is not None and cached.choice in cands:
      return dataclasses.replace(cached, from_cache=True)
  start = timer()
  secs, comp = [], []
  for c in cands:
    if secs and timer() - start > time_budget_s:
      secs.append(None)
      comp.append(None)
      continue
    run = build(c)
    t0 = timer()
    run()
    t1 = timer()
    for _ in range(timed_calls):
      run()
    t2 = timer()
    comp.append(t1 - t0)
    secs.append((t2 - t1) / max(timed_calls, 1))
  measured = [(s, c) for s, c in zip(secs, cands, strict=True) if s is not None]
  best = min(measured)[1]
  pad = tuple(padding_factor(steps, c) if steps is not None else None for c in cands)
  choice = ChunkChoice(best, cands, tuple(secs), tuple(comp), pad, False, key)
  if cache_path is not None:
    _write_cache(cache_path, key, choice)
  return choice


def tune_simulation(make: Callable[[int], Any], params: Any, candidates: Sequence[int], *,
                    rounds: int = 2, seed: int = 0, **kwargs) -> ChunkChoice:
  """:func:`tune_chunk_size` for a :class:`~fedjax_sim.Simulation`: ``make(chunk)`` builds one;
  each candidate is timed over ``rounds`` rounds per call (``Simulation.run_rounds``-style block).

  Returns:
    A :class:`ChunkChoice`; build the run with ``make(choice.choice)``.

  Example:
    >>> # choice = fs.autotune.tune_simulation(
    >>> #     lambda c: fs.Simulation(algo, pop, cohort_size=100, chunk_size=c), params, [1, 2, 5])
  """
  def build(chunk):
    sim = make(chunk)

    def run():  # a fresh state each call: the round donates its input state
      _, fig = sim.benchmark(sim.init(params, jax.random.key(seed)), rounds)
      return fig
    return run
  return tune_chunk_size(candidates, build, **kwargs)


# -- Simulation(chunk_size="auto") ------------------------------------------------------------

#: The environment variable naming the cache directory ("off": no cache).
CACHE_ENV = "FEDJAX_SIM_AUTOTUNE_CACHE"


@dataclasses.dataclass(frozen=True)
class AutoChunk:
  """A request for a measured chunk size: ``Simulation(..., chunk_size=AutoChunk(...))``.

  ``chunk_size="auto"`` is ``AutoChunk()``; a list of ints is ``AutoChunk(candidates=...)``.
  ``Simulation.init`` builds, compiles and times each candidate
  (:func:`fedjax_sim.runs.tuning.tune_plan`) and runs the fastest; chunk size is speed only,
  so the run's identity and results do not change.

  Attributes:
    candidates: chunk sizes to time (1 to :data:`MAX_CANDIDATES`, each at most the cohort and
      the memory-bound chunk), or None: powers of two and the cohort up to the memory bound
      (:func:`candidates_for`).
    budget_s: seconds for the whole tuning; once spent, the remaining candidates are skipped
      (at least one is always timed).
    cache_dir: where the choice is cached (``chunk_size.json``); None:
      ``$FEDJAX_SIM_AUTOTUNE_CACHE`` or ``$XDG_CACHE_HOME/fedjax_sim`` or
      ``~/.cache/fedjax_sim``; ``"off"``: no cache.
    timed_calls: timed one-round calls per candidate after its compile + first call.

  Example:
    >>> import fedjax_sim as fs
    >>> fs.autotune.AutoChunk(candidates=[1, 4], budget_s=30).candidates
    (1, 4)
  """

  candidates: tuple[int, ...] | None = None
  budget_s: float = 60.0
  cache_dir: str | None = None
  timed_calls: int = 2
  memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):  # bad values fail here, before anything compiles
    if self.candidates is not None:
      cands = self.candidates
      if isinstance(cands, (str, bytes)) or not hasattr(cands, "__len__") or not len(cands):
        raise ValueError(f"chunk_size: the candidate list {cands!r} is empty or not a list; "
                         "pass chunk sizes to time, e.g. chunk_size=[1, 8, 32], or 'auto'.")
      if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
             for c in cands):
        raise ValueError(f"chunk_size: candidates must be positive ints; got {list(cands)!r}. "
                         "Pass e.g. chunk_size=[1, 8, 32], or 'auto'.")
      if len(cands) > MAX_CANDIDATES:
        raise ValueError(f"chunk_size: {len(cands)} candidates; at most {MAX_CANDIDATES} are "
                         "timed (each is a compile): pass fewer.")
      object.__setattr__(self, "candidates", tuple(int(c) for c in cands))
    if (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
        or not self.budget_s > 0):
      raise ValueError(f"AutoChunk.budget_s must be a positive number of seconds; got "
                       f"{self.budget_s!r}.")
    if isinstance(self.timed_calls, bool) or not isinstance(self.timed_calls, int) or (
        self.timed_calls < 1):
      raise ValueError(f"AutoChunk.timed_calls must be an int >= 1; got {self.timed_calls!r}.")


def chunk_request(chunk_size: Any) -> dict[str, Any]:
  """Splits a ``Simulation(chunk_size=...)`` value into :class:`~fedjax_sim.core.Performance`
  fields: a fixed ``chunk_size`` (int or None) and an ``autotune`` request (or None).

  Returns:
    ``{"chunk_size": int | None, "autotune": AutoChunk | None}``.

  Raises:
    ValueError: a string other than ``"auto"``, or a bad candidate list.

  Example:
    >>> chunk_request("auto")["autotune"].candidates is None
    True
  """
  if isinstance(chunk_size, str):
    if chunk_size != "auto":
      raise ValueError(f"chunk_size must be a positive int, None (automatic from memory), "
                       f"'auto' (measured) or a list of candidates to time; got {chunk_size!r}.")
    return {"chunk_size": None, "autotune": AutoChunk()}
  if isinstance(chunk_size, AutoChunk):
    return {"chunk_size": None, "autotune": chunk_size}
  if isinstance(chunk_size, (list, tuple, np.ndarray)):
    return {"chunk_size": None, "autotune": AutoChunk(candidates=chunk_size)}
  return {"chunk_size": chunk_size, "autotune": None}  # checked by Performance


def cache_path(cache_dir: str | None = None) -> str | None:
  """The cache file: ``<dir>/chunk_size.json``, the directory ``cache_dir`` or
  ``$FEDJAX_SIM_AUTOTUNE_CACHE`` or ``$XDG_CACHE_HOME/fedjax_sim`` or ``~/.cache/fedjax_sim``.

  Returns:
    The path, or None when the directory is ``"off"`` (no cache).
  """
  d = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "fedjax_sim")
  return None if d == "off" else os.path.join(d, "chunk_size.json")


def candidates_for(cohort_size: int, max_chunk: int, multiple_of: int = 1) -> tuple[int, ...]:
  """Powers of two and the cohort itself, up to ``max_chunk`` (multiples of ``multiple_of``,
  the mesh size), thinned evenly in log scale to at most :data:`MAX_CANDIDATES`.

  Returns:
    The candidates, ascending (never empty).

  Example:
    >>> candidates_for(100, 100)
    (1, 2, 4, 8, 16, 32, 64, 100)
  """
  top = max(multiple_of, min(cohort_size, max_chunk))
  cands = {c for c in (2 ** i for i in range(top.bit_length())) if c % multiple_of == 0}
  cands.add(top - top % multiple_of)
  cands = sorted(cands)
  if len(cands) > MAX_CANDIDATES:
    idx = np.unique(np.round(np.linspace(0, len(cands) - 1, MAX_CANDIDATES)).astype(int))
    cands = [cands[i] for i in idx]
  return tuple(cands)


def cohort_steps(num_examples: Sequence[int], cohort_size: int, batch_size: int,
                 seed: int = 0, *, system: Any = None,
                 planned_steps: Callable[..., Any] | None = None) -> np.ndarray:
  """Local steps per client of one cohort sampled uniformly (``seed``).

  Without a system model: ``ceil(n / batch_size)`` (one epoch: a constant number of epochs
  cancels in :func:`padding_factor`). With a ``system`` (a
  :class:`~fedjax_sim.systems.SystemModel`) and the algorithm's ``planned_steps``
  (:class:`~fedjax_sim.algorithms.Algorithm`), each client's outcome is the system model's own
  ``after_selection`` draw (dropout: 0 steps; straggler fraction; deadline cap) and its steps are
  ``planned_steps(n, work_fraction, step_cap)``: the counts the round sorts the cohort by
  (:func:`fedjax_sim.core.cohort_slots`), so :func:`padding_factor`'s order is the round's.

  Returns:
    int64 ``[min(cohort_size, num_clients)]``.
  """
  n = np.asarray(num_examples, np.int64)
  rng = np.random.default_rng(seed)
  pick = rng.choice(len(n), min(cohort_size, len(n)), replace=False)
  if system is None or planned_steps is None:
    return -(-n[pick] // max(int(batch_size), 1))
  # The system model's own per-client draw (what the round uses), keyed by ``seed``.
  outcome = system.after_selection(jax.random.key(seed), jnp.asarray(pick, np.int32))
  sizes = np.where(np.asarray(outcome.kept), n[pick], 0).astype(np.int32)
  steps = planned_steps(sizes, outcome.work_fraction, outcome.step_cap,
                        max_examples=int(n.max(initial=1)))
  return np.asarray(steps, np.int64)
