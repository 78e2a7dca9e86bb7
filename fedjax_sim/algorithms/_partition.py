"""Moved to :mod:`fedjax_sim.partition_views` (an engine module); this path stays importable."""

from fedjax_sim.partition_views import (  # noqa: F401 - re-exported
    FROZEN,
    TRAINABLE,
    FinetuneBroadcast,
    TrainableSpec,
    merge,
    partitioned,
    path_names,
    refuse,
    resolve,
    split,
    upload_bits,
)
