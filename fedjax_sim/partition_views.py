"""Trainable / frozen views of the parameters (federated fine-tuning): an engine module.

An algorithm built with ``trainable=`` trains, sends, protects and stores only part of the
model. The engine splits the global parameters once per round into

* the **trainable view**: the params pytree with every frozen leaf replaced by ``None`` (an
  empty subtree, so ``jax.tree.map``, optax, the aggregators and ``global_norm`` simply skip it),
* the **frozen view**: the same tree with every trainable leaf replaced by ``None``.

The delta, the aggregator (clip norm, noise, compression, secure aggregation), the server
optimizer, per-client state (SCAFFOLD control variates, Ditto personal models) and the bits a
client uploads all live on the trainable view. The frozen view reaches the vmapped client
function ONCE (``in_axes=None``): every client of a chunk reads the same device buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_sim.types import Params

#: What ``trainable=`` accepts: a pytree of bools with the params' structure, a predicate on the
#: parameter path (a tuple of str keys, e.g. ``("params", "Dense_0", "kernel")``), or an
#: optax-style label function ``params -> pytree of labels`` (``"trainable"`` / ``"frozen"``
#: strings or bools).
TrainableSpec = Any

TRAINABLE = "trainable"
FROZEN = "frozen"


class FinetuneBroadcast(NamedTuple):
  """What a client of a partitioned algorithm receives: the algorithm's own broadcast (built on
  the trainable view) and the frozen view, shared by every client of the chunk."""

  broadcast: Any
  frozen: Params


def path_names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _as_bool(value, where: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str) and value in (TRAINABLE, FROZEN):
    return value == TRAINABLE
  raise ValueError(
      f"trainable: the entry for params{where} is {value!r}; each entry must be a bool or the "
      f"label {TRAINABLE!r} / {FROZEN!r}."
  )


def resolve(spec: TrainableSpec, params: Params) -> tuple[bool, ...]:
  """Resolves a ``trainable=`` spec against ``params``: one bool per leaf (flatten order).

  Raises:
    ValueError: the spec does not match the params' structure, has non-bool entries, or
      selects no leaf at all.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [p for p, _ in with_path]
  where = [jax.tree_util.keystr(p) for p in paths]
  if callable(spec) and not isinstance(spec, (bool, np.bool_)):
    mask = _resolve_callable(spec, params, paths, where, treedef)
  else:
    try:
      leaves = treedef.flatten_up_to(spec)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "trainable: a pytree of bools must have exactly the params' structure (one bool per "
          f"parameter array); it does not: {e}. Params structure: {treedef}."
      ) from e
    mask = tuple(_as_bool(v, w) for v, w in zip(leaves, where, strict=True))
  if not any(mask):
    raise ValueError(
        "trainable selects no parameter: every leaf would be frozen and nothing would be "
        f"trained. Params leaves: {where[:8]}{' ...' if len(where) > 8 else ''}. Select at "
        "least one (e.g. trainable=lambda path: 'head' in path)."
    )
  return mask


def _resolve_callable(fn, params, paths, where, treedef) -> tuple[bool, ...]:
  # A label function params -> pytree is tried first (optax.multi_transform style); a one-arg
  # predicate on a path tuple otherwise.
  try:
    labels, as_labels = fn(params), None
  except Exception as e:  # noqa: BLE001 - not a label function: a path predicate
    labels, as_labels = None, e
  if labels is not None and not isinstance(labels, (bool, np.bool_, str)):
    try:
      leaves = treedef.flatten_up_to(labels)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "trainable: the label function's output does not match the params' structure (it "
          f"must return one label per parameter array, like optax.multi_transform): {e}."
      ) from e
    return tuple(_as_bool(v, w) for v, w in zip(leaves, where, strict=True))
  out = []
  for p, w in zip(paths, where, strict=True):
    try:
      value = fn(path_names(p))
    except Exception as e:  # noqa: BLE001 - neither form works: say what each raised
      raise ValueError(
          f"trainable: the function fails both ways it can be called. As a label function "
          f"fn(params) it raised {type(as_labels).__name__}: {as_labels}; as a path predicate "
          f"fn(path) on params{w} it raised {type(e).__name__}: {e}."
      ) from e
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(
          f"trainable: the predicate returned {value!r} for params{w}; a path predicate must "
          "return a bool (it receives the path as a tuple of str keys)."
      )
    out.append(bool(value))
  return tuple(out)


def split(params: Params, mask: tuple[bool, ...]) -> tuple[Params, Params]:
  """``(trainable_view, frozen_view)``: ``params`` with the frozen / the trainable leaves set to
  None."""
  leaves, treedef = jax.tree.flatten(params)
  if len(leaves) != len(mask):
    raise ValueError(
        f"params have {len(leaves)} leaves but the trainable mask has {len(mask)}; the params "
        "do not have the structure the Simulation was initialised with."
    )
  trainable = treedef.unflatten([x if m else None for x, m in zip(leaves, mask, strict=True)])
  frozen = treedef.unflatten([None if m else x for x, m in zip(leaves, mask, strict=True)])
  return trainable, frozen


def merge(trainable: Params, frozen: Params) -> Params:
  """Inverse of :func:`split`: at each position the leaf that is not None."""
  return jax.tree.map(
      lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
  )


def upload_bits(trainable_view: Params) -> int:
  """Bits one client uploads for a full-precision delta of ``trainable_view`` (its dtypes)."""
  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize * 8
                 for x in jax.tree.leaves(trainable_view)))


def partitioned(
    build: Callable[[Callable], Any], loss_fn: Callable, trainable: TrainableSpec
) -> Any:
  """Wraps ``build(loss_fn) -> Algorithm`` so that it trains only the trainable view.

  The returned algorithm's ``client_update`` receives a :class:`FinetuneBroadcast`; it rebuilds
  the inner client update (pure Python, at trace time) around the loss
  ``loss_fn(merge(trainable_params, frozen), batch, key)``, so gradients, optimizer state,
  regularisers, control variates and the delta exist for the trainable leaves only.
  """
  if trainable is None:
    return build(loss_fn)
  if isinstance(trainable, (bool, np.bool_)):
    raise ValueError(
        "trainable must be a pytree of bools, a path predicate or a label function; a single "
        f"bool ({trainable!r}) is ambiguous. Pass None to train every parameter."
    )
  outer = build(loss_fn)

  def client_update(broadcast, data, client_state, key):
    if not isinstance(broadcast, FinetuneBroadcast):
      raise TypeError(
          "a trainable= algorithm's client update expects a FinetuneBroadcast (the Simulation "
          "builds it); call it through fs.Simulation."
      )
    frozen = broadcast.frozen

    def bound_loss(params, batch, step_key):
      return loss_fn(merge(params, frozen), batch, step_key)

    inner = build(bound_loss)
    return inner.client_update(broadcast.broadcast, data, client_state, key)

  return outer._replace(client_update=client_update, trainable=trainable)


def refuse(name: str, trainable: TrainableSpec) -> None:
  """Raises for algorithms whose extra client values are not defined on a partial model."""
  if trainable is not None:
    raise ValueError(
        f"{name} does not support trainable= (federated fine-tuning of part of the model): its "
        "per-client corrections/normalisations are defined for the whole model. Use "
        "fs.algorithms.fedavg / fedprox / fedsgd (any server optimizer), scaffold or ditto."
    )
