"""Standard federated-learning models (flax linen). Use them through ``fs.models.linen_apply``.

Every module takes ``train`` (dropout on when True); with ``linen_apply(module, train=True)``
dropout draws from the per-step key, which derives from the client's key.

Normalisation: the ResNet uses GroupNorm. BatchNorm keeps running statistics that differ per
client under non-IID data, and averaging them (or training with per-client batch statistics)
is known to hurt federated training (Hsieh et al., "The Non-IID Data Quagmire", ICML 2020); it
also needs mutable state that FedAvg does not average. Use GroupNorm / LayerNorm.

Convolutions: every conv here is :class:`Conv`, a ``flax.linen.Conv`` whose convolution is
:func:`conv_general_dilated`. On XLA:CPU (jax 0.10) a convolution's gradient inside a loop body
(the client's ``while_loop`` over local steps) is compiled with non-canonical layouts (the kernel
gradient as ``dim_labels=f01b_i01o->01bf``, the input gradient with an ``01oi`` kernel) that the
CPU backend runs on a slow generic emitter: ~15-20x slower than the same steps unrolled. On CPU
:func:`conv_general_dilated` therefore computes the backward pass itself with both gradients
written as canonical NHWC/HWIO convolutions (explicit transposes), which XLA:CPU runs on its
fast path inside loops too; the forward pass and the math are unchanged (same gradients to
float rounding). On GPU/TPU it is ``lax.conv_general_dilated``. Likewise :func:`max_pool`: the
gradient of ``reduce_window`` max (select-and-scatter) is slow on XLA:CPU, so the CPU path writes
the 2x2 pool's gradient out (same values, ties included). Measured in ``benchmarks/conv_loop.py``
and ``benchmarks/ceiling.py --cnn-layers``. Also on CPU, :class:`Conv` adds its bias with
:func:`add_channel_bias` (the bias gradient as one GEMV, not a fused column reduction) and a
shallow convolution (window depth <= :data:`PATCHES_MAX_DEPTH`, a first layer) runs its forward
pass as im2col + one dot: ``python -m benchmarks.ceiling --zoo-variants``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def map_on_vmap(f):
  """``f`` with a ``jax.custom_batching.custom_vmap`` rule: under ``vmap`` (several clients per
  chunk, each with its own kernel) it runs ``f`` in a ``lax.map`` over the batch axis instead of
  JAX's default rule (a grouped convolution, which XLA:CPU runs slowly). Unbatched it is ``f``.
  Measured in ``benchmarks/client_kernels.py`` (``vmap_canonical`` vs ``vmap_lax``). Usable on a
  user's own per-client kernel (e.g. a conv passed to flax's ``nn.Conv(conv_general_dilated=)``).

  Returns:
    ``f`` with the rule; results equal ``jax.vmap(f)``'s.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> f = map_on_vmap(lambda a, b: a @ b)
    >>> a, b = jnp.ones((3, 2, 4)), jnp.ones((3, 4, 5))
    >>> bool(jnp.allclose(jax.vmap(f)(a, b), jax.vmap(lambda a, b: a @ b)(a, b)))
    True
  """
  g = jax.custom_batching.custom_vmap(f)

  @g.def_vmap
  def rule(axis_size, in_batched, *args):
    del axis_size
    mapped = [a for a, b in zip(args, in_batched, strict=True) if b]

    def one(ms):
      it = iter(ms)
      return g(*[next(it) if b else a for a, b in zip(args, in_batched, strict=True)])

    return lax.map(one, mapped), True

  return g


#: The CPU forward pass of a convolution whose window holds at most this many input values
#: (``kh * kw * C_in``: a first layer on images) is im2col (shifted slices) and one dot, where
#: XLA:CPU's convolution is slow at such a small depth: the whole training step 1.03-1.08x
#: faster on the EMNIST CNN (3x3x1), 1.05x on pfl's CIFAR ``simple_cnn`` (3x3x3) on one core and
#: level with two threads (``python -m benchmarks.ceiling --zoo-variants``); same values.
#: Deeper convolutions keep XLA's.
PATCHES_MAX_DEPTH = 32
#: ... as long as the patches fit in this many bytes (a large image batch keeps XLA's conv).
PATCHES_MAX_BYTES = 32 * 2**20


@map_on_vmap
def _fwd_conv(x, k):
  kh, kw, c, o = k.shape
  n, h2, w2 = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
  depth = kh * kw * c
  if depth <= PATCHES_MAX_DEPTH and n * h2 * w2 * depth * x.dtype.itemsize <= PATCHES_MAX_BYTES:
    patches = jnp.concatenate([x[:, i:i + h2, j:j + w2, :] for i in range(kh) for j in range(kw)],
                              axis=-1)  # features in (kh, kw, C_in) order: HWIO's rows
    return (patches.reshape(-1, depth) @ k.reshape(depth, o)).reshape(n, h2, w2, o)
  return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=_NHWC)


@map_on_vmap
def _dx_conv(dy, k):
  # dx = full correlation of dy with the spatially flipped kernel, as an NHWC/HWIO conv.
  kh, kw = k.shape[0], k.shape[1]
  k_flip = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
  return lax.conv_general_dilated(dy, k_flip, (1, 1), [(kh - 1, kh - 1), (kw - 1, kw - 1)],
                                  dimension_numbers=_NHWC)


@map_on_vmap
def _dk_conv(x, dy):
  # dk[a, b, i, o] = sum_{n,h,w} x[n, h+a, w+b, i] dy[n, h, w, o]: a conv with the input
  # channels as the batch and the examples as the features, again NHWC/HWIO.
  return lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                                  "VALID", dimension_numbers=_NHWC).transpose(1, 2, 0, 3)


@jax.custom_vjp
def _conv_valid(x: jax.Array, k: jax.Array) -> jax.Array:
  """VALID, stride-1 2-D convolution, NHWC x HWIO -> NHWC, with canonical-layout gradients."""
  return _fwd_conv(x, k)


def _conv_valid_fwd(x, k):
  return _fwd_conv(x, k), (x, k)


def _conv_valid_bwd(res, dy):
  x, k = res
  return _dx_conv(dy, k), _dk_conv(x, dy).astype(k.dtype)


_conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, *, impl="auto"):
  """``lax.conv_general_dilated`` with a per-backend implementation (same signature).

  Args:
    lhs: as ``lax.conv_general_dilated``, like all the arguments before ``impl`` (``rhs``,
      ``window_strides``, ``padding``, ``lhs_dilation``, ``rhs_dilation``,
      ``dimension_numbers``, ``feature_group_count``, ``batch_group_count``, ``precision``,
      ``preferred_element_type``).
    impl: ``"auto"`` (``"canonical"`` when ``jax.default_backend()`` is ``"cpu"``, else
      ``"lax"``), ``"lax"`` (plain ``lax.conv_general_dilated``) or ``"canonical"`` (the CPU
      path: 2-D, stride 1, undilated, ungrouped NHWC/HWIO convolutions get hand-written
      canonical-layout gradients; any other convolution falls back to ``"lax"``).

  The canonical path is a ``jax.custom_vjp``: reverse mode (``grad``) only. Forward-mode
  transforms (``jax.jvp``, ``jacfwd``, ``hessian``) raise a TypeError on it; use
  ``impl="lax"`` (``EmnistCNN(conv_impl="lax")``) for them. Under ``vmap`` (several clients per
  chunk) its three convolutions (forward, input and kernel gradient) carry a
  ``jax.custom_batching.custom_vmap`` rule that loops over the clients (``lax.map``) instead of
  JAX's grouped convolution, which XLA:CPU runs slowly (``benchmarks/client_kernels.py``); the
  automatic CPU chunk for convolutional models is still one client (a scan over clients), which
  measured faster than any vmapped option on CPU.
  """
  if impl not in ("auto", "lax", "canonical"):
    raise ValueError(f"impl must be 'auto', 'lax' or 'canonical'; got {impl!r}.")
  if impl == "auto":
    impl = "canonical" if jax.default_backend() == "cpu" else "lax"
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type,
  )
  if impl == "lax" or lhs.ndim != 4:
    return plain()
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  simple = (
      dn == canonical and tuple(window_strides) == (1, 1) and feature_group_count == 1
      and batch_group_count == 1 and precision is None and preferred_element_type is None
      and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      and lhs.dtype == rhs.dtype
  )
  if not simple:
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[0:2], (1, 1), padding)
  pads = [(0, 0), *(tuple(p) for p in padding), (0, 0)]
  if any(lo < 0 or hi < 0 for lo, hi in pads):
    return plain()
  x = jnp.pad(lhs, pads) if any(lo or hi for lo, hi in pads) else lhs
  return _conv_valid(x, rhs)


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2, stride-2 max pool of an NHWC array with even H and W."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
  n, h, w, c = x.shape
  y = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  return y, (x, y)


def _max_pool_2x2_bwd(res, dy):
  # The gradient goes to the FIRST maximum of each window in row-major order, as XLA's
  # select-and-scatter (the gradient of lax.reduce_window max) does, ties included.
  x, y = res
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  hit = windows.reshape(n, h // 2, w // 2, 4, c) == y[:, :, :, None, :]
  first = hit & (jnp.cumsum(hit.astype(jnp.int32), axis=3) == 1)
  dx = jnp.where(first, dy[:, :, :, None, :], jnp.zeros((), dy.dtype))
  dx = dx.reshape(n, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return (dx.reshape(x.shape),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool(x: jax.Array, window_shape=(2, 2), strides=None, padding="VALID", *,
             impl: str = "auto") -> jax.Array:
  """``flax.linen.max_pool`` with a per-backend implementation (see :func:`conv_general_dilated`).

  On the CPU path a 2x2, stride-2, VALID pool of an NHWC array is a reshape + max whose gradient
  is written out (same values as ``reduce_window``'s select-and-scatter, ~2.5x faster inside the
  client loop on XLA:CPU); anything else is ``nn.max_pool``.
  """
  if impl not in ("auto", "lax", "canonical"):
    raise ValueError(f"impl must be 'auto', 'lax' or 'canonical'; got {impl!r}.")
  if impl == "auto":
    impl = "canonical" if jax.default_backend() == "cpu" else "lax"
  strides = window_shape if strides is None else strides
  if (impl == "lax" or x.ndim != 4 or tuple(window_shape) != (2, 2) or tuple(strides) != (2, 2)
      or padding != "VALID"):
    return nn.max_pool(x, window_shape, strides=strides, padding=padding)
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  if (h, w) != x.shape[1:3]:
    x = x[:, :h, :w]
  return _max_pool_2x2(x)


@jax.custom_vjp
def add_channel_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """``y + bias`` for a bias over the last axis, whose bias gradient is one matrix-vector product.

  The gradient of a broadcast add is a sum over every leading axis (a column reduction), which
  XLA:CPU fuses into the SGD update that consumes it and then runs as a strided scalar loop:
  with the two convolutions' bias gradients written as ``ones @ dy`` (a GEMV, never fused) the
  training step of pfl's CIFAR ``simple_cnn`` ran 1.09x faster on one core (18.21 -> 16.72 ms)
  and the EMNIST CNN's 1.05x (``python -m benchmarks.ceiling --zoo-variants``, rows in
  ``benchmarks/results/cpu-2core/ceiling.jsonl``). Values are those of ``y + bias`` to float
  rounding (the sum's order differs). Reverse mode only (a ``jax.custom_vjp``), like the CPU
  convolution.

  Args:
    y: ``[..., C]`` array.
    bias: ``[C]`` array (its gradient comes back in its own dtype, summed in float32 at
      least).

  Returns:
    ``y + bias``.

  Raises:
    ValueError: ``bias`` is not one vector of ``y.shape[-1]`` entries.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> y, b = jnp.ones((2, 3, 4)), jnp.arange(4.0)
    >>> g = jax.grad(lambda b: jnp.sum(add_channel_bias(y, b) ** 2))(b)
    >>> bool(jnp.allclose(g, jax.grad(lambda b: jnp.sum((y + b) ** 2))(b)))
    True
  """
  _check_channel_bias(y, bias)
  return y + bias


def _check_channel_bias(y, bias):
  if jnp.ndim(y) < 1 or jnp.shape(bias) != (jnp.shape(y)[-1],):
    raise ValueError(f"add_channel_bias: bias must have shape (y.shape[-1],) = "
                     f"{(jnp.shape(y)[-1:])}; got y {jnp.shape(y)} and bias {jnp.shape(bias)}.")


def _add_channel_bias_fwd(y, bias):
  _check_channel_bias(y, bias)
  # Zero-size residuals carry the two dtypes: each cotangent comes back in its primal's.
  return y + bias, (jnp.zeros((0,), y.dtype), jnp.zeros((0,), bias.dtype))


def _add_channel_bias_bwd(dtypes, dy):
  y_dtype, bias_dtype = dtypes[0].dtype, dtypes[1].dtype
  c = dy.shape[-1]
  ones = jnp.ones((dy.size // c,), dy.dtype)
  db = lax.dot_general(ones, dy.reshape(-1, c), (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.promote_types(dy.dtype, jnp.float32))
  return dy.astype(y_dtype), db.astype(bias_dtype)


add_channel_bias.defvjp(_add_channel_bias_fwd, _add_channel_bias_bwd)


class Conv(nn.Conv):
  """``flax.linen.Conv`` using :func:`conv_general_dilated` (fast gradients in loops on CPU).

  Same parameters as ``nn.Conv`` (names, shapes, initialisers); ``impl`` picks the
  implementation (``"auto"``: per backend). On the CPU path a plain 2-D convolution (NHWC input,
  stride 1, undilated, ungrouped, ``"SAME"``/``"VALID"`` or explicit padding, no mask) also adds
  its bias with :func:`add_channel_bias` (a faster bias gradient); anything else is exactly
  ``nn.Conv``'s call.
  """

  impl: str = "auto"

  def __post_init__(self):
    current = self.conv_general_dilated
    ours = getattr(current, "func", None) is conv_general_dilated  # e.g. copied by clone()
    if (current is None or ours) and self.conv_general_dilated_cls is None:
      object.__setattr__(self, "conv_general_dilated",
                         functools.partial(conv_general_dilated, impl=self.impl))
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs):
    if not canonical_conv_call(self, inputs):
      return nn.Conv.__call__(self, inputs)
    # nn.Conv's own parameters (same names, shapes, initialisers, dtypes) for this case.
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, inputs.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    promote = getattr(self, "promote_dtype", nn.dtypes.promote_dtype)
    inputs, kernel, bias = promote(inputs, kernel, bias, dtype=self.dtype)
    padding = self.padding if isinstance(self.padding, str) else [tuple(p) for p in self.padding]
    y = self.conv_general_dilated(inputs, kernel, (1, 1), padding, dimension_numbers=_NHWC)
    return add_channel_bias(y, bias)


def canonical_conv_call(conv: Conv, inputs: jax.Array) -> bool:
  """Whether ``conv(inputs)`` takes :class:`Conv`'s own CPU call (the bias added by
  :func:`add_channel_bias`) rather than ``nn.Conv``'s.

  It does for a plain 2-D convolution of an NHWC batch on the CPU path: ``impl`` resolving to
  ``"canonical"``, a bias, shared weights, no mask, stride and dilations one, one feature group,
  ``"SAME"``/``"VALID"`` or explicit integer padding, the default precision and the zoo's own
  ``conv_general_dilated``.

  Returns:
    True when the call is the CPU path's; False when it is exactly ``nn.Conv.__call__``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((2, 8, 8, 3))
    >>> canonical_conv_call(Conv(4, (3, 3), impl="canonical"), x)
    True
    >>> canonical_conv_call(Conv(4, (3, 3), strides=2, impl="canonical"), x)
    False
  """
  impl = conv.impl
  if impl == "auto":
    impl = "canonical" if jax.default_backend() == "cpu" else "lax"
  fn = conv.conv_general_dilated

  def pairs(v, ok):  # a sequence of two entries, each ok(entry)
    return (isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2
            and all(ok(e) for e in v))

  def unit(v):  # None, 1 or (1, 1): stride / dilation one
    one = lambda e: isinstance(e, int) and not isinstance(e, bool) and e == 1
    return v is None or one(v) or pairs(v, one)

  ints = lambda p: pairs(p, lambda e: isinstance(e, int) and not isinstance(e, bool))
  padding_ok = ((isinstance(conv.padding, str) and conv.padding in ("SAME", "VALID"))
                or pairs(conv.padding, ints))
  return (impl == "canonical" and conv.use_bias is True and conv.shared_weights
          and conv.mask is None and getattr(fn, "func", None) is conv_general_dilated
          and conv.conv_general_dilated_cls is None and inputs.ndim == 4
          and pairs(conv.kernel_size, lambda e: isinstance(e, int))
          and unit(conv.strides) and unit(conv.input_dilation) and unit(conv.kernel_dilation)
          and conv.feature_group_count == 1 and conv.precision is None and padding_ok)


def dropout_keep(rate: float, bits: int | str = "auto") -> tuple[int, float]:
  """The mask width and the keep probability :class:`Dropout` realises for ``rate``.

  ``bits="auto"``: 8 random bits per element where ``1 - rate`` is a multiple of 1/256 (0.5,
  0.25, 0.75, ...: exact), else 16, with the keep probability rounded to the nearest multiple
  of 2**-16 (rate 0.1: keep 58982/65536 = 0.899994). ``bits=32``: a multiple of 2**-32 (finer
  than ``flax.linen.Dropout``'s, which compares a float32 uniform of 23 random bits).

  Returns:
    ``(bits, keep)``: the bits drawn per element and the realised keep probability.

  Raises:
    ValueError: ``rate`` outside [0, 1] (rate 1 keeps nothing: ``(bits, 0.0)``), a ``bits``
      other than "auto", 8, 16 or 32, or a rate below 1 whose keep probability rounds to 0
      at that width.

  Example:
    >>> dropout_keep(0.25), dropout_keep(0.1)
    ((8, 0.75), (16, 0.899993896484375))
  """
  if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
    raise ValueError(f"Dropout rate must be a number in [0, 1] (a Python or NumPy scalar, "
                     f"not a traced value); got {rate!r}.")
  rate = float(rate)
  if bits == "auto":
    bits = 8 if float(1 - rate) * 256 == round(float(1 - rate) * 256) else 16
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (8, 16, 32):
    raise ValueError(f"Dropout bits must be 'auto' or the int 8, 16 or 32; got {bits!r}.")
  if rate == 1.0:  # as flax's layer: every element dropped
    return bits, 0.0
  threshold = min(round((1 - rate) * 2.0 ** bits), 2 ** bits)
  if threshold < 1:
    raise ValueError(f"Dropout rate {rate!r} keeps nothing at {bits} bits per element (keep "
                     f"probability below 2**-{bits + 1}); pass bits=32.")
  return bits, threshold / 2.0 ** bits


class Dropout(nn.Module):
  """``flax.linen.Dropout`` (same fields and call) whose mask draws 8 or 16 random bits per
  element instead of a float32 uniform's 32.

  Fewer random bits (threefry) make the layer cheaper on XLA:CPU: the engine's local step of
  ``fs.zoo.StackOverflowTransformer`` (batch 16, 2-core CPU) took 56.0 ms with flax's layer and
  41.3 ms with this one (16 bits; no dropout: 40.1), ``python -m benchmarks.lm_step_breakdown``;
  docs/benchmarks.md, "Dropout's random bits".
  The keep probability is :func:`dropout_keep`'s (exact where ``1 - rate`` is a multiple of
  1/256 or 1/65536, else within 2**-17 of it), and kept elements are scaled by one over the
  realised keep probability, so the layer is unbiased. The draws differ from flax's for the
  same key. The zoo's models use it; swap it for ``flax.linen.Dropout`` in your own modules
  the same way.

  Attributes:
    rate: the probability of dropping an element, in [0, 1] (1: zeros, as flax's).
    broadcast_dims: dimensions that share one mask entry (as flax's).
    deterministic: no dropout when True (or pass it to the call).
    rng_collection: the rng stream (``"dropout"``, which ``fs.models.linen_apply`` feeds from
      the step key).
    bits: random bits per element: ``"auto"`` (8 where exact, else 16), 8, 16 or 32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = Dropout(0.5)
    >>> y = layer.apply({}, jnp.ones((4, 256)), deterministic=False,
    ...                 rngs={"dropout": jax.random.key(0)})
    >>> sorted(set(y.ravel().tolist()))  # dropped or scaled by 1 / 0.5
    [0.0, 2.0]
  """

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  bits: int | str = "auto"

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng=None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    bits, keep = dropout_keep(self.rate, self.bits)
    if self.rate == 0 or deterministic:
      return inputs
    if keep == 0.0:  # rate 1: zeros, in the dtype any other rate returns (floats for ints)
      return jnp.zeros(inputs.shape, _dropout_dtype(inputs.dtype))
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for d in self.broadcast_dims:
      shape[d] = 1
    n = math.prod(shape)
    per_word = 32 // bits
    words = jax.random.bits(rng, (-(-n // per_word),), jnp.uint32)
    if per_word > 1:
      words = lax.bitcast_convert_type(words, jnp.uint8 if bits == 8 else jnp.uint16)
    draws = words.reshape(-1)[:n].reshape(shape).astype(jnp.uint32)
    if keep == 1.0:
      mask = jnp.ones(shape, bool)
    else:
      mask = draws < jnp.uint32(round(keep * 2.0 ** bits))
    mask = jnp.broadcast_to(mask, inputs.shape)
    # An integer input is scaled in floats (1 / keep is rarely an integer: 4/3 at rate 0.25),
    # not truncated to its dtype; flax's layer raises a TypeError on one.
    inputs = inputs.astype(_dropout_dtype(inputs.dtype))
    scale = jnp.asarray(1.0 / keep, inputs.dtype)
    return lax.select(mask, inputs * scale, jnp.zeros_like(inputs))


def _dropout_dtype(dtype):
  """:class:`Dropout`'s output dtype: the input's if inexact, else the default float."""
  return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.result_type(dtype, float)


class LogisticRegression(nn.Module):
  """Flatten -> Dense(num_classes)."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  """Flatten -> [Dense -> relu] * len(hidden) -> Dense(num_classes)."""

  num_classes: int
  hidden: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class EmnistCNN(nn.Module):
  """The EMNIST CNN of Reddi et al. 2021 (FedJAX / TFF): conv32-conv64-maxpool-dropout(0.25)-
  dense128-dropout(0.5)-dense(num_classes), valid 3x3 convolutions; ~1.2M parameters.

  ``conv_impl`` (``"auto"``, ``"lax"``, ``"canonical"``) picks the convolution and pooling
  implementation (module docstring); it changes speed, not parameters or results.
  """

  num_classes: int = 62
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(Conv(32, (3, 3), padding="VALID", impl=self.conv_impl)(x))
    x = nn.relu(Conv(64, (3, 3), padding="VALID", impl=self.conv_impl)(x))
    x = max_pool(x, (2, 2), strides=(2, 2), impl=self.conv_impl)
    x = Dropout(0.25, deterministic=not train)(x)
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    x = Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class CifarCNN(nn.Module):
  """Small CIFAR CNN (conv-pool-conv-pool-dense), the model of pfl-research's CIFAR-10 setup.

  ``conv_impl`` as in :class:`EmnistCNN`.
  """

  num_classes: int = 10
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(Conv(32, (3, 3), impl=self.conv_impl)(x))
    x = max_pool(x, (2, 2), strides=(2, 2), impl=self.conv_impl)
    x = nn.relu(Conv(64, (3, 3), impl=self.conv_impl)(x))
    x = max_pool(x, (2, 2), strides=(2, 2), impl=self.conv_impl)
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  channels: int
  stride: int
  groups: int

  @nn.compact
  def __call__(self, x):
    y = Conv(self.channels, (3, 3), strides=self.stride, use_bias=False)(x)
    y = nn.relu(nn.GroupNorm(num_groups=self.groups)(y))
    y = Conv(self.channels, (3, 3), use_bias=False)(y)
    y = nn.GroupNorm(num_groups=self.groups)(y)
    if x.shape[-1] != self.channels or self.stride != 1:
      x = Conv(self.channels, (1, 1), strides=self.stride, use_bias=False)(x)
      x = nn.GroupNorm(num_groups=self.groups)(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """CIFAR-style ResNet-18 (3x3 stem, no max-pool, stages 64-128-256-512) with GroupNorm."""

  num_classes: int = 100
  width: int = 64
  groups: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
    for stage, mult in enumerate((1, 2, 4, 8)):
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(self.width * mult, stride, self.groups)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class CharLSTM(nn.Module):
  """Next-character model of Reddi et al. 2021 for Shakespeare: embedding 8, two LSTM layers of
  256, dense to the vocabulary. Input int32 ``[B, T]``, output logits ``[B, T, vocab]``."""

  vocab_size: int
  embed_dim: int = 8
  hidden: int = 256
  num_layers: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Embed(self.vocab_size, self.embed_dim)(x)
    for _ in range(self.num_layers):
      h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h)
    return nn.Dense(self.vocab_size)(h)



class StackOverflowLSTM(nn.Module):
  """FedJAX's Stack Overflow next-word model (``fedjax.models.stackoverflow.create_lstm_model``).

  Word embedding 96 over ``vocab_size + 4`` ids (PAD 0, BOS 1, EOS 2, OOV ``vocab_size + 3``),
  one LSTM layer of 670, ``tanh``, a dense projection back to 96, and dense logits over the full
  vocabulary: 4,050,748 parameters at the default 10,000 words. Input int32 ``[B, T]`` (FedJAX's
  Stack Overflow sentences are ``T = 20`` tokens), output logits ``[B, T, vocab_size + 4]``.
  Same layer stack as FedJAX 0.0.17 (which has no Stack Overflow transformer; pfl-research's
  Stack Overflow benchmark uses a transformer instead). Train it with
  :func:`fedjax_sim.models.sequence_loss` (pad id 0).

  Reference: Reddi et al., "Adaptive Federated Optimization", ICLR 2021
  (https://arxiv.org/abs/2003.00295), whose model FedJAX's defaults follow.

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> m = fs.zoo.StackOverflowLSTM(vocab_size=50, hidden=8, embed_dim=4)
    >>> v = m.init(jax.random.key(0), jnp.ones((2, 20), jnp.int32))
    >>> m.apply(v, jnp.ones((2, 20), jnp.int32)).shape
    (2, 20, 54)
  """

  vocab_size: int = 10000
  embed_dim: int = 96
  hidden: int = 670
  num_layers: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Embed(self.vocab_size + 4, self.embed_dim)(x)
    for _ in range(self.num_layers):
      h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h)
      h = nn.Dense(self.embed_dim)(jnp.tanh(h))
    return nn.Dense(self.vocab_size + 4)(h)


class ShakespeareLSTM(nn.Module):
  """FedJAX's Shakespeare next-character model (``fedjax.models.shakespeare.create_lstm_model``).

  Character embedding 8 over ``vocab_size + 4`` ids (PAD 0, BOS/EOS/OOV after the 86 characters),
  two LSTM layers of 256 each followed by ``tanh``, dense logits: 820,522 parameters at the
  default 86 characters. Input int32 ``[B, T]`` (FedJAX/TFF: ``T = 80``), output logits
  ``[B, T, vocab_size + 4]``. :class:`CharLSTM` is the same stack without the ``tanh`` after each
  layer and with the vocabulary given whole. Train it with :func:`fedjax_sim.models.sequence_loss`.

  Reference: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629).

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> m = fs.zoo.ShakespeareLSTM(hidden=8)
    >>> v = m.init(jax.random.key(0), jnp.ones((2, 80), jnp.int32))
    >>> m.apply(v, jnp.ones((2, 80), jnp.int32)).shape
    (2, 80, 90)
  """

  vocab_size: int = 86
  embed_dim: int = 8
  hidden: int = 256
  num_layers: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Embed(self.vocab_size + 4, self.embed_dim)(x)
    for _ in range(self.num_layers):
      h = jnp.tanh(nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h))
    return nn.Dense(self.vocab_size + 4)(h)

def _uniform_005(key, shape, dtype=jnp.float32):
  """pfl's embedding init: uniform on [-0.05, 0.05]."""
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


class StackOverflowTransformer(nn.Module):
  """pfl-research's Stack Overflow next-word transformer (``LMTransformer``), layer for layer.

  Source: apple/pfl-research ``benchmarks/model/pytorch/transformer.py`` (``lm_transformer``),
  ``benchmarks/model/pytorch/layer.py`` (``PositionalEncoding``, a fixed sinusoidal table) and
  the config ``benchmarks/lm/configs/baseline.yaml``: embedding 96 = hidden 96 (so no input/output
  projections), 8 heads, 3 post-norm ``torch.nn.TransformerEncoderLayer`` blocks (ReLU
  feed-forward of 1536, LayerNorm eps 1e-5, dropout 0.1), causal mask, embeddings scaled by
  ``sqrt(96)`` plus the sinusoidal table, and logits tied to the embedding (no output bias).
  The pfl recipe: cohort 400, 1 local epoch, local batch 16, local SGD lr 0.3, central Adam
  lr 0.1 (eps 0.01, betas 0.9/0.99, 50 warm-up iterations), 2000 rounds, at most 64 sentences
  per user. The model follows Wang et al., "A Field Guide to Federated Optimization" (2021).

  ``vocab_size`` is the full id range including special ids (pad id 0, as
  :func:`fedjax_sim.models.sequence_loss` expects). Parameters:
  ``vocab_size * 96 + 3 * (4 * 96**2 + 4 * 96 + 2 * 96 * 1536 + 1536 + 96 + 4 * 96)``
  = ``vocab_size * 96 + 1,002,528``; 1,962,912 at ``vocab_size = 10,004``, equal to the
  torch model's count measured in /work/venvs/pfl (torch 2.13, ``nn.Embedding(10004, 96)`` +
  ``nn.TransformerEncoder(nn.TransformerEncoderLayer(96, 8, 1536, 0.1), 3)``).

  Examples:
    >>> import jax, jax.numpy as jnp, fedjax_sim as fs
    >>> m = fs.zoo.StackOverflowTransformer(vocab_size=50, embed_dim=8, num_heads=2, ff_dim=16)
    >>> v = m.init(jax.random.key(0), jnp.ones((2, 20), jnp.int32))
    >>> m.apply(v, jnp.ones((2, 20), jnp.int32)).shape
    (2, 20, 50)
  """

  vocab_size: int = 10004
  embed_dim: int = 96
  num_heads: int = 8
  ff_dim: int = 1536
  num_layers: int = 3
  dropout: float = 0.1
  max_len: int = 20

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.embed_dim
    embed = nn.Embed(self.vocab_size, d, embedding_init=_uniform_005)
    t = x.shape[-1]
    if t > self.max_len:
      raise ValueError(f"StackOverflowTransformer: sequence length {t} exceeds max_len="
                       f"{self.max_len}; pass a larger max_len.")
    pos = jnp.arange(self.max_len)[:, None]
    i = jnp.arange(d)[None, :]
    angle = pos / jnp.power(10000.0, (2 * (i // 2)) / d)
    pe = jnp.where(i % 2 == 0, jnp.sin(angle), jnp.cos(angle))
    h = embed(x) * jnp.sqrt(jnp.float32(d)) + pe[:t]
    mask = nn.make_causal_mask(x)
    det = not train
    for _ in range(self.num_layers):
      a = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=d,
                                          dropout_rate=self.dropout,
                                          deterministic=det)(h, h, mask=mask)
      h = nn.LayerNorm(epsilon=1e-5)(h + Dropout(self.dropout, deterministic=det)(a))
      f = nn.Dense(d)(Dropout(self.dropout, deterministic=det)(
          nn.relu(nn.Dense(self.ff_dim)(h))))
      h = nn.LayerNorm(epsilon=1e-5)(h + Dropout(self.dropout, deterministic=det)(f))
    return embed.attend(h)


class DenseAutoencoder(nn.Module):
  """Dense autoencoder: encoder ``hidden``, mirrored decoder; reconstructs the flattened input."""

  hidden: Sequence[int] = (64, 16)

  @nn.compact
  def __call__(self, x, train: bool = False):
    shape = x.shape
    h = x.reshape(shape[0], -1)
    dim = h.shape[-1]
    for i, width in enumerate(self.hidden):
      h = nn.Dense(width)(h)
      if i < len(self.hidden) - 1:
        h = nn.relu(h)
    for width in list(self.hidden[-2::-1]):
      h = nn.relu(nn.Dense(width)(h))
    return nn.Dense(dim)(h).reshape(shape)
