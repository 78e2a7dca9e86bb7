"""Plots (matplotlib, PNG) of a run's metrics: learning curves and ε over rounds."""

from __future__ import annotations

import os

import numpy as np


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def learning_curves(metrics: dict[str, np.ndarray], path: str, title: str = "") -> str:
  """Training loss (and accuracy) per round, evaluation metrics where measured, ε if present."""
  plt = _plt()
  rounds = np.arange(1, len(metrics["loss"]) + 1) if "round" not in metrics else metrics["round"]
  evals = [k for k in metrics if k.startswith("eval_")]
  panels = 1 + bool(evals) + ("epsilon" in metrics)
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
  ax = axes[0, 0]
  ax.plot(rounds, metrics["loss"], label="train loss (cohort)")
  if "accuracy" in metrics:
    ax2 = ax.twinx()
    ax2.plot(rounds, metrics["accuracy"], color="C1", alpha=0.6, label="train accuracy")
    ax2.set_ylabel("accuracy")
  ax.set_xlabel("round")
  ax.set_ylabel("loss")
  i = 1
  if evals:
    ax = axes[0, i]
    for k in evals:
      ok = np.isfinite(metrics[k])
      ax.plot(rounds[ok], metrics[k][ok], "o-", label=k[5:])
    ax.set_xlabel("round")
    ax.set_title("evaluation")
    ax.legend()
    i += 1
  if "epsilon" in metrics:
    ax = axes[0, i]
    ok = np.isfinite(metrics["epsilon"])
    ax.plot(rounds[ok], metrics["epsilon"][ok])
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def client_distribution(values: np.ndarray, path: str, name: str = "accuracy") -> str:
  """Histogram of a per-client metric (e.g. from ``evaluate_clients``), the fairness view."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.6))
  v = np.asarray(values)
  v = v[np.isfinite(v)]
  ax.hist(v, bins=30)
  for p in (10, 50, 90):
    ax.axvline(np.percentile(v, p), color="k", ls=":", lw=1)
  ax.set_xlabel(f"per-client {name} (dotted: p10, p50, p90)")
  ax.set_ylabel("clients")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_run(run_dir: str) -> list[str]:
  """PNGs for a run directory written by ``run(log_dir=...)`` / ``fedjax-sim run``."""
  from fedjax_sim.checkpoint import read_log

  metrics = read_log(run_dir)
  paths = [learning_curves(metrics, os.path.join(run_dir, "learning_curves.png"),
                           os.path.basename(os.path.normpath(run_dir)))]
  return paths
