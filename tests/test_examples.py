"""Every example runs (small settings) and writes its PNG.

Each starts a fresh Python process and compiles its own programs (20-90 s of CPU each on 2
cores), so the whole module is in the slow tier: `pytest -m slow` (and `.ci/run`) runs it.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_dp_privacy_utility_example(run_with_package, tmp_path):
  out = tmp_path / "dp.png"
  text = run_with_package("dp_fedavg_privacy_utility", "--rounds", "8", "--noise", "0", "1.0",
                          "--num-clients", "100", "--out", str(out))
  assert out.exists() and out.stat().st_size > 10_000
  assert "| 1.0 |" in text


def run_example(run, name, *args, tmp_path):
  out = tmp_path / f"{name}.png"
  text = run(name, *args, "--out", str(out))
  assert out.exists() and out.stat().st_size > 10_000
  return text


def test_emnist_example_on_digits(run_with_package, tmp_path):
  out = run_example(run_with_package,
                    "emnist_fedavg", "--rounds", "20", "--num-clients", "30", tmp_path=tmp_path)
  assert float(out.split("final test accuracy")[1].split()[0]) > 0.6


def test_shakespeare_example_learns(run_with_package, tmp_path):
  out = run_example(run_with_package,
                    "shakespeare_fedavg", "--rounds", "20", "--hidden", "32",
                    "--client-lr", "0.03", tmp_path=tmp_path)
  loss = float(out.split("final loss")[1].split()[0])
  baseline = float(out.split("vs unigram")[1].split()[0])
  assert loss < 0.85 * baseline


def test_heterogeneity_example(run_with_package, tmp_path):
  out = run_example(run_with_package,
                    "heterogeneity", "--rounds", "12", "--fairness-rounds", "20", "--q", "0", "1",
                    tmp_path=tmp_path)
  assert "SCAFFOLD" in out and "FedNova" in out and "q = 1.0" in out


def test_federated_kmeans_example(run_with_package, tmp_path):
  out = tmp_path / "clusters.png"
  text = run_with_package("federated_kmeans", "--rounds", "10", "--out", str(out))
  rows = [line.split("|") for line in text.splitlines() if line.startswith(("| iris", "| wine"))]
  ratios = [float(r[7]) for r in rows if "Lloyd" in r[4]]
  assert len(ratios) == 2 and max(ratios) < 1.1
  kfed_rows = [r for r in text.splitlines() if "k-FED one-shot" in r]
  assert len(kfed_rows) == 3 and all(0 <= float(r.split("|")[8]) <= 1 for r in kfed_rows)
  assert out.stat().st_size > 10_000


def test_autoencoder_anomaly_example(run_with_package, tmp_path):
  out = tmp_path / "roc.png"
  text = run_with_package("autoencoder_anomaly", "--rounds", "20", "--out", str(out))
  assert out.stat().st_size > 10_000
  aurocs = [float(line.split("AUROC")[1].split()[0]) for line in text.splitlines()
            if "AUROC" in line]
  assert len(aurocs) == 2 and min(aurocs) > 0.6


def test_robustness_compression_example(run_with_package, tmp_path):
  out = run_example(run_with_package,
                    "robustness_compression", "--rounds", "6", "--num-clients", "40",
                    "--cohort", "10", "--bits", "2", "--dp-clients", "60", "--dp-cohort", "20",
                    "--noise", "1.0", "--dp-seeds", "1", "--rules", "mean", "median", "krum",
                    "--attacks", "none", "flip5", "alie", tmp_path=tmp_path)
  assert "| median |" in out and "| Multi-Krum (f=2) |" in out and "| 2 |" in out
  assert "| 1.0 |" in out and "sign flip x5" in out


def test_federated_ssd_example_quick(run_with_package, tmp_path):
  out = tmp_path / "ssd.png"
  text = run_with_package("federated_ssd", "--rounds", "2", "--local-epochs", "1",
                          "--eval-every", "2", "--hidden", "64", "--out", str(out))
  rows = [line.split("|") for line in text.splitlines() if line.startswith(("| base", "| ssd"))]
  assert [r[1].strip() for r in rows] == ["base", "ssd"]
  # Uniformity (t = 2) and alignment of unit vectors lie in [0, 4]; probe accuracy in (0.1, 1].
  vals = np.array([[float(v) for v in r[3:10]] for r in rows])
  assert np.all((vals[:, :4] >= 0) & (vals[:, :4] <= 4.0 + 1e-6))
  assert np.all((vals[:, 6] >= 0) & (vals[:, 6] <= 4.0 + 1e-6))  # alignment on the sphere
  assert np.all((vals[:, 5] > 0.1) & (vals[:, 5] <= 1))
  assert out.exists() and out.stat().st_size > 10_000


def test_dp_ftrl_vs_dpsgd_example(run_with_package):
  text = run_with_package("dp_ftrl_vs_dpsgd", "--rounds", "8", "--seeds", "1",
                          "--num-clients", "100")
  assert "| DP-FedAvg, Poisson |" in text and "| BandMF b=8, min-sep 8 |" in text
