"""The :class:`Algorithm` contract and the public checks its factories share.

An algorithm is data: a client update for ONE client, an aggregator process and an optax server
optimizer (plus optional pieces). Factories (``fedavg``, ``scaffold``, ...) build it; new
algorithms are new compositions, never subclasses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from fedjax_sim.aggregators import Process
from fedjax_sim.client import ClientUpdateFn, PlannedStepsFn
from fedjax_sim.types import LossFn, Params

__all__ = ["Algorithm", "check_loss", "check_optimizer"]


class Algorithm(NamedTuple):
  """A federated algorithm as data; :class:`fedjax_sim.Simulation` runs it.

  Attributes:
    client_update: ``(broadcast, client_data, client_state, key) -> ClientOutput`` for ONE client.
    aggregator: the :class:`~fedjax_sim.aggregators.Process` applied to the cohort's outputs.
    server_optimizer: optax transformation applied to the aggregated pseudo-gradient.
    client_state_init: ``params -> state of one client`` for algorithms with persistent
      per-client state (stored for the whole population); None when stateless.
    name: for logs.
    loss_fn, client_optimizer, batch_size_hint: optional; when given, ``Simulation.init`` checks
      them against the params and the population before compiling (clear errors instead of
      tracer errors).
    server_extra_init: ``params -> server-side algorithm state`` (e.g. SCAFFOLD's server control
      variate), kept in ``ServerState.server_extra``; None when unused.
    broadcast_fn: ``(params, server_extra) -> broadcast`` sent to every client; default: params.
    server_update: ``(aggregated_delta, extra_sums, server_extra, stats, context) ->
      (delta_for_server_optimizer, new_server_extra)``, run after the aggregator; ``extra_sums``
      is the cohort sum of the clients' ``ClientOutput.extra`` and ``stats`` holds the round's
      ``clients`` and ``examples``. Default: the aggregated delta, unchanged.
    weight_fn: optional in-jit ``weight_fn(num_examples, client_metrics, client_id) -> weight``
      replacing each client's weight (e.g. loss-proportional weighting); negative values are
      clipped to 0. Under DP it needs an estimator with capped weights
      (``dp_mean(..., weight_cap=...)``), which bounds every weight by 1.
    trainable: the ``trainable=`` spec the algorithm was built with (federated fine-tuning), or
      None (every parameter trained). ``Simulation`` resolves it against the params; then the
      ``client_update`` receives a :class:`~fedjax_sim.algorithms.FinetuneBroadcast` and every
      other field works on the trainable view (see :mod:`fedjax_sim.partition_views`).
    planned_steps: optional pure ``planned_steps(num_examples, work_fraction, step_cap, *,
      max_examples) -> int32`` giving the local steps ``client_update`` runs (the trainer's own
      rule, e.g. ``make_client_update(...).planned_steps``). With a system model the round
      sorts the cohort by it before chunking (:func:`fedjax_sim.core.cohort_slots`), which
      changes speed only; None: the cohort is sorted by size.
  """

  client_update: ClientUpdateFn
  aggregator: Process
  server_optimizer: optax.GradientTransformation
  client_state_init: Callable[[Params], Any] | None = None
  name: str = "custom"
  loss_fn: LossFn | None = None
  client_optimizer: optax.GradientTransformation | None = None
  batch_size_hint: int | None = None
  server_extra_init: Callable[[Params], Any] | None = None
  broadcast_fn: Callable[[Params, Any], Any] | None = None
  server_update: Callable[..., tuple[Params, Any]] | None = None
  weight_fn: Callable[[Any, dict, Any], Any] | None = None
  trainable: Any = None
  planned_steps: PlannedStepsFn | None = None


def check_optimizer(name: str, opt: Any) -> None:
  """Refuses anything but an optax ``GradientTransformation`` for argument ``name``."""
  if not isinstance(opt, optax.GradientTransformation):
    raise TypeError(
        f"{name} must be an optax.GradientTransformation (e.g. optax.sgd(0.1)); got "
        f"{type(opt).__name__}."
    )


def check_loss(loss_fn: Any) -> None:
  """Refuses a ``loss_fn`` that is not callable."""
  if not callable(loss_fn):
    raise TypeError(
        "loss_fn must be callable as loss_fn(params, batch, key) -> (loss, aux); build one with "
        "fs.models.classifier_loss(apply_fn)."
    )
