"""Workloads run on 1 device in the test process and, by ``python sharded_worker.py``, on many
forced CPU devices or in several processes (XLA_FLAGS must be set before jax is imported, so
those runs need a fresh process).

    python sharded_worker.py devices OUT.npz WORKLOAD,...
    python sharded_worker.py multihost OUT.npz WORKLOAD,... COORDINATOR_PORT PROCESS_ID NPROC
    python -m fedjax_sim.launch --processes 2 sharded_worker.py launched OUT.npz WORKLOAD,...

``launched`` joins the launcher's run with ``fs.sharding.initialize()`` and passes no mesh (the
default: every process's device, each scanning its own clients).
"""

import sys

WORKLOADS = ("fedavg", "dp_fedavg", "scaffold", "band_mf", "dp_ftrl")
NUM_ROUNDS = 3


def make_population(num_clients=12, dim=5, classes=3, seed=0, min_size=1, max_size=17):
  """A small random population (the one tests/conftest.py's ``make_population`` builds)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  sizes = rng.integers(min_size, max_size + 1, num_clients)
  return [{"x": rng.normal(size=(n, dim)).astype(np.float32),
           "y": rng.integers(0, classes, n).astype(np.int32)} for n in sizes]


def linear_apply(p, x):
  return x @ p["w"] + p["b"]


def init_params(dim=5, classes=3, seed=1):
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(dim, classes)).astype(np.float32) * 0.1),
          "b": jnp.zeros(classes, jnp.float32)}


def build(name, loss_fn):
  import optax

  import fedjax_sim as fs

  if name == "scaffold":
    return fs.algorithms.scaffold(loss_fn, client_learning_rate=0.1, batch_size=4, local_epochs=1)
  aggregator = {  # DP-FedAvg, BandMF (correlated noise, 2 bands) and DP-FTRL's tree noise
      "dp_fedavg": lambda: fs.aggregators.dp_mean(0.05, 0.7),
      "band_mf": lambda: fs.aggregators.band_mf_mean(0.05, 0.7, bands=2),
      "dp_ftrl": lambda: fs.aggregators.dp_ftrl_mean(0.05, 0.7, num_rounds=NUM_ROUNDS + 1),
  }.get(name, lambda: None)()
  return fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.2), batch_size=4,
                              local_epochs=2, aggregator=aggregator)


def run_workload(name, mesh=None, population_on="device"):
  """Final params and client states (flat dict of NumPy arrays) after NUM_ROUNDS rounds."""
  import jax
  import numpy as np

  jax.config.update("jax_default_matmul_precision", "highest")  # as the test process

  import fedjax_sim as fs

  pop = fs.Population.from_clients(make_population(num_clients=24))
  loss_fn = fs.models.classifier_loss(linear_apply)
  sim = fs.Simulation(build(name, loss_fn), pop, cohort_size=7, mesh=mesh,
                      population_on=population_on)
  state = sim.init(init_params(), jax.random.key(11))
  state, metrics = sim.run(state, num_rounds=NUM_ROUNDS)
  leaves = jax.tree.leaves(fs.sharding.fetch((state.params, state.client_states)))
  out = {f"{name}/{i}": x for i, x in enumerate(leaves)}
  out[f"{name}/loss"] = metrics["loss"]
  out[f"{name}/chunk"] = np.asarray(sim.chunk_size)
  return out


def main(argv):
  mode, path, workloads = argv[1], argv[2], argv[3].split(",")
  import os

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax

  if mode == "multihost":
    port, pid, nproc = int(argv[4]), int(argv[5]), int(argv[6])
    import fedjax_sim as fs

    fs.sharding.initialize(f"127.0.0.1:{port}", nproc, pid, initialization_timeout=60)
  jax.config.update("jax_default_matmul_precision", "highest")
  import numpy as np

  import fedjax_sim as fs

  if mode == "launched":
    assert fs.sharding.initialize()
  mesh = None if mode == "launched" else fs.sharding.clients_mesh()
  results = {"num_devices": np.asarray(len(jax.devices()))}
  for name in workloads:
    results.update(run_workload(name, mesh))
  if mode == "launched":
    pop = fs.Population.from_clients(make_population(num_clients=24))
    sim = fs.Simulation(build("fedavg", fs.models.classifier_loss(linear_apply)), pop,
                        cohort_size=7)
    results["default_mesh_devices"] = np.asarray(0 if sim.mesh is None else sim.mesh.size)
    results["per_device_scan"] = np.asarray(sim.performance.per_device_scan)
    results["xla_flags"] = np.asarray(os.environ.get("XLA_FLAGS", ""))
    results["cpus"] = np.asarray(sorted(os.sched_getaffinity(0)))
    # A log directory: process 0 writes it (once); another run's log is refused on every process.
    log_dir = path + ".log"
    sim.run(sim.init(init_params(), jax.random.key(11)), 4, block_size=2, log_dir=log_dir)
    other = fs.Simulation(build("fedavg", fs.models.classifier_loss(linear_apply)), pop,
                          cohort_size=8)
    try:
      other.run(other.init(init_params(), jax.random.key(11)), 2, log_dir=log_dir)
      refused = ""
    except ValueError as e:
      refused = str(e)
    with open(f"{path}.refused{jax.process_index()}.txt", "w") as f:
      f.write(refused)
  if mode == "devices":
    # Population on the host (cohorts gathered there) or split over the devices, on the mesh.
    for where in ("host", "sharded"):
      placed = run_workload("scaffold", mesh, population_on=where)
      results.update({f"{where}_{k}": v for k, v in placed.items()})
    # A chunk that cannot be split over the mesh is refused before compiling.
    try:
      fs.Simulation(build("fedavg", fs.models.classifier_loss(lambda p, x: x)),
                    fs.Population.from_arrays({"x": np.zeros((4, 1), np.float32)}, [0, 1, 2, 3]),
                    cohort_size=3, chunk_size=3, mesh=mesh)
      results["chunk_error"] = np.asarray("")
    except ValueError as e:
      results["chunk_error"] = np.asarray(str(e))
    results["state_sharding"] = np.asarray(str(
        jax.tree.leaves(run_state_sharding(mesh))[0]))
    pop = fs.Population.from_clients(make_population(num_clients=24))
    sim = fs.Simulation(build("fedavg", fs.models.classifier_loss(linear_apply)), pop,
                        cohort_size=7, mesh=mesh, population_on="sharded")
    # fs.sweep with the simulations split over the devices: lane 0 (seed 11) is the reference.
    loss_fn = fs.models.classifier_loss(linear_apply)
    states, metrics = fs.sweep(lambda: build("fedavg", loss_fn), pop, init_params(),
                               seeds=[11, 1, 2, 3, 4, 5, 6, 7], num_rounds=NUM_ROUNDS,
                               cohort_size=7, mesh=mesh)
    lanes = jax.tree.leaves(fs.sharding.fetch(states.params))
    results.update({f"sweep_fedavg/{i}": x[0] for i, x in enumerate(lanes)})
    results["sweep_fedavg/loss"] = metrics["loss"][0]
    results["sweep_lanes_differ"] = np.asarray(not np.allclose(lanes[1][0], lanes[1][1]))
    results["sweep_sharding"] = np.asarray(str(states.params["w"].sharding.spec))
    try:
      fs.sweep(lambda: build("fedavg", loss_fn), pop, init_params(), seeds=[0, 1, 2],
               num_rounds=1, cohort_size=7, mesh=mesh)
      results["sweep_error"] = np.asarray("")
    except ValueError as e:
      results["sweep_error"] = np.asarray(str(e))
    x = sim.population.features["x"]
    results["features_sharding"] = np.asarray(str(x.sharding.spec))
    results["features_shard_rows"] = np.asarray(x.addressable_shards[0].data.shape[0])
    results["total_rows"] = np.asarray(pop.total_examples)
  if mode == "devices" or jax.process_index() == 0:
    np.savez(path, **results)
  if mode in ("multihost", "launched"):
    jax.distributed.shutdown()


def run_state_sharding(mesh):
  """The sharding of SCAFFOLD's per-client state after init on ``mesh``."""
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")  # as the test process

  import fedjax_sim as fs

  pop = fs.Population.from_clients(make_population(num_clients=24))
  sim = fs.Simulation(build("scaffold", fs.models.classifier_loss(linear_apply)), pop,
                      cohort_size=7, mesh=mesh)
  state = sim.init(init_params(), jax.random.key(0))
  return jax.tree.map(lambda x: x.sharding.spec, state.client_states)


if __name__ == "__main__":
  main(sys.argv)
