"""All clients' examples on device, in a CSR layout with no storage padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.types import MASK_KEY

_INT32 = np.iinfo(np.int32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _to_device_dtype(name: str, a: np.ndarray, what: str = "features") -> np.ndarray:
  """float64 -> float32 and 64-bit ints -> int32, refusing values that would not survive."""
  if a.dtype == np.float64:
    finite = a[np.isfinite(a)]
    if finite.size and float(np.max(np.abs(finite))) > _FLOAT32_MAX:
      raise ValueError(
          f"{what}[{name!r}] has float64 values up to {float(np.max(np.abs(finite))):.3g}, "
          f"beyond float32's largest ({_FLOAT32_MAX:.3g}); features are stored as float32, so "
          "rescale them (e.g. standardize or take a log) first."
      )
    return a.astype(np.float32)
  if a.dtype in (np.int64, np.uint64):
    if a.size and (int(a.min()) < _INT32.min or int(a.max()) > _INT32.max):
      raise ValueError(
          f"{what}[{name!r}] ({a.dtype}) has values in [{int(a.min())}, {int(a.max())}], "
          f"outside int32 [{_INT32.min}, {_INT32.max}]; features are stored as int32 and would "
          "wrap. Remap them (e.g. labels with np.unique(y, return_inverse=True)[1])."
      )
    return a.astype(np.int32)
  if a.dtype == object:
    raise TypeError(f"{what}[{name!r}] has dtype object; pass a numeric NumPy array.")
  return a


def check_features(features: Mapping[str, Any], what: str = "features") -> dict[str, np.ndarray]:
  """The Population's feature checks; ``what`` names the argument in the messages."""
  if not isinstance(features, Mapping) or not features:
    raise ValueError(
        f"{what} must be a non-empty dict mapping feature names to arrays, e.g. "
        "{'x': x, 'y': y}."
    )
  out = {}
  length = None
  for name, value in features.items():
    if not isinstance(name, str):
      raise TypeError(f"{what}: feature names must be strings; got {name!r}.")
    if name == MASK_KEY:
      raise ValueError(
          f"{what}: feature name {MASK_KEY!r} is reserved for the example mask; rename it.")
    a = np.asarray(value)
    if a.ndim == 0:
      raise ValueError(f"{what}[{name!r}] is a scalar; it needs a leading examples dimension.")
    a = _to_device_dtype(name, a, what)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
      raise ValueError(
          f"{what}[{name!r}] has {bad} non-finite values (NaN or Inf); clean or impute them "
          "first."
      )
    if length is None:
      length = a.shape[0]
    elif a.shape[0] != length:
      lengths = {k: np.shape(v)[0] for k, v in features.items()}
      raise ValueError(
          f"{what}: all features must have the same number of examples (leading dimension); "
          f"got {lengths}."
      )
    out[name] = a
  return out


@jax.tree_util.register_pytree_with_keys_class
class Population:
  """Every client's examples, stored once on device in a CSR (compressed sparse row) layout.

  One flat array per feature holds all examples ``[total_examples, ...]``, sorted by client;
  client ``i`` owns rows ``offsets[i] : offsets[i] + num_examples[i]``. Nothing is padded in
  storage: a client's minibatch is a gather ``x[offsets[i] + idx]`` with a mask for the tail, so
  heavy-tailed client sizes cost memory proportional to the real data.

  Clients are numbered ``0 .. num_clients - 1``; ``labels`` (host-side only) maps that index back
  to the ids you passed. A client may hold zero examples: it is allowed, and when sampled it
  does not participate: it trains nothing, is not counted in the round's ``clients``, sends no
  update to any reducer (mean, median, trimmed mean, Krum, ...) and has no client state
  written. Central DP's fixed denominator (the expected cohort size) still counts it, as it
  must not depend on the data.

  Attributes:
    features: dict of device arrays ``[total_examples, ...]``.
    offsets: int32 ``[num_clients]``, first row of each client.
    num_examples: int32 ``[num_clients]``, examples per client.
    max_examples: Python int, the largest client (static; sets shuffle buffer sizes).
    labels: NumPy array of the original client ids (host-side; dropped inside ``jit``).

  Examples:
    >>> import numpy as np, fedjax_sim as fs
    >>> x = np.arange(10, dtype=np.float32).reshape(5, 2)
    >>> pop = fs.Population.from_arrays({"x": x}, client_ids=np.array([7, 3, 7, 3, 3]))
    >>> pop.num_clients, pop.num_examples.tolist(), pop.labels.tolist()
    (2, [3, 2], [3, 7])
  """

  def __init__(self, features, offsets, num_examples, max_examples: int, labels=None):
    self.features = features
    self.offsets = offsets
    self.num_examples = num_examples
    self.max_examples = int(max_examples)
    self.labels = labels

  # -- pytree protocol: arrays are children; max_examples is static; labels stay on the host.
  def tree_flatten_with_keys(self):
    children = (
        (jax.tree_util.GetAttrKey("features"), self.features),
        (jax.tree_util.GetAttrKey("offsets"), self.offsets),
        (jax.tree_util.GetAttrKey("num_examples"), self.num_examples),
    )
    return children, self.max_examples

  @classmethod
  def tree_unflatten(cls, max_examples, children):
    return cls(*children, max_examples=max_examples)

  # -- constructors ---------------------------------------------------------------------------
  @classmethod
  def from_arrays(
      cls,
      features: Mapping[str, Any],
      client_ids: Any,
      *,
      num_clients: int | None = None,
  ) -> Population:
    """Builds a population from flat example arrays and one client id per example.

    Args:
      features: dict of arrays with the same leading (examples) dimension, e.g. ``{"x", "y"}``.
        float64 is stored as float32 and int64 / uint64 as int32; values that would
        not survive the cast (beyond float32's range, outside int32) are refused, naming the
        feature.
      client_ids: integer array ``[num_examples_total]``: which client owns each example.
      num_clients: if given, ids must lie in ``[0, num_clients)`` and clients without examples
        are kept (with zero examples). If None, the distinct ids become clients ``0..N-1`` in
        sorted order, and ``labels`` records the original ids.

    Returns:
      A :class:`Population` on the default device.

    Raises:
      ValueError / TypeError: on empty or mismatched features, non-finite values, or client ids
        of the wrong length, dtype or range.
    """
    feats = check_features(features)
    length = next(iter(feats.values())).shape[0]
    if length == 0:
      raise ValueError("the population is empty: features have 0 examples; pass at least one.")
    ids = np.asarray(client_ids)
    if ids.ndim != 1:
      raise ValueError(f"client_ids must be 1-D (one id per example); got shape {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(
          f"client_ids must be an integer array; got dtype {ids.dtype}. Map your ids to ints, "
          "e.g. with np.unique(ids, return_inverse=True)[1]."
      )
    if ids.shape[0] != length:
      raise ValueError(
          f"client_ids has length {ids.shape[0]} but features have {length} examples; "
          "pass exactly one client id per example."
      )
    if num_clients is None:
      labels, dense = np.unique(ids, return_inverse=True)
      n = labels.shape[0]
    else:
      n = int(num_clients)
      if n < 1:
        raise ValueError(f"num_clients must be >= 1; got {num_clients}.")
      if ids.min() < 0 or ids.max() >= n:
        raise ValueError(
            f"client_ids must lie in [0, num_clients={n}); got range [{ids.min()}, {ids.max()}]."
        )
      labels, dense = np.arange(n), ids.astype(np.int64)
    order = np.argsort(dense, kind="stable")
    counts = np.bincount(dense, minlength=n).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if counts.sum() >= 2**31:
      raise ValueError("more than 2**31 examples do not fit int32 offsets; split the population.")
    return cls(
        features={k: jnp.asarray(v[order]) for k, v in feats.items()},
        offsets=jnp.asarray(offsets, dtype=jnp.int32),
        num_examples=jnp.asarray(counts, dtype=jnp.int32),
        max_examples=int(counts.max()),
        labels=labels,
    )

  @classmethod
  def from_clients(cls, clients: Sequence[Mapping[str, Any]]) -> Population:
    """Builds a population from a list of per-client dicts of arrays.

    Args:
      clients: one dict per client with the same keys, trailing shapes and dtypes; each array's
        leading dimension is that client's number of examples (0 is allowed).

    Returns:
      A :class:`Population` whose client ``i`` is ``clients[i]``.
    """
    if isinstance(clients, Mapping) or not isinstance(clients, Sequence) or not clients:
      raise ValueError(
          "clients must be a non-empty list of per-client dicts, e.g. [{'x': x0, 'y': y0}, ...]."
      )
    keys = None
    for i, c in enumerate(clients):
      if not isinstance(c, Mapping):
        raise TypeError(f"clients[{i}] must be a dict of arrays; got {type(c).__name__}.")
      if keys is None:
        keys = set(c)
      elif set(c) != keys:
        raise ValueError(
            f"clients[{i}] has features {sorted(c)} but clients[0] has {sorted(keys)}; every "
            "client needs the same feature names."
        )
    sizes = []
    for i, c in enumerate(clients):
      lens = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in c.items()}
      if len(set(lens.values())) != 1 or None in lens.values():
        raise ValueError(f"clients[{i}] features must share one leading length; got {lens}.")
      sizes.append(next(iter(lens.values())))
    try:
      feats = {k: np.concatenate([np.asarray(c[k]) for c in clients]) for k in sorted(keys)}
    except ValueError as e:
      raise ValueError(
          f"clients' features have inconsistent trailing shapes; each feature must have the "
          f"same shape after the examples dimension ({e})."
      ) from None
    ids = np.repeat(np.arange(len(clients)), sizes)
    return cls.from_arrays(feats, ids, num_clients=len(clients))

  # -- host-side helpers ----------------------------------------------------------------------
  @property
  def num_clients(self) -> int:
    return int(self.offsets.shape[0])

  @property
  def total_examples(self) -> int:
    return int(next(iter(self.features.values())).shape[0])

  def client(self, i: int) -> dict[str, np.ndarray]:
    """Client ``i``'s examples as NumPy arrays (host-side; for tests and inspection)."""
    start = int(self.offsets[i])
    n = int(self.num_examples[i])
    return {k: np.asarray(v[start : start + n]) for k, v in self.features.items()}

  def example_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of one example of each feature."""
    return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in self.features.items()}

  def __repr__(self) -> str:
    spec = {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in self.features.items()}
    return (
        f"Population(num_clients={self.num_clients}, total_examples={self.total_examples}, "
        f"max_examples={self.max_examples}, features={spec})"
    )
