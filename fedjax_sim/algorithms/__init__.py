"""Federated algorithms: factories that compose a client update, an aggregator and a server optax
optimizer into an :class:`Algorithm`."""

from fedjax_sim.algorithms._base import Algorithm, check_loss, check_optimizer
from fedjax_sim.algorithms._fedavg import (
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedsgd,
    fedyogi,
)
from fedjax_sim.algorithms._heterogeneity import ditto, feddyn, fednova, qffl, scaffold
from fedjax_sim.partition_views import FinetuneBroadcast

__all__ = [
    "Algorithm",
    "FinetuneBroadcast",
    "check_loss",
    "check_optimizer",
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
