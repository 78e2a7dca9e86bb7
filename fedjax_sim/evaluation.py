"""Evaluation: centralized in batches, and per client (vmapped over the population).

Per-client evaluation gives the fairness view (the spread of accuracy across devices), and with
``personalize`` the accuracy after local fine-tuning (personalised FL).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation as _v
from fedjax_sim.client import ClientData, ClientUpdateFn
from fedjax_sim.data.population import Population
from fedjax_sim.types import MASK_KEY, LossFn, Params


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  pad = rows - a.shape[0]
  return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a


def evaluate(
    loss_fn: LossFn, params: Params, data: dict[str, Any], *, batch_size: int = 256,
    key: jax.Array | None = None,
) -> dict[str, float]:
  """Example-weighted mean loss and aux metrics of ``params`` on centralized ``data``.

  The data are padded to whole batches (padding masked out) and evaluated with ``lax.map`` in
  one compiled call.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> x = np.eye(3, dtype=np.float32); y = np.array([0, 1, 0])
    >>> m = fs.evaluation.evaluate(loss_fn, jnp.eye(3), {"x": x, "y": y}, batch_size=2)
    >>> round(m["accuracy"], 4)
    0.6667
  """
  arrays = {k: np.asarray(v) for k, v in data.items()}
  if not arrays:
    raise ValueError("data is empty; pass a dict of arrays like {'x': ..., 'y': ...}.")
  n = _v.same_length("evaluate(data=...)", arrays)
  if n == 0:
    raise ValueError("data has 0 examples.")
  _v.positive_int("batch_size", batch_size)
  bsz = min(batch_size, n)
  num_batches = math.ceil(n / bsz)
  padded = {k: _pad_rows(v, num_batches * bsz).reshape(num_batches, bsz, *v.shape[1:])
            for k, v in arrays.items()}
  mask = (np.arange(num_batches * bsz) < n).astype(np.float32).reshape(num_batches, bsz)
  key = jax.random.key(0) if key is None else key
  sums = _evaluate_batches(loss_fn, params, padded, jnp.asarray(mask), key)
  total = float(mask.sum())
  return {k: float(v) / total for k, v in jax.device_get(sums).items()}


@functools.partial(jax.jit, static_argnums=0)
def _evaluate_batches(loss_fn, params, batches, mask, key):
  def one(args):
    batch, m = args
    batch = dict(batch)
    batch[MASK_KEY] = m
    loss, aux = loss_fn(params, batch, key)
    count = m.sum()
    return {"loss": loss * count, **{k: v * count for k, v in aux.items()}}

  per_batch = jax.lax.map(one, (batches, mask))
  return jax.tree.map(lambda x: x.sum(0), per_batch)


@dataclasses.dataclass(frozen=True)
class ClientEvaluation:
  """Per-client metrics: ``metrics[name]`` is a NumPy array ``[num_clients]``.

  ``num_examples`` weights them; clients with no examples hold NaN.
  """

  metrics: dict[str, np.ndarray]
  num_examples: np.ndarray

  def summary(self, percentiles=(10, 50, 90)) -> dict[str, float]:
    """Example-weighted and unweighted means and percentiles over clients, per metric."""
    has = self.num_examples > 0
    w = self.num_examples[has].astype(np.float64)
    out = {}
    for name, values in self.metrics.items():
      v = values[has]
      out[f"{name}_weighted_mean"] = float(np.sum(w * v) / np.sum(w))
      out[f"{name}_mean"] = float(np.mean(v))
      for p in percentiles:
        out[f"{name}_p{p}"] = float(np.percentile(v, p))
    return out


def evaluate_clients(
    loss_fn: LossFn,
    params: Params,
    population: Population,
    *,
    batch_size: int = 64,
    chunk_size: int = 16,
    personalize: ClientUpdateFn | None = None,
    personalize_population: Population | None = None,
    client_params: Params | None = None,
    key: jax.Array | None = None,
) -> ClientEvaluation:
  """Evaluates ``params`` on every client's own data, vmapped over clients in chunks.

  Args:
    loss_fn: the model's loss.
    params: the global model.
    population: the clients' evaluation data.
    batch_size: examples per evaluation step of one client.
    chunk_size: clients evaluated together (memory/speed only, not results).
    personalize: optional client update (e.g. ``fs.make_client_update(loss_fn, optax.sgd(0.1),
      batch_size=10, local_steps=5)``): each client first fine-tunes the global model with it
      on ``personalize_population`` (its training data; default ``population``), and is then
      evaluated with its fine-tuned model.
    personalize_population: the data to fine-tune on (same client numbering).
    client_params: optional per-client models (leading dimension ``num_clients``, e.g. Ditto's
      ``state.client_states``): client i is evaluated with its own model instead of ``params``.
    key: base key of the fine-tuning (client i uses ``fold_in(key, i)``).

  Returns:
    A :class:`ClientEvaluation`.
  """
  _v.positive_int("batch_size", batch_size)
  _v.positive_int("chunk_size", chunk_size)
  if personalize_population is not None and personalize is None:
    raise ValueError("personalize_population is given but personalize is None.")
  tune = population if personalize_population is None else personalize_population
  if tune.num_clients != population.num_clients:
    raise ValueError(
        f"personalize_population has {tune.num_clients} clients but population has "
        f"{population.num_clients}; they must be the same clients."
    )
  key = jax.random.key(0) if key is None else key
  n = population.num_clients
  chunk = max(1, min(chunk_size, n))
  num_chunks = math.ceil(n / chunk)
  ids = np.arange(num_chunks * chunk)
  real = ids < n
  ids = np.where(real, ids, 0).reshape(num_chunks, chunk)
  real = real.reshape(num_chunks, chunk)
  if client_params is not None:
    lead = {np.shape(x)[0] for x in jax.tree.leaves(client_params)}
    if lead != {n}:
      raise ValueError(
          f"client_params must have leading dimension num_clients={n}; got {sorted(lead)}."
      )
  sums, counts = _client_sums(loss_fn, personalize, batch_size, params, client_params,
                              population, tune, jnp.asarray(ids, jnp.int32), jnp.asarray(real),
                              key)
  sums, counts = jax.device_get((sums, counts))
  counts = np.asarray(counts).reshape(-1)[:n]
  with np.errstate(invalid="ignore", divide="ignore"):
    metrics = {k: np.where(counts > 0, np.asarray(v).reshape(-1)[:n] / counts, np.nan)
               for k, v in sums.items()}
  return ClientEvaluation(metrics, counts.astype(np.int64))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _client_sums(loss_fn, personalize, batch_size, params, client_params, population, tune, ids,
                 real, key):
  def one_client(cid, is_real):
    n = jnp.where(is_real, population.num_examples[cid], 0)
    data = ClientData(population.features, population.offsets[cid], n, population.max_examples)
    if client_params is not None:
      params_i = jax.tree.map(lambda p: p[cid], client_params)
    else:
      params_i = params
    local = params_i
    if personalize is not None:
      train = ClientData(tune.features, tune.offsets[cid],
                         jnp.where(is_real, tune.num_examples[cid], 0), tune.max_examples)
      out = personalize(params_i, train, (), jax.random.fold_in(key, cid))
      local = jax.tree.map(lambda p, d: p - d, params_i, out.delta)
    order = jnp.arange(population.max_examples, dtype=jnp.int32)
    steps = (n + batch_size - 1) // batch_size

    def body(carry):
      step, sums = carry
      batch = data.batch(order, step, batch_size)
      loss, aux = loss_fn(local, batch, key)
      count = batch[MASK_KEY].sum()
      new = {"loss": loss, **aux}
      return step + 1, jax.tree.map(lambda s, v: s + count * v, sums, new)

    template = jax.eval_shape(lambda: loss_fn(local, data.batch(order, 0, batch_size), key))
    sums0 = {"loss": jnp.zeros(()), **jax.tree.map(lambda s: jnp.zeros(s.shape), template[1])}
    _, sums = jax.lax.while_loop(lambda c: c[0] < steps, body, (0, sums0))
    return sums, n.astype(jnp.float32)

  return jax.lax.map(lambda xs: jax.vmap(one_client)(*xs), (ids, real))


def make_eval_fn(loss_fn: LossFn, data: dict[str, Any], *, batch_size: int = 256
                 ) -> Callable[[Params], dict[str, float]]:
  """An ``eval_fn(params)`` for :meth:`Simulation.run` on centralized test data.

  Returns:
    ``eval_fn(params) -> dict of floats`` (the loss and its aux metrics).
  """
  return lambda params: evaluate(loss_fn, params, data, batch_size=batch_size)
