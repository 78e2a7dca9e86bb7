"""``python -m fedjax_sim.launch``: local processes of one run (the launcher itself; the JAX run
across processes is tests/test_sharding.py's multihost test)."""

import json
import os
import subprocess
import sys
import time

import jax
import pytest

import fedjax_sim as fs
from fedjax_sim import launch

# A child that records what the launcher gave it (no jax: these tests stay fast).
REPORT = """
import json, os, sys
out = sys.argv[1]
pid = os.environ["FEDJAX_SIM_PROCESS_ID"]
info = {k: os.environ.get(k) for k in ("FEDJAX_SIM_COORDINATOR", "FEDJAX_SIM_NUM_PROCESSES",
        "FEDJAX_SIM_PROCESS_ID", "FEDJAX_SIM_CPUS", "FEDJAX_SIM_HOST_DEVICES", "XLA_FLAGS")}
info["affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
with open(os.path.join(out, f"p{pid}.json"), "w") as f:
  json.dump(info, f)
print(f"hello from {pid}")
"""


def _reports(tmp_path, n):
  return [json.load(open(tmp_path / f"p{i}.json")) for i in range(n)]


def test_cpu_groups_split_and_refuse():
  assert launch.cpu_groups(3, 1, available=[4, 0, 2]) == [(0,), (2,), (4,)]
  assert launch.cpu_groups(1, 2, available=[0, 1, 2]) == [(0, 1)]
  with pytest.raises(ValueError, match="--processes 3 x --cpus-per-process 1 pins 3 CPUs.*"
                                       "--no-pin"):
    launch.cpu_groups(3, 1, available=[0, 1])
  with pytest.raises(ValueError, match="--processes must be a positive integer"):
    launch.cpu_groups(0, 1, available=[0, 1])
  with pytest.raises(ValueError, match="--cpus-per-process must be a positive integer"):
    launch.cpu_groups(1, 0, available=[0, 1])


def test_each_process_gets_its_id_coordinator_and_cpus(tmp_path, capfd):
  script = tmp_path / "report.py"
  script.write_text(REPORT)
  n = min(2, len(launch.available_cpus()))
  status = launch.launch([sys.executable, str(script), str(tmp_path)], n,
                         log_dir=str(tmp_path / "logs"), env={**os.environ, "XLA_FLAGS": ""})
  assert status == 0
  got = _reports(tmp_path, n)
  assert [g["FEDJAX_SIM_PROCESS_ID"] for g in got] == [str(i) for i in range(n)]
  assert len({g["FEDJAX_SIM_COORDINATOR"] for g in got}) == 1
  assert got[0]["FEDJAX_SIM_COORDINATOR"].startswith("127.0.0.1:")
  assert all(g["FEDJAX_SIM_NUM_PROCESSES"] == str(n) and g["FEDJAX_SIM_HOST_DEVICES"] == "1"
             for g in got)
  groups = launch.cpu_groups(n, 1)
  if hasattr(os, "sched_setaffinity"):  # pinned: each to its own core, kernels on one thread
    assert [tuple(g["affinity"]) for g in got] == groups
    assert [g["FEDJAX_SIM_CPUS"] for g in got] == [",".join(map(str, c)) for c in groups]
    assert all(g["XLA_FLAGS"] == launch.SINGLE_THREAD_FLAG for g in got)
  # Process 0 writes to the terminal; the others to their log in --log-dir.
  assert "hello from 0" in capfd.readouterr().out
  if n > 1:
    assert "hello from 1" in (tmp_path / "logs" / "process-1.log").read_text()


def test_unpinned_processes_keep_the_users_flags(tmp_path):
  script = tmp_path / "report.py"
  script.write_text(REPORT)
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}
  assert launch.launch([sys.executable, str(script), str(tmp_path)], 3, pin=False, env=env) == 0
  got = _reports(tmp_path, 3)
  assert all(g["FEDJAX_SIM_CPUS"] is None for g in got)
  assert all(g["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=true" for g in got)


def test_a_failing_process_stops_the_others_and_its_status_is_returned(tmp_path, capfd):
  # Process 1 fails at once; process 0 would sleep for a minute unless it is stopped.
  script = tmp_path / "fail.py"
  script.write_text("import os, sys, time\n"
                    "if os.environ['FEDJAX_SIM_PROCESS_ID'] == '1':\n"
                    "  print('worker one broke'); sys.exit(3)\n"
                    "time.sleep(60)\n")
  t = time.monotonic()
  status = launch.launch([sys.executable, str(script)], 2, pin=False)
  assert status == 3
  assert time.monotonic() - t < 30  # process 0 was stopped, not waited for
  err = capfd.readouterr().err
  assert "process 1 of 2 exited with status 3" in err and "worker one broke" in err
  log_dir = err.split("Its output: ")[1].split("process-1.log")[0]
  assert os.path.isdir(log_dir)  # a failed run keeps its logs


@pytest.mark.slow  # process-level: six launcher processes, each importing jax (~12 s)
def test_command_line(tmp_path):
  script = tmp_path / "ok.py"
  script.write_text("import sys; print('args', sys.argv[1:])\n")
  res = subprocess.run([sys.executable, "-m", "fedjax_sim.launch", "--processes", "2",
                        "--no-pin", str(script), "--flag", "1"],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert "args ['--flag', '1']" in res.stdout
  # The script's own flags (even one named like the launcher's) stay the script's; -m MODULE.
  res = subprocess.run([sys.executable, "-m", "fedjax_sim.launch", "-n", "1", "--no-pin",
                        str(script), "--processes", "3"],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and "args ['--processes', '3']" in res.stdout, res.stderr
  res = subprocess.run([sys.executable, "-m", "fedjax_sim.launch", "-n", "1", "--no-pin",
                        "-m", "platform", "--terse"], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and res.stdout.strip(), res.stderr
  res = subprocess.run([sys.executable, "-m", "fedjax_sim.launch", "--processes", "2"],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and "name the script to run" in res.stderr
  res = subprocess.run([sys.executable, "-m", "fedjax_sim.launch", "-n", "2", "--no-pin", "--",
                        "no-such-program-here"], capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and "cannot start no-such-program-here" in res.stderr
  many = len(launch.available_cpus()) + 1
  res = subprocess.run([sys.executable, "-m", "fedjax_sim.launch", "--processes", str(many),
                        str(script)], capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and f"--processes {many}" in res.stderr and "--no-pin" in res.stderr


def test_launched_config_and_initialize_refuse_mixed_or_broken_settings(monkeypatch):
  assert launch.launched_config() is None and not launch.launched()
  with pytest.raises(ValueError, match="command is empty"):
    launch.launch([], 2)
  monkeypatch.setenv(launch.ENV_PROCESS_ID, "0")
  with pytest.raises(ValueError, match="FEDJAX_SIM_COORDINATOR is not set"):
    launch.launched_config()
  monkeypatch.setenv(launch.ENV_COORDINATOR, "127.0.0.1:1")
  monkeypatch.setenv(launch.ENV_NUM_PROCESSES, "two")
  with pytest.raises(ValueError, match="must be integers"):
    launch.launched_config()
  monkeypatch.setenv(launch.ENV_NUM_PROCESSES, "2")
  monkeypatch.setenv(launch.ENV_PROCESS_ID, "2")
  with pytest.raises(ValueError, match=r"must lie in \[0, FEDJAX_SIM_NUM_PROCESSES=2\)"):
    launch.launched_config()
  monkeypatch.setenv(launch.ENV_PROCESS_ID, "1")
  assert launch.launched_config() == {"coordinator_address": "127.0.0.1:1",
                                      "num_processes": 2, "process_id": 1}
  with pytest.raises(ValueError, match="which chose them already"):
    fs.sharding.initialize("127.0.0.1:2", 2, 0)


def test_initialize_outside_the_launcher_is_a_single_process_run():
  assert fs.sharding.initialize() is False  # no launcher, no cluster: nothing changes


@pytest.mark.slow  # process-level (a launcher and its children)
def test_sigterm_to_the_launcher_stops_every_process(tmp_path):
  script = tmp_path / "sleep.py"
  script.write_text("import os, time\n"
                    "open(os.path.join(os.path.dirname(__file__), "
                    "f\"started{os.environ['FEDJAX_SIM_PROCESS_ID']}\"), 'w').close()\n"
                    "time.sleep(120)\n")
  proc = subprocess.Popen([sys.executable, "-m", "fedjax_sim.launch", "--processes", "2",
                           "--no-pin", str(script)], stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while not all((tmp_path / f"started{i}").exists() for i in range(2)):
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.1)
  proc.terminate()
  err = proc.communicate(timeout=60)[1]
  assert proc.returncode == 143 and "terminated; processes stopped" in err


def test_a_simulation_without_a_mesh_in_a_multi_process_run_warns(monkeypatch, pop, loss_fn):
  """An explicit chunk size keeps the default mesh off: each process would then run the whole
  simulation alone, which is said, not left silent."""
  import optax

  algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=4,
                              local_epochs=1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.warns(UserWarning, match="every process runs the whole simulation by itself"):
    fs.Simulation(algo, pop, cohort_size=4, chunk_size=2)
