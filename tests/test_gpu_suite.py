"""The GPU suite (benchmarks/gpu_suite.py), its pfl peer and the pfl-model CIFAR workload."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gpu_suite, run, workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pfl_peer():
  spec = importlib.util.spec_from_file_location(
      "pfl_fedavg", os.path.join(ROOT, "benchmarks", "peers", "pfl_fedavg.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)  # numpy only at import; torch/pfl are imported in main()
  return mod


def _num_params(module, shape):
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones(shape)))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def test_cifar_is_pfl_simple_cnn_and_cifar_small_is_zoo_cifarcnn():
  # pfl-research benchmarks/model/pytorch/cnn.py simple_cnn on 32x32x3, 10 classes: 896 + 18,496
  # (convs) + 12,544 * 128 + 128 + 128 * 10 + 10 (dense) = 1,626,442.
  assert _num_params(workloads.WORKLOADS["cifar"].module(), (1, 32, 32, 3)) == 1_626_442
  assert _num_params(workloads.WORKLOADS["cifar-small"].module(), (1, 32, 32, 3)) == 545_098
  # its dropout is on in training:
  assert workloads.WORKLOADS["cifar"].train_kwargs == {"train": True}


def test_pfl_peer_uses_the_same_data_and_refuses_bad_input(capsys):
  peer = _pfl_peer()
  # One generator file (benchmarks/peers/common.py) serves both (imported under two names).
  gen_module = sys.modules[workloads.cifar_shaped.__module__]
  assert os.path.samefile(peer.common.__file__, gen_module.__file__)
  for a, b in zip(peer.common.cifar_shaped(7, 50, 3), workloads.cifar_shaped(7, 50, 3)):
    np.testing.assert_array_equal(a, b)
  for argv, needle in [(["--rounds", "0"], "--rounds must be >= 1"),
                       (["--cohort", "60", "--num-clients", "50"], "exceeds --num-clients"),
                       (["--warmup-rounds", "0"], "--warmup-rounds must be >= 1"),
                       (["--device", "tpu"], "invalid choice")]:
    with pytest.raises(SystemExit):
      peer.parse_args(argv)
    assert needle in capsys.readouterr().err


def test_gpu_plan_has_the_issue_sizes_and_every_command_parses():
  steps = gpu_suite.plan(dry_run=False, pfl_python="python3")
  assert list(steps) == list(gpu_suite.STEPS)
  argv = {k: s["cmd"][3:] for k, s in steps.items() if s["kind"] == "run"}
  assert argv["cifar"][argv["cifar"].index("--rounds") + 1] == "1500"
  parsed = {k: run.parse_args(a) for k, a in argv.items()}  # the harness accepts each step
  assert parsed["cifar"].workloads == ["cifar"] and parsed["cifar"].rounds == 1500
  assert 0 < parsed["cifar"].max_seconds <= 90
  assert parsed["cnn"].workloads == ["cnn"] and parsed["cnn"].cohorts == [1000]
  assert parsed["population"].cohorts == [10**4] and workloads.WORKLOADS["population"].dp_only
  assert parsed["dense"].cohorts == [10**4] and parsed["dense"].num_clients == 10**4
  # the sequential baseline runs (cifar_after only repeats the fedjax_sim figure, precision
  # compares two fedjax_sim rows)
  assert not any(p.no_sequential for k, p in parsed.items()
                 if k not in ("cifar_after", "precision"))
  pfl = _pfl_peer().parse_args(steps["pfl"]["cmd"][2:])
  assert pfl.device == "cuda" and pfl.cohort == 50 and pfl.batch_size == 10
  assert (pfl.client_lr, pfl.server_lr) == (0.1, 1.0)
  default = gpu_suite.parse_args([])
  assert default.budget_seconds <= 540  # the suite fits 9 minutes
  # a plain run's time boxes fit its budget, with 30 s for interpreter starts
  assert default.steps == list(gpu_suite.DEFAULT_STEPS)
  assert sum(steps[k]["box"] for k in default.steps) <= default.budget_seconds - 30
  assert gpu_suite.parse_args(["--dry-run"]).steps == list(gpu_suite.STEPS)
  # the sweep includes the model's automatic chunk (0) and the measured one (-1)
  assert parsed["cnn"].chunk_sizes == [0, -1, 20, 50, 150]
  assert parsed["cnn"].autotune_budget_seconds <= 30
  assert parsed["precision"].precision == ["f32", "bf16"]
  assert parsed["precision"].cohorts == [1000]
  assert parsed["stackoverflow"].workloads == ["stackoverflow"]
  assert parsed["shakespeare"].workloads == ["shakespeare"]
  assert parsed["stackoverflow_transformer"].workloads == ["stackoverflow-transformer"]
  assert parsed["stackoverflow_transformer"].cohorts == [400]
  assert parsed["cifar_after"].workloads == ["cifar"]
  nproc = steps["pfl_nproc"]["cmd"]
  assert nproc[1:3] == ["-m", "torch.distributed.run"]
  assert f"--nproc_per_node={steps['pfl_nproc']['nproc']}" in nproc
  assert steps["peaks"]["kind"] == "code" and steps["precision"]["kind"] == "run"


def test_failed_and_timed_out_steps_are_recorded(tmp_path):
  with open(tmp_path / "log", "w") as log:
    rows, st = gpu_suite.run_step(
        "x", {"cmd": [sys.executable, "-c", "import sys; sys.exit('boom')"], "kind": "env"},
        30, dict(os.environ), log)
    assert rows == [] and st["status"] == "failed" and "boom" in st["error"]
    rows, st = gpu_suite.run_step(
        "y", {"cmd": [sys.executable, "-c", "import time; time.sleep(30)"], "kind": "env"},
        1, dict(os.environ), log)
    assert rows == [] and st["status"] == "timeout" and "1 s time box" in st["error"]
    rows, st = gpu_suite.run_step(
        "p", {"cmd": [sys.executable, "-c", "print('{\"params_finite\": false}')"],
              "kind": "pfl"}, 30, dict(os.environ), log)
    assert rows == [] and st["status"] == "failed" and "non-finite" in st["error"]


def test_a_pfl_that_cannot_start_is_an_error_row_with_the_setup_and_no_ratio(tmp_path):
  step = {"cmd": [sys.executable, "-c", "import sys; sys.exit('torchrun: rendezvous failed')"],
          "kind": "pfl", "nproc": 4}
  with open(tmp_path / "log", "w") as log:
    rows, st = gpu_suite.run_step("pfl_nproc", step, 30, dict(os.environ), log)
  assert rows == [] and st["status"] == "failed"
  assert "rendezvous failed" in st["error"] and "setup.sh pfl" in st["error"]
  ours = {"step": "cifar", "engine": "fedjax_sim", "model": "cifar", "cohort": 50, "rounds": 3,
          "rounds_per_s": 1.0, "client_updates_per_s": 50.0}
  md = gpu_suite.table([ours], [st])
  assert "FAILED" in md and "setup.sh pfl" in md and "pfl at its best" not in md


def test_missing_pfl_is_a_skipped_row_and_bad_steps_are_refused(tmp_path, capsys):
  out = tmp_path / "r.jsonl"
  assert gpu_suite.main(["--steps", "pfl", "--out", str(out),
                         "--pfl-python", str(tmp_path / "no-python")]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 1 and rows[0]["status"] == "skipped"
  assert "pfl not installed" in rows[0]["error"]
  assert "pfl not installed" in (tmp_path / "r.jsonl.md").read_text()
  with pytest.raises(SystemExit):
    gpu_suite.parse_args(["--steps", "resnet"])
  assert "valid steps: env, peaks, cifar, pfl" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(tmp_path):
  out = tmp_path / "r.jsonl"
  assert gpu_suite.main(["--dry-run", "--out", str(out), "--pfl-python",
                         str(tmp_path / "no-python")]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  status = {r["step"]: r for r in rows if r.get("kind") == "status"}
  assert set(status) == set(gpu_suite.STEPS)
  for step in ("pfl", "pfl_nproc"):  # a peer that cannot start: an error row, no ratio
    assert status[step]["status"] == "skipped" and "pfl not installed" in status[step]["error"]
  for step in ("env", "peaks", "cifar", "cifar_after", "cnn", "stackoverflow",
               "stackoverflow_transformer", "shakespeare", "precision", "population", "dense"):
    assert status[step]["status"] == "ok", status[step]
  figures = {r["step"]: r for r in rows if r.get("engine") == "fedjax_sim"}
  assert set(figures) == {"cifar", "cifar_after", "cnn", "stackoverflow",
                          "stackoverflow_transformer", "shakespeare", "precision", "population",
                          "dense"}
  assert sorted(r["precision"] for r in rows if r.get("step") == "precision"
                and r.get("engine") == "fedjax_sim") == ["bf16", "f32"]
  assert {r["precision"] for r in rows if r.get("engine") == "gemm_peak"} == {
      "f32", "tf32_default", "bf16"}
  assert figures["cifar"]["rounds"] == 2 and figures["cifar"]["params"] == 1_626_442
  assert figures["population"]["dp"] is True
  for step, r in figures.items():
    assert np.isfinite(r["client_updates_per_s"]) and r["client_updates_per_s"] > 0
    # cifar_after repeats cifar and the LM rows skip the sequential loop (time budget).
    if step not in ("cifar_after", "stackoverflow", "stackoverflow_transformer", "shakespeare",
                    "precision"):
      assert r["speedup_vs_sequential"] > 0
  env = [r for r in rows if r["step"] == "env" and "kind" not in r]
  assert env and env[0]["jax_backend"] == "cpu"
  md = (tmp_path / "r.jsonl.md").read_text()
  assert "| cifar | fedjax_sim |" in md and "DRY RUN" in md
  assert "measured GEMM peaks" in md and "precision rows: cnn c3 chunk 3: bf16" in md
  assert "x client-updates/s" not in md


@pytest.mark.slow  # timed benchmark blocks
def test_fixed_rounds_are_timed_in_blocks_and_stop_at_max_seconds(tmp_path, capsys):
  out = tmp_path / "r.jsonl"
  run.main(["--workloads", "population", "--num-clients", "40", "--cohorts", "4",
            "--no-sequential", "--rounds", "250", "--max-seconds", "1e-9", "--out", str(out)])
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert row["rounds"] == 100  # one 100-round block timed, then the limit stopped it
  assert row["client_updates_per_s"] == pytest.approx(4 * row["rounds_per_s"])
  assert row["padding_waste"] >= 1.0
  for argv, needle in [(["--max-seconds", "5"], "needs --rounds"),
                       (["--rounds", "-1"], "--rounds must be >= 0"),
                       (["--autotune-budget-seconds", "0"], "--autotune-budget-seconds must be"),
                       (["--precision", "f16"], "invalid choice: 'f16'"),
                       (["--workloads", "dense", "--num-clients", "9", "--cohorts", "0"],
                        "--cohorts must be >= 1")]:
    with pytest.raises(SystemExit):
      run.parse_args(argv)
    assert needle in capsys.readouterr().err
