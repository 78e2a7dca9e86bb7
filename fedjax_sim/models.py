"""Adapters from models to the pure ``loss_fn(params, batch, key) -> (loss, aux)`` contract.

Every batch carries ``batch[MASK_KEY]`` (1.0 real, 0.0 padding); the losses built here are means
over the real examples only, so padded examples contribute exactly zero to the loss and to its
gradient. Write your own ``loss_fn`` the same way (see :func:`masked_mean`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.types import MASK_KEY, Batch, LossFn, Params

ApplyFn = Callable[..., jax.Array]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of per-example ``values [B]`` over real examples; 0.0 if there are none.

  Padded entries are selected away (not multiplied), so even a non-finite value in a padded slot
  contributes exactly zero.
  """
  mask = mask.astype(bool)
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def _takes_key(apply_fn: ApplyFn) -> bool:
  try:
    params = inspect.signature(apply_fn).parameters.values()
  except (TypeError, ValueError):
    return False
  positional = [
      p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
  ]
  return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def _caller(apply_fn: ApplyFn) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable as apply_fn(params, x[, key]); got {apply_fn!r}.")
  if _takes_key(apply_fn):
    return apply_fn
  return lambda params, x, key: apply_fn(params, x)


def classifier_loss(
    apply_fn: ApplyFn, *, input_key: str = "x", label_key: str = "y"
) -> LossFn:
  """Softmax cross-entropy for ``apply_fn(params, x[, key]) -> logits`` and integer labels.

  Args:
    apply_fn: returns logits ``[B, num_classes]``. If it takes a third argument it receives the
      per-step PRNG key (for dropout).
    input_key: feature holding the inputs.
    label_key: feature holding integer labels.

  Returns:
    ``loss_fn(params, batch, key) -> (mean cross-entropy, {"accuracy": ...})`` over real examples.

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> batch = {"x": jnp.eye(2), "y": jnp.array([0, 1]), fs.MASK_KEY: jnp.array([1.0, 0.0])}
    >>> loss, aux = loss_fn(jnp.eye(2), batch, jax.random.key(0))
    >>> round(float(aux["accuracy"]), 3)
    1.0
  """
  call = _caller(apply_fn)

  def loss_fn(params: Params, batch: Batch, key: jax.Array):
    logits = call(params, batch[input_key], key)
    labels = batch[label_key]
    mask = batch[MASK_KEY]
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return masked_mean(per_example, mask), {"accuracy": masked_mean(correct, mask)}

  def check_population(params: Params, population: Any) -> None:
    """Raises if the population's labels fall outside the model's classes (before compiling)."""
    if label_key not in population.features or input_key not in population.features:
      raise ValueError(
          f"classifier_loss reads features {input_key!r} and {label_key!r}; the population has "
          f"{sorted(population.features)}. Pass input_key= / label_key=."
      )
    x = population.features[input_key]
    y = population.features[label_key]
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise TypeError(
          f"labels {label_key!r} have dtype {y.dtype}; classifier_loss needs integer class ids "
          "(e.g. y.astype(np.int32)); for real-valued targets use regression_loss."
      )
    try:
      logits = jax.eval_shape(call, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype),
                              jax.random.key(0))
    except Exception:  # noqa: BLE001 - the engine's loss check reports a model that fails
      return
    if tuple(y.shape[1:]) != tuple(logits.shape[1:-1]):
      raise ValueError(
          f"labels {label_key!r} have shape {tuple(y.shape)} but the model's logits "
          f"{(y.shape[0], *logits.shape[1:])} need labels of shape "
          f"{(y.shape[0], *logits.shape[1:-1])} (one class id per example; e.g. y.reshape(-1) "
          "for labels of shape (n, 1))."
      )
    num_classes = logits.shape[-1]
    lo, hi = int(jnp.min(y)), int(jnp.max(y))
    if lo < 0 or hi >= num_classes:
      raise ValueError(
          f"labels {label_key!r} span [{lo}, {hi}] but the model outputs {num_classes} classes; "
          f"labels must lie in [0, {num_classes - 1}] (size the output layer to the labels)."
      )

  loss_fn.check_population = check_population
  return loss_fn


def sequence_loss(
    apply_fn: ApplyFn, *, input_key: str = "x", label_key: str = "y", pad_id: int = 0
) -> LossFn:
  """Token-level cross-entropy for ``apply_fn(params, x[, key]) -> logits [B, T, V]``.

  The loss is the mean over real (non-pad) target tokens of real examples; ``accuracy`` is the
  next-token accuracy over the same tokens.

  Returns:
    ``loss_fn(params, batch, key) -> (loss, {"accuracy": ...})``, masked by
      ``batch[MASK_KEY]`` and the padding token.

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> loss_fn = fs.models.sequence_loss(lambda p, x: jax.nn.one_hot(x, 4) * p)
    >>> batch = {"x": jnp.array([[1, 2, 0]]), "y": jnp.array([[1, 2, 0]]),
    ...          fs.MASK_KEY: jnp.ones(1)}
    >>> float(loss_fn(10.0, batch, None)[1]["accuracy"])
    1.0
  """
  call = _caller(apply_fn)

  def loss_fn(params: Params, batch: Batch, key: jax.Array):
    logits = call(params, batch[input_key], key)
    labels = batch[label_key]
    tokens = (labels != pad_id) & (batch[MASK_KEY][:, None] > 0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    flat = tokens.reshape(-1)
    return (masked_mean(per_token.reshape(-1), flat),
            {"accuracy": masked_mean(correct.reshape(-1), flat)})

  return loss_fn


def multilabel_loss(
    apply_fn: ApplyFn, *, input_key: str = "x", label_key: str = "y"
) -> LossFn:
  """Sigmoid cross-entropy (summed over labels) for multi-hot targets, e.g. StackOverflow tags.

  ``aux["precision_at_1"]``: whether the top-scored label is one of the true labels.

  Returns:
    ``loss_fn(params, batch, key) -> (loss, aux)``, averaged over ``batch[MASK_KEY]``.
  """
  call = _caller(apply_fn)

  def loss_fn(params: Params, batch: Batch, key: jax.Array):
    logits = call(params, batch[input_key], key)
    targets = batch[label_key].astype(logits.dtype)
    per_example = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
    top = jnp.take_along_axis(targets, jnp.argmax(logits, -1)[:, None], axis=-1)[:, 0]
    mask = batch[MASK_KEY]
    return masked_mean(per_example, mask), {"precision_at_1": masked_mean(top, mask)}

  return loss_fn


def regression_loss(
    apply_fn: ApplyFn, *, input_key: str = "x", target_key: str = "y"
) -> LossFn:
  """Mean squared error for ``apply_fn(params, x[, key]) -> predictions``.

  The squared error is averaged over output dimensions, then over real examples.

  Returns:
    ``loss_fn(params, batch, key) -> (loss, {})``, averaged over ``batch[MASK_KEY]``.

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> loss_fn = fs.models.regression_loss(lambda w, x: x @ w)
    >>> batch = {"x": jnp.ones((2, 3)), "y": jnp.zeros(2), fs.MASK_KEY: jnp.ones(2)}
    >>> float(loss_fn(jnp.ones(3), batch, jax.random.key(0))[0])
    9.0
  """
  call = _caller(apply_fn)

  def loss_fn(params: Params, batch: Batch, key: jax.Array):
    pred = call(params, batch[input_key], key)
    target = batch[target_key].astype(pred.dtype)
    err = jnp.square(pred - target.reshape(pred.shape))
    per_example = err.reshape(err.shape[0], -1).mean(axis=1)
    return masked_mean(per_example, batch[MASK_KEY]), {}

  return loss_fn


def linen_apply(module: Any, *, rng_collection: str = "dropout", **apply_kwargs) -> ApplyFn:
  """``apply(params, x, key)`` for a flax linen module, with ``params = variables["params"]``.

  The key is passed as the ``rng_collection`` stream (dropout; ``key=None`` for evaluation);
  extra keyword arguments (e.g. ``train=True``) are forwarded to ``module.apply``. Modules
  with mutable collections (BatchNorm statistics) are not supported by this helper; use
  GroupNorm/LayerNorm, as is customary in federated learning.

  Returns:
    ``apply_fn(params, x, key) -> outputs``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, fedjax_sim as fs
    >>> module = nn.Dense(3)
    >>> params = module.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> fs.models.linen_apply(module)(params, jnp.ones((2, 4)), jax.random.key(1)).shape
    (2, 3)
  """

  def apply(params: Params, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    rngs = None if key is None else {rng_collection: key}
    return module.apply({"params": params}, x, rngs=rngs, **apply_kwargs)

  return apply


def nnx_apply(model: Any) -> tuple[ApplyFn, Params]:
  """Splits a flax nnx module into a pure ``apply(params, x)`` and its ``nnx.Param`` state.

  ``nnx.split`` runs once, here; ``nnx.merge`` runs inside the traced function, so the mutable
  module object never crosses a transformation boundary. Non-parameter state (e.g. RNG streams)
  is held fixed; use the model in deterministic mode.

  Returns:
    ``(apply_fn, params)``; ``params`` is the ``nnx.State`` of parameters (a pytree).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fedjax_sim as fs
    >>> apply_fn, params = fs.models.nnx_apply(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> apply_fn(params, jnp.ones((2, 4))).shape
    (2, 3)
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params: Params, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params, rest)(x)

  return apply, params
