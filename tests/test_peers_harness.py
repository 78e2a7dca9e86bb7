"""`python -m benchmarks.run --peers ...`: interleaving, best settings, ratios and failed peers.

The peers are stand-ins (no peer engine is installed in CI): a script that prints the JSON line a
peer prints, run under this interpreter from a fake venv folder.
"""

import json
import os
import sys
import tempfile

import numpy as np
import pytest

from benchmarks import run, side_by_side, workloads
from benchmarks.peers import common

FAKE_PEER = '''
import argparse, json, sys
p = argparse.ArgumentParser()
for a in ["--model", "--cohort", "--num_clients", "--num-clients", "--batch_size", "--batch-size",
          "--client_lr", "--client-lr", "--server_lr", "--server-lr", "--rounds", "--max_seconds",
          "--max-seconds", "--warmup_cohort", "--backend", "--torch-threads", "--num_cpus",
          "--workers"]:
  p.add_argument(a)
a = p.parse_args()
setting = a.backend or a.torch_threads or a.num_cpus
speed = {"jit": 50.0, "1": 20.0, "2": 40.0}[setting]
if "DIVERGE" in sys.argv[0] and setting == "2":
  print(json.dumps({"client_updates_per_s": 1e9, "rounds_per_s": 1.0, "params_finite": False}))
  sys.exit(0)
print("peer noise on stdout")
print(json.dumps({"tool": "fake", "model": a.model, "cohort": int(a.cohort),
                  "client_updates_per_s": speed, "rounds_per_s": speed / int(a.cohort),
                  "params_finite": True}))
'''


def fake_venvs(tmp_path, names):
  for n in names:
    (tmp_path / "venvs" / n / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / "venvs" / n / "bin" / "python")
  return str(tmp_path / "venvs")


@pytest.mark.slow  # benchmark harness end to end: fake peer processes (~17 s of CPU)
def test_interleaved_best_setting_ratios_and_failed_peers(tmp_path):
  peer = tmp_path / "peer.py"
  peer.write_text(FAKE_PEER)
  diverging = tmp_path / "DIVERGE_peer.py"
  diverging.write_text(FAKE_PEER)
  venvs = fake_venvs(tmp_path, ["fedjax", "flwr"])  # no pfl venv
  out = tmp_path / "peers.jsonl"
  with pytest.raises(SystemExit) as e:  # a failed peer makes the run exit non-zero (3)
    run.main(["--peers", "fedjax", "pfl", "flwr", "--workloads", "logistic", "--cohorts", "10",
              "--num-clients", "40", "--target-seconds", "0.2", "--repeats", "2",
              "--peer-venvs", venvs, "--peer-scripts", f"fedjax={peer}", f"flwr={diverging}",
              "--out", str(out)])
  assert e.value.code == 3
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  runs = [r for r in rows if not r.get("summary")]
  # A-B-C-A-B-C: each repeat runs fedjax_sim, then every setting of every usable peer.
  order = [(r["repeat"], r["engine"], r["setting"]) for r in runs if r["engine"] != "pfl"]
  assert [(rep, eng) for rep, eng, _ in order] == [
      (rep, eng) for rep in (0, 1) for eng in ("fedjax_sim", "fedjax", "flwr", "flwr")]
  assert all("load_avg_1min" in r for r in runs if "error" not in r)
  assert {r["cpu"] for r in rows} == {common.host_cpu()}  # every row, summaries too
  # The missing venv fails pfl's row with the setup command; no ratio from it.
  pfl = [r for r in runs if r["engine"] == "pfl"]
  assert len(pfl) == 1 and "setup.sh pfl" in pfl[0]["error"]
  summaries = {r["peer"]: r for r in rows if r.get("summary")}
  assert "ratio_of_means" not in summaries["pfl"]
  ours = [r["client_updates_per_s"] for r in runs if r["engine"] == "fedjax_sim"]
  assert len(ours) == 2 and all(np.isfinite(ours))
  fj = summaries["fedjax"]
  assert fj["best_setting"] == "backend=jit"
  assert fj["ratio_of_means"] == pytest.approx(np.mean(ours) / 50.0)
  assert fj["ratios_per_repeat"] == pytest.approx([o / 50.0 for o in ours])
  # Flower's 2-CPU setting diverged: an error row, and its huge figure is never "best".
  fl = summaries["flwr"]
  assert fl["best_setting"] == "num_cpus=1"
  assert fl["ratio_of_means"] == pytest.approx(np.mean(ours) / 20.0)
  assert any("diverged" in err for err in fl["errors"])
  md = (tmp_path / "peers.md").read_text()
  assert "| logistic | 10 | fedjax |" in md and "failed: the pfl peer" in md
  assert side_by_side.resummarize(str(out)) in md  # the table again, from the rows alone


INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: another core, never read
"""


def test_host_cpu_names_the_processor_and_its_kernel_extensions(tmp_path):
  intel = tmp_path / "intel"
  intel.write_text(INTEL_AMX)
  assert common.host_cpu(str(intel)) == (
      "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (family 6, model 143; avx512f, amx)")
  amd = tmp_path / "amd"
  amd.write_text("cpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
                 "flags\t\t: fpu avx2 avx512f avx512_bf16\n")
  assert common.host_cpu(str(amd)) == "AMD EPYC (family 25, model 17; avx512f, no amx)"
  plain = tmp_path / "plain"
  plain.write_text("model name\t: Some CPU\nflags\t\t: sse2\n")
  assert common.host_cpu(str(plain)) == "Some CPU (no avx512f, no amx)"
  assert common.host_cpu(str(tmp_path / "missing")) == (
      common.platform.processor() or common.platform.machine())


def test_best_setting_is_the_fastest_mean():
  rows = [{"model": "dense", "cohort": 10, "repeat": i, "engine": "fedjax_sim",
           "setting": "", "client_updates_per_s": 100.0 + i, "load_avg_1min": 1.0}
          for i in range(2)]
  rows += [{"model": "dense", "cohort": 10, "repeat": i, "engine": "pfl", "setting": s,
            "client_updates_per_s": v, "load_avg_1min": 2.0}
           for i, (a, b) in enumerate([(30.0, 45.0), (50.0, 40.0)])
           for s, v in (("torch_threads=1", a), ("torch_threads=2", b))]
  (s,) = side_by_side.summarize(rows)
  assert s["best_setting"] == "torch_threads=2"  # mean 42.5 beats 40
  assert s["ratio_of_means"] == pytest.approx(100.5 / 42.5)
  assert s["ratios_per_repeat"] == pytest.approx([100 / 45, 101 / 40])


def test_examples_ratio_is_work_normalised():
  """Unequal cohorts (fedjax_sim's clients smaller here): the client-updates ratio favours
  fedjax_sim, the examples/s ratio does not; a peer without examples gets no such ratio."""
  rows = [{"model": "cnn", "cohort": 10, "repeat": i, "engine": "fedjax_sim", "setting": "",
           "client_updates_per_s": 12.0, "examples_per_s": 12.0 * 80, "load_avg_1min": 1.0}
          for i in range(2)]
  rows += [{"model": "cnn", "cohort": 10, "repeat": i, "engine": "pfl",
            "setting": "torch_threads=2", "client_updates_per_s": 10.0,
            "detail": {"examples_per_s": 10.0 * 100 + i}, "load_avg_1min": 1.0}
           for i in range(2)]
  rows += [{"model": "cnn", "cohort": 10, "repeat": i, "engine": "flwr", "setting": "cpus=1",
            "client_updates_per_s": 5.0, "load_avg_1min": 1.0} for i in range(2)]
  flwr, pfl = side_by_side.summarize(rows)
  assert pfl["ratio_of_means"] == pytest.approx(1.2)
  assert pfl["ratio_of_means_examples"] == pytest.approx(960 / 1000.5)
  assert pfl["ratios_per_repeat_examples"] == pytest.approx([960 / 1000, 960 / 1001])
  assert "ratio_of_means_examples" not in flwr
  md = side_by_side.markdown([flwr, pfl])
  assert "**0.96×** (0.96, 0.96)" in md and "| — |" in md


def test_examples_ratio_is_against_the_peers_best_setting_by_examples():
  """pfl's 1-thread runs draw more client-updates/s here but fewer examples/s (smaller cohorts
  drawn): the work-normalised ratio is taken against its best setting by examples/s."""
  rows = [{"model": "cnn", "cohort": 10, "repeat": i, "engine": "fedjax_sim", "setting": "",
           "client_updates_per_s": 10.0, "examples_per_s": 1000.0, "load_avg_1min": 1.0}
          for i in range(2)]
  for setting, cu, ex in (("torch_threads=1", 12.0, 900.0), ("torch_threads=2", 11.0, 1100.0)):
    rows += [{"model": "cnn", "cohort": 10, "repeat": i, "engine": "pfl", "setting": setting,
              "client_updates_per_s": cu, "examples_per_s": ex, "load_avg_1min": 1.0}
             for i in range(2)]
  (s,) = side_by_side.summarize(rows)
  assert s["best_setting"] == "torch_threads=1"
  assert s["best_setting_examples"] == "torch_threads=2"
  assert s["ratio_of_means_examples"] == pytest.approx(1000 / 1100)


def test_fedjax_sim_is_taken_at_its_best_setting_too():
  """--ours-settings default processes=2: fedjax_sim's best mean is compared, and named."""
  rows = [{"model": "cnn", "cohort": 100, "repeat": i, "engine": "fedjax_sim",
           "ours_setting": o, "setting": f"{o} chunk=1", "client_updates_per_s": v,
           "examples_per_s": e, "load_avg_1min": 1.0}
          for i in range(2)
          for o, v, e in (("default", 13.0, 1300.0 + i), ("processes=2", 15.0 + i, 1200.0))]
  rows += [{"model": "cnn", "cohort": 100, "repeat": i, "engine": "pfl", "setting": "workers=2",
            "client_updates_per_s": 15.0, "examples_per_s": 1500.0, "load_avg_1min": 1.0}
           for i in range(2)]
  (s,) = side_by_side.summarize(rows)
  assert s["fedjax_sim_best_setting"] == "processes=2"
  assert s["fedjax_sim_setting_means"] == {"default": 13.0, "processes=2": 15.5}
  assert s["ratio_of_means"] == pytest.approx(15.5 / 15.0)
  assert s["ratios_per_repeat"] == pytest.approx([1.0, 16 / 15])
  # By examples its best is the default here (1300.5 > 1200): compared on that.
  assert s["fedjax_sim_best_setting_examples"] == "default"
  assert s["ratio_of_means_examples"] == pytest.approx(1300.5 / 1500)
  assert "15–16 (processes=2)" in side_by_side.markdown([s])
  # Rows from before --ours-settings are the default setting; one setting: nothing named.
  (old,) = side_by_side.summarize([{k: v for k, v in r.items() if k != "ours_setting"}
                                   for r in rows if r.get("ours_setting") != "processes=2"])
  assert "fedjax_sim_best_setting" not in old
  assert side_by_side.ours_argv("default") == ()
  assert side_by_side.ours_argv("processes=4") == ("--processes", "4")
  for bad in ("processes=1", "threads=2", "processes=x"):
    with pytest.raises(ValueError, match="not a fedjax_sim setting"):
      side_by_side.ours_argv(bad)


def test_peers_bad_input(capsys, tmp_path):
  with pytest.raises(SystemExit):
    run.parse_args(["--peers", "tff"])
  assert "invalid choice" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run.parse_args(["--peers", "pfl", "--repeats", "0"])
  assert "--repeats must be >= 1" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run.parse_args(["--peers", "pfl", "--peer-python", sys.executable])
  assert "drop --peer-python" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run.parse_args(["--peers", "pfl", "--peer-settings", "num_cpus=1"])
  assert "valid: torch_threads=1, torch_threads=2, workers=2" in capsys.readouterr().err
  args = run.parse_args(["--peers", "pfl", "flwr", "--peer-settings", "num_cpus=1"])
  assert [s for s, _ in side_by_side.settings_of(args, side_by_side.PEERS["flwr"])] == [
      "num_cpus=1"]
  assert [s for s, _ in side_by_side.settings_of(args, side_by_side.PEERS["pfl"])] == [
      "torch_threads=1", "torch_threads=2", "workers=2"]
  with pytest.raises(SystemExit):
    run.parse_args(["--peers", "pfl", "--ours-settings", "default", "threads=2"])
  assert "--ours-settings: 'threads=2' is not a fedjax_sim setting" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run.parse_args(["--peers", "pfl", "--processes", "2"])
  assert "pass --ours-settings processes=2" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run.parse_args(["--processes", "0"])
  assert "--processes must be >= 1" in capsys.readouterr().err


def test_pfl_workers_stop_together_and_count_every_workers_examples(capsys):
  """pfl's multi-process setting: worker 0's row times the lockstep rounds and adds the other
  workers' shares of the examples; a worker that failed fails the row with its output."""
  import subprocess

  sys.path.insert(0, os.path.dirname(common.__file__))
  import pfl_common  # the peer's module (no torch needed for these parts)

  row = pfl_common.combine_workers({"examples_timed": 300, "seconds": 3.0, "workers": 2},
                                   [{"examples_timed": 150}, {"examples_timed": 450}])
  assert row["examples_per_s"] == pytest.approx(300.0) and row["workers"] == 3
  args = pfl_common.parse_args("x", ["--workers", "2"], cohort=4, num_clients=8, batch_size=2)
  assert args.workers == 2
  with pytest.raises(SystemExit):
    pfl_common.parse_args("x", ["--workers", "0"], cohort=4, num_clients=8, batch_size=2)
  assert "--workers must be >= 1" in capsys.readouterr().err
  ok = subprocess.Popen([sys.executable, "-c", "print('noise'); print('{\"examples_timed\": 7}')"],
                        stdout=subprocess.PIPE)
  fail = subprocess.Popen([sys.executable, "-c", "raise SystemExit('gloo: connection refused')"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  paths = []
  for proc in (ok, fail):
    out = proc.communicate()[0]
    f = tempfile.NamedTemporaryFile("wb", suffix=".log", delete=False)
    f.write(out)
    f.close()
    paths.append(f.name)
  assert pfl_common.collect_workers([(ok, paths[0])]) == [{"examples_timed": 7}]
  with pytest.raises(SystemExit, match="(?s)exited with 1:.*connection refused"):
    pfl_common.collect_workers([(fail, paths[1])])


@pytest.mark.parametrize("model", ["logistic", "cifar"])
def test_peers_train_on_the_same_data(model):
  """Peers import benchmarks/peers/common.py (numpy only); it must match benchmarks.run."""
  gen = workloads.WORKLOADS[model].data
  for ours, theirs in zip(gen(30), common.workload_data(model, 30)):
    np.testing.assert_array_equal(ours, theirs)
  assert common.WORKLOADS[model][1] == workloads.WORKLOADS[model].batch_size


def test_flower_peer_refuses_what_it_cannot_run(capsys):
  sys.path.insert(0, os.path.join(os.path.dirname(workloads.__file__), "peers"))
  from benchmarks.peers import flwr_fedavg

  a = flwr_fedavg.parse_args(["--model", "cifar", "--cohort", "50"])
  assert (a.num_clients, a.batch_size) == (1000, 10)
  with pytest.raises(SystemExit):
    flwr_fedavg.parse_args(["--server_lr", "0.5"])
  assert "server SGD with lr 1.0 only" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    flwr_fedavg.parse_args(["--cohort", "20", "--num_clients", "10"])
  assert "--cohort 20 must be in [1, --num_clients=10]" in capsys.readouterr().err


def test_lm_workloads_run_fedjax_own_models_and_a_missing_venv_names_the_setup(tmp_path):
  args = run.parse_args(["--peers", "fedjax", "--workloads", "stackoverflow",
                         "--peer-venvs", str(tmp_path)])
  peer = side_by_side.PEERS["fedjax"]
  assert {"stackoverflow", "shakespeare"} <= set(peer.models)
  assert side_by_side.script_path(args, peer, "stackoverflow").endswith("peers/fedjax_lm.py")
  assert side_by_side.script_path(args, peer, "cnn").endswith("peers/fedjax_fedavg.py")
  with pytest.raises(side_by_side.PeerError, match="setup.sh fedjax"):
    side_by_side.check_peer(args, peer)


def test_pfl_runs_its_stackoverflow_transformer_through_pfl_lm(tmp_path):
  args = run.parse_args(["--peers", "pfl", "--workloads", "stackoverflow-transformer",
                         "--peer-venvs", str(tmp_path)])
  pfl, fedjax = side_by_side.PEERS["pfl"], side_by_side.PEERS["fedjax"]
  assert side_by_side.script_path(args, pfl, "stackoverflow-transformer").endswith(
      "peers/pfl_lm.py")
  assert side_by_side.script_path(args, pfl, "cifar").endswith("peers/pfl_fedavg.py")
  assert "stackoverflow-transformer" not in fedjax.models  # FedJAX has no such model
  argv = side_by_side.peer_argv(args, pfl, "stackoverflow-transformer", 400, 3400, ())
  assert argv[argv.index("--batch-size") + 1] == "16" and argv[1].endswith("pfl_lm.py")
  with pytest.raises(side_by_side.PeerError, match="setup.sh pfl"):
    side_by_side.check_peer(args, pfl)


def test_pfl_offers_the_emnist_cnn_with_pfls_simple_cnn_layers(tmp_path):
  """pfl_fedavg.py's --model lists cnn beside cifar: the harness then runs pfl on `cnn`, with
  the workload's batch and `--model cnn` (the script's --help runs without torch)."""
  args = run.parse_args(["--peers", "pfl", "--workloads", "cnn", "cifar",
                         "--peer-venvs", fake_venvs(tmp_path, ["pfl"])])
  pfl = side_by_side.PEERS["pfl"]
  models = side_by_side.peer_models(args, pfl)
  assert {"cnn", "cifar", "stackoverflow-transformer"} <= set(models)
  assert "dense" not in models and "logistic" not in models
  argv = side_by_side.peer_argv(args, pfl, "cnn", 10, 3400, ())
  assert argv[argv.index("--model") + 1] == "cnn"
  assert argv[argv.index("--batch-size") + 1] == str(workloads.WORKLOADS["cnn"].batch_size)
  assert argv[1].endswith("pfl_fedavg.py")
