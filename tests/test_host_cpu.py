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


@pytest.mark.slow  # two fresh interpreters (~5 s); the in-process check below stays
def test_too_late_and_bad_switches_are_clear_errors():
  late = run_py("import jax; jax.devices()\nimport fedjax_sim as fs\n"
                "assert fs.host_cpu._state['devices'] is None\nfs.host_cpu.configure(2)")
  assert late.returncode != 0
  assert "must run before jax starts its backend" in late.stderr
  bad = run_py("import fedjax_sim", FEDJAX_SIM_HOST_DEVICES="many")
  assert bad.returncode != 0 and "FEDJAX_SIM_HOST_DEVICES='many'" in bad.stderr


def test_a_bad_device_count_is_a_clear_error():
  with pytest.raises(ValueError, match="num_devices must be"):
    fs.host_cpu.configure(0)


@pytest.mark.skipif(os.environ.get("FEDJAX_SIM_HOST_DEVICES") not in (None, "1"),
                    reason="the suite runs with a non-default FEDJAX_SIM_HOST_DEVICES")
def test_default_is_one_device_and_no_mesh():
  assert fs.host_cpu.DEFAULT_DEVICES == "1"
  assert fs.host_cpu._state["devices"] is None and fs.host_cpu.default_mesh() is None



def _conv_setup():
  """A tiny conv model (a plain ``nn.Conv``), a population with an empty client, algorithms."""
  import flax.linen as nn
  import jax
  import numpy as np
  import optax

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(3, (3, 3), padding="VALID")(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  rng = np.random.default_rng(0)
  sizes = rng.integers(0, 7, 10)  # an empty client too
  pop = fs.Population.from_clients([{"x": rng.normal(size=(n, 6, 6, 1)).astype(np.float32),
                                     "y": rng.integers(0, 3, n).astype(np.int32)} for n in sizes])
  loss = fs.models.classifier_loss(fs.models.linen_apply(Net()))
  params = Net().init(jax.random.key(0), np.zeros((1, 6, 6, 1), np.float32))["params"]
  builders = {
      "fedavg": lambda: fs.algorithms.fedavg(loss, client_optimizer=optax.sgd(0.1), batch_size=2,
                                             local_epochs=1),
      "scaffold": lambda: fs.algorithms.scaffold(loss, client_learning_rate=0.1, batch_size=2,
                                                 local_epochs=1)}
  return pop, params, builders


def per_device_runs(chunks_per_device=(1,), algos=("fedavg", "scaffold"), rounds=2):
  """The shard_map pass (``per_device_scan``) on every device of this process vs the oracle.

  The oracle is the plain round on one device, clients one at a time (``chunk_size=1``). The
  model is a plain ``nn.Conv`` (``lax.conv_general_dilated``): under vmap its kernel gets a
  batch dimension and XLA runs a grouped convolution (``feature_group_count`` or
  ``batch_group_count`` > 1 in the compiled HLO), which one client per device must not have.

  Returns:
    ``{"devices": n, "runs": {f"{algo}/{chunk}": {"err", "groups", ...}}, "vmapped_groups"}``.
  """
  import re

  import jax
  import numpy as np

  from fedjax_sim import core

  pop, params, builders = _conv_setup()
  mesh = fs.sharding.clients_mesh()
  n = mesh.shape["clients"]

  def run(algo, **perf):
    plan = core.plan_for(algo, fs.sampling.uniform(5), pop, params, **perf)
    step = jax.jit(lambda s, p: core.round_step(plan, s, p))
    state = core.initial_state(plan, params, jax.random.key(3))
    for _ in range(rounds):
      state, metrics = step(state, pop)
    hlo = step.lower(state, pop).compile().as_text()
    groups = [int(g) for g in re.findall(r"(?:feature|batch)_group_count=(\d+)", hlo)]
    return (jax.tree.map(np.asarray, (state.params, state.client_states)),
            {k: float(v) for k, v in metrics.items()}, max(groups, default=1))

  out = {"devices": n, "runs": {}}
  for name in algos:
    algo = builders[name]()
    want, want_m, _ = run(algo, chunk_size=1)
    for k in chunks_per_device:
      got, got_m, groups = run(algo, chunk_size=k * n, mesh=mesh, per_device_scan=True)
      err = max(float(np.max(np.abs(a - b)))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
      out["runs"][f"{name}/{k * n}"] = {
          "err": err, "groups": groups, "loss": [got_m["loss"], want_m["loss"]],
          "steps": [got_m["client_steps"], want_m["client_steps"]]}
  # The check can fail: two clients vmapped on one device do run a grouped convolution.
  out["vmapped_groups"] = run(builders["fedavg"](), chunk_size=2, unbatched_single_client=True)[2]
  return out


def _check_per_device(out, devices, runs):
  assert out["devices"] == devices and len(out["runs"]) == runs
  assert out["vmapped_groups"] > 1
  for name, r in out["runs"].items():
    assert r["err"] < 1e-5, (name, r)  # params and SCAFFOLD's client states
    assert abs(r["loss"][0] - r["loss"][1]) < 1e-5 and r["steps"][0] == r["steps"][1], (name, r)
    assert r["groups"] == 1, (name, r)  # no grouped convolution: no batch dim over clients


def _conv_groups(jaxpr) -> list[int]:
  """Every convolution's ``feature_group_count`` and ``batch_group_count`` in ``jaxpr``."""
  import jax.extend

  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out += [eqn.params["feature_group_count"], eqn.params["batch_group_count"]]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _conv_groups(sub)
  return out


def test_per_device_scan_traces_one_client_per_device_without_a_batch_dim():
  """Trace only (cheap): inside the shard_map every conv is a single client's (no grouped
  conv); the same round vmapped over 2 clients on one device does group (the check can fail)."""
  import jax

  from fedjax_sim import core

  pop, params, builders = _conv_setup()
  algo = builders["fedavg"]()

  def groups(**perf):
    plan = core.plan_for(algo, fs.sampling.uniform(5), pop, params, **perf)
    state = core.initial_state(plan, params, jax.random.key(3))
    jaxpr = jax.make_jaxpr(lambda s, p: core.round_step(plan, s, p))(state, pop)
    assert ("shard_map" in str(jaxpr)) == bool(perf.get("per_device_scan"))
    return _conv_groups(jaxpr.jaxpr)

  mesh = fs.sharding.clients_mesh()
  n = mesh.shape["clients"]
  per_device = groups(chunk_size=n, mesh=mesh, per_device_scan=True)
  assert per_device and max(per_device) == 1
  assert max(groups(chunk_size=2)) > 1


@pytest.mark.slow  # a fresh 2-device interpreter compiling 7 rounds (~15 s of CPU)
def test_per_device_scan_on_two_host_devices_equals_one_device():
  code = ("import json, sys; sys.path.insert(0, 'tests'); from test_host_cpu import "
          "per_device_runs; print(json.dumps(per_device_runs()))")
  _check_per_device(last_json(run_py(code, FEDJAX_SIM_HOST_DEVICES="2")), 2, 2)


def test_per_device_scan_refuses_a_population_not_replicated():
  """per_device_scan with a sharded/host population (or no mesh) would gather the whole
  population on every device each round: refused before compiling, naming the setting."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from fedjax_sim.plan import Performance
  from fedjax_sim.runs import planning

  pop = fs.Population.from_arrays(
      {"x": np.zeros((8, 3), np.float32), "y": np.zeros(8, np.int32)}, np.repeat(np.arange(4), 2))
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(lambda p, x: x @ p),
                              client_optimizer=optax.sgd(0.1), batch_size=2, local_epochs=1)
  params = jnp.zeros((3, 2))
  mesh = fs.sharding.clients_mesh()
  for perf, where in ((Performance(per_device_scan=True), "device"),
                      (Performance(per_device_scan=True, mesh=mesh), "sharded"),
                      (Performance(per_device_scan=True, mesh=mesh), "host")):
    with pytest.raises(ValueError, match=r"per_device_scan=True\) needs a mesh"):
      planning.plan(algo, fs.sampling.uniform(2), pop, params, jax.random.key(0),
                    performance=perf, population_on=where)
