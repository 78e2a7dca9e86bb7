"""Aggregator stages as ``(init, aggregate)`` pairs, composed with ``chain`` and placed in the
three slots of an :class:`AggregationProcess` (the aggregator an algorithm uses):
``per_client`` -> ``reduce`` -> ``post``. A slot holds a :class:`Stage` (``per_client``,
``post``) or a :class:`Reducer` (``reduce``).

* ``per_client`` stages see ONE client's :class:`~fedjax_sim.types.WeightedUpdate`; they run
  inside the vmapped cohort chunk (clip, quantise, compress, attack). Their state is read-only
  during a round. Their metrics are averaged over the real clients of the cohort.
* ``reduce`` is a :class:`Reducer`: the (weighted) **sum** over the cohort. Because it is a sum,
  it streams across chunks (and devices).
* ``post`` stages see the single reduced update (noise, normalisation, dequantisation) and may
  update their state; ``context.per_client_state`` shows them the per-client slot's state.
* A per-client stage may keep state for EACH client of the population (``client_init``; e.g.
  top-k error feedback): the engine stores it for all clients, hands the client's own slice in
  ``update.client_state`` and writes back what the stage returns there.
* A :class:`Reducer` may instead be *stacked* (robust rules: median, trimmed mean, Krum, ...):
  the engine then fills a ``[K, ...]`` buffer with the cohort's per-client updates chunk by
  chunk and hands it over whole. Memory is O(K x params) for that buffer, not O(chunk x params).
* After ``post``, a per-client stage may ``finalize``: it receives the cohort SUMS of the
  per-client metrics it emitted and returns its new state (e.g. adaptive clipping moves its clip
  from the noised count of unclipped clients).

Every ``aggregate`` has the signature
``aggregate(update, state, key, context) -> (update, new_state, metrics)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fedjax_sim.types import EmptyState, Params, PRNGKey, RoundContext, WeightedUpdate

AggState = Any
Metrics = dict[str, jax.Array]
AggregateFn = Callable[
    [WeightedUpdate, AggState, PRNGKey, RoundContext], tuple[WeightedUpdate, AggState, Metrics]
]

#: Tags a stage can carry so that compositions can be checked before compiling.
CLIPS = "clips"  # bounds each client's L2 contribution (sensitivity)
ADDS_NOISE = "adds_noise"  # adds random noise to the aggregate (central DP)
CAPS_WEIGHTS = "caps_weights"  # bounds each client's weight by 1 (weighted DP estimators)
LOCAL_NOISE = "local_noise"  # each client noises its own update (local DP)
SECURE = "secure"  # the server only sees the sum in a finite group (secure aggregation)

FinalizeFn = Callable[[AggState, Metrics, PRNGKey, RoundContext], tuple[AggState, Metrics]]


class Stage(NamedTuple):
  """One stage of an aggregation process (a slot's contents, composed with :func:`chain`): a
  pair of pure functions ``init(params) -> state`` and ``aggregate`` (module docstring), plus,
  for per-client stages, an optional ``finalize(state, metric_sums, key, context)`` and an
  optional ``client_init(params) -> one client's state`` (state kept for every client).

  ``Aggregator`` is its name before the rename (kept as an alias)."""

  init: Callable[[Params], AggState]
  aggregate: AggregateFn
  tags: frozenset = frozenset()
  finalize: FinalizeFn | None = None
  client_init: Callable[[Params], Any] | None = None


class Reducer(NamedTuple):
  """The cohort reduction: a sum of per-client contributions.

  Attributes:
    contribute: ``(update, is_real) -> WeightedUpdate`` for one client; the engine sums these
      over the cohort (streaming across chunks). ``is_real`` is 1.0 for a real client, 0.0 for a
      padded slot.
    weighted: whether contributions are multiplied by the client weight.
    stacked: for non-linear (robust) rules, ``stacked(updates, mask, key, context) ->
      (WeightedUpdate, metrics)``: ``updates`` is the cohort's per-client
      :class:`WeightedUpdate` stacked along a leading ``[K]`` axis (padded slots zeroed) and
      ``mask`` marks the real ones. The engine then keeps all K updates (O(K x params) memory)
      instead of streaming a sum. ``None`` for a plain sum.
    attack: optional omniscient attack on the stacked updates before reducing,
      ``attack(updates, mask, ids, key, context) -> (updates, metrics)`` (see
      :mod:`fedjax_sim.attacks`); forces the stacked path.
    check: optional ``check(context, num_params)`` run before compiling.
  """

  contribute: Callable[[WeightedUpdate, jax.Array], WeightedUpdate]
  weighted: bool
  stacked: Callable | None = None
  attack: Callable | None = None
  check: Callable | None = None

  @property
  def needs_stack(self) -> bool:
    return self.stacked is not None or self.attack is not None


class AggregationProcess(NamedTuple):
  """The aggregator an algorithm uses: a pipeline in three slots (see the module docstring).

  ``Process`` is its name before the rename (kept as an alias).

  Attributes:
    per_client, reduce, post: the slots.
    noise_multiplier: for central-DP processes, the noise multiplier z that the privacy
      accountant must use (the effective one for adaptive clipping); None otherwise.
    check: optional ``check(context)`` run by ``Simulation`` before compiling (raises on settings
      that cannot work for this population / sampler).
  """

  per_client: Stage
  reduce: Reducer
  post: Stage
  noise_multiplier: float | None = None
  check: Callable[[RoundContext], None] | None = None
  #: bands of the correlated-noise mechanism (1: independent noise each round; BandMF: b), for
  #: the accountant, which needs a participation schedule with min-separation >= num_bands.
  num_bands: int = 1
  #: for a strategy matrix of fixed size T (``band_mf_mean(strategy=[T, T] matrix)``): T, the
  #: most rounds a run may reach; None when any length works.
  horizon: int | None = None
  #: for mechanisms accounted without amplification (tree aggregation): ``T -> CᵀC`` of the
  #: strategy over T rounds, from which ``fs.privacy`` computes the min-separation sensitivity.
  strategy_gram: Callable[[int], Any] | None = None

  @property
  def tags(self) -> frozenset:
    return self.per_client.tags | self.post.tags

  def init(self, params: Params) -> tuple[AggState, AggState]:
    return self.per_client.init(params), self.post.init(params)


#: The names before the rename: a stage was an ``Aggregator``, the aggregator a ``Process``.
Aggregator = Stage
Process = AggregationProcess


def identity() -> Stage:
  """A stage that changes nothing.

  Returns:
    a :class:`Stage` with an empty state that returns the update unchanged.
  """

  def aggregate(update, state, key, context):
    del key, context
    return update, state, {}

  return Stage(lambda params: EmptyState(), aggregate)


def chain(*stages: Stage) -> Stage:
  """Applies ``stages`` in order; stage ``i`` gets the key ``fold_in(key, i)``.

  The state is a tuple of the stages' states and the metrics are merged (later stages win on a
  name clash).

  Returns:
    a :class:`Stage` whose state is the tuple of the stages' states.

  Examples:
    >>> import fedjax_sim as fs
    >>> agg = fs.aggregators.chain(fs.aggregators.clip_l2(1.0), fs.aggregators.identity())
    >>> len(agg.init({"w": 0.0}))
    2
  """
  for i, s in enumerate(stages):
    if not isinstance(s, Stage):
      raise TypeError(
          f"chain() takes Stages (fs.aggregators.Stage); argument {i} is {type(s).__name__}. "
          "Processes (weighted_mean, dp_mean, ...) cannot be chained; build one with process(...)."
      )

  def init(params):
    return tuple(s.init(params) for s in stages)

  has_client_state = any(s.client_init is not None for s in stages)

  def client_init(params):
    return tuple(() if s.client_init is None else s.client_init(params) for s in stages)

  def aggregate(update, state, key, context):
    new_states, metrics = [], {}
    client_states = update.client_state if has_client_state else ((),) * len(stages)
    new_client_states = []
    for i, (stage, st, cs) in enumerate(zip(stages, state, client_states, strict=True)):
      update, st, m = stage.aggregate(
          update._replace(client_state=cs), st, jax.random.fold_in(key, i), context
      )
      new_states.append(st)
      new_client_states.append(update.client_state)
      metrics.update(m)
    if has_client_state:
      update = update._replace(client_state=tuple(new_client_states))
    return update, tuple(new_states), metrics

  def finalize(state, metric_sums, key, context):
    new_states, metrics = [], {}
    for i, (stage, st) in enumerate(zip(stages, state, strict=True)):
      if stage.finalize is not None:
        st, m = stage.finalize(st, metric_sums, jax.random.fold_in(key, i), context)
        metrics.update(m)
      new_states.append(st)
    return tuple(new_states), metrics

  tags = frozenset().union(*(s.tags for s in stages)) if stages else frozenset()
  has_finalize = any(s.finalize is not None for s in stages)
  return Stage(
      init, aggregate, tags, finalize if has_finalize else None,
      client_init if has_client_state else None,
  )


def weighted_sum_reducer() -> Reducer:
  """Sum of ``weight * delta`` and of ``weight``.

  Returns:
    a :class:`Reducer` (``weighted=True``).
  """

  def contribute(update, is_real):
    w = update.weight * is_real
    return WeightedUpdate(jax.tree.map(lambda d: w * d, update.delta), w)

  return Reducer(contribute, weighted=True)


def sum_reducer() -> Reducer:
  """Unweighted sum of ``delta``; the weight becomes the number of real clients.

  Returns:
    a :class:`Reducer` (``weighted=False``).
  """

  def contribute(update, is_real):
    return WeightedUpdate(jax.tree.map(lambda d: is_real * d, update.delta), is_real)

  return Reducer(contribute, weighted=False)


def process(
    per_client: Stage | None = None,
    reduce: Reducer | None = None,
    post: Stage | None = None,
    *,
    noise_multiplier: float | None = None,
    check: Callable[[RoundContext], None] | None = None,
    num_bands: int = 1,
    horizon: int | None = None,
    strategy_gram: Callable[[int], Any] | None = None,
) -> AggregationProcess:
  """Assembles an aggregation pipeline; missing slots are identities / an unweighted sum.

  Returns:
    the :class:`AggregationProcess` ``(per_client, reduce, post, noise_multiplier, check)``.

  Raises:
    ValueError: for compositions whose privacy is undefined: noise without per-client clipping,
      or noise on an example-weighted sum whose weights are not capped (unbounded sensitivity).
  """
  per_client = identity() if per_client is None else per_client
  reduce = sum_reducer() if reduce is None else reduce
  post = identity() if post is None else post
  for name, stage in (("per_client", per_client), ("post", post)):
    if not isinstance(stage, Stage):
      raise TypeError(f"{name} must be a Stage; got {type(stage).__name__}.")
  if not isinstance(reduce, Reducer):
    raise TypeError(
        f"reduce must be a Reducer (sum_reducer() or weighted_sum_reducer()); got "
        f"{type(reduce).__name__}."
    )
  if reduce.needs_stack and SECURE in per_client.tags:
    raise ValueError(
        "a robust rule (or an omniscient attack) needs each client's update, but secure "
        "aggregation reveals only their sum: the two cannot be combined. Use a streaming "
        "defence that secure aggregation allows (norm bounding: clip_l2 in per_client)."
    )
  if reduce.stacked is not None and ADDS_NOISE in post.tags:
    raise ValueError(
        "central DP noise after a robust rule: the noise is calibrated to the sensitivity of a "
        "SUM of clipped updates, and fedjax_sim does not account the sensitivity of robust "
        "rules. Use dp_mean (with norm bounding by its clip), or local DP noise per client."
    )
  if ADDS_NOISE in post.tags or LOCAL_NOISE in per_client.tags:
    if CLIPS not in per_client.tags:
      raise ValueError(
          "noise is added but no per-client stage bounds the clients' contributions, so the "
          "noise protects nothing; put clip_l2(clip) in per_client (or use dp_mean)."
      )
    if ADDS_NOISE in post.tags and reduce.weighted and CAPS_WEIGHTS not in per_client.tags:
      raise ValueError(
          "DP noise on an example-weighted sum (weighted_mean): its sensitivity is unbounded "
          "(one client's weight is unbounded). Use dp_mean (unweighted sum, fixed denominator) "
          "or dp_mean(..., weight_cap=w) (weights min(n_k / w, 1))."
      )
  return AggregationProcess(per_client, reduce, post, noise_multiplier, check, int(num_bands),
                            horizon, strategy_gram)


def as_process(aggregator: Any) -> AggregationProcess:
  """Validates the ``aggregator`` argument of an algorithm.

  Returns:
    ``aggregator`` itself when it is an :class:`AggregationProcess` (otherwise it raises).
  """
  if isinstance(aggregator, AggregationProcess):
    return aggregator
  if isinstance(aggregator, Stage):
    raise TypeError(
        "aggregator must be an AggregationProcess (e.g. weighted_mean(), dp_mean(...), or "
        "process(per_client=..., reduce=..., post=...)); got a single Stage (an "
        "fs.aggregators.Stage, formerly Aggregator). Put it in a slot: "
        "process(per_client=stage) or process(post=stage)."
    )
  raise TypeError(f"aggregator must be an AggregationProcess; got {type(aggregator).__name__}.")
