"""Mixed precision as a policy: the client's forward/backward in a low-precision dtype, everything
else in float32.

``precision="bf16"`` (on :func:`fedjax_sim.algorithms.fedavg` and the algorithms built on it)
wraps the loss so that the model runs on bfloat16 copies of the float32 master parameters and of
the batch's floating features; gradients flow back through the casts, so the client optimizer
updates float32 parameters and the client's delta is float32. Clipping, aggregation, DP noise
and the server step see only float32 values (the usual "bf16 compute, f32 master weights" recipe,
as in jmp / Micikevicius et al., "Mixed Precision Training", ICLR 2018). The precision changes
results, so it belongs to the algorithm (it is in the traced round, hence in the algorithm
digest).

float16 is not offered: it needs loss scaling, which this policy does not do. On XLA:CPU bf16
matmuls do not reach AMX (measured ~235 GFLOP/s vs ~290-325 for f32, ``/work/shared/reference/
measured-2026-12.md``), so bf16 is a memory, not a speed, setting on CPU.

Example:
  >>> import jax, jax.numpy as jnp, fedjax_sim as fs
  >>> loss = fs.precision.with_precision(
  ...     fs.models.classifier_loss(lambda p, x: x @ p), "bf16")
  >>> batch = {"x": jnp.eye(2), "y": jnp.array([0, 1]), fs.MASK_KEY: jnp.ones(2)}
  >>> g = jax.grad(lambda p: loss(p, batch, jax.random.key(0))[0])(jnp.eye(2))
  >>> g.dtype
  dtype('float32')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_sim.types import MASK_KEY

__all__ = ["PRECISIONS", "check_precision", "compute_dtype", "with_precision"]

#: The accepted policies and their compute dtypes.
PRECISIONS = {"f32": jnp.float32, "bf16": jnp.bfloat16}
_ALIASES = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16"}


def check_precision(precision: str, backend: str | None = None, devices: Any = None) -> str:
  """Validates ``precision=`` for the backend, before compiling.

  Returns:
    The canonical name (``"f32"`` or ``"bf16"``).

  Raises:
    ValueError: an unknown policy, float16, or bf16 on a GPU without bf16 support (compute
      capability below 8.0).
  """
  name = _ALIASES.get(precision, precision) if isinstance(precision, str) else precision
  if name in ("f16", "fp16", "float16"):
    raise ValueError("precision='f16' is not supported (float16 needs loss scaling); use "
                     "precision='bf16' (bfloat16 compute, float32 master params) or 'f32'")
  if name not in PRECISIONS:
    raise ValueError(f"precision={precision!r}: expected one of {sorted(PRECISIONS)}")
  if name == "bf16":
    backend = backend or jax.default_backend()
    if backend == "gpu":
      for d in devices if devices is not None else jax.devices():
        cc = getattr(d, "compute_capability", None)
        if cc is not None and float(cc) < 8.0:
          raise ValueError(f"precision='bf16': device {d.device_kind} (compute capability {cc}) "
                           "has no bfloat16 arithmetic; use precision='f32'")
  return name


def compute_dtype(precision: str):
  """The compute dtype of a (validated) policy."""
  return PRECISIONS[check_precision(precision)]


def _cast(tree, dtype):
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def with_precision(loss_fn, precision: str = "f32"):
  """``loss_fn`` computed at ``precision``: params and floating batch features cast to the
  compute dtype on the way in (gradients cast back to the params' float32), the loss and aux
  cast to float32 on the way out. ``"f32"`` returns ``loss_fn`` itself.

  Returns:
    A ``loss_fn(params, batch, key) -> (loss, aux)`` with ``loss_fn``'s attributes (e.g. its
    population check).
  """
  name = check_precision(precision)
  if name == "f32":
    return loss_fn
  dtype = PRECISIONS[name]

  def low(params, batch, key):
    feats = {k: (v if k == MASK_KEY else _cast(v, dtype)) for k, v in batch.items()}
    loss, aux = loss_fn(_cast(params, dtype), feats, key)
    return _cast(loss, jnp.float32), _cast(aux, jnp.float32)

  low.__dict__.update(getattr(loss_fn, "__dict__", {}))
  low.__wrapped__ = loss_fn
  low.precision = name
  return low
