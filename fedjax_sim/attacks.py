"""Malicious clients: model-poisoning and data-poisoning attacks, inside the compiled round.

A fixed set of malicious clients (a boolean mask over the population, e.g. from
:func:`choose`) attacks whenever it is sampled:

* per-client attacks rewrite the attacker's own update inside the vmapped chunk
  (:func:`sign_flip`, :func:`scaling`, :func:`gaussian`);
* omniscient attacks see the honest updates of the same round (:func:`alie`, :func:`ipm`): the
  engine stacks the cohort's updates (a ``[K, P]`` buffer, as robust rules do) and overwrites
  the attackers' rows before the reduce;
* :func:`flip_labels` poisons the attackers' data once, on the host.

:func:`apply` puts attacks into an aggregation :class:`~fedjax_sim.aggregators.Process`: the
per-client attacks run first in the per-client slot (before the server's clipping or
compression stages), the omniscient ones just before the reduce. Metrics: ``malicious`` is the
fraction of the cohort's real clients that attacked.

Examples:
  >>> import numpy as np, fedjax_sim as fs
  >>> bad = fs.attacks.choose(100, fraction=0.2, seed=0)
  >>> int(bad.sum())
  20
  >>> agg = fs.attacks.apply(fs.aggregators.median(), fs.attacks.sign_flip(bad))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators import Aggregator, Process, add_gaussian, chain
from fedjax_sim.data.population import Population


def choose(
    num_clients: int, fraction: float | None = None, *, ids: Any = None, seed: int = 0
) -> np.ndarray:
  """The malicious clients as a boolean mask ``[num_clients]``.

  Args:
    num_clients: the population size N.
    fraction: pick ``round(fraction * N)`` clients uniformly at random (seeded).
    ids: or name the malicious client ids explicitly.
    seed: the NumPy seed for ``fraction``.
  """
  n = _v.positive_int("num_clients", num_clients)
  if (fraction is None) == (ids is None):
    raise ValueError("pass exactly one of fraction= or ids= to choose the malicious clients.")
  mask = np.zeros(n, bool)
  if fraction is not None:
    frac = _v.probability("fraction", fraction)
    count = int(round(frac * n))
    mask[np.random.default_rng(seed).choice(n, count, replace=False)] = True
    return mask
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be a 1-D integer array of client ids; got {ids!r}.")
  if ids.size and (ids.min() < 0 or ids.max() >= n):
    raise ValueError(f"ids must lie in [0, {n}); got min {ids.min()}, max {ids.max()}.")
  mask[ids] = True
  return mask


def _mask(malicious) -> np.ndarray:
  m = np.asarray(malicious)
  if m.ndim != 1 or m.dtype != bool:
    raise TypeError(
        "malicious must be a boolean mask over the population ([num_clients]); build one with "
        f"fs.attacks.choose(num_clients, fraction=... or ids=...). Got {m.dtype} {m.shape}."
    )
  return m


class _PerClient(NamedTuple):
  malicious: np.ndarray
  rewrite: Any  # (delta, key) -> delta
  name: str


class _Omniscient(NamedTuple):
  malicious: np.ndarray
  craft: Any  # (benign_mean, benign_std, n, f) -> malicious row [P]
  name: str


def sign_flip(malicious, scale: float = 1.0) -> _PerClient:
  """Attackers send ``-scale * delta`` (their honest update, negated and scaled).

  Returns:
    a per-client attack for :func:`apply`.
  """
  s = _v.positive("scale", scale)
  return _PerClient(_mask(malicious), lambda d, key: jax.tree.map(lambda x: -s * x, d),
                    "sign_flip")


def scaling(malicious, factor: float) -> _PerClient:
  """Attackers send ``factor * delta``: model replacement boosts by ``factor ~ n / server_lr``
  (Bagdasaryan et al., AISTATS 2020); combine with :func:`flip_labels` for a targeted attack.

  Returns:
    a per-client attack for :func:`apply`.
  """
  s = _v.positive("factor", factor)
  return _PerClient(_mask(malicious), lambda d, key: jax.tree.map(lambda x: s * x, d),
                    "scaling")


def gaussian(malicious, stddev: float) -> _PerClient:
  """Attackers send pure noise ``N(0, stddev^2 I)`` instead of their update.

  Returns:
    a per-client attack for :func:`apply`.
  """
  sd = _v.positive("stddev", stddev)

  def rewrite(delta, key):
    return add_gaussian(jax.tree.map(jnp.zeros_like, delta), sd, key)

  return _PerClient(_mask(malicious), rewrite, "gaussian")


def alie(malicious, z: float | None = None) -> _Omniscient:
  """"A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019).

  Every attacker sends ``mu - z * sigma``, the coordinate-wise mean and standard deviation of the
  round's honest updates. By default ``z`` is the paper's ``z_max = Phi^-1((n - s) / n)`` with
  ``s = floor(n / 2 + 1) - f`` (n real clients of the round, f of them malicious); the variant of
  Karimireddy et al. (``(n - f - s) / (n - f)``) is not used.

  Returns:
    an omniscient attack on the stacked updates, for :func:`apply`.
  """
  fixed = None if z is None else _v.non_negative("z", z)

  def craft(mu, sigma, n, f):
    if fixed is None:
      s = jnp.floor(n / 2 + 1) - f
      zz = ndtri(jnp.clip((n - s) / jnp.maximum(n, 1.0), 1e-6, 1 - 1e-6))
    else:
      zz = fixed
    return mu - zz * sigma

  return _Omniscient(_mask(malicious), craft, "alie")


def ipm(malicious, epsilon: float = 0.1) -> _Omniscient:
  """Inner-product manipulation (Xie, Koyejo, Gupta, UAI 2019): every attacker sends
  ``-epsilon * mean(honest updates)``. ``epsilon = 0.1`` targets median/Krum-type rules; a large
  one (e.g. 100) targets the mean.

  Returns:
    an omniscient attack on the stacked updates, for :func:`apply`.
  """
  eps = _v.positive("epsilon", epsilon)
  return _Omniscient(_mask(malicious), lambda mu, sigma, n, f: -eps * mu, "ipm")


def apply(aggregator: Process, *attacks) -> Process:
  """Returns ``aggregator`` with the attacks inserted (module docstring).

  Returns:
    a new :class:`~fedjax_sim.aggregators.Process`: per-client attacks first in its
      ``per_client`` slot, omniscient ones on the stacked updates before its reducer.

  Raises:
    ValueError: when a malicious mask does not match the population (checked by
      ``Simulation`` before compiling), or with no attack.
  """
  if not isinstance(aggregator, Process):
    raise TypeError(f"aggregator must be a Process; got {type(aggregator).__name__}.")
  if not attacks:
    raise ValueError("apply() needs at least one attack (sign_flip, scaling, gaussian, alie, ipm).")
  per_client, omniscient = [], []
  for a in attacks:
    if isinstance(a, _PerClient):
      per_client.append(a)
    elif isinstance(a, _Omniscient):
      omniscient.append(a)
    else:
      raise TypeError(
          f"{a!r} is not an attack; use fs.attacks.sign_flip/scaling/gaussian/alie/ipm (label "
          "flipping poisons the data instead: fs.attacks.flip_labels(population, ...))."
      )
  masks = [a.malicious for a in attacks]

  def check(context):
    for m in masks:
      if m.shape[0] != context.num_clients:
        raise ValueError(
            f"the malicious mask has {m.shape[0]} entries but the population has "
            f"{context.num_clients} clients; build it with fs.attacks.choose(num_clients, ...)."
        )
    if aggregator.check is not None:
      aggregator.check(context)

  stages = [_per_client_stage(a) for a in per_client]
  new_per_client = chain(*stages, aggregator.per_client) if stages else aggregator.per_client
  reduce = aggregator.reduce
  if omniscient:
    if reduce.attack is not None:
      omniscient = [reduce.attack, *omniscient]
    reduce = reduce._replace(attack=_stack_attack(omniscient))
  return aggregator._replace(per_client=new_per_client, reduce=reduce, check=check)


def _per_client_stage(attack: _PerClient) -> Aggregator:
  def init(params):
    del params
    return jnp.asarray(attack.malicious)

  def aggregate(update, state, key, context):
    bad = state[context.client_id]
    attacked = attack.rewrite(update.delta, key)
    delta = jax.tree.map(lambda a, h: jnp.where(bad, a, h), attacked, update.delta)
    return update._replace(delta=delta), state, {"malicious": bad.astype(jnp.float32)}

  return Aggregator(init, aggregate)


def _stack_attack(attacks):
  """Omniscient attacks on the stacked ``[K, ...]`` updates (applied in order)."""

  def attack_fn(updates, mask, ids, key, context):
    del key, context
    delta = updates.delta
    metrics = {}
    for a in attacks:
      if not isinstance(a, _Omniscient):  # an attack composed earlier
        updates, m = a(updates._replace(delta=delta), mask, ids, None, None)
        delta = updates.delta
        metrics.update(m)
        continue
      bad = jnp.asarray(a.malicious)[ids] & mask
      honest = mask & ~bad
      n = jnp.sum(mask).astype(jnp.float32)
      f = jnp.sum(bad).astype(jnp.float32)
      h = jnp.maximum(jnp.sum(honest), 1).astype(jnp.float32)

      def rewrite(x, bad=bad, honest=honest, n=n, f=f, h=h, a=a):
        shape = (-1,) + (1,) * (x.ndim - 1)
        hm = honest.reshape(shape)
        mu = jnp.sum(jnp.where(hm, x, 0.0), axis=0) / h
        var = jnp.sum(jnp.where(hm, jnp.square(x - mu), 0.0), axis=0) / h
        row = a.craft(mu, jnp.sqrt(var), n, f).astype(x.dtype)
        return jnp.where(bad.reshape(shape), row[None], x)

      delta = jax.tree.map(rewrite, delta)
      metrics[f"{a.name}_attackers"] = f
    return updates._replace(delta=delta), metrics

  return attack_fn


def flip_labels(
    population: Population, malicious, num_classes: int, *, label: str = "y",
    mapping: Any = None,
) -> Population:
  """Data poisoning: the malicious clients' labels ``y -> num_classes - 1 - y`` (or
  ``mapping[y]``), e.g. ``9 - y`` on MNIST (Tolpegin et al. 2020). Returns a new population;
  the honest clients' data is unchanged.
  """
  if not isinstance(population, Population):
    raise TypeError(f"population must be an fs.Population; got {type(population).__name__}.")
  bad = _mask(malicious)
  if bad.shape[0] != population.num_clients:
    raise ValueError(
        f"the malicious mask has {bad.shape[0]} entries; the population has "
        f"{population.num_clients} clients."
    )
  c = _v.positive_int("num_classes", num_classes)
  if label not in population.features:
    raise KeyError(f"label={label!r} is not a feature; features: {sorted(population.features)}.")
  y = np.asarray(population.features[label])
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"features[{label!r}] must hold integer class labels; got {y.dtype}.")
  table = np.arange(c)[::-1] if mapping is None else np.asarray(mapping)
  if table.shape != (c,):
    raise ValueError(f"mapping must have num_classes={c} entries; got shape {table.shape}.")
  per_example = np.repeat(bad, np.asarray(population.num_examples))
  order = np.repeat(np.asarray(population.offsets), np.asarray(population.num_examples)) + (
      np.arange(per_example.size) - np.repeat(
          np.cumsum(np.asarray(population.num_examples)) - np.asarray(population.num_examples),
          np.asarray(population.num_examples))
  )
  poisoned = y.copy()
  rows = order[per_example]
  poisoned[rows] = table[y[rows]]
  features = dict(population.features)
  features[label] = jnp.asarray(poisoned.astype(y.dtype))
  return Population(features, population.offsets, population.num_examples,
                    population.max_examples, population.labels)


__all__ = [
    "alie", "apply", "choose", "flip_labels", "gaussian", "ipm", "scaling", "sign_flip",
]
