"""The benchmark harness refuses bad input and never records a figure for a diverged run."""

import jax.numpy as jnp
import pytest

from benchmarks import run


@pytest.mark.parametrize("argv,needle", [
    (["--workloads", "resnet"], "valid workloads: logistic, dense, cnn, cifar, population"),
    (["--models", "dense", "--cohorts", "100", "7"], "valid cohorts for dense: 10, 100, 1000"),
    (["--workloads", "cifar", "--cohorts", "100"], "valid cohorts for cifar: 50"),
    (["--chunk-sizes", "-2"], "--chunk-sizes"),
])
def test_refuses_unknown_workloads_and_cohorts(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    run.parse_args(argv)
  assert e.value.code == 2
  assert needle in capsys.readouterr().err


def test_defaults_are_valid():
  args = run.parse_args(["--workloads", "cnn", "cifar", "population"])
  assert args.workloads == ["cnn", "cifar", "population"] and args.cohorts is None


def test_check_finite():
  run.check_finite({"w": jnp.ones(3)}, "ok")
  with pytest.raises(SystemExit, match=r"non-finite parameters in \['b'\]") as e:
    run.check_finite({"w": jnp.ones(3), "b": jnp.array([0.0, jnp.nan])}, "x")
  assert e.value.code not in (0, None)


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_diverged_run_fails_loudly_and_records_nothing(tmp_path):
  out = tmp_path / "r.jsonl"
  with pytest.raises(SystemExit, match="non-finite parameters") as e:
    run.main(["--workloads", "population", "--cohorts", "100", "--num-clients", "200",
              "--no-sequential", "--server-lr", "1e39", "--target-seconds", "0.1",
              "--out", str(out)])
  assert e.value.code not in (0, None)
  assert not out.exists() or out.read_text() == ""


FAKE_PEER = '''
import argparse, json
p = argparse.ArgumentParser()
for a in ["--model", "--cohort", "--num_clients", "--batch_size", "--client_lr", "--server_lr",
          "--rounds", "--max_seconds", "--warmup_cohort"]:
  p.add_argument(a)
a = p.parse_args()
print("FedJAX-like noise on stdout")
print(json.dumps({"tool": "fedjax", "model": a.model, "cohort": int(a.cohort),
                  "client_updates_per_s": 50.0, "rounds_per_s": 50.0 / int(a.cohort),
                  "params_finite": a.client_lr != "0.123"}))
'''


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_peer_mode_records_measured_ratios(tmp_path):
  import json
  import sys
  peer = tmp_path / "peer.py"
  peer.write_text(FAKE_PEER)
  out = tmp_path / "r.jsonl"
  run.main(["--workloads", "logistic", "--cohorts", "10", "--num-clients", "40",
            "--no-sequential", "--target-seconds", "0.2", "--peer-python", sys.executable,
            "--peer-script", str(peer), "--out", str(out)])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  fedjax = [r for r in rows if r["engine"] == "fedjax"]
  ours = [r for r in rows if r["engine"] == "fedjax_sim"]
  assert len(fedjax) == 1 and fedjax[0]["cohort"] == 10 and fedjax[0]["model"] == "logistic"
  assert len(ours) == 1
  assert ours[0]["speedup_vs_fedjax"] == ours[0]["client_updates_per_s"] / 50.0


@pytest.mark.slow  # runs the benchmark harness with a fake peer
def test_peer_mode_bad_input(tmp_path, capsys):
  with pytest.raises(SystemExit):
    run.parse_args(["--peer-python", str(tmp_path / "nope")])
  assert "not an executable file" in capsys.readouterr().err
  import sys
  with pytest.raises(SystemExit):
    run.parse_args(["--workloads", "cifar", "--peer-python", sys.executable])
  assert "FedJAX peer runs only logistic, dense, cnn" in capsys.readouterr().err
  peer = tmp_path / "peer.py"
  peer.write_text(FAKE_PEER)
  with pytest.raises(SystemExit, match="FedJAX peer produced non-finite"):
    run.main(["--workloads", "logistic", "--cohorts", "10", "--num-clients", "40",
              "--no-sequential", "--target-seconds", "0.2", "--peer-python", sys.executable,
              "--peer-script", str(peer), "--client-lr", "0.123", "--out",
              str(tmp_path / "x.jsonl")])
