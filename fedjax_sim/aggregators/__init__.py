"""Aggregation pipelines: ``process(per_client=, reduce=, post=)`` of ``(init, aggregate)``
stages."""

from fedjax_sim.aggregators._base import (
    ADDS_NOISE,
    CLIPS,
    Aggregator,
    Process,
    Reducer,
    as_process,
    chain,
    identity,
    process,
    sum_reducer,
    weighted_sum_reducer,
)
from fedjax_sim.aggregators._stages import (
    clip_l2,
    divide_by,
    dp_mean,
    gaussian_noise,
    global_norm,
    mean,
    normalize,
    sum,
    weighted_mean,
)

__all__ = [
    "ADDS_NOISE",
    "CLIPS",
    "Aggregator",
    "Process",
    "Reducer",
    "as_process",
    "chain",
    "clip_l2",
    "divide_by",
    "dp_mean",
    "gaussian_noise",
    "global_norm",
    "identity",
    "mean",
    "normalize",
    "process",
    "sum",
    "sum_reducer",
    "weighted_mean",
    "weighted_sum_reducer",
]
