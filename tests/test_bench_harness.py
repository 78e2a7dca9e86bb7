"""The benchmark harness refuses bad input and never records a figure for a diverged run."""

import jax.numpy as jnp
import pytest

from benchmarks import run


@pytest.mark.parametrize("argv,needle", [
    (["--workloads", "resnet"], "valid workloads: logistic, dense, cnn, cifar, population"),
    (["--models", "dense", "--cohorts", "100", "7"], "valid cohorts for dense: 10, 100, 1000"),
    (["--workloads", "cifar", "--cohorts", "100"], "valid cohorts for cifar: 50"),
    (["--chunk-sizes", "-1"], "--chunk-sizes"),
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


def test_diverged_run_fails_loudly_and_records_nothing(tmp_path):
  out = tmp_path / "r.jsonl"
  with pytest.raises(SystemExit, match="non-finite parameters") as e:
    run.main(["--workloads", "population", "--cohorts", "100", "--num-clients", "200",
              "--no-sequential", "--server-lr", "1e39", "--target-seconds", "0.1",
              "--out", str(out)])
  assert e.value.code not in (0, None)
  assert not out.exists() or out.read_text() == ""
