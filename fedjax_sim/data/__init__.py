"""Federated data: the CSR :class:`Population`, host-side partitioners and in-jit samplers."""

from fedjax_sim.data import partition, sampling
from fedjax_sim.data.population import Population

__all__ = ["Population", "partition", "sampling"]
