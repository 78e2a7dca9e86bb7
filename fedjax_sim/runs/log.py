"""A run's log: ``metrics.jsonl`` (one JSON object per round), ``config.json`` (its identity,
settings, versions, XLA flags and sessions), TensorBoard events and CSV export."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import numpy as np

from fedjax_sim import host_cpu
from fedjax_sim._version import __version__
from fedjax_sim.runs import identity

__all__ = ["MetricsLog", "read_log", "to_csv", "versions", "xla_flags"]


class MetricsLog:
  """Appends one JSON object per round to ``<log_dir>/metrics.jsonl`` (with the config hash),
  and with ``tensorboard=True`` the same scalars as TensorBoard event files (tensorboardX).

  ``config.json`` records the run's identity, fingerprint, versions, run key, the caller's
  ``settings`` and one entry per session (``run`` call); a resumed run extends it, never
  replaces it (``existing``: its current contents, from
  :func:`fedjax_sim.runs.ownership.prepare_log_dir`). Each session records the versions and the
  XLA flags it ran under (:func:`xla_flags`).
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
    self.hash = identity.config_hash(fp)
    claim_only = existing is not None and set(existing) <= {"run_id", "fingerprint"}
    config = dict(existing) if existing and not claim_only else {
        "config_hash": self.hash, "run_id": fp.get("run_id"), "fingerprint": fp,
        "versions": versions(), **(seed_info or {}), "sessions": []}
    if not config.get("run_id"):  # a log taken to be this run's (from before run ids)
      config["run_id"] = fp.get("run_id")
    if settings is not None:
      config.setdefault("settings", settings)
    config.setdefault("sessions", []).append(
        {**(session or {}), **{k: v for k, v in (seed_info or {}).items() if k == "start_round"},
         "versions": versions(), "xla_flags": xla_flags()})
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


def versions() -> dict[str, str]:
  """The versions a run ran under (recorded in ``config.json`` for each session).

  Returns:
    ``{"fedjax_sim": ..., "jax": ..., "optax": ..., "numpy": ...}``.
  """
  import optax

  return {"fedjax_sim": __version__, "jax": jax.__version__, "optax": optax.__version__,
          "numpy": np.__version__}


def xla_flags() -> dict[str, Any]:
  """The XLA flags a run ran under: ``XLA_FLAGS`` as jax read it, and those fedjax_sim added at
  import (:mod:`fedjax_sim.host_cpu`; ``FEDJAX_SIM_XLA_FLAGS=0`` turns them off).

  Returns:
    ``{"XLA_FLAGS": str or None, "added_by_fedjax_sim": [...], "switch": "..."}``.
  """
  return {"XLA_FLAGS": os.environ.get("XLA_FLAGS"),
          "added_by_fedjax_sim": list(host_cpu.added_flags()),
          "switch": f"{host_cpu.ENV_FLAGS}={os.environ.get(host_cpu.ENV_FLAGS, '1')}"}


def read_log(log_dir: str) -> dict[str, np.ndarray]:
  """Reads ``metrics.jsonl`` back into ``{name: array over rounds}`` (NaN where missing).

  A row that does not parse (a write cut short by a kill) is dropped with a warning, as a
  resumed run drops it.

  Returns:
    ``{column name: float array over the log's rows}``.
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
