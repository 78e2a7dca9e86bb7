import json

import pytest

from fedjax_sim import cli


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_demo_runs_and_learns(capsys, tmp_path):
  run_dir = tmp_path / "demo"
  cli.main(["demo", "--rounds", "40", "--eval-every", "20", "--out", str(run_dir)])
  out = capsys.readouterr().out
  assert "final test accuracy" in out
  acc = float(out.split("final test accuracy")[1].split()[0])
  assert acc > 0.7  # 40 DP rounds; the full demo (200 rounds) reaches ~0.95
  # The demo leaves a run directory: every round logged, ε with its δ, the plot.
  rounds = [json.loads(line)["round"] for line in open(run_dir / "metrics.jsonl")]
  assert rounds == list(range(1, 41))
  summary = json.load(open(run_dir / "summary.json"))
  assert summary["delta"] == 1e-5 and summary["epsilon"] > 0
  assert abs(summary["test_accuracy"] - acc) < 1e-4  # printed to 4 digits
  assert (run_dir / "config.json").exists()
  assert (run_dir / "learning_curves.png").stat().st_size > 10_000


@pytest.mark.slow  # PLD over 1000 rounds; the accountants are in test_privacy.py
def test_privacy_command_prints_both_accountants(capsys):
  cli.main(["privacy", "--num-clients", "10000", "--q", "0.01", "--noise-multiplier", "1.0",
            "--rounds", "1000"])
  out = capsys.readouterr().out
  assert "RDP: epsilon = 2.10" in out and "PLD: epsilon = 1.8" in out
  cli.main(["privacy", "--num-clients", "10000", "--cohort-size", "100", "--target-epsilon",
            "4", "--rounds", "500"])
  out = capsys.readouterr().out
  assert "RDP: noise multiplier z =" in out and "PLD: not available" in out


def test_privacy_command_accounts_the_tree(capsys):
  """`fedjax-sim privacy --tree` prints the library's tree-aggregation ε (fs.privacy.epsilon with
  dp_ftrl_mean's strategy_gram), and its calibrated z reaches the target."""
  import re

  import fedjax_sim as fs

  args = ["privacy", "--num-clients", "1000", "--q", "0.1", "--min-separation", "10",
          "--rounds", "40", "--tree"]
  assert cli.main(args + ["--noise-multiplier", "5"]) == 0
  out = capsys.readouterr().out
  sampler = fs.sampling.cyclic_poisson(0.1, 10, max_cohort_size=1000)
  gram = fs.aggregators.dp_ftrl_mean(1.0, 1.0, num_rounds=40).strategy_gram
  want = fs.privacy.epsilon(sampler, 1000, 5.0, 40, 1e-5, strategy_gram=gram)
  got = float(re.search(r"RDP: epsilon = ([0-9.]+)", out).group(1))
  assert "tree aggregation" in out and got == pytest.approx(want, abs=1e-4)
  assert cli.main(args + ["--target-epsilon", "8"]) == 0
  z = float(re.search(r"RDP: noise multiplier z = ([0-9.]+)", capsys.readouterr().out).group(1))
  assert fs.privacy.epsilon(sampler, 1000, z + 1e-3, 40, 1e-5, strategy_gram=gram) <= 8.0
  assert fs.privacy.epsilon(sampler, 1000, 0.98 * z, 40, 1e-5, strategy_gram=gram) > 8.0
  assert cli.main(args + ["--noise-multiplier", "5", "--bands", "4"]) == 2  # two mechanisms
