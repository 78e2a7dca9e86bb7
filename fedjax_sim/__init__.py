"""fedjax_sim: fast, exact federated learning simulation in JAX.

Client training is one pure function for one client, vmapped across the cohort in chunks;
sampling, local training, clipping, aggregation, DP noise and the server optimizer step are fused
into one compiled round, and many rounds run inside one ``lax.scan``.

Importing the package does one thing besides defining names: before jax's CPU backend starts,
:mod:`fedjax_sim.host_cpu` appends two XLA:CPU flags to ``XLA_FLAGS`` (unless
``FEDJAX_SIM_XLA_FLAGS=0``; see the README). ``__all__`` lists what users call; the machinery
(:mod:`fedjax_sim.programs`, :mod:`fedjax_sim.runs`, ...) is importable by its module path.
"""

# First, before anything can start jax's backend: host devices and XLA:CPU flags (host_cpu.py).
from fedjax_sim import host_cpu  # noqa: I001

from fedjax_sim import (
    aggregators,
    algorithms,
    asynchronous,
    attacks,
    autotune,
    core,
    evaluation,
    flops,
    memory,
    models,
    nonfinite,
    peft,
    plots,
    precision,
    privacy,
    sharding,
    ssl,
    systems,
    unsupervised,
    zoo,
)
from fedjax_sim._version import __version__
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.asynchronous import AsyncSimulation
from fedjax_sim.client import ClientData, make_client_update
from fedjax_sim.data import datasets, partition, sampling
from fedjax_sim.data.population import Population
from fedjax_sim.plan import Performance, RoundPlan, ServerState
from fedjax_sim.runs.recorder import RunOptions
from fedjax_sim.runs.simulation import Simulation
from fedjax_sim.sweep import sweep
from fedjax_sim.types import MASK_KEY, ClientOutput, RoundContext, WeightedUpdate

# The paths before the host wing (fedjax_sim/runs/), kept as attributes for existing code; not
# in __all__ (import fedjax_sim.runs.<module> instead).
from fedjax_sim import checkpoint, checks, programs, round, run_dir  # noqa: E402, F401, A004

__all__ = [
    "MASK_KEY",
    "Algorithm",
    "AsyncSimulation",
    "ClientData",
    "ClientOutput",
    "Performance",
    "Population",
    "RoundContext",
    "RoundPlan",
    "RunOptions",
    "ServerState",
    "Simulation",
    "WeightedUpdate",
    "__version__",
    "aggregators",
    "algorithms",
    "asynchronous",
    "attacks",
    "autotune",
    "core",
    "datasets",
    "evaluation",
    "flops",
    "host_cpu",
    "make_client_update",
    "memory",
    "models",
    "nonfinite",
    "partition",
    "peft",
    "plots",
    "precision",
    "privacy",
    "sampling",
    "sharding",
    "sweep",
    "ssl",
    "systems",
    "unsupervised",
    "zoo",
]
