"""Federated algorithms: factories that compose a client update, an aggregator and a server optax
optimizer into an :class:`Algorithm`."""

from fedjax_sim.algorithms._fedavg import (
    Algorithm,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedsgd,
    fedyogi,
)
from fedjax_sim.algorithms._heterogeneity import ditto, feddyn, fednova, qffl, scaffold
from fedjax_sim.algorithms._partition import FinetuneBroadcast

__all__ = [
    "Algorithm",
    "FinetuneBroadcast",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedsgd",
    "fedyogi",
    "ditto",
    "feddyn",
    "fednova",
    "qffl",
    "scaffold",
]
