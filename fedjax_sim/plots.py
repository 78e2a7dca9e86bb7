"""Plots (matplotlib, PNG) of a run's metrics: learning curves and ε over rounds."""

from __future__ import annotations

import contextlib
import os

import numpy as np


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (PNG files; no display needed).

  Returns:
    The ``matplotlib.pyplot`` module, for figures beside the library's own plots.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


#: Prefixes of held-out metrics in a run's log: ``eval_*`` from ``run(eval_fn=...)``, ``test_*``.
HELD_OUT_PREFIXES = ("eval_", "test_")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average over ``window`` rounds (NaN entries ignored).

  Args:
    values: a per-round series.
    window: rounds per average (>= 1); the first ``window - 1`` points average what exists.

  Returns:
    a float array of the same length.

  Examples:
    >>> smooth(np.array([1.0, 3.0, np.nan, 5.0]), 2).tolist()
    [1.0, 2.0, 3.0, 5.0]
  """
  v = np.asarray(values, np.float64)
  ok = np.isfinite(v)
  csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
  ccount = np.concatenate([[0], np.cumsum(ok)])
  hi = np.arange(1, len(v) + 1)
  lo = np.maximum(hi - int(window), 0)
  count = ccount[hi] - ccount[lo]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def _held_out(metrics, name):
  return [(p, metrics[p + name]) for p in HELD_OUT_PREFIXES if p + name in metrics]


def learning_curves(metrics: dict[str, np.ndarray], path: str, title: str = "", *,
                    delta: float | None = None, window: int | None = None) -> str:
  """Saves a PNG of a run's learning curves.

  One panel per quantity, each with a legend: the training loss of the cohort per round (raw,
  faded) beside its moving average, with the held-out loss (``eval_loss`` / ``test_loss``) at
  the rounds where it was measured; the same for accuracy; other held-out metrics; and the ε
  spent, labelled with its δ.

  Args:
    metrics: per-round arrays, as returned by ``Simulation.run`` or
      :func:`fedjax_sim.checkpoint.read_log` (``round`` optional).
    path: the PNG to write.
    title: the figure title.
    delta: the δ of the ``epsilon`` column (shown in its legend).
    window: rounds per moving average; default ``max(1, rounds // 20)``.

  Returns:
    ``path``.
  """
  plt = pyplot()
  n = len(metrics["loss"])
  rounds = np.asarray(metrics["round"]) if "round" in metrics else np.arange(1, n + 1)
  window = max(1, n // 20) if window is None else int(window)
  panels = []
  for name in ("loss", "accuracy"):
    if name in metrics or _held_out(metrics, name):
      panels.append(name)
  others = sorted({k[len(p):] for k in metrics for p in HELD_OUT_PREFIXES
                   if k.startswith(p) and k[len(p):] not in ("loss", "accuracy")})
  if others:
    panels.append("others")
  if "epsilon" in metrics and np.isfinite(np.asarray(metrics["epsilon"], float)).any():
    panels.append("epsilon")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    if panel in ("loss", "accuracy"):
      if panel in metrics:
        raw = np.asarray(metrics[panel], float)
        ax.plot(rounds, raw, color="C0", alpha=0.3, lw=1, label=f"train {panel} (cohort)")
        if window > 1:
          ax.plot(rounds, smooth(raw, window), color="C0", lw=2,
                  label=f"train {panel}, mean of {window} rounds")
      for i, (prefix, values) in enumerate(_held_out(metrics, panel)):
        values = np.asarray(values, float)
        ok = np.isfinite(values)
        ax.plot(rounds[ok], values[ok], "o-", color=f"C{i + 1}", label=f"{prefix[:-1]} {panel}")
      ax.set_ylabel(panel)
      ax.set_title(panel)
    elif panel == "others":
      for i, name in enumerate(others):
        for prefix, values in _held_out(metrics, name):
          values = np.asarray(values, float)
          ok = np.isfinite(values)
          ax.plot(rounds[ok], values[ok], "o-", color=f"C{i}", label=f"{prefix[:-1]} {name}")
      ax.set_title("held-out metrics")
    else:
      eps = np.asarray(metrics["epsilon"], float)
      ok = np.isfinite(eps)
      label = "ε spent" + (f" at δ = {delta:g}" if delta is not None else " (δ not recorded)")
      ax.plot(rounds[ok], eps[ok], color="C3", label=label)
      ax.set_ylabel("ε")
      ax.set_title("privacy")
    ax.set_xlabel("round")
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def client_distribution(values: np.ndarray, path: str, name: str = "accuracy") -> str:
  """Histogram of a per-client metric (e.g. from ``evaluate_clients``), the fairness view.

  Returns:
    ``path``.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.6))
  v = np.asarray(values)
  v = v[np.isfinite(v)]
  ax.hist(v, bins=30, label="clients")
  for p, ls in ((10, ":"), (50, "--"), (90, "-.")):
    ax.axvline(np.percentile(v, p), color="k", ls=ls, lw=1, label=f"p{p}")
  ax.set_xlabel(f"per-client {name}")
  ax.legend(fontsize=8)
  ax.set_ylabel("clients")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_run(run_dir: str, *, delta: float | None = None) -> list[str]:
  """PNGs for a run directory written by ``run(log_dir=...)`` / ``fedjax-sim run`` / ``demo``.

  Args:
    run_dir: the directory holding ``metrics.jsonl``.
    delta: the δ of the logged ε; default: ``delta`` from the run's ``summary.json`` or
      ``config.json`` when recorded there.

  Returns:
    the paths written (``<run_dir>/learning_curves.png``).
  """
  import json

  from fedjax_sim.runs.log import read_log

  metrics = read_log(run_dir)
  if not metrics.get("round", np.zeros(0)).size:
    raise ValueError(f"{os.path.join(run_dir, 'metrics.jsonl')} holds no rounds (empty, or its "
                     "only row was cut short); nothing to plot yet.")
  if delta is None:
    for name in ("summary.json", "config.json"):
      p = os.path.join(run_dir, name)
      recorded = None
      with contextlib.suppress(OSError, ValueError, AttributeError):  # absent or torn
        with open(p) as f:
          recorded = json.load(f).get("delta")
      if recorded is not None:
        delta = float(recorded)
        break
  paths = [learning_curves(metrics, os.path.join(run_dir, "learning_curves.png"),
                           os.path.basename(os.path.normpath(run_dir)), delta=delta)]
  return paths
