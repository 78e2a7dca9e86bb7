"""A run's identity, from values: digests, the fingerprint, the run id and ONE :func:`compare`.

A run is identified by its configuration fingerprint (algorithm, hyper-parameters, population
contents, sampler, model shapes) together with its run key: two runs with the same identity
compute the same rounds bit for bit, so they may share a directory; any other run may not.
Everything here takes the :class:`~fedjax_sim.core.RoundPlan`, the population and the state,
never the :class:`~fedjax_sim.Simulation`.

The round's computation is hashed from the plan with the default
:class:`~fedjax_sim.core.Performance` (one chunk of the whole cohort, no mesh, the default
ordering): speed-only settings never change a run's identity.

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_sim as fs
  >>> from fedjax_sim.runs import identity
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(60, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
  >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 6, 60))
  >>> algo = fs.algorithms.fedavg(fs.models.classifier_loss(lambda p, x: x @ p),
  ...                             client_optimizer=optax.sgd(0.1), batch_size=4, local_steps=1)
  >>> plan = fs.core.plan_for(algo, fs.sampling.uniform(3), pop, jnp.zeros((3, 2)))
  >>> state = fs.core.initial_state(plan, jnp.zeros((3, 2)), jax.random.key(0))
  >>> fp = identity.fingerprint(plan, pop, state)
  >>> identity.compare(fp, fp).owner, identity.compare(fp, fp).diffs
  ('same', [])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import weakref
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_sim import core
from fedjax_sim.plan import Performance, RoundPlan
from fedjax_sim.runs import store

__all__ = ["ENGINE_DIGEST", "JAX_SETTINGS", "NEW_FIELDS", "NOT_COMPARED", "PRNG_DEFAULTS",
           "Comparison", "algorithm_digest", "compare", "config_hash", "fingerprint",
           "jax_settings", "population_digest", "prng_settings", "run_id", "settings_hint",
           "traced_library_versions"]

# Fingerprint fields added after the first release: a checkpoint without them still restores
# (with a warning), since it cannot be checked against them.
NEW_FIELDS = ("run_id", "algorithm_digest", "population_digest", "prng", "x64")
# Not compared on restore: the restored run adopts the checkpoint's identity, and the digest's
# jax version only tells whether the algorithm digests are comparable.
NOT_COMPARED = ("run_id", "digest_jax", "digest_engine", "digest_libs")
#: The ``prng`` field every run had before the field existed (JAX's defaults since jax 0.5).
PRNG_DEFAULTS = {"impl": "threefry2x32", "threefry_partitionable": True}
#: The fingerprint fields of JAX's global settings (:func:`jax_settings`), at the values every run
#: had before they existed (JAX's defaults): at these values they stay out of :func:`run_id`, so
#: the ids of those runs, and the checkpoint and log directories they own, are unchanged; any
#: other value enters the id.
JAX_SETTINGS = {"prng": PRNG_DEFAULTS, "x64": False}
# The jax.config option behind each (field, key) of JAX_SETTINGS.
_OPTIONS = {("prng", "threefry_partitionable"): "jax_threefry_partitionable",
            ("prng", "impl"): "jax_default_prng_impl", ("x64", None): "jax_enable_x64"}
#: The version of the traced round behind ``algorithm_digest``: raised whenever a change to the
#: engine's code (not to what it computes) changes the traced program, so that checkpoints of
#: older engines are recognised as such instead of as another configuration.
ENGINE_DIGEST = "8"  # 3: fs.zoo CPU conv with a custom_vmap rule (issue 22); 4: chunk pass split
#                      into scan_chunks / per_device_pass (shard_map over host devices); 5: with a
#                      system model the cohort is sorted by the steps clients run (issue 22; the
#                      rounds without a system trace as before); 6: client_steps (and so
#                      step_slots) counts the steps of clients dropped at the deadline
#                      (deadline_policy="drop"; other rounds trace as before); 7: the zoo's
#                      models drop out with fs.zoo.Dropout (8/16-bit masks: other draws);
#                      8: a client running alone trains its partial last batch trimmed
#                      (Performance.trim_last_batch)


# -- digests ---------------------------------------------------------------------------------


def _uint32_words(x):
  """The array's bits as uint32 words (NumPy stays on the host, JAX arrays on device)."""
  xp = np if isinstance(x, np.ndarray) else jax.numpy
  x = xp.asarray(x)
  if x.dtype == bool:
    return x.astype(xp.uint32).reshape(-1)
  size = np.dtype(x.dtype).itemsize
  if size == 8:  # host-only (JAX runs without x64): fold the halves
    return x.reshape(-1).view(np.uint32)
  unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[size]
  if xp is np:
    return x.reshape(-1).view(unsigned).astype(np.uint32)
  return jax.lax.bitcast_convert_type(x.reshape(-1), unsigned).astype(xp.uint32)


def _checksum(x) -> list[int]:
  """Two position-weighted sums of the array's bits, mod 2**32 (order-independent integer
  sums, so the same on every device and chunking; cheap: one pass over the data)."""
  w = _uint32_words(x)
  xp = np if isinstance(w, np.ndarray) else jax.numpy
  i = xp.arange(w.shape[0], dtype=xp.uint32)
  a = xp.sum(w * (i * xp.uint32(2654435761) + xp.uint32(1)), dtype=xp.uint32)
  b = xp.sum((w ^ (w >> 13)) * (i + xp.uint32(0x9E3779B9)), dtype=xp.uint32)
  return [int(a), int(b)]


def population_digest(population) -> str:
  """A hash of the population's contents (every feature value, the client sizes and offsets).

  Returns:
    16 hex digits; equal for equal data however the population is placed.
  """
  try:
    h = hashlib.sha256()
    for name in sorted(population.features):
      x = population.features[name]
      h.update(f"{name}:{tuple(np.shape(x))}:{np.dtype(x.dtype).name}".encode())
      h.update(json.dumps(_checksum(x)).encode())
    h.update(np.asarray(population.num_examples).astype(np.int64).tobytes())
    h.update(np.asarray(population.offsets).astype(np.int64).tobytes())
    return h.hexdigest()[:16]
  except Exception:  # noqa: BLE001 - e.g. arrays spanning processes: a digest never stops a run
    return "unavailable"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spec(t):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)


def algorithm_digest(plan: RoundPlan, population, state) -> str:
  """A hash of the round's computation: the traced program of one round (every literal:
  learning rates, clip norms, batch sizes, local steps, server optimizer) and its constants.

  The round is traced from ``plan`` with the default :class:`~fedjax_sim.core.Performance`, so
  the digest does not depend on the speed-only settings (chunk size, device count,
  ``sort_by_size``, ``unbatched_single_client``), which do not change results.

  Args:
    plan: the run's plan.
    population: the clients' data (its shapes).
    state: the state (its shapes).

  Returns:
    16 hex digits, or ``"unavailable"`` if the round cannot be traced abstractly.
  """
  cache = _DIGESTS.setdefault(plan, {})
  key = (str(jax.tree.structure(state)), str(jax.tree.leaves(_spec(state))),
         str(jax.tree.leaves(_spec(population))))
  if key not in cache:  # one trace per plan and state layout (~0.5 s on a CPU)
    identity_plan = dataclasses.replace(plan, performance=Performance())
    try:
      closed = jax.make_jaxpr(lambda s, p: core.round_step(identity_plan, s, p))(
          _spec(state), _spec(population))
    except Exception:  # noqa: BLE001 - a digest must never stop a run
      return "unavailable"
    h = hashlib.sha256(_ADDRESS.sub("", str(closed.jaxpr)).encode())
    for c in closed.consts:
      c = np.asarray(c) if not jax.dtypes.issubdtype(getattr(c, "dtype", None),
                                                     jax.dtypes.prng_key) else np.asarray(
          jax.random.key_data(c))
      h.update(f"{c.shape}:{c.dtype}".encode())
      h.update(np.ascontiguousarray(c).tobytes())
    cache[key] = h.hexdigest()[:16]
  return cache[key]


def traced_library_versions() -> str:
  """Versions of the libraries whose code is traced into the round besides jax (the optimizers
  and, for flax models, the layers): a digest traced under other versions cannot be compared.

  Returns:
    e.g. ``"optax 0.2.8, flax 0.12.0"``.
  """
  import flax
  import optax

  return f"optax {optax.__version__}, flax {flax.__version__}"


def prng_settings(key=None) -> dict[str, Any]:
  """JAX's global random-number settings that change a run's draws but not its traced round.

  ``jax_threefry_partitionable`` changes the bits every threefry key draws (cohorts, dropout,
  shuffles, DP noise) while the jaxpr stays the same, so :func:`algorithm_digest` cannot see
  it. The implementation (``jax_default_prng_impl``, or ``key``'s own) is recorded beside it:
  ``rbg`` and ``unsafe_rbg`` keys have the same data shape, and a digest traced under another
  jax version is not compared.

  Args:
    key: the run key, whose implementation is recorded; default: the default implementation.

  Returns:
    ``{"impl": name, "threefry_partitionable": bool}``.
  """
  impl = jax.config.jax_default_prng_impl if key is None else jax.random.key_impl(key)
  return {"impl": str(impl), "threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}


def jax_settings(key=None) -> dict[str, Any]:
  """The fingerprint fields of JAX's global settings that change a run's results where its
  shapes, and across jax versions its digests, cannot show it: ``prng``
  (:func:`prng_settings`) and ``x64`` (``jax_enable_x64``: with float32 params the state's
  shapes and dtypes are the same, but intermediates, and so the results, are not).

  Args:
    key: the run key (:func:`prng_settings`).

  Returns:
    ``{"prng": {...}, "x64": bool}``.
  """
  return {"prng": prng_settings(key), "x64": bool(jax.config.jax_enable_x64)}


def _setting(fp: dict[str, Any], field: str, sub: str | None):
  v = fp.get(field)
  return v if sub is None else (v.get(sub) if isinstance(v, dict) else None)


def settings_hint(saved: dict[str, Any], fp: dict[str, Any]) -> str:
  """What to do when ``saved`` was written under other :func:`jax_settings` than ``fp``.

  Args:
    saved: a saved fingerprint (a checkpoint's, a claim's or a log's).
    fp: this run's fingerprint.

  Returns:
    A sentence naming the settings and the fix (with a leading space), or ``""`` when both
    record the same settings or ``saved`` predates the fields.
  """
  changed = [(opt, _setting(saved, f, k), _setting(fp, f, k)) for (f, k), opt in _OPTIONS.items()
             if f in saved and f in fp and _setting(saved, f, k) != _setting(fp, f, k)]
  if not changed:
    return ""
  detail = ", ".join(f"{opt}={old!r} (now {new!r})" for opt, old, new in changed)
  fix = " and ".join(f"jax.config.update({opt!r}, {old!r})" for opt, old, _ in changed)
  return (f" It was written under other JAX settings ({detail}), which change every random "
          "draw (cohorts, dropout, shuffles, DP noise) or the precision of the round without "
          "changing its shapes, so it is another run. To resume it, call "
          f"{fix} at the start of the program (before any simulation is built or compiled); "
          "or use another directory.")


# -- the fingerprint and the run id -------------------------------------------------------------


def tree_spec(tree) -> dict[str, str]:
  """``{path: "shape:dtype"}`` of a pytree's leaves.

  Returns:
    The dict.
  """
  return {jax.tree_util.keystr(path): f"{tuple(np.shape(x))}:{np.dtype(x.dtype).name}"
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def fingerprint(plan: RoundPlan, population, state) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed: names, shapes, settings, a digest of the
  round's computation (hyper-parameters), a digest of the population's contents, JAX's
  global settings that change results (:func:`jax_settings`), and the run's identity
  (``run_id``: all of these and the run key).

  Args:
    plan: the run's plan.
    population: the clients' data.
    state: the run's state (its shapes and run key).

  Returns:
    A JSON-able dict.
  """
  sampler = repr(plan.sampler)
  fp = {
      "algorithm": plan.algorithm.name,
      "num_clients": population.num_clients,
      "total_examples": population.total_examples,
      "features": {k: f"{tuple(v.shape[1:])}:{np.dtype(v.dtype).name}"
                   for k, v in population.features.items()},
      "sampler": sampler if len(sampler) < 500 else hashlib.sha256(sampler.encode()).hexdigest(),
      "aggregator_tags": sorted(plan.algorithm.aggregator.tags),
      "noise_multiplier": plan.algorithm.aggregator.noise_multiplier,
      "params": tree_spec(state.params),
      "state": tree_spec(store.to_savable(state)),
      "algorithm_digest": algorithm_digest(plan, population, state),
      "population_digest": population_digest(population),
      "digest_jax": jax.__version__,
      "digest_engine": ENGINE_DIGEST,
      "digest_libs": traced_library_versions(),
      **jax_settings(state.key),
  }
  fp["run_id"] = run_id(fp, state.key)
  return fp


def run_id(fp: dict[str, Any], key) -> str:
  """The run's identity: its fingerprint (without the fields of :data:`NOT_COMPARED`, and
  without the :data:`JAX_SETTINGS` fields at their defaults) and its run key.

  Returns:
    16 hex digits.
  """
  body = {k: v for k, v in fp.items() if k not in NOT_COMPARED
          and not (k in JAX_SETTINGS and _json(v) == _json(JAX_SETTINGS[k]))}
  data = np.asarray(jax.random.key_data(key)).tolist()
  blob = json.dumps([body, data], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash(fp: dict[str, Any]) -> str:
  """A short hash of a whole fingerprint (each log row carries it).

  Returns:
    16 hex digits.
  """
  return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the one comparison -------------------------------------------------------------------------


class Comparison(NamedTuple):
  """How a saved fingerprint relates to this run's (:func:`compare`).

  Attributes:
    owner: ``"same"`` (this run), ``"legacy"`` (saved before run ids: taken to be this run's),
      ``"older"`` (another jax / engine / library version traced its digest and nothing else
      differs: taken to be this run's) or ``"other"`` (another run).
    diffs: the compared fields that differ (all but :data:`NOT_COMPARED`).
    missing: the :data:`NEW_FIELDS` of ``fp`` that the saved fingerprint predates.
    incomparable: the saved algorithm digest was traced by another jax, engine or library
      version, so it cannot be compared.
  """

  owner: str
  diffs: list[str]
  missing: list[str]
  incomparable: bool

  @property
  def config_diffs(self) -> list[str]:
    """The differences that make it another configuration (a field the saved fingerprint
    predates, and an incomparable algorithm digest, are not evidence)."""
    skip = set(self.missing) | ({"algorithm_digest"} if self.incomparable else set())
    return [k for k in self.diffs if k not in skip]


def _json(x) -> str:
  return json.dumps(x, sort_keys=True, default=str)


def compare(saved: dict[str, Any], fp: dict[str, Any], *,
            saved_run_id: Any = dataclasses.MISSING) -> Comparison:
  """Compares a saved fingerprint with this run's ``fp`` (the only such comparison).

  Args:
    saved: the fingerprint saved with a checkpoint step or in a log's ``config.json``.
    fp: this run's :func:`fingerprint`.
    saved_run_id: the saved run id when it is kept apart from ``saved`` (a log's
      ``config.json``); default ``saved["run_id"]``.

  Returns:
    A :class:`Comparison`.
  """
  owner_id = saved.get("run_id") if saved_run_id is dataclasses.MISSING else saved_run_id
  diffs = [k for k in sorted(set(fp) | set(saved))
           if k not in NOT_COMPARED and _json(fp.get(k)) != _json(saved.get(k))]
  missing = [k for k in NEW_FIELDS if k not in saved and k in fp and k not in NOT_COMPARED]
  incomparable = (saved.get("digest_jax") != fp.get("digest_jax")
                  or saved.get("digest_engine", "1") != fp.get("digest_engine", "1")
                  or ("digest_libs" in saved and saved["digest_libs"] != fp.get("digest_libs")))
  if owner_id is None:
    owner = "legacy"
  elif owner_id == fp.get("run_id"):
    owner = "same"
  elif incomparable and not [k for k in diffs if k != "algorithm_digest" and k not in missing]:
    owner = "older"
  else:
    owner = "other"
  return Comparison(owner, diffs, missing, incomparable)
