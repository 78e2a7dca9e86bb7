"""Federated data: the CSR :class:`Population`, host-side partitioners and in-jit samplers."""

from fedjax_sim.data import datasets, disk, partition, sampling, sqlite
from fedjax_sim.data.population import Population

__all__ = ["Population", "datasets", "disk", "partition", "sampling", "sqlite"]
