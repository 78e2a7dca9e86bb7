"""Moved to :mod:`fedjax_sim.runs.simulation`; this path stays importable."""

from fedjax_sim.memory import CPU_STEP_FLOPS, auto_chunk_size  # noqa: F401 - re-exported
from fedjax_sim.memory import device_memory_budget as _device_memory_budget
from fedjax_sim.plan import ServerState
from fedjax_sim.runs.recorder import RunOptions
from fedjax_sim.runs.simulation import Simulation

__all__ = ["RunOptions", "ServerState", "Simulation", "auto_chunk_size",
           "default_memory_budget"]


def default_memory_budget(reserved_bytes: int = 0) -> int:
  """Bytes the client pass may use (:func:`fedjax_sim.memory.device_memory_budget`).

  Returns:
    256 MiB on CPU; on an accelerator half of the memory left after ``reserved_bytes``.
  """
  return _device_memory_budget(reserved_bytes)
