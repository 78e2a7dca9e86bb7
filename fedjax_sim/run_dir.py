"""Moved to :mod:`fedjax_sim.runs.identity` (digests, run id) and
:mod:`fedjax_sim.runs.ownership` (directories); this path stays importable."""

from fedjax_sim.runs.identity import (  # noqa: F401 - re-exported
  ENGINE_DIGEST,
  NEW_FIELDS,
  NOT_COMPARED,
  algorithm_digest,
  compare,
  population_digest,
  run_id,
  traced_library_versions,
)
from fedjax_sim.runs.ownership import (  # noqa: F401 - re-exported
  check_savable,
  check_save,
  prepare_checkpoint_dir,
  prepare_log_dir,
)
from fedjax_sim.runs.recorder import CheckpointSaveError, RunRecorder  # noqa: F401

__all__ = ["CheckpointSaveError", "algorithm_digest", "check_savable", "population_digest",
           "prepare_checkpoint_dir", "prepare_log_dir", "run_id"]


def digests_incomparable(meta, fp) -> bool:
  """Whether ``meta``'s algorithm digest was traced by another jax, engine or library version
  (:func:`fedjax_sim.runs.identity.compare`).

  Returns:
    The flag.
  """
  return compare(meta, fp).incomparable
