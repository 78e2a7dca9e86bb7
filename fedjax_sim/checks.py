"""What :class:`fedjax_sim.Simulation` checks before anything compiles.

Every function here raises a clear ``TypeError`` / ``ValueError`` that names the argument and
the fix, from shapes and Python values only (abstract evaluation, never a compile), so a bad
configuration never surfaces as an XLA traceback or a silent NaN.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import core, sharding
from fedjax_sim.aggregators import ADDS_NOISE, CAPS_WEIGHTS, LOCAL_NOISE
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.data.population import Population
from fedjax_sim.data.sampling import CyclicPoissonSampler, PoissonSampler, UniformSampler
from fedjax_sim.systems import SystemModel
from fedjax_sim.types import MASK_KEY, RoundContext


def param_count(params) -> int:
  """Scalars in a pytree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def simulation_args(algorithm, population, *, cohort_size, sampler, chunk_size, system, mesh,
                    population_on, sort_by_size=True,
                    unbatched_single_client=True) -> UniformSampler | PoissonSampler:
  """Checks :class:`~fedjax_sim.Simulation`'s arguments (the sampler against the population is
  left to ``sampler.validate``, whose warnings point at the caller's ``Simulation(...)``).

  Returns:
    The sampler (``fs.sampling.uniform(cohort_size)`` when only ``cohort_size`` is given).
  """
  if not isinstance(algorithm, Algorithm):
    raise TypeError(
        f"algorithm must be an fs.algorithms.Algorithm (e.g. fs.algorithms.fedavg(...)); got "
        f"{type(algorithm).__name__}."
    )
  if not isinstance(population, Population):
    raise TypeError(
        f"population must be an fs.Population (Population.from_arrays / from_clients); got "
        f"{type(population).__name__}."
    )
  if (cohort_size is None) == (sampler is None):
    raise ValueError(
        "pass exactly one of cohort_size=K (uniform sampling without replacement) or "
        "sampler=fs.sampling.poisson(q, max_cohort_size) / fs.sampling.uniform(K)."
    )
  if sampler is None:
    sampler = UniformSampler(cohort_size)
  if not isinstance(sampler, (UniformSampler, PoissonSampler, CyclicPoissonSampler)):
    raise TypeError(f"sampler must be fs.sampling.uniform(...) or poisson(...); got {sampler!r}.")
  if chunk_size is not None and (
      not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
      or chunk_size < 1
  ):
    raise ValueError(f"chunk_size must be a positive int or None (automatic); got {chunk_size!r}.")
  if system is not None:
    if not isinstance(system, SystemModel):
      raise TypeError(f"system must be an fs.systems.SystemModel; got {type(system).__name__}.")
    system.validate(population.num_clients)
  for name, value in (("sort_by_size", sort_by_size),
                      ("unbatched_single_client", unbatched_single_client)):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"{name} must be True or False; got {value!r}.")
  if population_on not in ("device", "sharded", "host"):
    raise ValueError(
        f"population_on must be 'device', 'sharded' or 'host'; got {population_on!r}.")
  if population_on == "sharded" and mesh is None:
    raise ValueError(
        "population_on='sharded' splits the examples over the devices of a mesh's 'clients' "
        "axis; pass mesh=fs.sharding.clients_mesh() (or use 'device' / 'host').")
  if mesh is not None:  # a requested chunk must split evenly over the mesh's devices
    sharding.fit_chunk(1, sampler.max_cohort_size, sharding.mesh_size(mesh),
                       None if chunk_size is None else int(chunk_size))
  return sampler


def composition(algorithm: Algorithm, context: RoundContext) -> None:
  """The aggregator's own check, and the DP composition rules."""
  if algorithm.aggregator.check is not None:
    algorithm.aggregator.check(context)
  dp_tags = {ADDS_NOISE, LOCAL_NOISE} & algorithm.aggregator.tags
  if algorithm.weight_fn is not None and dp_tags and not (
      algorithm.aggregator.reduce.weighted and CAPS_WEIGHTS in algorithm.aggregator.tags
  ):
    raise ValueError(
        "weight_fn with a DP aggregator that sums clients unweighted: the weights would be "
        "ignored, and uncapped weights would break the DP sensitivity. Use "
        "fs.aggregators.dp_mean(clip, z, weight_cap=w), which caps every weight at 1."
    )
  if algorithm.server_update is not None and dp_tags:
    raise ValueError(
        f"{algorithm.name} sends per-client values besides its update (ClientOutput.extra) that "
        "bypass the aggregator, so a DP aggregator cannot protect them; this combination is "
        "not supported. Use a non-DP aggregator, or FedAvg / FedProx for DP."
    )


def typed_key(key) -> jax.Array:
  """``key`` as a typed PRNG key of the default implementation (a legacy uint32[2] is wrapped).

  Returns:
    The typed key.
  """
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single key (shape ()); got shape {key.shape}.")
    default = jax.random.key_impl(jax.random.key(0))
    if jax.random.key_impl(key) != default:
      raise ValueError(
          f"key must use the default PRNG implementation ({default}), which the run's "
          f"derivations, logs and checkpoints record; got {jax.random.key_impl(key)}. Use "
          "jax.random.key(seed) without impl=."
      )
    return key
  try:
    arr = jnp.asarray(key)
  except TypeError:
    arr = None
  if arr is not None and arr.dtype == jnp.uint32 and arr.shape == (2,):
    return jax.random.wrap_key_data(arr)
  raise TypeError(
      f"key must be a PRNG key such as jax.random.key(0); got {type(key).__name__} "
      f"{getattr(key, 'shape', '')}."
  )


def params(params) -> None:
  """Float, finite, non-empty parameters."""
  if not jax.tree.leaves(params):
    raise ValueError("params is empty; pass the model's parameter pytree.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"params{jax.tree_util.keystr(path)} has dtype {leaf.dtype}; trainable parameters "
          "must be floating point."
      )
    bad = int(leaf.size - jnp.count_nonzero(jnp.isfinite(leaf)))
    if bad:
      raise ValueError(
          f"params{jax.tree_util.keystr(path)} has {bad} non-finite values (NaN or Inf); "
          "initialize the model with finite values (e.g. module.init(key, x))."
      )


def state_pieces(plan: core.RoundPlan, params, memory_budget: int) -> None:
  """The server optimizer fits the params; per-client state and stacked reducers fit memory."""
  algo = plan.algorithm
  train, _ = plan.views(params)
  try:
    jax.eval_shape(algo.server_optimizer.init, train)
  except Exception as e:  # noqa: BLE001
    raise ValueError(
        f"server_optimizer.init(params) failed: {e}. The server optimizer does not fit the "
        "params' structure (check masks / multi_transform labels)."
    ) from e
  n = plan.context.num_clients
  if algo.client_state_init is not None:
    _population_state_fits(jax.eval_shape(algo.client_state_init, train), n, algo.name)
  stage = algo.aggregator.per_client
  if stage.client_init is not None:
    _population_state_fits(jax.eval_shape(stage.client_init, train), n,
                           "the aggregator's per-client stage")
  reduce = algo.aggregator.reduce
  num_params = param_count(train)
  if reduce.check is not None:
    reduce.check(plan.context, num_params)
  if reduce.needs_stack:
    need = plan.cohort_size * num_params * 4
    if need > memory_budget:
      raise ValueError(
          f"this aggregator needs every client's update at once (a [K, P] buffer: robust "
          f"rules and omniscient attacks are not sums, so they cannot stream across chunks or "
          f"devices); K={plan.cohort_size} x P={num_params} floats = "
          f"{need / 2**30:.2f} GiB exceeds memory_budget={memory_budget / 2**30:.2f} "
          "GiB. Use a smaller cohort, raise memory_budget, or a streaming defence "
          "(fs.aggregators.norm_bounded_mean, which is a sum of clipped updates)."
      )


def _population_state_fits(one_client_state, num_clients: int, name: str) -> None:
  """Refuses per-client state for the whole population that cannot fit in device memory."""
  per_client = sum(
      int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(one_client_state)
  )
  needed = per_client * num_clients
  dev = jax.devices()[0]
  try:
    available = int(dev.memory_stats()["bytes_limit"])
  except Exception:  # noqa: BLE001 - CPU: the host's physical memory
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if needed > 0.8 * available:
    raise ValueError(
        f"{name} keeps {per_client / 2**20:.2f} MiB of state per client; for {num_clients} "
        f"clients that is {needed / 2**30:.2f} GiB, more than 80% of the "
        f"{available / 2**30:.1f} GiB of {dev.platform} memory. Use fewer clients, a smaller "
        "model, or a stateless algorithm."
    )


def batch_spec(algorithm: Algorithm, population: Population):
  """``(batch_size, spec)``: the shapes of one batch the loss sees (mask included)."""
  loss_batch = algorithm.batch_size_hint
  bsz = population.max_examples if loss_batch is None else loss_batch
  spec = {
      k: jax.ShapeDtypeStruct((bsz, *v.shape), v.dtype)
      for k, v in population.example_spec().items()
  }
  spec[MASK_KEY] = jax.ShapeDtypeStruct((bsz,), jnp.float32)
  return bsz, spec


def round_traces(plan: core.RoundPlan, state: Any, population: Population) -> None:
  """Abstract-evaluates the loss and the optimizers to turn shape errors into clear messages."""
  algo = plan.algorithm
  _, spec = batch_spec(algo, population)
  check = getattr(algo.loss_fn, "check_population", None)
  if check is not None:  # the library's own checks name the feature: before the loss trace
    check(state.params, population)
  if algo.loss_fn is not None:
    try:
      out = jax.eval_shape(algo.loss_fn, state.params, spec, jax.random.key(0))
    except Exception as e:  # noqa: BLE001
      raise ValueError(
          f"loss_fn(params, batch, key) failed on a batch of this population (features "
          f"{ {k: v.shape for k, v in spec.items()} }) with these params: {e}"
      ) from e
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError("loss_fn must return a pair (loss, aux); return (loss, {}) for no aux.")
    loss, _ = out
    if getattr(loss, "shape", None) != ():
      raise ValueError(
          f"loss_fn must return a scalar loss (the mean over the real examples of the batch); "
          f"it returned shape {getattr(loss, 'shape', type(loss))}. Reduce it with "
          "fs.models.masked_mean(per_example_loss, batch[fs.MASK_KEY])."
      )
  train_params, _ = plan.views(state.params)
  if algo.client_optimizer is not None:
    try:
      opt_state = jax.eval_shape(algo.client_optimizer.init, train_params)
      jax.eval_shape(algo.client_optimizer.update, train_params, opt_state, train_params)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"client_optimizer does not fit the params' structure: {e}") from e
  try:
    jax.eval_shape(algo.server_optimizer.update, train_params, state.opt_state, train_params)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"server_optimizer does not fit the params' structure: {e}") from e


def same_layout(expected: Any, state: Any) -> None:
  """Refuses a state whose structure or leaf shapes differ from ``expected`` (keys aside)."""
  def layout(t):
    t = dataclasses.replace(t, key=None)
    return jax.tree.structure(t), [(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(t)]

  if layout(expected) != layout(state):
    raise ValueError(
        "state does not match this Simulation (its optimizer, aggregator or client state has "
        "another structure or shape); build it with this sim.init(params, key) or "
        "sim.restore(...)."
    )


def run_args(num_rounds, *, block_size, eval_every, eval_fn, checkpoint_dir, checkpoint_every,
             log_dir, tensorboard, accountant, on_nonfinite) -> tuple[int, int, int | None,
                                                                      int | None, str]:
  """Checks :meth:`~fedjax_sim.Simulation.run`'s schedule arguments.

  Returns:
    ``(num_rounds, block_size, eval_every, checkpoint_every, on_nonfinite)``, the block size
    defaulted to ``eval_every`` or ``min(num_rounds, 100)``.
  """
  from fedjax_sim import _validation as _v
  from fedjax_sim import nonfinite as _nf

  policy = _nf.check_policy(on_nonfinite)
  # One integer rule (fs._validation.positive_int): Python or NumPy ints >= 1, never bools.
  num_rounds = _v.positive_int("num_rounds", num_rounds)
  eval_every = _v.positive_int("eval_every", eval_every, allow_none=True)
  block_size = _v.positive_int("block_size", block_size, allow_none=True)
  checkpoint_every = _v.positive_int("checkpoint_every", checkpoint_every, allow_none=True)
  if eval_every is not None and eval_fn is None:
    raise ValueError("eval_every is set but eval_fn is None; pass eval_fn(params) -> dict.")
  if block_size is None:
    block_size = eval_every if eval_every is not None else min(int(num_rounds), 100)
  if eval_every is not None and eval_every % block_size and block_size % eval_every:
    raise ValueError(
        f"eval_every={eval_every} and block_size={block_size}: one must divide the other so "
        "evaluations fall between blocks."
    )
  if checkpoint_every is not None and checkpoint_dir is None:
    raise ValueError("checkpoint_every is set but checkpoint_dir is None.")
  if accountant not in ("rdp", "pld"):
    raise ValueError(f"accountant must be 'rdp' or 'pld'; got {accountant!r}.")
  if tensorboard and not log_dir:
    raise ValueError("tensorboard=True needs log_dir (where the event files go).")
  return num_rounds, block_size, eval_every, checkpoint_every, policy
