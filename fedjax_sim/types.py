"""Core types and contracts shared by every part of fedjax_sim.

The sign convention of a client's update is written here, once:

    ``delta = server_params - client_params``   (a *pseudo-gradient*)

so any optax optimizer used as the server optimizer applies it like a gradient:
``optax.sgd(1.0)`` on the mean ``delta`` moves the server exactly to the mean client model.

The key derivations are written here too. A run has one key; round ``r`` uses
``round_key = fold_in(run_key, r)``, split three ways into the cohort, client and aggregator
keys (the aggregator key split again into per-client, post and finalize keys); client ``i``
trains with ``fold_in(client_key, i)``. Everything else is ``fold_in(parent, SALT)`` with one of
the named salts below, so a draw never depends on cohort order, chunk size or device count.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

Params = Any
PyTree = Any
PRNGKey = jax.Array
Batch = dict[str, jax.Array]

#: Key of the per-example mask in every batch handed to a ``loss_fn``: float32 ``[B]``, 1.0 for
#: a real example and 0.0 for padding. A ``loss_fn`` must give padded examples exactly zero weight
#: (the helpers in :mod:`fedjax_sim.models` do). Feature names may not use this key.
MASK_KEY = "__mask__"


#: ``fold_in(round_key, SHARED_SALT)``: public randomness shared by every client and the server in
#: a round (rotations, secure-aggregation pairwise seeds).
SHARED_SALT = 0x5EED
#: ``fold_in(round_key, SYSTEM_SALT)``: the system model's draws (availability, dropout, ...).
SYSTEM_SALT = 0x5157E
#: ``fold_in(run_key, PARTITION_SALT)``: the cyclic / balls-in-bins sampler's fixed assignment of
#: clients to bins (drawn once per run, the same every round).
PARTITION_SALT = 0xB1175
#: ``fold_in(partition_key, WINDOW_SALT)``: a participation-capped schedule's fixed window of
#: cycles per client (``cyclic_poisson(..., max_participations=k)``), drawn once per run.
WINDOW_SALT = 0x3A9
#: ``fold_in(aggregator_key, MF_NOISE_SALT)``: the i.i.d. Gaussian draw that a correlated-noise
#: mechanism (BandMF) turns into this round's noise. Only used when the strategy has > 1 band (the
#: identity strategy draws from the aggregator key itself, exactly as ``gaussian_noise``).
MF_NOISE_SALT = 0xBA4D
#: ``fold_in(system_key, AVAILABILITY_SALT)``: who is available this round.
AVAILABILITY_SALT = 0
#: ``fold_in(system_key, OUTCOME_SALT)``: each selected client's dropout / straggler outcome.
OUTCOME_SALT = 1
#: ``fold_in(post_key, STACK_SALT)``: the stacked reduce (robust rules, omniscient attacks), which
#: folds in ``ATTACK_SALT`` for the attack and ``ROBUST_SALT`` for the rule.
STACK_SALT = 0x57AC
ATTACK_SALT = 0
ROBUST_SALT = 1
#: Asynchronous runs (:mod:`fedjax_sim.asynchronous`): the host seeds the duration jitter of the
#: clients that start on model version ``v`` from ``(run key data, DURATION_SALT, v)``.
DURATION_SALT = 0xD0A7
#: ``fold_in(client_key, LOSS_EVAL_SALT)``: q-FFL's evaluation of the client's loss.
LOSS_EVAL_SALT = 0x51FF1
#: ``fold_in(client_key, PERSONAL_SALT)``: Ditto's personal model training.
PERSONAL_SALT = 0xD1770


class LossFn(Protocol):
  """``loss_fn(params, batch, key) -> (loss, aux)``.

  ``batch`` is a dict of features with leading dimension ``B`` plus ``batch[MASK_KEY]``; ``loss``
  is a scalar: the mean loss over the *real* examples of the batch. ``aux`` is a (possibly empty)
  dict of scalar metrics, also means over real examples.
  """

  def __call__(self, params: Params, batch: Batch, key: PRNGKey) -> tuple[jax.Array, PyTree]: ...


class ClientOutput(NamedTuple):
  """What one client sends back after local training.

  Attributes:
    delta: pseudo-gradient ``server_params - client_params`` (same tree as the params).
    weight: float32 scalar; the number of real examples the client holds (0 for a padded client
      or a client with no data). Aggregators decide whether to use it.
    metrics: dict of float32 scalars, example-weighted means over the client's local steps
      (e.g. ``{"loss": ...}``).
    client_state: the client's new persistent state (an empty tuple for stateless algorithms).
    extra: optional pytree the round SUMS over the cohort's real clients and hands to the
      algorithm's ``server_update`` (e.g. SCAFFOLD's control-variate deltas); ``()`` if unused.
      It bypasses the aggregator, so algorithms that use it are not combined with DP.
  """

  delta: Params
  weight: jax.Array
  metrics: dict[str, jax.Array]
  client_state: PyTree
  extra: PyTree = ()


class WeightedUpdate(NamedTuple):
  """The part of a :class:`ClientOutput` that flows through an aggregator.

  Per-client stages see one client's ``(delta, weight)``; after the reduce, ``delta`` holds the
  sum over the cohort and ``weight`` the summed weight (or the number of clients, for an
  unweighted reduce).

  ``client_state`` is the client's own persistent state of the per-client stages that keep one
  (e.g. top-k error feedback), stored for the whole population by the engine; ``()`` otherwise.
  """

  delta: Params
  weight: jax.Array
  client_state: PyTree = ()


class RoundContext(NamedTuple):
  """Facts about the round, handed to every aggregator stage.

  Attributes:
    expected_cohort_size: ``K`` for fixed-size sampling, ``q * N`` for Poisson sampling. The fixed
      denominator of DP estimators.
    num_clients: ``N``, the population size.
    client_sizes: host-side NumPy array of every client's number of examples (public
      metadata used by estimators with capped example weights), or None.
    per_client_state: inside ``post`` stages, the state of the ``per_client`` slot (e.g. the
      current adaptive clip), read-only; None elsewhere.
    params_template: the model's parameter shapes (a pytree of ``jax.ShapeDtypeStruct``), for
      stages that flatten the update and must restore it (rotations).
    shared_key: a key shared by every client and the server in this round (public randomness:
      a rotation, secure-aggregation pairwise seeds); None outside a round.
    client_id: inside ``per_client`` stages, the client's global id (traced int32).
    cohort_ids, cohort_mask: the round's cohort slots (global ids, padded) and which slots hold
      a real selected client.
    cohort_kept: in ``post`` stages, which slots' updates reached the reduce (selected, not
      dropped, finite).
    max_cohort_size: the static cohort capacity K of the sampler.
  """

  expected_cohort_size: float
  num_clients: int
  client_sizes: Any = None
  per_client_state: Any = None
  params_template: Any = None
  shared_key: Any = None
  client_id: Any = None
  cohort_ids: Any = None
  cohort_mask: Any = None
  cohort_kept: Any = None
  max_cohort_size: int | None = None


class EmptyState(NamedTuple):
  """State of a stateless stage."""
