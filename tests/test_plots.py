"""The plots a researcher keeps: what each panel shows and that every axis has a legend."""

import matplotlib
import numpy as np
import pytest

import fedjax_sim as fs

matplotlib.use("Agg")


@pytest.fixture
def saved_figures(monkeypatch):
  """Records (title, [(axis title, legend texts), ...]) of every figure saved."""
  from matplotlib.figure import Figure

  saved = []
  original = Figure.savefig

  def record(fig, path, *args, **kwargs):
    axes = []
    for ax in fig.axes:
      legend = ax.get_legend()
      axes.append((ax.get_title(), [t.get_text() for t in legend.get_texts()] if legend else None))
    saved.append((fig.get_suptitle(), axes))
    return original(fig, path, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", record)
  return saved


def test_smooth_is_a_trailing_mean_that_skips_nan():
  rng = np.random.default_rng(0)
  v = rng.normal(size=50)
  v[[3, 17, 18]] = np.nan
  got = fs.plots.smooth(v, 7)
  want = [np.nanmean(v[max(0, i - 6):i + 1]) for i in range(50)]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_learning_curves_show_smoothed_held_out_and_epsilon_with_delta(tmp_path, saved_figures):
  n = 100
  nan = np.full(n, np.nan)
  eval_acc, test_loss, eval_auc = nan.copy(), nan.copy(), nan.copy()
  eval_acc[9::10], test_loss[9::10], eval_auc[49::50] = 0.8, 0.5, 0.9
  metrics = {"loss": np.linspace(2, 0.5, n), "accuracy": np.linspace(0.1, 0.9, n),
             "eval_accuracy": eval_acc, "test_loss": test_loss, "eval_auc": eval_auc,
             "epsilon": np.linspace(0.1, 3.0, n)}
  path = fs.plots.learning_curves(metrics, str(tmp_path / "c.png"), "run", delta=1e-5)
  assert (tmp_path / "c.png").stat().st_size > 10_000 and path.endswith("c.png")
  ((title, axes),) = saved_figures
  assert title == "run"
  panels = dict(axes)
  assert set(panels) == {"loss", "accuracy", "held-out metrics", "privacy"}
  assert all(legend for legend in panels.values())  # a legend on every axis
  assert panels["loss"] == ["train loss (cohort)", "train loss, mean of 5 rounds", "test loss"]
  assert panels["accuracy"] == ["train accuracy (cohort)", "train accuracy, mean of 5 rounds",
                                "eval accuracy"]
  assert panels["held-out metrics"] == ["eval auc"]
  assert panels["privacy"] == ["ε spent at δ = 1e-05"]


def test_plot_run_reads_delta_from_the_run_directory(tmp_path, saved_figures):
  import json

  rows = [{"round": r, "loss": 1.0 / r, "epsilon": 0.1 * r} for r in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "summary.json").write_text(json.dumps({"delta": 0.001}))
  (path,) = fs.plots.plot_run(str(tmp_path))
  assert path.endswith("learning_curves.png")
  ((_, axes),) = saved_figures
  assert dict(axes)["privacy"] == ["ε spent at δ = 0.001"]
  assert dict(axes)["loss"] == ["train loss (cohort)"]  # 5 rounds: no smoothing window


def test_partition_plot_has_title_and_label_legend(tmp_path, saved_figures):
  labels = np.repeat(np.array([3, 5, 7]), 40)
  ids = fs.partition.dirichlet(labels, 6, alpha=0.5, seed=0)
  fs.partition.describe(ids, labels, plot_path=str(tmp_path / "p.png"), plot_title="split")
  ((title, axes),) = saved_figures
  assert title == "split"
  assert dict(axes)["label mix per client"] == ["3", "5", "7"]
  assert (tmp_path / "p.png").exists()


def test_plots_is_an_attribute_of_the_package():
  import fedjax_sim

  assert fedjax_sim.plots is fs.plots and "plots" in fedjax_sim.__all__
