"""Moved to :mod:`fedjax_sim.runs.planning` (every check made before compiling); this path stays
importable."""

from fedjax_sim.runs.planning import (  # noqa: F401 - re-exported
    batch_spec,
    composition,
    param_count,
    params,
    round_traces,
    run_args,
    same_layout,
    simulation_args,
    state_pieces,
    typed_key,
)
