"""Devices and hosts: a ``clients`` mesh axis that splits each cohort chunk across devices.

A simulation is one XLA program. With ``Simulation(..., mesh=fs.sharding.clients_mesh())`` the
clients of every vmapped chunk are split along the mesh's ``clients`` axis (``AxisType.Auto``:
the compiler partitions the program from a few sharding constraints), the cohort sums become
all-reduces across devices, and the server state is replicated. Per-client persistent state is
sharded along ``clients`` (when the population size divides evenly; replicated otherwise).
The population's examples are replicated (every device can gather any client's batch) or, with
``population_on="sharded"``, split along ``clients`` so that each device holds ``1/n`` of them
(batches are then gathered across devices inside the program).

The mesh changes speed, never results: a client's randomness depends only on (seed, round,
global client id), so 1 device and 8 devices give the same parameters up to the float summation
order (tests check this for FedAvg, DP-FedAvg and SCAFFOLD).

Multi-host (one process per host, the same script everywhere)::

    import fedjax_sim as fs
    fs.sharding.initialize()            # or initialize("10.0.0.1:1234", num_processes=2,
                                        #                process_id=int(os.environ["RANK"]))
    mesh = fs.sharding.clients_mesh()   # every device of every process
    sim = fs.Simulation(algo, population, cohort_size=1000, mesh=mesh)

Every process builds the same population and initial parameters (same files, same seeds); the
arrays handed to the program are assembled from each process's local copy. Metrics and the
server state come back replicated, so each process can read them; per-client state is split
across processes (read it with :func:`fetch`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedjax_sim.data.population import Population

#: Name of the mesh axis along which clients are split.
CLIENTS = "clients"


def clients_mesh(devices=None) -> Mesh:
  """A 1-D mesh with one ``clients`` axis (``AxisType.Auto``) over ``devices``.

  Args:
    devices: the devices to use; default ``jax.devices()`` (every device of every process, so
      that after :func:`initialize` the mesh spans all hosts).

  Returns:
    A :class:`jax.sharding.Mesh` for ``Simulation(..., mesh=...)``.

  Examples:
    >>> import fedjax_sim as fs
    >>> mesh = fs.sharding.clients_mesh()
    >>> mesh.axis_names, mesh.shape["clients"] >= 1
    (('clients',), True)
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("clients_mesh needs at least one device.")
  return jax.make_mesh((len(devices),), (CLIENTS,), axis_types=(AxisType.Auto,), devices=devices)


def mesh_size(mesh: Any) -> int:
  """Devices along the ``clients`` axis of ``mesh``, after checking that it has one.

  Raises:
    TypeError: ``mesh`` is not a :class:`jax.sharding.Mesh`.
    ValueError: the mesh has no ``clients`` axis, or it is not ``AxisType.Auto``.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(
        f"mesh must be a jax.sharding.Mesh with a {CLIENTS!r} axis (fs.sharding.clients_mesh()); "
        f"got {type(mesh).__name__}."
    )
  if CLIENTS not in mesh.axis_names:
    raise ValueError(
        f"the mesh has axes {tuple(mesh.axis_names)} but no {CLIENTS!r} axis, along which the "
        f"cohort is split; build one with fs.sharding.clients_mesh() or "
        f"jax.make_mesh((n,), ('{CLIENTS}',), axis_types=(jax.sharding.AxisType.Auto,))."
    )
  axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[CLIENTS]
  if axis_type != AxisType.Auto:
    raise ValueError(
        f"the mesh's {CLIENTS!r} axis is {axis_type}; the engine partitions with sharding "
        f"constraints, which need AxisType.Auto (jax.make_mesh defaults to Explicit). Use "
        f"fs.sharding.clients_mesh() or jax.make_mesh(..., axis_types=(AxisType.Auto,))."
    )
  return int(mesh.shape[CLIENTS])


def fit_chunk(chunk: int, cohort_size: int, num_devices: int, requested: int | None) -> int:
  """The chunk size to use on ``num_devices`` devices along ``clients``.

  A requested chunk must be a multiple of ``num_devices`` (each device takes an equal share of
  every chunk); an automatic one is rounded up to the next multiple (the extra slots are padded,
  masked clients, as for any cohort that does not fill its last chunk). Neither exceeds the
  cohort size rounded up to a multiple of ``num_devices``.

  Examples:
    >>> from fedjax_sim.sharding import fit_chunk
    >>> fit_chunk(5, cohort_size=20, num_devices=4, requested=None)
    8
  """
  if num_devices == 1:
    return chunk
  if requested is not None:
    if requested % num_devices:
      valid = ", ".join(str(num_devices * i) for i in range(1, 5))
      raise ValueError(
          f"chunk_size={requested} cannot be split over the {num_devices} devices of the mesh's "
          f"{CLIENTS!r} axis; use a multiple of {num_devices} ({valid}, ...), or chunk_size=None "
          "to choose one automatically (a cohort that does not fill the last chunk is padded "
          "with masked clients)."
      )
    chunk = requested
  cap = -(-cohort_size // num_devices) * num_devices  # one chunk holds the whole cohort
  return min(-(-chunk // num_devices) * num_devices, cap)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def along_clients(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Dimension ``axis`` split along the ``clients`` mesh axis."""
  return NamedSharding(mesh, PartitionSpec(*([None] * axis), CLIENTS))


def put(tree: Any, sharding_for) -> Any:
  """Places every leaf of ``tree`` with ``sharding_for(leaf)`` (works across processes).

  Each process passes the same values; every addressable shard is cut from the local copy, so
  the result is a global array even when the sharding spans devices of other processes.
  """

  def one(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      data = put(jax.random.key_data(x), sharding_for)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    sharding = sharding_for(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """``tree`` replicated on every device of ``mesh``."""
  return put(tree, lambda x: replicated(mesh))


def put_along_clients(tree: Any, mesh: Mesh) -> Any:
  """Leaves split along their leading dimension when it divides evenly; replicated otherwise."""
  n = mesh_size(mesh)
  return put(
      tree,
      lambda x: along_clients(mesh) if np.ndim(x) and np.shape(x)[0] % n == 0 else replicated(mesh),
  )


def place_state(state: Any, mesh: Mesh) -> Any:
  """A :class:`~fedjax_sim.ServerState` on ``mesh``: the server pieces replicated, the
  per-client states split along ``clients`` (:func:`put_along_clients`).

  Returns:
    The placed state.
  """
  per_client = (state.client_states, state.agg_client_states)
  server = put_replicated(dataclasses.replace(state, client_states=(), agg_client_states=()),
                          mesh)
  client_states, agg_client_states = put_along_clients(per_client, mesh)
  return dataclasses.replace(server, client_states=client_states,
                             agg_client_states=agg_client_states)


def place_population(population: Population, mesh: Mesh, how: str = "device") -> Population:
  """The population placed on ``mesh``.

  Args:
    population: the clients' data.
    mesh: a mesh with a ``clients`` axis.
    how: ``"device"``: replicated on every device. ``"sharded"``: the example rows split along
      ``clients`` (padded with zero rows to a multiple of the axis size; the padding belongs to
      no client, so nothing reads it). ``"host"``: the features stay where they are (host
      NumPy arrays); only the per-client offsets and counts are placed.

  Examples:
    >>> import numpy as np, fedjax_sim as fs
    >>> pop = fs.Population.from_arrays({"x": np.ones((5, 2), np.float32)}, [0, 0, 1, 2, 2])
    >>> placed = fs.sharding.place_population(pop, fs.sharding.clients_mesh(), "sharded")
    >>> placed.num_clients, placed.client(2)["x"].shape
    (3, (2, 2))
  """
  offsets, num_examples = put_replicated((population.offsets, population.num_examples), mesh)
  features = population.features
  if how == "device":
    features = put_replicated(features, mesh)
  elif how == "sharded":
    n = mesh_size(mesh)

    def pad(x):
      x = np.asarray(x)
      extra = -x.shape[0] % n
      return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]) if extra else x

    features = put(jax.tree.map(pad, features), lambda x: along_clients(mesh))
  elif how != "host":
    raise ValueError(f"how must be 'device', 'sharded' or 'host'; got {how!r}.")
  return Population(features, offsets, num_examples, population.max_examples, population.labels)


def constrain(tree: Any, sharding: NamedSharding | None) -> Any:
  """``jax.lax.with_sharding_constraint`` on every leaf, or nothing when ``sharding`` is None."""
  if sharding is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def fetch(tree: Any) -> Any:
  """Every leaf as a NumPy array, gathered from all processes when it spans several.

  Examples:
    >>> import jax.numpy as jnp, fedjax_sim as fs
    >>> fs.sharding.fetch({"w": jnp.ones(2)})["w"].tolist()
    [1.0, 1.0]
  """
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    initialization_timeout: int = 300,
) -> bool:
  """Joins a multi-process (multi-host) run: ``jax.distributed.initialize`` plus CPU collectives.

  Call it once per process, before anything touches a device. On CPU it selects the gloo
  collectives (``jax_cpu_collectives_implementation='gloo'``), without which cross-process sums
  fail. Called with no arguments in a process that ``python -m fedjax_sim.launch`` started, it
  joins the launcher's run (:mod:`fedjax_sim.launch`); on a cluster that JAX detects (SLURM,
  TPU pods, Open MPI, Kubernetes), it joins that one; elsewhere it does nothing, so one script
  runs as one process or many.

  Args:
    coordinator_address: ``"host:port"`` of process 0, reachable from every process.
    num_processes: number of processes (one per host).
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: restrict this process to these local devices (optional).
    initialization_timeout: seconds to wait for every process to join.

  Returns:
    True when this process joined a multi-process run; False when it was called without
    arguments outside the launcher and any cluster JAX detects (one process; nothing changed).

  Raises:
    ValueError: the launcher's environment is incomplete, or arguments were given inside a
      launched process (the launcher already chose them).

  Examples:
    >>> import fedjax_sim as fs
    >>> fs.sharding.initialize()   # not launched: a single-process run
    False
  """
  # Imported here, not at the top: `import fedjax_sim` must not import the launcher, which
  # `python -m fedjax_sim.launch` runs as __main__ (runpy warns when it is already imported).
  # fedjax_sim.launch imports nothing of the package, so there is no cycle.
  from fedjax_sim import launch as _launch

  given = (coordinator_address, num_processes, process_id) != (None, None, None)
  config = _launch.launched_config()
  if config is not None:
    if given:
      raise ValueError(
          "fs.sharding.initialize() got coordinator_address/num_processes/process_id in a "
          "process started by `python -m fedjax_sim.launch`, which chose them already; call "
          "it without them.")
    coordinator_address = config["coordinator_address"]
    num_processes, process_id = config["num_processes"], config["process_id"]
  elif not given and not _cluster_detected():
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout,
  )
  return True


def _cluster_detected() -> bool:
  """Whether ``jax.distributed.initialize()`` would find a cluster (SLURM, Open MPI, ...)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  try:
    from jax._src.clusters import ClusterEnv
  except ImportError:  # jax moved it: let jax.distributed decide, as before
    return True
  return any(not env.opt_in_only_method and env.is_env_present()
             for env in ClusterEnv._cluster_types)
