"""A slow, obviously-correct reference: a Python loop over clients with the engine's key scheme.

Key derivation (the contract in DESIGN.md):
  round_key = fold_in(run_key, round); cohort, client, agg = split(round_key, 3)
  per_client_agg, post, finalize = split(agg, 3); client key = fold_in(client, id)
  shuffle, step = split(client key); epoch e order = epoch_permutation(fold_in(shuffle, e), ...)
  step s key = fold_in(step, s); chained post stage i key = fold_in(post, i)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.client import epoch_permutation


def round_keys(run_key, r):
  round_key = jax.random.fold_in(run_key, r)
  cohort_key, client_key, agg_key = jax.random.split(round_key, 3)
  per_client_key, post_key, _ = jax.random.split(agg_key, 3)
  return cohort_key, client_key, per_client_key, post_key


_GRADS = {}


def _grad_fn(loss_fn, mu):
  """``grad(p, anchor, batch, key)`` of the loss plus FedProx's ``mu/2 |p - anchor|^2``, jitted
  once per (loss, mu) for the whole test session: the eager grad cost ~0.1 s a step."""
  if (loss_fn, mu) not in _GRADS:

    def objective(p, anchor, batch, k):
      loss, _ = loss_fn(p, batch, k)
      prox = 0.5 * mu * sum(jnp.sum((a - b) ** 2) for a, b in zip(
          jax.tree.leaves(p), jax.tree.leaves(anchor)))
      return loss + prox

    _GRADS[(loss_fn, mu)] = jax.jit(jax.grad(objective))
  return _GRADS[(loss_fn, mu)]


def train_client(loss_fn, opt, params, data, n, max_examples, key, *, batch_size, epochs=None,
                 steps=None, mu=0.0, shift=None, return_steps=False):
  """Local training for one client as a plain Python loop over its minibatches."""
  shuffle_key, step_key = jax.random.split(key)
  spe = -(-n // batch_size)
  total = epochs * spe if epochs is not None else (steps if n > 0 else 0)
  w = params
  opt_state = opt.init(w)
  grad = _grad_fn(loss_fn, float(mu))

  perms = {}  # epoch -> its order (drawn once per epoch, as the engine does)
  for s in range(total):
    e, pos = divmod(s, spe)
    if e not in perms:
      perms[e] = np.asarray(epoch_permutation(jax.random.fold_in(shuffle_key, e), n,
                                              max_examples))[:n]
    perm = perms[e]
    idx = perm[pos * batch_size:(pos + 1) * batch_size]
    batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
    batch[fs.MASK_KEY] = jnp.ones(len(idx), jnp.float32)
    g = grad(w, params, batch, jax.random.fold_in(step_key, s))
    if shift is not None:
      g = jax.tree.map(lambda a, b: a + b, g, shift)
    upd, opt_state = opt.update(g, opt_state, w)
    w = optax.apply_updates(w, upd)
  return (w, total) if return_steps else w


def clip(delta, c):
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(delta)))
  f = min(1.0, c / norm) if norm > 0 else 1.0
  return jax.tree.map(lambda x: np.asarray(x) * f, delta)


def oracle_round(pop, params, opt_state, server_opt, run_key, r, cohort_ids, *, loss_fn,
                 client_opt, batch_size, epochs=None, steps=None, mu=0.0, dp=None):
  """One round: each cohort client trained in a loop, then mean / DP-mean, then server step.

  dp: None for the example-weighted mean, or (clip, noise_multiplier) for DP-FedAvg with the
  fixed denominator len(cohort_ids).
  """
  _, client_key, _, post_key = round_keys(run_key, r)
  deltas, weights = [], []
  for cid in cohort_ids:
    data = pop.client(int(cid))
    n = int(pop.num_examples[cid])
    key = jax.random.fold_in(client_key, int(cid))
    w = train_client(loss_fn, client_opt, params, data, n, pop.max_examples, key,
                     batch_size=batch_size, epochs=epochs, steps=steps, mu=mu)
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, w))
    weights.append(float(n))
  if dp is None:
    total = sum(weights)
    agg = jax.tree.map(lambda *ds: sum(wt * d for wt, d in zip(weights, ds)) / total, *deltas)
  else:
    c, z = dp
    clipped = [clip(d, c) for d in deltas]
    summed = jax.tree.map(lambda *ds: sum(ds), *clipped)
    leaves, treedef = jax.tree.flatten(summed)
    keys = jax.random.split(jax.random.fold_in(post_key, 0), len(leaves))
    noised = [x + z * c * np.asarray(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    agg = jax.tree.map(lambda x: x / len(cohort_ids), jax.tree.unflatten(treedef, noised))
  agg = jax.tree.map(jnp.asarray, agg)
  upd, opt_state = server_opt.update(agg, opt_state, params)
  return optax.apply_updates(params, upd), opt_state
