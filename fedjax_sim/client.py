"""Local training of ONE client. The round vmaps it across the cohort, in one place (round.py)."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import _validation as _v
from fedjax_sim.data.population import check_features
from fedjax_sim.types import MASK_KEY, ClientOutput, LossFn, Params, PRNGKey, PyTree


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClientData:
  """One client's view of the population (CSR): the shared flat arrays plus its row range.

  Attributes:
    features: the population's flat feature arrays ``[total_examples, ...]`` (shared, not copied).
    offset: int32 scalar, the client's first row.
    num_examples: int32 scalar, its number of examples (0 for a padded cohort slot).
    max_examples: static Python int, the largest client in the population.
    work_fraction: fraction of its planned local steps the client completes (stragglers; 1.0).
    step_cap: the most local steps the client can run this round (deadlines; effectively none).
    trim_last_batch: static; the client runs alone, not vmapped with others, so the trainer may
      run an epoch's partial last batch at a smaller static size that holds it
      (:func:`last_batch_sizes`; ``Performance.trim_last_batch``).
  """

  features: dict[str, jax.Array]
  offset: jax.Array
  num_examples: jax.Array
  max_examples: int = dataclasses.field(metadata=dict(static=True))
  work_fraction: jax.Array = 1.0
  step_cap: jax.Array = 2**30
  trim_last_batch: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def batch(self, perm: jax.Array, position: jax.Array, batch_size: int,
            size: int | None = None) -> dict[str, jax.Array]:
    """The ``position``-th minibatch of an epoch ordered by ``perm``, with a mask for the tail.

    ``size`` (static, default ``batch_size``) keeps only the batch's first ``size`` slots: a
    last batch whose real examples all lie there (the rest would be masked padding).
    """
    size = batch_size if size is None else size
    slots = position * batch_size + jnp.arange(size)
    valid = slots < self.num_examples
    local = perm[jnp.clip(slots, 0, self.max_examples - 1)]
    rows = self.offset + jnp.where(valid, local, 0)
    batch = {k: v[rows] for k, v in self.features.items()}
    batch[MASK_KEY] = valid.astype(jnp.float32)
    return batch


#: Optional key of ``ClientOutput.metrics``: local steps the client ran. The round sums it (it
#: measures vmap padding) instead of averaging it.
NUM_STEPS = "num_steps"
#: Optional key of ``ClientOutput.metrics``: 1.0 if the client's planned work exceeded its
#: ``step_cap`` (missed the deadline). The round counts it and applies the deadline policy.
LATE = "late"

ClientUpdateFn = Callable[[Params, ClientData, PyTree, PRNGKey], ClientOutput]
#: ``planned_steps(num_examples, work_fraction, step_cap, *, max_examples) -> int32 steps``: the
#: local steps a client will run (:func:`make_local_trainer`); the round sorts clients by it.
PlannedStepsFn = Callable[..., jax.Array]


#: Fractions of the batch size at which a trimmed last batch may run (the smallest that holds
#: it): the padded slots computed fall from up to ``B - 1`` to under ``B / 4``.
LAST_BATCH_FRACTIONS = (0.25, 0.5, 0.75)


def last_batch_sizes(batch_size: int) -> tuple[int, ...]:
  """The static sizes below ``batch_size`` at which a client running alone trains the partial
  last batch of an epoch (``Performance.trim_last_batch``).

  A vmapped chunk cannot skip anything per client (a ``lax.switch`` under ``vmap`` runs every
  branch), so trimming is for unbatched clients only: a chunk of one, or each device's scan.

  Returns:
    Sorted sizes (empty for batches under 4).

  Examples:
    >>> last_batch_sizes(20), last_batch_sizes(10), last_batch_sizes(3)
    ((5, 10, 15), (3, 5, 8), ())
  """
  if batch_size < 4:
    return ()
  return tuple(sorted({math.ceil(batch_size * f) for f in LAST_BATCH_FRACTIONS} - {batch_size}))


def epoch_permutation(key: PRNGKey, num_examples: jax.Array, max_examples: int) -> jax.Array:
  """A uniformly random order of ``[0, num_examples)`` in the first slots of a ``[max]`` array."""
  scores = jax.random.uniform(key, (max_examples,))
  scores = jnp.where(jnp.arange(max_examples) < num_examples, scores, 2.0)
  return jnp.argsort(scores).astype(jnp.int32)


class LocalResult(NamedTuple):
  """What local training returns: the trained params, the steps run, and the step metrics
  (example-weighted means of ``loss`` and the loss's aux metrics)."""

  params: Params
  num_steps: jax.Array
  metrics: dict[str, jax.Array]
  late: jax.Array = False


LocalTrainer = Callable[..., LocalResult]

#: Salt of the key (folded into the client's key) that draws the shared-data part of each batch.
SHARED_DATA_SALT = 0x5A4ED


class SharedMix(NamedTuple):
  """A small public dataset mixed into every local batch (Zhao et al. 2018).

  Attributes:
    features: dict of arrays ``[num_shared, ...]`` with the population's feature names, trailing
      shapes and dtypes.
    fraction: fraction in [0, 1) of each batch drawn (uniformly, with replacement, with the
      client's key) from ``features``; ``round(fraction * batch_size)`` slots.
  """

  features: dict[str, jax.Array]
  fraction: float

  def slots(self, batch_size: int) -> int:
    """Shared examples per batch of ``batch_size``; checks that some own ones remain."""
    m = int(round(self.fraction * batch_size))
    if m >= batch_size or m == 0:
      raise ValueError(
          f"shared_fraction={self.fraction} with a batch of {batch_size} gives {m} shared "
          f"example(s) per batch; it must leave between 1 and {batch_size - 1} slots to the "
          "shared data. Change shared_fraction or batch_size."
      )
    return m

  def check(self, features: dict[str, jax.Array]) -> None:
    """Refuses shared data whose feature names, trailing shapes or dtypes differ from the
    population's (static: raised while tracing, before compiling)."""
    if set(self.features) != set(features):
      raise ValueError(
          f"shared_data has features {sorted(self.features)} but the population has "
          f"{sorted(features)}; give shared_data exactly the population's feature names."
      )
    for k, v in features.items():
      mine = self.features[k]
      if mine.shape[1:] != v.shape[1:] or mine.dtype != v.dtype:
        raise ValueError(
            f"shared_data[{k!r}] has examples of shape {mine.shape[1:]} and dtype {mine.dtype}; "
            f"the population's are {v.shape[1:]} {v.dtype}. Convert shared_data to match."
        )


def make_shared_mix(shared_data, shared_fraction) -> SharedMix | None:
  """Validates ``shared_data=`` / ``shared_fraction=``; None when no data is shared.

  Returns:
    A :class:`SharedMix`, or None for ``shared_data=None`` (with ``shared_fraction`` 0).
  """
  # In [0, 1): the fraction of each local batch drawn from shared_data (1 would leave no room
  # for the client's own data).
  shared_fraction = _v.hyperparameter("shared_fraction", shared_fraction, low=0,
                                      high=1, high_open=True)
  if shared_data is None:
    if shared_fraction:
      raise ValueError("shared_fraction > 0 needs shared_data (a dict of feature arrays).")
    return None
  if not isinstance(shared_data, dict) or not shared_data:
    raise TypeError(
        "shared_data must be a non-empty dict of arrays {feature_name: [num_shared, ...]}; got "
        f"{type(shared_data).__name__}."
    )
  # The Population's own checks and messages (non-finite values, dtypes that would not survive
  # float32 / int32, scalars, lengths), naming shared_data; the labels are checked against the
  # model's classes with the population's, before compiling (shared_loss below).
  checked = check_features(shared_data, "shared_data")
  if not next(iter(checked.values())).shape[0]:
    raise ValueError("shared_data holds no examples; pass at least one, or shared_data=None.")
  features = {k: jnp.asarray(v) for k, v in checked.items()}
  if shared_fraction == 0:
    raise ValueError("shared_data is given but shared_fraction is 0; set a fraction in (0, 1).")
  return SharedMix(features, float(shared_fraction))


def shared_loss(loss_fn: LossFn, shared: SharedMix | None) -> LossFn:
  """``loss_fn`` whose pre-compile population check (``Simulation.init``) also checks the shared
  data: the population's feature names, shapes and dtypes, and (where the loss has a
  ``check_population``, e.g. :func:`fedjax_sim.models.classifier_loss`) its labels against the
  model's classes, with the same messages as the population's, naming ``shared_data``.

  Returns:
    ``loss_fn`` itself for ``shared=None``, else a wrapper computing the same loss.
  """
  if shared is None:
    return loss_fn
  inner = getattr(loss_fn, "check_population", None)

  @functools.wraps(loss_fn)
  def loss(*args, **kwargs):
    return loss_fn(*args, **kwargs)

  def check_population(params, population):
    if inner is not None:
      inner(params, population)
    shared.check(population.features)
    if inner is not None:
      try:
        inner(params, types.SimpleNamespace(features=shared.features))
      except (ValueError, TypeError) as e:
        raise type(e)(f"shared_data: {e}") from None

  loss.check_population = check_population
  return loss


def make_local_trainer(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    *,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    regularizer: Callable[[Params, Params], jax.Array] | None = None,
    shared: SharedMix | None = None,
) -> LocalTrainer:
  """Builds ``train(start_params, data, key, grad_shift=None) -> LocalResult`` for ONE client.

  The client starts from ``start_params``, re-initialises ``client_optimizer`` and runs
  minibatch steps over its own data, shuffled each epoch with its own key. With
  ``local_epochs=E`` it runs ``E * ceil(n_k / batch_size)`` steps (so the number of steps
  varies per client; the last batch of an epoch is masked). With ``local_steps=S`` it runs
  exactly S steps, cycling through reshuffled epochs (a client with no data runs none).
  ``grad_shift`` (a params-shaped tree) is added to every gradient (SCAFFOLD's control-variate
  correction ``c - c_i``); ``anchor`` is the second argument of ``regularizer`` (default: the
  start; Ditto anchors its personal model to the global one).

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (scalar loss, aux dict)``; mean over real examples.
    client_optimizer: any optax transformation; its state is fresh every round.
    batch_size: static minibatch size B; None means one full batch of the largest client.
    local_epochs: passes over the local data (exactly one of local_epochs / local_steps).
    local_steps: fixed number of local steps.
    regularizer: optional ``r(params, anchor) -> scalar`` added to the loss (FedProx, Ditto).
    shared: optional :class:`SharedMix`: each batch of B then holds ``m = round(fraction * B)``
      shared examples drawn with the client's key and ``B - m`` of the client's own (an epoch
      is a pass over the client's own data in batches of ``B - m``).

  Returns:
    ``train(start_params, data, key, grad_shift=None, anchor=None) -> LocalResult``. Its
    attribute ``train.planned_steps(num_examples, work_fraction=1.0, step_cap=2**30, *,
    max_examples=None)`` is the pure rule for the local steps ``train`` runs
    (``min(ceil(planned * work_fraction), step_cap)``), the one formula the trainer itself
    uses; an :class:`~fedjax_sim.algorithms.Algorithm` carries it as ``planned_steps``.
  """
  _check_local_work(batch_size, local_epochs, local_steps)

  def uncapped_steps(n, bsz, work_fraction):
    """The one rule: planned steps of a client with ``n`` own examples per batch of ``bsz``,
    scaled by its ``work_fraction`` (stragglers), before the deadline's cap."""
    if local_epochs is not None:
      planned = local_epochs * ((n + bsz - 1) // bsz)
    else:
      planned = jnp.where(n > 0, local_steps, 0)
    return jnp.ceil(planned * work_fraction).astype(jnp.int32)

  def own_batch(max_examples: int | None) -> int:
    """Own examples per batch (static): ``batch_size`` less the shared slots."""
    bsz = max_examples if batch_size is None else batch_size
    if bsz is None:
      raise ValueError("planned_steps of a full-batch update (batch_size=None) needs "
                       "max_examples= (the population's largest client).")
    return bsz if shared is None else bsz - shared.slots(bsz)

  def planned_steps(num_examples, work_fraction=1.0, step_cap=2**30, *, max_examples=None):
    """Local steps a client runs (pure, traceable, broadcasts over clients): the planned
    steps for ``num_examples`` examples times ``work_fraction``, rounded up, capped at
    ``step_cap``; ``max_examples`` (static) is needed with ``batch_size=None`` only."""
    n = jnp.asarray(num_examples, jnp.int32)
    return jnp.minimum(uncapped_steps(n, own_batch(max_examples), work_fraction), step_cap)

  def objective(params, anchor, batch, key):
    loss, aux = loss_fn(params, batch, key)
    total = loss if regularizer is None else loss + regularizer(params, anchor)
    return total, (loss, aux)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train(start: Params, data: ClientData, key: PRNGKey, grad_shift: Params | None = None,
            anchor: Params | None = None):
    bsz = data.max_examples if batch_size is None else batch_size
    full_bsz, num_shared = bsz, 0
    if shared is not None:
      shared.check(data.features)
      num_shared = shared.slots(bsz)
      bsz = bsz - num_shared  # the client's own examples per batch
    n = data.num_examples
    steps_per_epoch = jnp.maximum((n + bsz - 1) // bsz, 1)
    # Stragglers complete a fraction of the planned steps; a deadline caps them (the rule
    # planned_steps exposes, so that the round can sort clients by it).
    planned = uncapped_steps(n, bsz, data.work_fraction)
    late = planned > data.step_cap
    total_steps = jnp.minimum(planned, data.step_cap)
    shuffle_key, step_key = jax.random.split(key)

    if local_epochs is not None:
      epochs = jnp.arange(local_epochs)
      perms = jax.vmap(
          lambda e: epoch_permutation(jax.random.fold_in(shuffle_key, e), n, data.max_examples)
      )(epochs)

      def order_for(step, perm):
        return perms[step // steps_per_epoch]
    else:

      def order_for(step, perm):
        epoch = step // steps_per_epoch
        fresh = epoch_permutation(jax.random.fold_in(shuffle_key, epoch), n, data.max_examples)
        return jnp.where(step % steps_per_epoch == 0, fresh, perm)

    aux_shape = _aux_template(loss_fn, start, data, full_bsz)
    anchor = start if anchor is None else anchor
    mix_key = jax.random.fold_in(key, SHARED_DATA_SALT)

    # A client running alone trains an epoch's partial last batch at the smallest static size
    # that holds it (lax.switch picks the branch; the other sizes are never run). The slots
    # cut are masked padding, which contributes exactly zero, and the random draws of the
    # kept rows do not change (partitionable threefry counts along the leading axis), so only
    # the float summation order differs from the full-size batch.
    tails = (last_batch_sizes(bsz)
             if data.trim_last_batch and batch_size is not None and shared is None else ())

    def body(carry):
      step, params, opt_state, perm, sums = carry
      perm = order_for(step, perm)
      position = step % steps_per_epoch
      key = jax.random.fold_in(step_key, step)

      def train_on(size, params, opt_state, sums):
        batch = data.batch(perm, position, bsz, size)
        if shared is not None:
          batch = _mix(batch, shared, num_shared, jax.random.fold_in(mix_key, step))
        (_, (loss, aux)), grads = grad_fn(params, anchor, batch, key)
        if grad_shift is not None:
          grads = jax.tree.map(jnp.add, grads, grad_shift)
        updates, opt_state = client_optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        count = batch[MASK_KEY].sum()
        metrics = {"loss": loss, **aux}
        sums = jax.tree.map(lambda s, m: s + count * m.astype(jnp.float32), sums, metrics)
        return params, opt_state, sums

      if tails:
        left = n - position * bsz  # real examples from this batch's first slot on
        which = sum((left > t).astype(jnp.int32) for t in tails)
        params, opt_state, sums = jax.lax.switch(
            which, [functools.partial(train_on, size) for size in (*tails, bsz)],
            params, opt_state, sums)
      else:
        params, opt_state, sums = train_on(bsz, params, opt_state, sums)
      return step + 1, params, opt_state, perm, sums

    sums0 = {"loss": jnp.zeros((), jnp.float32)}
    sums0.update(jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape))
    carry0 = (
        jnp.zeros((), jnp.int32),
        start,
        client_optimizer.init(start),
        jnp.arange(data.max_examples, dtype=jnp.int32),
        sums0,
    )
    _, params, _, _, sums = jax.lax.while_loop(lambda c: c[0] < total_steps, body, carry0)
    processed = _examples_processed(n, bsz, total_steps, steps_per_epoch)
    processed = processed + num_shared * total_steps.astype(jnp.float32)
    metrics = jax.tree.map(lambda s: s / jnp.maximum(processed, 1.0), sums)
    return LocalResult(params, total_steps, metrics, late)

  train.planned_steps = planned_steps
  return train


def _mix(batch, shared: SharedMix, num_shared: int, key) -> dict[str, jax.Array]:
  """Appends ``num_shared`` examples drawn uniformly (with replacement) from the shared set."""
  size = next(iter(shared.features.values())).shape[0]
  idx = jax.random.randint(key, (num_shared,), 0, size)
  out = {k: jnp.concatenate([v, shared.features[k][idx].astype(v.dtype)])
         for k, v in batch.items() if k != MASK_KEY}
  out[MASK_KEY] = jnp.concatenate([batch[MASK_KEY], jnp.ones((num_shared,), jnp.float32)])
  return out


def proximal(strength) -> Callable[[Params, Params], jax.Array]:
  """``r(params, anchor) = strength / 2 * ||params - anchor||^2`` (FedProx, Ditto, FedDyn)."""
  strength = jnp.float32(strength)

  def regularizer(params: Params, anchor: Params) -> jax.Array:
    sq = sum(jnp.sum(jnp.square(p - a)) for p, a in zip(
        jax.tree.leaves(params), jax.tree.leaves(anchor), strict=True))
    return 0.5 * strength * sq

  return regularizer


def result_metrics(result: LocalResult) -> dict[str, jax.Array]:
  """A local result's metrics plus the ``num_steps`` and ``late`` entries the round reads."""
  metrics = dict(result.metrics)
  metrics[NUM_STEPS] = result.num_steps.astype(jnp.float32)
  metrics[LATE] = jnp.asarray(result.late, jnp.float32)
  return metrics


def make_client_update(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    *,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    regularizer: Callable[[Params, Params], jax.Array] | None = None,
    shared: SharedMix | None = None,
) -> ClientUpdateFn:
  """Builds the FedAvg-style local update of ONE client (see :func:`make_local_trainer`).

  Returns:
    ``client_update(broadcast, data, client_state, key) -> ClientOutput`` with
    ``delta = broadcast - local_params`` and ``weight = num_examples``; ``metrics`` holds the
    example-weighted mean ``loss`` (and the loss's aux metrics) over the local steps, and
    ``num_steps``. ``client_state`` is passed through unchanged. Its attribute
    ``client_update.planned_steps`` is the trainer's pure step rule
    (:func:`make_local_trainer`).
  """
  train = make_local_trainer(
      loss_fn, client_optimizer, batch_size=batch_size, local_epochs=local_epochs,
      local_steps=local_steps, regularizer=regularizer, shared=shared,
  )

  def client_update(broadcast: Params, data: ClientData, client_state: Any, key: PRNGKey):
    result = train(broadcast, data, key)
    delta = jax.tree.map(lambda b, p: b - p, broadcast, result.params)
    return ClientOutput(delta, data.num_examples.astype(jnp.float32), result_metrics(result),
                        client_state)

  client_update.planned_steps = train.planned_steps
  return client_update


def client_mean_loss(
    loss_fn: LossFn, params: Params, data: ClientData, batch_size: int, key: PRNGKey
) -> jax.Array:
  """Mean loss of ``params`` over ALL of one client's examples (forward passes only)."""
  order = jnp.arange(data.max_examples, dtype=jnp.int32)
  steps = (data.num_examples + batch_size - 1) // batch_size

  def body(carry):
    step, total = carry
    batch = data.batch(order, step, batch_size)
    loss, _ = loss_fn(params, batch, key)
    return step + 1, total + loss * batch[MASK_KEY].sum()

  _, total = jax.lax.while_loop(lambda c: c[0] < steps, body, (0, jnp.zeros((), jnp.float32)))
  return total / jnp.maximum(data.num_examples, 1).astype(jnp.float32)


def _examples_processed(n, bsz, total_steps, steps_per_epoch):
  """Real examples seen over ``total_steps`` (full epochs plus a partial one)."""
  full_epochs = total_steps // steps_per_epoch
  rest = total_steps % steps_per_epoch
  return (full_epochs * n + jnp.minimum(rest * bsz, n)).astype(jnp.float32)


def _aux_template(loss_fn, params, data: ClientData, bsz: int):
  batch = {k: jax.ShapeDtypeStruct((bsz, *v.shape[1:]), v.dtype) for k, v in data.features.items()}
  batch[MASK_KEY] = jax.ShapeDtypeStruct((bsz,), jnp.float32)
  _, aux = jax.eval_shape(loss_fn, params, batch, jax.random.key(0))
  return aux


def _check_local_work(batch_size, local_epochs, local_steps) -> None:
  if (local_epochs is None) == (local_steps is None):
    raise ValueError(
        "pass exactly one of local_epochs (passes over each client's data) or local_steps "
        f"(a fixed number of minibatch steps); got local_epochs={local_epochs!r}, "
        f"local_steps={local_steps!r}."
    )
  _v.positive_int("local_epochs", local_epochs, allow_none=True)
  _v.positive_int("local_steps", local_steps, allow_none=True)
  _v.positive_int("batch_size (None for one full batch)", batch_size, allow_none=True)
