"""Per-block progress of :meth:`fedjax_sim.Simulation.run` (``progress=True``).

A tqdm bar on a terminal; one plain line per block otherwise (CI logs, notebooks' captured
stderr). Shows the last round's loss and accuracy, the block's evaluation, ε, and the
client-updates per second of the clients that took part.
"""

from __future__ import annotations

import sys
import time

import numpy as np


class Progress:
  """Progress over ``total`` rounds of cohorts of capacity ``cohort`` (``enabled=False``: none)."""

  def __init__(self, total: int, cohort: int, enabled: bool = True):
    self.cohort, self.enabled = cohort, enabled
    self.last = time.perf_counter()
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, unit="round", dynamic_ncols=True)

  def update(self, rounds_done: int, active: int, block: dict, evals: dict | None) -> None:
    """Reports the block of ``active`` rounds that ended at round ``rounds_done``."""
    if not self.enabled:
      return
    now = time.perf_counter()
    info = {"loss": f"{block['loss'][-1]:.4f}"}
    if "accuracy" in block:
      info["acc"] = f"{block['accuracy'][-1]:.3f}"
    for k, v in (evals or {}).items():
      info[f"eval_{k}"] = f"{v:.4f}"
    if "epsilon" in block and np.isfinite(block["epsilon"][-1]):
      info["eps"] = f"{block['epsilon'][-1]:.3g}"
    # Clients that took part (under Poisson sampling fewer than the cohort's capacity).
    real = float(np.sum(block["clients"])) if "clients" in block else active * self.cohort
    info["cu/s"] = f"{real / max(now - self.last, 1e-9):.0f}"
    self.last = now
    if self.bar is not None:
      self.bar.set_postfix(info, refresh=False)
      self.bar.update(active)
    else:
      print(f"round {rounds_done}: " + " ".join(f"{k}={v}" for k, v in info.items()),
            file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
