"""fedjax_sim: fast, exact federated learning simulation in JAX.

Client training is one pure function for one client, vmapped across the cohort in chunks;
sampling, local training, clipping, aggregation, DP noise and the server optimizer step are fused
into one compiled round, and many rounds run inside one ``lax.scan``.
"""

# First, before anything can start jax's backend: host devices and XLA:CPU flags (host_cpu.py).
from fedjax_sim import host_cpu  # noqa: I001

from fedjax_sim import (
    aggregators,
    algorithms,
    asynchronous,
    attacks,
    checkpoint,
    core,
    evaluation,
    memory,
    models,
    nonfinite,
    peft,
    plots,
    privacy,
    programs,
    run_dir,
    sharding,
    ssl,
    systems,
    unsupervised,
    zoo,
)
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.asynchronous import AsyncSimulation
from fedjax_sim.client import ClientData, make_client_update
from fedjax_sim.data import datasets, partition, sampling
from fedjax_sim.data.population import Population
from fedjax_sim.core import RoundPlan, ServerState
from fedjax_sim.round import Simulation
from fedjax_sim.sweep import sweep
from fedjax_sim.types import MASK_KEY, ClientOutput, RoundContext, WeightedUpdate

__version__ = "0.1.0"

__all__ = [
    "MASK_KEY",
    "Algorithm",
    "AsyncSimulation",
    "ClientData",
    "ClientOutput",
    "Population",
    "RoundContext",
    "RoundPlan",
    "ServerState",
    "Simulation",
    "WeightedUpdate",
    "aggregators",
    "algorithms",
    "asynchronous",
    "attacks",
    "checkpoint",
    "core",
    "datasets",
    "evaluation",
    "host_cpu",
    "make_client_update",
    "memory",
    "models",
    "nonfinite",
    "partition",
    "peft",
    "plots",
    "privacy",
    "programs",
    "run_dir",
    "sampling",
    "sharding",
    "sweep",
    "ssl",
    "systems",
    "unsupervised",
    "zoo",
]
