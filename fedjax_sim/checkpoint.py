"""Moved to :mod:`fedjax_sim.runs` (:mod:`~fedjax_sim.runs.store`: orbax I/O;
:mod:`~fedjax_sim.runs.log`: the metrics log; :mod:`~fedjax_sim.runs.recorder`: signals and the
run's errors; :mod:`~fedjax_sim.runs.identity`: the fingerprint); this path stays importable.

A checkpoint holds the whole :class:`~fedjax_sim.ServerState` (round, params, optimizer and
aggregator state, per-client population state, server-side algorithm state, run key) plus a
fingerprint of the configuration. Because every random draw derives from ``(key, round)``, a
resumed run continues **bit-identically** to an uninterrupted one.
"""

from fedjax_sim.runs.identity import config_hash  # noqa: F401 - re-exported
from fedjax_sim.runs.log import MetricsLog, read_log, to_csv  # noqa: F401 - re-exported
from fedjax_sim.runs.ownership import restore  # noqa: F401 - re-exported
from fedjax_sim.runs.recorder import (  # noqa: F401 - re-exported
    CheckpointSaveError,
    SignalFlag,
    SimulationInterrupted,
)
from fedjax_sim.runs.store import save  # noqa: F401 - re-exported
from fedjax_sim.runs.store import to_savable as _to_savable  # noqa: F401 - the old name

__all__ = ["CheckpointSaveError", "MetricsLog", "SignalFlag", "SimulationInterrupted",
           "fingerprint", "read_log", "restore", "save", "to_csv"]


def fingerprint(simulation, state) -> dict:
  """``simulation.fingerprint(state)``: the form before fingerprints took values
  (:func:`fedjax_sim.runs.identity.fingerprint` of the plan, population and state).

  Returns:
    A JSON-able dict.
  """
  return simulation.fingerprint(state)
