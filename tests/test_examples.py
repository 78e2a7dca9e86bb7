"""Every example runs (small settings) and writes its PNG."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dp_privacy_utility_example(tmp_path):
  out = tmp_path / "dp.png"
  res = subprocess.run(
      [sys.executable, os.path.join(ROOT, "examples", "dp_fedavg_privacy_utility.py"),
       "--rounds", "8", "--noise", "0", "1.0", "--num-clients", "100", "--out", str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  assert out.exists() and out.stat().st_size > 10_000
  assert "| 1.0 |" in res.stdout


def run_example(name, *args, tmp_path):
  out = tmp_path / f"{name}.png"
  res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), *args,
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  assert out.exists() and out.stat().st_size > 10_000
  return res.stdout


def test_emnist_example_on_digits(tmp_path):
  out = run_example("emnist_fedavg", "--rounds", "20", "--num-clients", "30", tmp_path=tmp_path)
  assert float(out.split("final test accuracy")[1].split()[0]) > 0.6


def test_shakespeare_example_learns(tmp_path):
  out = run_example("shakespeare_fedavg", "--rounds", "20", "--hidden", "32",
                    "--client-lr", "0.03", tmp_path=tmp_path)
  loss = float(out.split("final loss")[1].split()[0])
  baseline = float(out.split("vs unigram")[1].split()[0])
  assert loss < 0.85 * baseline


def test_heterogeneity_example(tmp_path):
  out = run_example("heterogeneity", "--rounds", "12", "--fairness-rounds", "20", "--q", "0", "1",
                    tmp_path=tmp_path)
  assert "SCAFFOLD" in out and "FedNova" in out and "q = 1.0" in out


def test_federated_kmeans_example():
  res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "federated_kmeans.py"),
                        "--rounds", "10"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  ratios = [float(line.split("|")[-2]) for line in res.stdout.splitlines()
            if line.startswith("| iris") or line.startswith("| wine")]
  assert len(ratios) == 2 and max(ratios) < 1.1


def test_autoencoder_anomaly_example():
  res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "autoencoder_anomaly.py"),
                        "--rounds", "20"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  aurocs = [float(line.split("AUROC")[1].split()[0]) for line in res.stdout.splitlines()
            if "AUROC" in line]
  assert len(aurocs) == 2 and min(aurocs) > 0.6


def test_robustness_compression_example(tmp_path):
  out = run_example("robustness_compression", "--rounds", "6", "--num-clients", "40",
                    "--cohort", "10", "--bits", "2", "--dp-clients", "60", "--dp-cohort", "20",
                    "--noise", "1.0", tmp_path=tmp_path)
  assert "| median |" in out and "| 2 |" in out and "| 1.0 |" in out
