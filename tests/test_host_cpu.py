"""fs.host_cpu: host devices and XLA flags set before jax starts, never over the user's choice.

Each scenario runs in a fresh interpreter: the device count and XLA flags are fixed once jax's
backend starts, and this test process's backend has started long ago.
"""

import json
import os
import subprocess
import sys

import pytest

import fedjax_sim as fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TWO_RUNS = r'''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np, optax
import fedjax_sim as fs
rng = np.random.default_rng(0)
sizes = rng.integers(1, 9, 12)
clients = [{"x": rng.normal(size=(n, 4)).astype(np.float32),
            "y": rng.integers(0, 3, n).astype(np.int32)} for n in sizes]
pop = fs.Population.from_clients(clients)
loss = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])
algo = fs.algorithms.fedavg(loss, client_optimizer=optax.sgd(0.1),
                            server_optimizer=optax.sgd(1.0), batch_size=3, local_epochs=1)
sim = fs.Simulation(algo, pop, cohort_size=5)
state = sim.init({"w": jnp.full((4, 3), 0.1), "b": jnp.zeros(3)}, jax.random.key(7))
state, _ = sim.run(state, 3)
print(json.dumps({"devices": len(jax.devices()), "mesh": sim.mesh is not None,
                  "chunk": sim.chunk_size, "xla_flags": os.environ.get("XLA_FLAGS"),
                  "user_xla_flags": fs.host_cpu.USER_XLA_FLAGS,
                  "w": np.asarray(state.params["w"]).tolist()}))
'''


def run_py(code, **env):
  full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for k in ("XLA_FLAGS", fs.host_cpu.ENV_DEVICES, fs.host_cpu.ENV_FLAGS):
    full.pop(k, None)
  full.update(env)
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                       cwd=ROOT, timeout=600)
  return res


def last_json(res):
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters compiling a run (~11 s of CPU)
def test_split_over_host_devices_gives_the_single_device_result():
  one = last_json(run_py(TWO_RUNS, FEDJAX_SIM_HOST_DEVICES="1"))
  two = last_json(run_py(TWO_RUNS, FEDJAX_SIM_HOST_DEVICES="2"))
  assert (one["devices"], one["mesh"]) == (1, False)
  assert (two["devices"], two["mesh"]) == (2, True) and two["chunk"] % 2 == 0
  # Only the float summation order differs.
  import numpy as np
  np.testing.assert_allclose(two["w"], one["w"], rtol=1e-5, atol=1e-6)
  if fs.host_cpu._jaxlib_version() in fs.host_cpu.FLAGS_TESTED_ON:
    for name, _ in fs.host_cpu.FAST_XLA_FLAGS:
      assert f"--{name}=" in two["xla_flags"]
  assert two["user_xla_flags"] is None


@pytest.mark.slow  # fresh interpreters compiling a run (~11 s of CPU)
def test_the_users_flags_and_device_count_win():
  user = "--xla_force_host_platform_device_count=3 --xla_cpu_experimental_ynn_fusion_type="
  out = last_json(run_py(TWO_RUNS, XLA_FLAGS=user, FEDJAX_SIM_HOST_DEVICES="auto"))
  assert out["devices"] == 3 and not out["mesh"]  # the user's count; their mesh, not ours
  assert out["user_xla_flags"] == user
  assert out["xla_flags"].startswith(user)
  assert out["xla_flags"].count("xla_cpu_experimental_ynn_fusion_type") == 1
  off = last_json(run_py(TWO_RUNS, FEDJAX_SIM_XLA_FLAGS="0", FEDJAX_SIM_HOST_DEVICES="off"))
  assert off["xla_flags"] is None and off["devices"] == 1 and not off["mesh"]


def test_too_late_and_bad_switches_are_clear_errors():
  late = run_py("import jax; jax.devices()\nimport fedjax_sim as fs\n"
                "assert fs.host_cpu._state['devices'] is None\nfs.host_cpu.configure(2)")
  assert late.returncode != 0
  assert "must run before jax starts its backend" in late.stderr
  bad = run_py("import fedjax_sim", FEDJAX_SIM_HOST_DEVICES="many")
  assert bad.returncode != 0 and "FEDJAX_SIM_HOST_DEVICES='many'" in bad.stderr
  with pytest.raises(ValueError, match="num_devices must be"):
    fs.host_cpu.configure(0)


@pytest.mark.skipif(os.environ.get("FEDJAX_SIM_HOST_DEVICES") not in (None, "1"),
                    reason="the suite runs with a non-default FEDJAX_SIM_HOST_DEVICES")
def test_default_is_one_device_and_no_mesh():
  assert fs.host_cpu.DEFAULT_DEVICES == "1"
  assert fs.host_cpu._state["devices"] is None and fs.host_cpu.default_mesh() is None
