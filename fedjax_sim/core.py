"""The pure round: a frozen :class:`RoundPlan` and three pure functions.

(:class:`RoundPlan`, :class:`Performance`, :class:`ServerState` and :func:`initial_state` are
defined in :mod:`fedjax_sim.plan`; :func:`plan_for` in :mod:`fedjax_sim.runs.planning`, the one
place a plan is assembled. All are re-exported here.)

* :func:`initial_state` builds the :class:`ServerState` before round 0,
* :func:`sample_cohort` draws round ``r``'s cohort (a pure function of the run key and ``r``),
* :func:`round_step` runs one federated round: keys, cohort slots, the chunk pass over the
  cohort (``algorithm.client_update`` for ONE client, vmapped here and nowhere else), the
  aggregator's reduce and post stages, the server update and the round's metrics.

Nothing here compiles, checks concrete values or touches the host: :class:`fedjax_sim.Simulation`
checks its arguments (:mod:`fedjax_sim.runs.planning`) and compiles (:mod:`fedjax_sim.programs`);
:func:`fedjax_sim.sweep` vmaps :func:`initial_state` and :func:`round_step` over simulations.
The key derivations and their salts are written once, in :mod:`fedjax_sim.types`.

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_sim as fs
  >>> from fedjax_sim import core
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(60, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
  >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 6, 60))
  >>> algo = fs.algorithms.fedavg(fs.models.classifier_loss(lambda p, x: x @ p),
  ...                             client_optimizer=optax.sgd(0.1), batch_size=4, local_steps=2)
  >>> params = jnp.zeros((3, 2))
  >>> plan = core.plan_for(algo, fs.sampling.uniform(3), pop, params, chunk_size=3)
  >>> state = core.initial_state(plan, params, jax.random.key(0))
  >>> state, metrics = jax.jit(lambda s, p: core.round_step(plan, s, p))(state, pop)
  >>> int(state.round), float(metrics["clients"])
  (1, 3.0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import nonfinite as _nf
from fedjax_sim import partition_views as _views
from fedjax_sim import sharding as _sharding
from fedjax_sim.aggregators import ADDS_NOISE, global_norm
from fedjax_sim.client import LATE, NUM_STEPS, ClientData
from fedjax_sim.data.population import Population
from fedjax_sim.data.sampling import Cohort
from fedjax_sim.plan import (  # noqa: F401 - the round's values, re-exported
  Performance,
  RoundPlan,
  ServerState,
  base_context,
  initial_state,
)
from fedjax_sim.runs.planning import plan_for, with_template  # noqa: F401 - re-exported
from fedjax_sim.types import (
  ATTACK_SALT,
  AVAILABILITY_SALT,
  OUTCOME_SALT,
  PARTITION_SALT,
  ROBUST_SALT,
  SHARED_SALT,
  STACK_SALT,
  SYSTEM_SALT,
  RoundContext,
  WeightedUpdate,
)


class RoundKeys(NamedTuple):
  """Round ``r``'s keys, all derived from ``fold_in(run_key, r)`` (:mod:`fedjax_sim.types`)."""

  cohort: jax.Array
  client: jax.Array
  per_client: jax.Array
  post: jax.Array
  finalize: jax.Array
  shared: jax.Array
  system: jax.Array


def round_keys(key: jax.Array, round_: jax.Array) -> RoundKeys:
  """The keys of round ``round_`` of the run keyed ``key``."""
  round_key = jax.random.fold_in(key, round_)
  cohort_key, client_key, agg_key = jax.random.split(round_key, 3)
  per_client_key, post_key, finalize_key = jax.random.split(agg_key, 3)
  return RoundKeys(cohort_key, client_key, per_client_key, post_key, finalize_key,
                   jax.random.fold_in(round_key, SHARED_SALT),
                   jax.random.fold_in(round_key, SYSTEM_SALT))


def sample_cohort(plan: RoundPlan, key: jax.Array, round_: jax.Array):
  """Round ``round_``'s cohort and availability mask (None without a system model).

  A pure function of (run key, round): the round step and the host-side prefetcher
  (``population_on="host"``) draw the same cohort from it.

  Returns:
    ``(cohort, available)``: a :class:`~fedjax_sim.data.sampling.Cohort` and a bool
    ``[num_clients]`` mask or None.
  """
  keys = round_keys(key, round_)
  num_clients = plan.context.num_clients
  available = None
  if plan.system is not None:
    available = plan.system.available(
        jax.random.fold_in(keys.system, AVAILABILITY_SALT), round_, num_clients)
  if getattr(plan.sampler, "needs_round", False):  # participation schedules (cyclic, min-sep)
    cohort = plan.sampler.sample(keys.cohort, num_clients, available, round_=round_,
                                 partition_key=jax.random.fold_in(key, PARTITION_SALT))
    return cohort, available
  return plan.sampler.sample(keys.cohort, num_clients, available), available


class CohortSlots(NamedTuple):
  """The cohort laid out in ``num_chunks * chunk_size`` slots (padded slots are not real)."""

  ids: jax.Array
  real: jax.Array


def slot_steps(plan: RoundPlan, keys: RoundKeys, population: Population, ids: jax.Array,
               real: jax.Array) -> jax.Array | None:
  """The local steps each slot's client will run this round, before any of them runs.

  The system model's outcome is drawn from the key :func:`client_result` uses
  (``fold_in(keys.system, OUTCOME_SALT)``, then the client id), so the counts are the ones the
  clients run: ``algorithm.planned_steps`` of the example count (0 for padded, dropped and
  empty clients), the work fraction (stragglers) and the step cap (deadline).

  Returns:
    int32 ``[len(ids)]``, or None without a system model or without
    ``plan.algorithm.planned_steps`` (then the steps follow the client sizes).
  """
  planned = plan.algorithm.planned_steps
  if plan.system is None or planned is None:
    return None
  outcome = plan.system.after_selection(jax.random.fold_in(keys.system, OUTCOME_SALT), ids)
  n = population.num_examples[ids]
  n = jnp.where(real & outcome.kept & (n > 0), n, 0)  # as client_result's num_examples
  return planned(n, outcome.work_fraction, outcome.step_cap,
                 max_examples=population.max_examples).astype(jnp.int32)


def cohort_slots(plan: RoundPlan, cohort: Cohort, population: Population,
                 keys: RoundKeys | None = None) -> CohortSlots:
  """Sorts the cohort (``plan.sort_by_size``) and pads it to whole chunks.

  With a system model and ``plan.algorithm.planned_steps`` (and the round's ``keys``) the
  cohort is sorted by the local steps each client will run (:func:`slot_steps`: stragglers and
  deadlines cut them), else by client size; descending either way, so that each chunk's
  vmapped loop runs only as many steps as its own largest client. Only the summation order
  depends on it.
  """
  ids, real = cohort.ids, cohort.mask
  if plan.sort_by_size:  # big clients together: each chunk runs only the steps it needs
    steps = None if keys is None else slot_steps(plan, keys, population, ids, real)
    if steps is None:
      sizes = jnp.where(real, population.num_examples[ids], -1)
    else:
      sizes = jnp.where(real, steps, -1)
    order = jnp.argsort(-sizes, stable=True)
    ids, real = ids[order], real[order]
  pad = plan.num_chunks * plan.chunk_size - plan.cohort_size
  if pad:
    ids = jnp.concatenate([ids, jnp.zeros((pad,), jnp.int32)])
    real = jnp.concatenate([real, jnp.zeros((pad,), bool)])
  return CohortSlots(ids, real)


class Contribution(NamedTuple):
  """What one client adds to the round's sums (all zero for a client that did not count).

  Attributes:
    update: the reducer's contribution (or, for stacked reducers, the whole update).
    client_metrics: the client's metrics weighted by its example count.
    stage_metrics: the per-client aggregator stages' metrics.
    stats: counts (``clients``, ``examples``, ``nan_clients``, ``client_steps``, and the
      system model's ``dropped`` / ``stragglers`` / ``late``). ``client_steps`` is the local
      steps the client ran (the compute it spent), also when it did not count: a client dropped
      as late (``deadline_policy="drop"``) or with a non-finite update keeps its steps; a
      padded slot, a client lost to dropout and an empty client ran none.
    extra: ``ClientOutput.extra`` (values for the algorithm's ``server_update``).
  """

  update: Any
  client_metrics: dict
  stage_metrics: Any
  stats: dict
  extra: Any


class ClientResult(NamedTuple):
  """One client's :class:`Contribution`, its new persistent states and whether it counted."""

  contribution: Contribution
  states: Any
  kept: jax.Array


def client_result(plan: RoundPlan, keys: RoundKeys, context: RoundContext,
                  population: Population, per_client_state, cid, is_real, states,
                  broadcast, *, alone: bool = False) -> ClientResult:
  """One client's part of the round (the function :func:`chunk_pass` vmaps).

  ``alone`` (static): the client is not vmapped with others (a chunk of one, or a device's
  scan), so with ``plan.performance.trim_last_batch`` its partial last batches run trimmed.
  """
  algo, system = plan.algorithm, plan.system
  process = algo.aggregator
  client_state, agg_client_state = states
  selected = is_real
  if system is not None:
    outcome = system.after_selection(jax.random.fold_in(keys.system, OUTCOME_SALT), cid[None])
    outcome = jax.tree.map(lambda x: x[0], outcome)
    is_real = is_real & outcome.kept  # a dropped client's update is lost (it trains nothing)
    work_fraction, step_cap = outcome.work_fraction, outcome.step_cap
  else:
    work_fraction, step_cap = jnp.float32(1.0), jnp.int32(2**30)
  # A client without examples does not participate (the one definition, for every reducer and
  # the `clients` count; fs.Population documents it).
  is_real = is_real & (population.num_examples[cid] > 0)
  data = ClientData(
      population.features,
      population.offsets[cid],
      jnp.where(is_real, population.num_examples[cid], 0),
      population.max_examples,
      work_fraction,
      step_cap,
      trim_last_batch=alone and bool(plan.performance.trim_last_batch),
  )
  out = algo.client_update(broadcast, data, client_state, jax.random.fold_in(keys.client, cid))
  if algo.weight_fn is not None:
    w = algo.weight_fn(data.num_examples.astype(jnp.float32), out.metrics, cid)
    out = out._replace(weight=jnp.maximum(jnp.asarray(w, jnp.float32), 0.0))
  late = is_real & (jnp.asarray(out.metrics.get(LATE, 0.0)) > 0)
  # The clients that trained: one dropped as late below ran its steps up to the deadline all
  # the same (its chunk's vmapped loop ran them), so they count in client_steps.
  trained = is_real
  if system is not None and system.deadline_policy == "drop":
    is_real = is_real & ~late
  # A non-finite update has a non-finite norm: the same reduction clip_l2 computes, so XLA
  # shares it and the check costs no extra pass over the update. (An update whose squared norm
  # overflows float32, i.e. entries beyond ~1e19, is treated as non-finite too.)
  finite = jnp.isfinite(global_norm(out.delta)) & jnp.isfinite(out.weight)
  real = is_real & finite
  real_f = real.astype(jnp.float32)
  update, _, stage_metrics = process.per_client.aggregate(
      WeightedUpdate(out.delta, out.weight, agg_client_state), per_client_state,
      jax.random.fold_in(keys.per_client, cid), context._replace(client_id=cid),
  )
  new_agg_client_state = update.client_state
  update = update._replace(client_state=())
  zero_unless_real = lambda tree: jax.tree.map(  # select, never multiply: NaN * 0 is NaN
      lambda c: jnp.where(real, c, jnp.zeros_like(c)), tree)
  n = data.num_examples.astype(jnp.float32) * real_f
  stats = {
      "clients": real_f,
      "examples": n,
      "nan_clients": (is_real & ~finite).astype(jnp.float32),
      "client_steps": jnp.asarray(out.metrics.get(NUM_STEPS, 0.0), jnp.float32) * trained,
  }
  if system is not None:
    stats["dropped"] = (selected & ~outcome.kept).astype(jnp.float32)
    stats["stragglers"] = (selected & outcome.kept & outcome.straggler).astype(jnp.float32)
    stats["late"] = late.astype(jnp.float32)
  contribution = Contribution(
      update=zero_unless_real(
          update if process.reduce.needs_stack else process.reduce.contribute(update, real_f)),
      client_metrics={name: jnp.where(real, m * n, 0.0) for name, m in out.metrics.items()
                      if name not in (NUM_STEPS, LATE)},
      stage_metrics=zero_unless_real(stage_metrics),
      stats=stats,
      extra=zero_unless_real(out.extra),
  )
  return ClientResult(contribution, (out.client_state, new_agg_client_state), real)


class ChunkPass(NamedTuple):
  """The cohort's sums and per-slot outputs after every chunk ran.

  Attributes:
    sums: the :class:`Contribution` summed over the cohort (``update`` is ``()`` for stacked
      reducers).
    step_slots: local steps the vmapped chunks ran, padding included (sum over chunks of
      ``chunk_size *`` the chunk's largest ``client_steps``): the work a chunk schedule pays
      for. ``step_slots / client_steps >= 1`` is the padding factor (clients dropped as late
      included on both sides: they ran their steps).
    states: every slot's new persistent states, ``[num_chunks, chunk, ...]``.
    kept: which slots counted, ``[num_chunks, chunk]``.
    stack: for stacked reducers, every slot's update ``[num_chunks, chunk, ...]``; else ``()``.
  """

  sums: Contribution
  step_slots: jax.Array
  states: Any
  kept: jax.Array
  stack: Any


def chunk_pass(plan: RoundPlan, keys: RoundKeys, context: RoundContext, population: Population,
               per_client_state, slots: CohortSlots, cohort_states, broadcast) -> ChunkPass:
  """Runs the cohort chunk by chunk (``lax.scan``), each chunk's clients vmapped.

  The cohort's persistent states are gathered once (O(K x state)) by the caller, streamed
  through the loop as inputs / outputs and scattered back once: carrying the whole
  population's state through the loop would copy it per chunk.

  With a mesh and ``plan.per_device_scan`` the scan runs inside a ``jax.shard_map`` over the
  ``clients`` axis (:func:`per_device_pass`); with a mesh otherwise, every chunk is split over
  the devices by the partitioner (a sharding constraint on the chunk).
  """
  chunk = plan.chunk_size
  ids = slots.ids.reshape(plan.num_chunks, chunk)
  real = slots.real.reshape(plan.num_chunks, chunk)
  if plan.mesh is not None and plan.per_device_scan:
    sums, steps, states, kept, stack = per_device_pass(
        plan, keys, context, population, per_client_state, ids, real, cohort_states, broadcast)
  else:
    sums, steps, states, kept, stack = scan_chunks(
        plan, keys, context, population, per_client_state, ids, real, cohort_states, broadcast,
        chunk_sharding(plan))
  # The work the chunk schedule pays for: every slot of a chunk runs its largest client's steps.
  return ChunkPass(sums, chunk * jnp.sum(steps), states, kept, stack)


def scan_chunks(plan: RoundPlan, keys: RoundKeys, context: RoundContext, population: Population,
                per_client_state, ids, real, cohort_states, broadcast, sharding=None):
  """The scan over chunks ``ids``/``real`` ``[num_chunks, chunk]`` (``chunk`` from their shape).

  Returns:
    ``(sums, steps, states, kept, stack)``: the summed :class:`Contribution`, every chunk's
    largest ``client_steps`` ``[num_chunks]``, and :class:`ChunkPass`'s per-slot outputs.
  """
  stacked = plan.algorithm.aggregator.reduce.needs_stack
  alone = ids.shape[1] == 1 and plan.unbatched_single_client
  one = lambda cid, is_real, states, broadcast: client_result(
      plan, keys, context, population, per_client_state, cid, is_real, states, broadcast,
      alone=alone)
  if alone:
    # A vmap over ONE client still batches every op (size-1 batch dimension: batched GEMMs,
    # grouped convolutions), which XLA:CPU runs slower (benchmarks/chunk1.py); run it plain.
    def clients(cids, creal, cstates, broadcast):
      out = one(*jax.tree.map(lambda x: x[0], (cids, creal, cstates)), broadcast)
      return jax.tree.map(lambda x: jnp.asarray(x)[None], out)
  else:
    clients = jax.vmap(one, in_axes=(0, 0, 0, None))  # the one vmap over clients
  # A trace cache, not a compile: the accumulator's shape probe below and the scan's body share
  # one trace of the client; XLA inlines the nested call into the caller's program.
  clients = jax.jit(clients)

  def summable(result: ClientResult) -> Contribution:
    return result.contribution._replace(update=()) if stacked else result.contribution

  def body(acc, xs):
    cids, creal, cstates = _sharding.constrain(xs, sharding)  # split over devices
    result = clients(cids, creal, cstates, broadcast)
    summed = jax.tree.map(lambda x: jnp.sum(x, axis=0), summable(result))
    steps = jnp.max(result.contribution.stats["client_steps"])
    ys = (steps, result.states, result.kept, result.contribution.update if stacked else ())
    return jax.tree.map(jnp.add, acc, summed), ys

  first = jax.eval_shape(
      clients, ids[0], real[0], jax.tree.map(lambda s: s[0], cohort_states), broadcast)
  acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), summable(first))
  sums, (steps, states, kept, stack) = jax.lax.scan(body, acc0, (ids, real, cohort_states))
  return sums, steps, states, kept, stack


def per_device_pass(plan: RoundPlan, keys: RoundKeys, context: RoundContext,
                    population: Population, per_client_state, ids, real, cohort_states,
                    broadcast):
  """:func:`scan_chunks` inside a ``jax.shard_map`` over the mesh's ``clients`` axis.

  Each device gets its ``chunk / n`` slots of every chunk (one client per device at chunk
  ``n``) and scans them with the one-client function itself: no batch dimension, so a CNN
  runs the plain convolution of a single client. The sums are added across devices with one
  ``psum``, each chunk's step count with a ``pmax``; the per-slot outputs stay split along
  ``clients``. Everything else (population, broadcast, keys, aggregator state) is replicated,
  so no example moves between devices. A client's randomness depends on its id only, so the
  result equals the single-device one up to the float summation order.

  Returns:
    :func:`scan_chunks`'s tuple.
  """
  mesh = plan.mesh
  split, whole = jax.sharding.PartitionSpec(None, _sharding.CLIENTS), jax.sharding.PartitionSpec()
  shared = (keys, context, population, per_client_state, broadcast)
  leaves, treedef = jax.tree.flatten(shared)
  traced = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]  # the rest is static

  def local(ids, real, cohort_states, arrays):
    full = list(leaves)
    for i, x in zip(traced, arrays, strict=True):
      full[i] = x
    sums, steps, states, kept, stack = scan_chunks(
        plan, *jax.tree.unflatten(treedef, full)[:4], ids, real, cohort_states,
        jax.tree.unflatten(treedef, full)[4])
    return (jax.lax.psum(sums, _sharding.CLIENTS), jax.lax.pmax(steps, _sharding.CLIENTS),
            states, kept, stack)

  return jax.shard_map(
      local, mesh=mesh, in_specs=(split, split, split, whole),
      out_specs=(whole, whole, split, split, split), check_vma=False,
  )(ids, real, cohort_states, [leaves[i] for i in traced])


def chunk_sharding(plan: RoundPlan):
  """Sharding of one chunk's per-client arrays: split along ``clients`` (None: no mesh)."""
  return None if plan.mesh is None else _sharding.along_clients(plan.mesh)


def reduce_stack(reducer, updates, mask, ids, key, context):
  """The stacked reduce: an optional omniscient attack, then the robust rule (or the sum)."""
  metrics = {}
  zero_masked = lambda tree: jax.tree.map(
      lambda u: jnp.where(mask.reshape((-1,) + (1,) * (u.ndim - 1)), u, jnp.zeros_like(u)), tree)
  if reducer.attack is not None:
    updates, m = reducer.attack(updates, mask, ids, jax.random.fold_in(key, ATTACK_SALT),
                                context)
    updates = zero_masked(updates)
    metrics.update(m)
  if reducer.stacked is not None:
    reduced, m = reducer.stacked(updates, mask, jax.random.fold_in(key, ROBUST_SALT), context)
    metrics.update(m)
    return reduced, metrics
  contributions = zero_masked(jax.vmap(reducer.contribute)(updates, mask.astype(jnp.float32)))
  return jax.tree.map(lambda c: jnp.sum(c, axis=0), contributions), metrics


class ServerStep(NamedTuple):
  """The server's side of a round: the new server pieces and what the aggregator reported."""

  params: Any
  opt_state: Any
  agg_state: Any
  server_extra: Any
  server_delta: Any
  metrics: dict


def server_step(plan: RoundPlan, state: ServerState, keys: RoundKeys, context: RoundContext,
                passed: ChunkPass, slots: CohortSlots, train_params) -> ServerStep:
  """Reduce (stacked rules), post stages, finalize, the algorithm's server update, optimizer."""
  algo = plan.algorithm
  process = algo.aggregator
  per_client_state, post_state = state.agg_state
  reduced, metrics = passed.sums.update, {}
  kept = passed.kept.reshape(-1)
  if process.reduce.needs_stack:
    reduced, metrics = reduce_stack(
        process.reduce, jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), passed.stack),
        kept, slots.ids, jax.random.fold_in(keys.post, STACK_SALT), context)
  aggregated, post_state, post_metrics = process.post.aggregate(
      reduced, post_state, keys.post,
      context._replace(per_client_state=per_client_state, cohort_kept=kept))
  metrics.update(post_metrics)
  if process.per_client.finalize is not None:
    per_client_state, finalize_metrics = process.per_client.finalize(
        per_client_state, passed.sums.stage_metrics, keys.finalize, context)
    metrics.update(finalize_metrics)
  stats = passed.sums.stats
  server_delta, server_extra = aggregated.delta, state.server_extra
  if algo.server_update is not None:
    server_delta, server_extra = algo.server_update(
        aggregated.delta, passed.sums.extra, state.server_extra,
        {"clients": stats["clients"], "examples": stats["examples"]}, context)
  updates, opt_state = algo.server_optimizer.update(server_delta, state.opt_state, train_params)
  new_params = optax.apply_updates(train_params, updates)
  if ADDS_NOISE not in process.tags:
    # No client took part (possible under Poisson sampling): keep the server unchanged. Under DP
    # the noisy update is always applied, so an empty cohort is not revealed.
    took_part = stats["clients"] > 0
    new_params, opt_state, server_extra = jax.tree.map(
        lambda a, b: jnp.where(took_part, a, b), (new_params, opt_state, server_extra),
        (train_params, state.opt_state, state.server_extra))
  return ServerStep(new_params, opt_state, (per_client_state, post_state), server_extra,
                    server_delta, metrics)


def round_metrics(plan: RoundPlan, cohort: Cohort, available, passed: ChunkPass,
                  server: ServerStep, nonfinite) -> dict:
  """The round's metrics: counts, norms, and example / client averages (NaN over nothing)."""
  stats = passed.sums.stats
  metrics = {
      "clients": stats["clients"],
      "examples": stats["examples"],
      "nan_clients": stats["nan_clients"],
      "truncated": cohort.truncated.astype(jnp.float32),
      **({} if cohort.schedule_violations is None else {
          "schedule_violations": cohort.schedule_violations.astype(jnp.float32)}),
      **({} if plan.system is None else {
          "available": jnp.sum(available).astype(jnp.float32),
          "dropped": stats["dropped"], "stragglers": stats["stragglers"],
          "late": stats["late"],
      }),
      "update_norm": global_norm(server.server_delta),
      "client_steps": stats["client_steps"],
      "step_slots": passed.step_slots,
      _nf.NONFINITE: nonfinite.astype(jnp.float32),
  }
  # Averages over nothing are NaN (nothing was measured), not 0.
  examples, clients = stats["examples"], stats["clients"]
  metrics.update({k: jnp.where(examples > 0, v / jnp.maximum(examples, 1.0), jnp.nan)
                  for k, v in passed.sums.client_metrics.items()})
  metrics.update({k: jnp.where(clients > 0, v / jnp.maximum(clients, 1.0), jnp.nan)
                  for k, v in passed.sums.stage_metrics.items()})
  metrics.update(server.metrics)
  return metrics


def check_state_fits(plan: RoundPlan, state: ServerState) -> None:
  """Refuses (at trace time, from shapes) a state built for another model, population or plan:
  params that are not the plan's model, or per-client pieces not kept for its ``num_clients``.

  Raises:
    ValueError: naming the piece, its leading size and the plan's client count.
  """
  template = plan.context.params_template
  if template is not None:
    spec = lambda t: (jax.tree.structure(t), [(tuple(np.shape(x)), jnp.dtype(x.dtype))
                                              for x in jax.tree.leaves(t)])
    if spec(plan.views(state.params)[0]) != spec(template):
      raise ValueError(
          "state.params do not have the structure and shapes of this plan's model (its "
          "trainable view: the params the plan was built for): the state was built for another "
          "model or plan. Build it with this plan (core.initial_state / sim.init) or restore "
          "it with sim.restore(...).")
  n = plan.context.num_clients
  for name in ("client_states", "agg_client_states"):
    for path, x in jax.tree_util.tree_leaves_with_path(getattr(state, name)):
      if not np.shape(x) or np.shape(x)[0] != n:
        raise ValueError(
            f"state.{name}{jax.tree_util.keystr(path)} has shape {tuple(np.shape(x))}, but this "
            f"plan keeps per-client state for {n} clients (a leading axis of {n}): the state "
            "was built for another population or plan. Build it with this plan "
            "(core.initial_state / sim.init) or restore it with sim.restore(...).")


def round_step(plan: RoundPlan, state: ServerState, population: Population, halt=False):
  """One federated round (pure; traced into the caller's program).

  A non-finite round (:mod:`fedjax_sim.nonfinite`) keeps the server state; with ``halt`` (a
  traced bool, ``on_nonfinite="raise"``) it returns the input state unchanged, round included.

  Args:
    plan: the round plan.
    state: the state after ``state.round`` rounds.
    population: the clients' data (device arrays, or their shapes under ``jax.eval_shape``).
    halt: stop at a non-finite round instead of skipping its server step.

  Returns:
    ``(new_state, metrics)``, ``metrics`` a dict of float32 scalars.
  """
  check_state_fits(plan, state)
  algo = plan.algorithm
  keys = round_keys(state.key, state.round)
  cohort, available = sample_cohort(plan, state.key, state.round)
  slots = cohort_slots(plan, cohort, population, keys)
  context = plan.context._replace(
      shared_key=keys.shared, cohort_ids=slots.ids, cohort_mask=slots.real)
  # trainable=: the algorithm sees the trainable view; the frozen view goes to every client of
  # a chunk once (an unbatched argument of the vmapped client function).
  train_params, frozen = plan.views(state.params)
  broadcast = (train_params if algo.broadcast_fn is None
               else algo.broadcast_fn(train_params, state.server_extra))
  if frozen is not None:
    broadcast = _views.FinetuneBroadcast(broadcast, frozen)
  ids = slots.ids.reshape(plan.num_chunks, plan.chunk_size)
  cohort_states = jax.tree.map(lambda s: s[ids], (state.client_states, state.agg_client_states))
  passed = chunk_pass(plan, keys, context, population, state.agg_state[0], slots, cohort_states,
                      broadcast)
  server = server_step(plan, state, keys, context, passed, slots, train_params)
  # Non-finite rounds (fedjax_sim.nonfinite): the server step is not applied.
  stats = passed.sums.stats
  no_finite_client = (stats["nan_clients"] > 0) & (stats["clients"] == 0)
  state_ok = _nf.stays_finite((server.params, server.opt_state),
                              (train_params, state.opt_state))
  nonfinite = ~state_ok | no_finite_client
  discard = ~state_ok | (halt & no_finite_client)
  new, old = server[:4], (train_params, state.opt_state, state.agg_state, state.server_extra)
  params, opt_state, agg_state, server_extra = jax.tree.map(
      lambda a, b: jnp.where(discard, b, a), new, old)
  client_states, agg_client_states = state.client_states, state.agg_client_states
  if client_states != () or agg_client_states != ():
    # Padded slots (which may repeat a real id), clients whose update was non-finite (or was
    # dropped) and every client of a discarded round write out of bounds and are dropped.
    write = jnp.where(passed.kept & ~discard, ids, plan.context.num_clients).reshape(-1)
    client_states, agg_client_states = jax.tree.map(
        lambda s, new: s.at[write].set(new.reshape(-1, *new.shape[2:]), mode="drop"),
        (client_states, agg_client_states), passed.states)
  if frozen is not None:  # the frozen leaves are the incoming buffers, unchanged
    params = _views.merge(params, frozen)
  new_state = ServerState(
      round=state.round + jnp.where(halt & nonfinite, 0, 1).astype(state.round.dtype),
      params=params, opt_state=opt_state, agg_state=agg_state, client_states=client_states,
      key=state.key, server_extra=server_extra, agg_client_states=agg_client_states)
  return new_state, round_metrics(plan, cohort, available, passed, server, nonfinite)
