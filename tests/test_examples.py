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
