from fedjax_sim import cli


def test_demo_runs_and_learns(capsys):
  cli.main(["demo", "--rounds", "40", "--eval-every", "20"])
  out = capsys.readouterr().out
  assert "final test accuracy" in out
  acc = float(out.split("final test accuracy")[1].split()[0])
  assert acc > 0.7  # 40 DP rounds; the full demo (200 rounds) reaches ~0.95
