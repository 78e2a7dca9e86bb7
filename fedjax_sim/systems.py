"""System heterogeneity: which devices are available, which drop out, which straggle or miss the
deadline. Everything is an in-jit mask or step budget driven by the round key and keyed by the
client's global id, so results stay invariant to cohort order and chunk size.

Pass a :class:`SystemModel` to ``Simulation(..., system=...)``. Round metrics then report
``available`` (clients available this round), ``dropped`` (selected, then lost), ``stragglers``
and ``late`` (clients whose planned local work exceeded their budget). Under
``deadline_policy="drop"`` a late client counts in ``late`` only, not in ``clients`` or
``examples``, and its update is lost; the steps it ran up to the deadline still count in
``client_steps`` (the local steps the cohort ran: compute spent) and so in ``step_slots``, so
that ``step_slots / client_steps`` stays the chunk schedule's padding factor.

Step budgets apply to client updates built on :func:`fedjax_sim.client.make_local_trainer`
(FedAvg, FedProx, SCAFFOLD, FedNova, q-FFL, Ditto); a custom client update sees them as
``data.work_fraction`` / ``data.step_cap``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v

DEADLINE_POLICIES = ("drop", "partial")


class SelectionOutcome(NamedTuple):
  """Per cohort slot: kept (not dropped), fraction of local work, step cap, straggler flag."""

  kept: jax.Array
  work_fraction: jax.Array
  step_cap: jax.Array
  straggler: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class SystemModel:
  """Device availability, dropout, stragglers and deadlines.

  Args:
    availability: per-client probability of being available in a round (default: always).
    diurnal_period: if set, availability oscillates with this period in rounds:
      ``p_i(t) = p_i * (1 + sin(2π (t / period + φ_i))) / 2`` with a per-client phase φ_i
      (``phases``, default spread uniformly over the day by client id).
    phases: per-client phases in [0, 1) for the diurnal model.
    trace: optional 0/1 array ``[num_windows, num_clients]`` (e.g. from :func:`load_trace`):
      client i is available in round t only if ``trace[(t // rounds_per_window) % W, i]``.
    rounds_per_window: rounds per trace window.
    dropout: probability that a selected client drops out after selection (update lost).
    straggler_prob: probability that a selected client is a straggler.
    straggler_min_fraction: a straggler completes a fraction ~ U(min_fraction, 1) of its local
      steps.
    deadline: optional round deadline in seconds; with ``steps_per_second`` (per client) a
      client can run at most ``floor(deadline * speed)`` local steps.
    steps_per_second: per-client compute speed (e.g. lognormal), needed with ``deadline``.
    deadline_policy: ``"drop"`` (clients over the deadline send nothing; the steps they ran
      up to it still count in ``client_steps``) or ``"partial"`` (they send the work done by
      the deadline).

  References:
    Bonawitz et al., "Towards Federated Learning at Scale: System Design", MLSys 2019
    (availability, dropouts, deadlines); Lai et al., "FedScale", ICML 2022 (device traces).
  """

  availability: tuple[float, ...] | None = None
  diurnal_period: int | None = None
  phases: tuple[float, ...] | None = None
  trace: np.ndarray | None = None
  rounds_per_window: int = 1
  dropout: float = 0.0
  straggler_prob: float = 0.0
  straggler_min_fraction: float = 0.1
  deadline: float | None = None
  steps_per_second: tuple[float, ...] | None = None
  deadline_policy: str = "drop"

  def __post_init__(self):
    if self.availability is not None:
      object.__setattr__(self, "availability",
                         tuple(_v.per_client("availability", self.availability, max_value=1.0)))
    if self.phases is not None:
      object.__setattr__(self, "phases", tuple(float(p) for p in np.asarray(self.phases)))
    if self.diurnal_period is not None and (
        not isinstance(self.diurnal_period, (int, np.integer)) or self.diurnal_period < 1):
      raise ValueError(f"diurnal_period must be a positive int; got {self.diurnal_period!r}.")
    if self.trace is not None:
      t = np.asarray(self.trace)
      if t.ndim != 2 or not np.isin(t, (0, 1)).all():
        raise ValueError("trace must be a 0/1 array [num_windows, num_clients].")
      object.__setattr__(self, "trace", t.astype(bool))
    if self.rounds_per_window < 1:
      raise ValueError(f"rounds_per_window must be >= 1; got {self.rounds_per_window!r}.")
    _v.probability("dropout", self.dropout)
    _v.probability("straggler_prob", self.straggler_prob)
    if not 0 < self.straggler_min_fraction <= 1:
      raise ValueError("straggler_min_fraction must lie in (0, 1].")
    if self.deadline_policy not in DEADLINE_POLICIES:
      raise ValueError(f"deadline_policy must be one of {DEADLINE_POLICIES}; got "
                       f"{self.deadline_policy!r}.")
    if (self.deadline is None) != (self.steps_per_second is None):
      raise ValueError("deadline and steps_per_second go together: pass both or neither.")
    if self.deadline is not None:
      _v.positive("deadline (seconds)", self.deadline)
      s = _v.per_client("steps_per_second", self.steps_per_second)
      if s.min() <= 0:
        raise ValueError("steps_per_second must be > 0 for every client.")
      object.__setattr__(self, "steps_per_second", tuple(float(v) for v in s))

  def validate(self, num_clients: int) -> None:
    for name in ("availability", "phases", "steps_per_second"):
      v = getattr(self, name)
      if v is not None and len(v) != num_clients:
        raise ValueError(
            f"{name} has {len(v)} entries but the population has {num_clients} clients."
        )
    if self.trace is not None and self.trace.shape[1] != num_clients:
      raise ValueError(
          f"the availability trace covers {self.trace.shape[1]} clients but the population has "
          f"{num_clients}; the trace's client ids must match the population."
      )

  # -- in-jit -----------------------------------------------------------------------------------
  def available(self, key: jax.Array, round_index: jax.Array, num_clients: int) -> jax.Array:
    """bool [num_clients]: who can be selected this round."""
    ids = jnp.arange(num_clients)
    p = (jnp.ones(num_clients) if self.availability is None
         else jnp.asarray(self.availability, jnp.float32))
    if self.diurnal_period is not None:
      phase = (ids / num_clients if self.phases is None
               else jnp.asarray(self.phases, jnp.float32))
      t = round_index.astype(jnp.float32) / self.diurnal_period
      p = p * 0.5 * (1.0 + jnp.sin(2 * jnp.pi * (t + phase)))
    avail = jax.random.uniform(key, (num_clients,)) < p
    if self.availability is None and self.diurnal_period is None:
      avail = jnp.ones(num_clients, bool)
    if self.trace is not None:
      window = (round_index // self.rounds_per_window) % self.trace.shape[0]
      avail = avail & jnp.asarray(self.trace)[window]
    return avail

  def after_selection(self, key: jax.Array, ids: jax.Array) -> SelectionOutcome:
    """Per selected client (keyed by id): dropout, straggling and the deadline step cap."""

    def one(cid):
      k = jax.random.fold_in(key, cid)
      k_drop, k_strag, k_frac = jax.random.split(k, 3)
      kept = jax.random.uniform(k_drop) >= self.dropout
      straggler = jax.random.uniform(k_strag) < self.straggler_prob
      fraction = jnp.where(
          straggler,
          jax.random.uniform(k_frac, minval=self.straggler_min_fraction, maxval=1.0),
          1.0,
      )
      if self.deadline is None:
        cap = jnp.int32(2**30)
      else:
        speed = jnp.asarray(self.steps_per_second, jnp.float32)[cid]
        cap = jnp.floor(self.deadline * speed).astype(jnp.int32)
      return SelectionOutcome(kept, fraction, cap, straggler)

    return jax.vmap(one)(ids)


def load_trace(path: str, num_clients: int | None = None) -> np.ndarray:
  """Reads an availability trace CSV with columns ``client_id,window`` (one row per client and
  time window in which it is available) into a 0/1 array ``[num_windows, num_clients]``.

  Client ids must be integers in ``[0, num_clients)`` (the population's numbering).
  """
  rows = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2, comments="#",
                    skiprows=_header_rows(path))
  if rows.shape[1] != 2:
    raise ValueError(f"{path}: expected two columns client_id,window; got {rows.shape[1]}.")
  clients, windows = rows[:, 0], rows[:, 1]
  n = int(clients.max()) + 1 if num_clients is None else int(num_clients)
  if clients.min() < 0 or clients.max() >= n:
    raise ValueError(
        f"{path}: client ids span [{clients.min()}, {clients.max()}] but the population has "
        f"{n} clients (ids 0..{n - 1}); the trace's client ids must match the population."
    )
  if windows.min() < 0:
    raise ValueError(f"{path}: windows must be >= 0.")
  trace = np.zeros((int(windows.max()) + 1, n), np.int8)
  trace[windows, clients] = 1
  return trace


def _header_rows(path: str) -> int:
  with open(path) as f:
    first = f.readline()
  return 0 if first.strip()[:1].isdigit() or first.startswith("#") else 1


# -- FedScale traces (Lai et al., ICML 2022) ---------------------------------------------------
# FedScale ships two pickles (benchmark/dataset/data/device_info/): ``client_device_capacity``,
# ``{client_id: {"computation": ms per sample (inference), "communication": kbit/s}}``, and
# ``client_behave_trace``, ``{client_id: {"active": [s, ...], "inactive": [s, ...],
# "finish_time": s, ...}}`` (active while ``active[i] <= t % finish_time <= inactive[i]``).


def fedscale_rows(path: str, num_clients: int, client_ids, what: str) -> list:
  import pickle

  with open(path, "rb") as f:
    table = pickle.load(f)
  if not isinstance(table, dict):
    raise ValueError(f"{path}: a FedScale {what} pickle holds a dict keyed by client id; got "
                     f"{type(table).__name__}.")
  n = _v.positive_int("num_clients", num_clients)
  if client_ids is None:
    if len(table) != n:
      raise ValueError(
          f"{path}: the {what} trace has {len(table)} clients but the population has {n}; the "
          "trace's client ids must match the population. Pass client_ids= (the trace key of "
          "each population client, e.g. [i % len(trace) + 1 for i in range(N)], FedScale's "
          "reuse) to map them.")
    keys = sorted(table)
  else:
    keys = list(client_ids)
    if len(keys) != n:
      raise ValueError(f"client_ids has {len(keys)} entries but the population has {n} clients.")
    missing = [k for k in keys if k not in table]
    if missing:
      raise ValueError(f"{path}: client_ids {missing[:5]} are not in the {what} trace (its ids "
                       f"span {min(table)}..{max(table)}); the trace's ids must match.")
  return [table[k] for k in keys]


def load_fedscale_capacity(path: str, num_clients: int, *, client_ids=None) -> dict:
  """Reads FedScale's ``client_device_capacity`` pickle.

  Args:
    path: the pickle.
    num_clients: the population size (client ``i`` gets the trace's ``i``-th smallest key).
    client_ids: optional trace key per population client.

  Returns:
    ``{"ms_per_sample": float64 [N], "kbps": float64 [N]}`` (FedScale's ``computation`` and
    ``communication``); :func:`fedscale_timing` turns them into durations.
  """
  rows = fedscale_rows(path, num_clients, client_ids, "device-capacity")
  try:
    ms = np.asarray([float(r["computation"]) for r in rows])
    kbps = np.asarray([float(r["communication"]) for r in rows])
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: every entry needs 'computation' and 'communication' ({e}).") from e
  if not (np.isfinite(ms).all() and (ms > 0).all() and np.isfinite(kbps).all()
          and (kbps > 0).all()):
    raise ValueError(f"{path}: computation and communication must be finite and > 0.")
  return {"ms_per_sample": ms, "kbps": kbps}

