"""Parameter-efficient fine-tuning: LoRA adapters for flax linen, trainable-part selectors and
loading pretrained weights.

:func:`lora` wraps ANY linen module: every ``nn.Dense`` (and single-input-axis
``nn.DenseGeneral``, e.g. the q/k/v projections of ``nn.MultiHeadDotProductAttention``) inside
it gains a low-rank adapter ``y = x W + b + (α / r) (x A) B`` with ``A [d_in, r]`` random and
``B [r, d_out]`` zero at init (so the adapted model starts equal to the base one). The base
``kernel``/``bias`` keep their names, so pretrained Dense params load directly
(:func:`load_pretrained`). Train only the adapters with
``fs.algorithms.fedavg(..., trainable=fs.peft.lora_trainable())``; FFA-LoRA (Sun et al. 2024)
freezes ``A`` too (``lora_trainable(freeze_a=True)``), which makes the update linear in the
trained part and suits DP. After training, :meth:`LoRA.merge` folds the adapters into the base
kernels (a plain model again).

flax nnx ships its own adapters (``nnx.LoRA``, ``nnx.LoRALinear``, params ``lora_a`` /
``lora_b``); :func:`lora_trainable` selects them in an ``nnx.State`` too (see
``fs.models.nnx_apply``). Convolutions are not adapted.

References:
  Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of Large
  Language Models", ICLR 2022 (arXiv 2021). Sun, Qin, Li, Ding, "Improving LoRA in
  Privacy-preserving Federated Learning" (FFA-LoRA), ICLR 2024.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import _validation
from fedjax_sim import partition_views as _views
from fedjax_sim.types import Params

LORA_A = "lora_a"
LORA_B = "lora_b"


def _adaptable(module) -> bool:
  if type(module) is nn.Dense:
    return True
  if type(module) is nn.DenseGeneral:
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return tuple(axis) == (-1,) and module.batch_dims == ()
  return False


@dataclasses.dataclass(frozen=True)
class LoRA:
  """A linen module whose Dense layers carry low-rank adapters (build with :func:`lora`).

  Attributes:
    module: the wrapped linen module (unchanged; adapters are added while it runs).
    rank: r, the adapters' rank.
    alpha: α; the adapter output is scaled by ``α / r``.
    only: optional predicate on a Dense layer's module path (tuple of names) choosing which
      layers are adapted; default all.
  """

  module: nn.Module
  rank: int
  alpha: float
  only: Callable[[tuple[str, ...]], bool] | None = None

  @property
  def scale(self) -> float:
    """``α / r``."""
    return self.alpha / self.rank

  def _interceptor(self, next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not _adaptable(mod):
      return next_fun(*args, **kwargs)
    if self.only is not None and not self.only(tuple(mod.scope.path)):
      return next_fun(*args, **kwargs)
    x = args[0]
    y = next_fun(*args, **kwargs)
    d_in = x.shape[-1]
    out_shape = tuple(np.atleast_1d(mod.features).tolist())
    d_out = int(np.prod(out_shape))
    if self.rank > min(d_in, d_out):
      raise ValueError(
          f"lora: rank={self.rank} exceeds the layer {'/'.join(mod.scope.path)} "
          f"({d_in} -> {d_out}); the rank must be at most min(d_in, d_out) = "
          f"{min(d_in, d_out)}. Lower rank, or restrict the adapted layers with only=."
      )
    # A: Kaiming-uniform (a = sqrt 5), as the reference implementation; B: zeros.
    a = mod.param(LORA_A, nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                  (d_in, self.rank), mod.param_dtype)
    b = mod.param(LORA_B, nn.initializers.zeros, (self.rank, *out_shape), mod.param_dtype)
    low = jnp.einsum("...i,ir->...r", x, a.astype(x.dtype))
    delta = jnp.tensordot(low, b.astype(x.dtype), axes=1)
    return y + (self.scale * delta).astype(y.dtype)

  def init(self, rngs, *args, **kwargs):
    """``module.init`` with the adapters created (A random, B zero)."""
    with nn.intercept_methods(self._interceptor):
      return self.module.init(rngs, *args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    """``module.apply`` with the adapters applied."""
    with nn.intercept_methods(self._interceptor):
      return self.module.apply(variables, *args, **kwargs)

  def merge(self, params: Params) -> Params:
    """Folds every adapter into its base kernel: ``W + (α / r) A B``; drops ``lora_a/lora_b``.

    Returns:
      Params of the plain ``module`` (``self.module.apply({"params": merged}, x)`` equals
      ``self.apply({"params": params}, x)`` up to float rounding).
    """
    return merge(params, self.scale)


def lora(module: nn.Module, rank: int, alpha: float | None = None, *,
         only: Callable[[tuple[str, ...]], bool] | None = None) -> LoRA:
  """Adds rank-``rank`` LoRA adapters to the Dense layers of a flax linen ``module``.

  Args:
    module: any linen module (e.g. ``fs.zoo.MLP(10)``).
    rank: r >= 1 (at most each adapted layer's ``min(d_in, d_out)``; checked at init).
    alpha: α (default r, i.e. scale 1).
    only: optional predicate on a Dense layer's path (e.g. ``lambda p: p[-1] != "Dense_2"``).

  Returns:
    A :class:`LoRA` with ``init``/``apply``/``merge``; use it wherever the module was used
    (``fs.models.linen_apply(lora(...))``).

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> model = fs.peft.lora(fs.zoo.MLP(3, (8,)), rank=2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> sorted(params["Dense_0"])
    ['bias', 'kernel', 'lora_a', 'lora_b']
    >>> merged = model.merge(params)
    >>> bool(jnp.allclose(model.apply({"params": params}, jnp.ones((2, 4))),
    ...                   model.module.apply({"params": merged}, jnp.ones((2, 4)))))
    True
  """
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"lora: rank must be a positive int; got {rank!r}.")
  if alpha is None:
    alpha = float(rank)
  alpha = _validation.positive("lora: alpha", alpha)  # finite: an inf scale makes NaN outputs
  if not isinstance(module, nn.Module):
    raise TypeError(f"lora: module must be a flax linen nn.Module; got {type(module).__name__}.")
  return LoRA(module, int(rank), float(alpha), only)


def merge(params: Params, scale: float) -> Params:
  """Folds adapters (dicts holding ``kernel``, ``lora_a``, ``lora_b``) into their kernels.

  Returns:
    The params without adapter leaves; each adapted kernel is ``W + scale * A B``.
  """
  if isinstance(params, dict):
    if LORA_A in params and LORA_B in params and "kernel" in params:
      a, b, w = params[LORA_A], params[LORA_B], params["kernel"]
      out = {k: v for k, v in params.items() if k not in (LORA_A, LORA_B)}
      out["kernel"] = w + scale * jnp.tensordot(a, b, axes=1).reshape(w.shape).astype(w.dtype)
      return out
    return {k: merge(v, scale) for k, v in params.items()}
  return params


def lora_trainable(*, freeze_a: bool = False,
                   also: Callable[[tuple[str, ...]], bool] | None = None):
  """A ``trainable=`` predicate selecting the LoRA adapters (linen :func:`lora` or nnx).

  Args:
    freeze_a: FFA-LoRA (Sun et al. 2024): train ``B`` only; ``A`` stays at its random init.
    also: optional extra predicate on the path of parameters to train as well (e.g. a new
      classification head: ``lambda path: "Dense_2" in path``).

  Returns:
    ``predicate(path) -> bool`` for ``fs.algorithms.fedavg(..., trainable=...)``.

  Examples:
    >>> import fedjax_sim as fs
    >>> pred = fs.peft.lora_trainable(freeze_a=True)
    >>> pred(("Dense_0", "lora_b")), pred(("Dense_0", "lora_a")), pred(("Dense_0", "kernel"))
    (True, False, False)
  """

  def predicate(path: tuple[str, ...]) -> bool:
    if LORA_B in path or (not freeze_a and LORA_A in path):
      return True
    return bool(also(path)) if also is not None else False

  return predicate


def trainable_view(params: Params, trainable: _views.TrainableSpec) -> Params:
  """``params`` with the frozen leaves set to None (what is trained, sent and stored).

  Returns:
    The trainable view; e.g. ``fs.peft.upload_bits(trainable_view(params, spec))``.
  """
  return _views.split(params, _views.resolve(trainable, params))[0]


def frozen_view(params: Params, trainable: _views.TrainableSpec) -> Params:
  """``params`` with the trainable leaves set to None (shared once by all clients).

  Returns:
    The frozen view.
  """
  return _views.split(params, _views.resolve(trainable, params))[1]


merge_views = _views.merge
upload_bits = _views.upload_bits


def load_pretrained(init_params: Params, pretrained: Params | str | os.PathLike,
                    *, strict: bool = True) -> Params:
  """Copies pretrained weights into freshly initialised (e.g. LoRA-adapted) params.

  Args:
    init_params: params of the model to fine-tune (``LoRA.init(...)["params"]``): they give
      the structure; adapters and new layers keep their initial values.
    pretrained: a params pytree (nested dicts of arrays), or the path of a file written by
      ``flax.serialization.msgpack_serialize(params)`` (``.msgpack``), or of a
      ``safetensors`` file (keys ``"Dense_0.kernel"``; needs the optional ``safetensors``
      package).
    strict: every non-adapter leaf of ``init_params`` must come from ``pretrained``.

  Returns:
    ``init_params`` with every leaf found in ``pretrained`` (same path, shape) replaced.

  Raises:
    ValueError: a pretrained leaf has no place or another shape in ``init_params``, or (strict)
      a base leaf is missing from ``pretrained``.
  """
  if isinstance(pretrained, (str, os.PathLike)):
    pretrained = _read_weights(os.fspath(pretrained))
  flat_init = {tuple(_views.path_names(p)): v
               for p, v in jax.tree_util.tree_leaves_with_path(init_params)}
  flat_pre = {tuple(_views.path_names(p)): v
              for p, v in jax.tree_util.tree_leaves_with_path(pretrained)}
  for path, v in flat_pre.items():
    if path not in flat_init:
      raise ValueError(
          f"load_pretrained: pretrained weight {'/'.join(path)} has no counterpart in the "
          f"model's params (paths like {'/'.join(next(iter(flat_init)))}); the architectures "
          "differ."
      )
    if tuple(np.shape(v)) != tuple(np.shape(flat_init[path])):
      raise ValueError(
          f"load_pretrained: {'/'.join(path)} has shape {np.shape(v)} in the pretrained "
          f"weights but {np.shape(flat_init[path])} in the model."
      )
  if strict:
    missing = [p for p in flat_init
               if p not in flat_pre and LORA_A not in p and LORA_B not in p]
    if missing:
      raise ValueError(
          f"load_pretrained: the pretrained weights lack {['/'.join(p) for p in missing[:5]]}"
          f"{' ...' if len(missing) > 5 else ''}; pass strict=False to keep their initial "
          "values (e.g. a new head)."
      )

  def pick(path, v):
    new = flat_pre.get(tuple(_views.path_names(path)))
    return v if new is None else jnp.asarray(new, dtype=v.dtype)

  return jax.tree_util.tree_map_with_path(pick, init_params)


def _read_weights(path: str) -> Params:
  """The params pytree in ``path``; a missing, unreadable, truncated or corrupt file, or one
  that holds something other than a dict of arrays, is a ValueError naming the file."""
  if not os.path.exists(path):
    raise ValueError(f"load_pretrained: no file at {path!r}.")
  if os.path.isdir(path):
    raise ValueError(f"load_pretrained: {path!r} is a directory; pass the .msgpack or "
                     ".safetensors file of the weights (an orbax checkpoint directory: restore "
                     "it with orbax and pass the params pytree).")
  if path.endswith(".safetensors"):
    try:
      import safetensors  # noqa: F401
    except ImportError:
      return _read_weights_file(path)  # its message: the optional package to install
  try:
    tree = _read_weights_file(path)
  except Exception as e:  # noqa: BLE001 - msgpack / safetensors / OS errors, with the file named
    raise ValueError(
        f"load_pretrained: {path!r} cannot be read as "
        f"{'safetensors' if path.endswith('.safetensors') else 'flax msgpack'} weights; the file "
        f"is truncated or corrupt ({type(e).__name__}: {e}). Write it with "
        "flax.serialization.msgpack_serialize(params) (or safetensors' save_file).") from None
  if not isinstance(tree, dict) or not tree:
    raise ValueError(
        f"load_pretrained: {path!r} holds {type(tree).__name__} {tree!r:.60}, not a dict of "
        "params; write it with flax.serialization.msgpack_serialize(params).")
  return tree


def _read_weights_file(path: str) -> Params:
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ValueError(
          "load_pretrained: reading .safetensors needs the optional 'safetensors' package "
          "(pip install safetensors); or save the params with flax.serialization."
      ) from e
    nested: dict = {}
    for key, value in load_file(path).items():
      *parents, leaf = key.split(".")
      node = nested
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    return nested
  from flax import serialization

  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())
