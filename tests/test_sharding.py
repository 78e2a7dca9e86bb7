"""Sharding over a 'clients' mesh axis and multi-process runs give the single-device result.

XLA_FLAGS (forced CPU devices) must be set before jax is imported, so the many-device and
multi-process runs happen in fresh processes (``sharded_worker.py``); this process computes the
1-device reference with the same workload.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from sharded_worker import WORKLOADS, build, run_workload

import fedjax_sim as fs
from fedjax_sim.launch import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL, ATOL = 2e-5, 2e-6


def _env(num_devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  return env


@pytest.fixture(scope="module")
def reference():
  """Every workload on this process's single default device (no mesh)."""
  assert len(jax.devices()) == 1
  out = {}
  for name in WORKLOADS:
    out.update(run_workload(name))
  return out


def _assert_same(got, want, names):
  compared = 0
  for key in want:
    if key.split("/")[0] in names and not key.endswith("/chunk"):
      np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
      compared += 1
  assert compared >= 3 * len(names)  # params (w, b), loss, and SCAFFOLD's client states


@pytest.mark.slow  # an end-to-end run (> 20 s of CPU on 2 cores)
def test_eight_devices_equal_one_device(reference, tmp_path):
  path = tmp_path / "d8.npz"
  subprocess.run([sys.executable, os.path.join(HERE, "sharded_worker.py"), "devices", str(path),
                  ",".join(WORKLOADS)], env=_env(8), check=True, timeout=300)
  got = np.load(path)
  assert int(got["num_devices"]) == 8
  _assert_same(got, reference, WORKLOADS)
  for name in WORKLOADS:  # cohort 7 padded to one chunk of 8: one client per device
    assert int(got[f"{name}/chunk"]) == 8
  for where in ("host", "sharded"):  # population_on="host" / "sharded" on 8 devices too
    placed = {k[len(where) + 1:]: got[k] for k in got.files if k.startswith(where + "_")}
    _assert_same(placed, reference, ("scaffold",))
  assert str(got["state_sharding"]) == "P('clients',)"  # per-client state split over devices
  sweep = {k[len("sweep_"):]: got[k] for k in got.files if k.startswith("sweep_fedavg/")}
  _assert_same(sweep, reference, ("fedavg",))  # fs.sweep lanes split over 8 devices
  assert bool(got["sweep_lanes_differ"]) and str(got["sweep_sharding"]) == "P('clients',)"
  assert "3 simulations cannot be split over the 8 devices" in str(got["sweep_error"])
  assert str(got["features_sharding"]) == "P('clients',)"  # "sharded": 1/8 of the rows each
  assert int(got["features_shard_rows"]) == -(-int(got["total_rows"]) // 8)
  msg = str(got["chunk_error"])
  assert "chunk_size=3 cannot be split over the 8 devices" in msg and "8, 16, 24" in msg


@pytest.mark.multihost
def test_two_processes_equal_single_process(reference, tmp_path):
  path = tmp_path / "mh.npz"
  port = free_port()
  names = ("dp_fedavg", "scaffold")
  procs = [
      subprocess.Popen(
          [sys.executable, os.path.join(HERE, "sharded_worker.py"), "multihost", str(path),
           ",".join(names), str(port), str(pid), "2"],
          env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for pid in range(2)
  ]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  got = np.load(path)
  assert int(got["num_devices"]) == 4  # 2 processes x 2 devices in one mesh
  _assert_same(got, reference, names)


@pytest.mark.multihost
def test_launched_processes_split_cohorts_by_default(reference, tmp_path):
  """``python -m fedjax_sim.launch --processes 2``: no mesh passed, each process scans its own
  clients (``per_device_scan``) on the global mesh, pinned to its own core; same results."""
  path = tmp_path / "launched.npz"
  names = ("fedavg", "scaffold")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process, as the launcher sets it up
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  pin = [] if len(os.sched_getaffinity(0)) >= 2 else ["--no-pin"]
  res = subprocess.run([sys.executable, "-m", "fedjax_sim.launch", "--processes", "2", *pin,
                        "--log-dir", str(tmp_path / "logs"),
                        os.path.join(HERE, "sharded_worker.py"), "launched", str(path),
                        ",".join(names)], env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  got = np.load(path)
  assert int(got["num_devices"]) == 2 and int(got["default_mesh_devices"]) == 2
  assert bool(got["per_device_scan"])
  if not pin:  # process 0 on the first core, its kernels single-threaded
    assert list(got["cpus"]) == [min(os.sched_getaffinity(0))]
    assert "--xla_cpu_multi_thread_eigen=false" in str(got["xla_flags"])
  _assert_same(got, reference, names)
  # Process 0 alone wrote the log (4 rounds, 4 rows); the other run was refused on both.
  with open(f"{path}.log/metrics.jsonl") as f:
    assert [json.loads(line)["round"] for line in f] == [1, 2, 3, 4]
  assert "holds the log of another run" in open(f"{path}.refused0.txt").read()
  assert "process 0 refused it" in open(f"{path}.refused1.txt").read()


def test_mesh_bad_input(pop, loss_fn):
  algo = build("fedavg", loss_fn)
  with pytest.raises(ValueError, match="no 'clients' axis"):
    fs.Simulation(algo, pop, cohort_size=4, mesh=jax.make_mesh((1,), ("data",)))
  with pytest.raises(ValueError, match="need AxisType.Auto"):
    fs.Simulation(algo, pop, cohort_size=4, mesh=jax.make_mesh(
        (1,), ("clients",), axis_types=(jax.sharding.AxisType.Explicit,)))
  with pytest.raises(ValueError, match="population_on='sharded' splits the examples"):
    fs.Simulation(algo, pop, cohort_size=4, population_on="sharded")
  with pytest.raises(TypeError, match="jax.sharding.Mesh"):
    fs.Simulation(algo, pop, cohort_size=4, mesh="clients")
  with pytest.raises(ValueError, match="use a multiple of 4"):
    fs.sharding.fit_chunk(6, cohort_size=10, num_devices=4, requested=6)
  assert fs.sharding.fit_chunk(6, cohort_size=10, num_devices=4, requested=None) == 8
  assert fs.sharding.fit_chunk(12, cohort_size=10, num_devices=4, requested=12) == 12
  assert fs.sharding.fit_chunk(16, cohort_size=7, num_devices=4, requested=16) == 8  # capped

