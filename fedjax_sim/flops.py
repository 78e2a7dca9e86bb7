"""FLOPs of a function counted from its jaxpr: the same figure on every backend.

The CPU rule of the automatic chunk size (:func:`fedjax_sim.memory.auto_chunk_size`) sizes a
chunk by the FLOPs of one local step, and the benchmarks report FLOP/s against a GEMM peak;
both count here. XLA's own cost analysis is backend-dependent (on GPU it misses convolutions
lowered to cuDNN custom calls), so the jaxpr is counted instead.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["count_flops"]

#: Elementwise primitives counted as one FLOP per output element.
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "exp", "exp2", "log", "log1p", "tanh",
    "logistic", "sqrt", "rsqrt", "pow", "integer_pow", "abs", "sign", "erf", "select_n",
})
#: Reductions counted as one FLOP per input element.
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin",
                         "reduce_precision", "cumsum", "cumlogsumexp", "cummax"})


def _size(aval) -> int:
  return int(np.prod(aval.shape)) if hasattr(aval, "shape") else 1


def _count_jaxpr(jaxpr) -> dict[str, float]:
  """FLOPs of a jaxpr by kind: ``matmul`` (dot_general), ``conv``, ``elementwise``, ``reduce``."""
  out = {"matmul": 0.0, "conv": 0.0, "elementwise": 0.0, "reduce": 0.0}

  def add(counts, times=1.0):
    for k, v in counts.items():
      out[k] += times * v

  for e in jaxpr.eqns:
    name = e.primitive.name
    if name == "dot_general":
      (lc, _), (lb, _) = e.params["dimension_numbers"]
      lhs = e.invars[0].aval.shape
      contract = int(np.prod([lhs[i] for i in lc])) if lc else 1
      out["matmul"] += 2.0 * _size(e.outvars[0].aval) * contract
    elif name == "conv_general_dilated":
      rhs = e.invars[1].aval.shape
      dn = e.params["dimension_numbers"]
      out_feat = rhs[dn.rhs_spec[0]]
      per_out = int(np.prod(rhs)) // out_feat  # kernel window x input features per group
      out["conv"] += 2.0 * _size(e.outvars[0].aval) * per_out
    elif name in _ELEMENTWISE:
      out["elementwise"] += _size(e.outvars[0].aval)
    elif name in _REDUCTIONS or name.startswith("reduce_window"):
      out["reduce"] += _size(e.invars[0].aval)
    elif name == "while":
      raise ValueError("count_flops: a while loop has no static trip count; count by hand")
    sub = [p for p in e.params.values() if hasattr(p, "eqns") or hasattr(p, "jaxpr")]
    if name == "cond":
      branches = [_count_jaxpr(b.jaxpr) for b in e.params["branches"]]
      add(max(branches, key=lambda c: sum(c.values())))
      continue
    for p in sub:
      inner = p if hasattr(p, "eqns") else p.jaxpr
      inner = inner if hasattr(inner, "eqns") else inner.jaxpr
      add(_count_jaxpr(inner), float(e.params.get("length", 1)) if name == "scan" else 1.0)
  return out


def count_flops(fn: Any, *args: Any) -> dict[str, float]:
  """Counts the FLOPs of ``fn(*args)`` from its jaxpr, the same on every backend.

  A multiply-add is 2 FLOPs: ``dot_general`` (matmuls, attention, LSTM gate projections)
  ``2 x output size x contracted size``; ``conv_general_dilated`` ``2 x output size x kernel
  window x input features per group``; elementwise arithmetic (bias adds, activations, LSTM gate
  nonlinearities and products, softmax) 1 per output element; reductions (sums, max-pool windows)
  1 per input element. ``scan`` bodies count ``length`` times; ``cond`` its costliest branch;
  other nested jaxprs (``pjit``, ``custom_jvp``/``custom_vjp``/``custom_vmap`` calls) once.
  Data movement (gather, transpose, concatenate) counts 0. ``args`` may be arrays or
  ``jax.ShapeDtypeStruct``s.

  Args:
    fn: the function.
    *args: its arguments (or their shapes).

  Returns:
    ``{"matmul", "conv", "elementwise", "reduce", "total"}`` in FLOPs.

  Raises:
    ValueError: ``fn`` holds a ``while`` loop (no static trip count).

  Examples:
    >>> import jax.numpy as jnp
    >>> count_flops(lambda a, b: a @ b, jnp.ones((4, 3)), jnp.ones((3, 5)))["total"]
    120.0
  """
  counts = _count_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr)
  counts["total"] = sum(counts.values())
  return counts
