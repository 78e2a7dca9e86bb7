"""Federated algorithms as compositions over one engine: a client update, an aggregator process
and an optax server optimizer. New algorithms are new compositions, never subclasses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import _validation as _v
from fedjax_sim import partition_views as _views
from fedjax_sim import precision as _precision
from fedjax_sim.aggregators import Process, as_process, weighted_mean
from fedjax_sim.algorithms._base import Algorithm, check_loss, check_optimizer
from fedjax_sim.client import make_client_update, make_shared_mix, proximal, shared_loss
from fedjax_sim.types import LossFn


def fedavg(
    loss_fn: LossFn,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    aggregator: Process | None = None,
    weight_fn: Callable[[Any, dict, Any], Any] | None = None,
    trainable: _views.TrainableSpec = None,
    shared_data: dict | None = None,
    shared_fraction: float = 0.0,
    precision: str = "f32",
) -> Algorithm:
  """Federated Averaging (generalised: any client and server optax optimizer).

  Each sampled client trains locally from the broadcast model; the server aggregates the
  pseudo-gradients ``server - client`` (example-weighted mean by default) and applies
  ``server_optimizer`` (``optax.sgd(1.0)`` = plain FedAvg).

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (loss, aux)``.
    client_optimizer: optax optimizer for local steps (state reset every round).
    server_optimizer: optax optimizer on the aggregated update; default ``optax.sgd(1.0)``.
    batch_size: local minibatch size (None: full batch).
    local_epochs: local passes over the data (exactly one of local_epochs / local_steps).
    local_steps: fixed number of local steps.
    aggregator: a Process; default :func:`~fedjax_sim.aggregators.weighted_mean`.
    weight_fn: optional dynamic client weighting (see :class:`Algorithm`).
    trainable: federated fine-tuning: which parameters are trained — a pytree of bools with the
      params' structure, a predicate on the parameter path (a tuple of str keys), or an
      optax-style label function ``params -> pytree of "trainable"/"frozen"``. Frozen leaves are
      shared by every client of a chunk and never change; the delta, aggregator (clipping,
      noise, compression, secure sum), server optimizer and the upload cover only the trainable
      ones. None (default): everything is trained.
    shared_data: a small globally shared dataset (a dict of arrays with the population's
      feature names and shapes) mixed into every local batch (Zhao et al. 2018). It is public:
      every client holds it, so it changes the privacy model (DP protects the clients' own
      data, not the shared set).
    shared_fraction: fraction in [0, 1) of each local batch drawn from ``shared_data`` (with
      the client's key, in-jit); the rest comes from the client's own examples.
    precision: the client's compute precision (:mod:`fedjax_sim.precision`): ``"f32"``
      (default) or ``"bf16"`` (bfloat16 forward/backward on float32 master params; the delta,
      clipping, aggregation, DP noise and server step stay float32). It changes results, so
      it is part of the algorithm.

  Returns:
    an :class:`Algorithm` for :class:`fedjax_sim.Simulation`.

  References:
    McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017. Reddi et al., "Adaptive Federated
    Optimization", ICLR 2021 (server optimizers). Hu et al., "LoRA: Low-Rank Adaptation of
    Large Language Models", 2021 (fine-tuning part of a model). Zhao, Li, Lai, Suda, Civin,
    Chandra, "Federated Learning with Non-IID Data", 2018 (shared data).

  Examples:
    >>> import optax, fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.1), batch_size=10,
    ...                             local_epochs=1)
    >>> algo.name
    'fedavg'
  """
  algo = _local_sgd_algorithm(
      "fedavg", loss_fn, client_optimizer, server_optimizer, batch_size, local_epochs,
      local_steps, aggregator, regularizer=None, trainable=trainable, shared_data=shared_data,
      shared_fraction=shared_fraction, precision=precision,
  )
  if weight_fn is not None and not callable(weight_fn):
    raise TypeError("weight_fn must be callable as weight_fn(num_examples, metrics, client_id).")
  return algo._replace(weight_fn=weight_fn)


def fedprox(
    loss_fn: LossFn,
    *,
    mu: float,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    aggregator: Process | None = None,
    trainable: _views.TrainableSpec = None,
) -> Algorithm:
  """FedProx: FedAvg whose local objective adds ``mu/2 * ||w - w_server||^2``.

  ``mu=0`` is exactly FedAvg. ``trainable=`` as in :func:`fedavg` (the proximal term then
  covers the trainable parameters).

  Returns:
    an :class:`Algorithm` for :class:`fedjax_sim.Simulation`.

  References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020.

  Examples:
    >>> import optax, fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> fs.algorithms.fedprox(loss_fn, mu=0.01, client_optimizer=optax.sgd(0.1),
    ...                       batch_size=10, local_epochs=1).name
    'fedprox'
  """
  mu_value = _v.non_negative("mu", mu)  # 0 is FedAvg
  return _local_sgd_algorithm(
      "fedprox", loss_fn, client_optimizer, server_optimizer, batch_size, local_epochs,
      local_steps, aggregator, regularizer=proximal(mu_value), trainable=trainable,
  )


def fedsgd(
    loss_fn: LossFn,
    *,
    server_optimizer: optax.GradientTransformation,
    aggregator: Process | None = None,
    trainable: _views.TrainableSpec = None,
) -> Algorithm:
  """FedSGD: each client sends the gradient of its loss on ALL its data at the server model.

  One full-batch step with ``sgd(1.0)`` makes the client's pseudo-gradient equal to its mean
  gradient; the example-weighted mean over clients is then the full-batch gradient of the union
  of their data, which ``server_optimizer`` applies (e.g. ``optax.sgd(lr)``: centralised GD).

  Returns:
    an :class:`Algorithm` for :class:`fedjax_sim.Simulation`.

  References:
    McMahan et al., AISTATS 2017 (FedSGD baseline).

  Examples:
    >>> import optax, fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> fs.algorithms.fedsgd(loss_fn, server_optimizer=optax.sgd(0.5)).name
    'fedsgd'
  """
  return _local_sgd_algorithm(
      "fedsgd", loss_fn, optax.sgd(1.0), server_optimizer, None, None, 1, aggregator,
      regularizer=None, trainable=trainable,
  )


def _local_sgd_algorithm(
    name, loss_fn, client_optimizer, server_optimizer, batch_size, local_epochs, local_steps,
    aggregator, regularizer, trainable=None, shared_data=None, shared_fraction=0.0,
    precision="f32",
) -> Algorithm:
  check_loss(loss_fn)
  precision = _precision.check_precision(precision)
  check_optimizer("client_optimizer", client_optimizer)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  check_optimizer("server_optimizer", server_optimizer)
  process = weighted_mean() if aggregator is None else as_process(aggregator)
  shared = make_shared_mix(shared_data, shared_fraction)

  def build(loss):
    client_update = make_client_update(
        _precision.with_precision(loss, precision), client_optimizer, batch_size=batch_size,
        local_epochs=local_epochs, local_steps=local_steps, regularizer=regularizer, shared=shared,
    )
    return Algorithm(
        client_update, process, server_optimizer, None, name, shared_loss(loss_fn, shared),
        client_optimizer, batch_size, planned_steps=client_update.planned_steps,
    )

  return _views.partitioned(build, loss_fn, trainable)


# -- server optimizers (Reddi et al. 2021): thin named helpers over optax --------------------------
#
# Reddi et al. 2021, Algorithm 2, with Δ_t the round's aggregated update and τ the "degree of
# adaptivity" (``eps`` below): m_t = β1 m_{t-1} + (1 - β1) Δ_t; v_t = v_{t-1} + Δ_t² (FedAdagrad),
# β2 v_{t-1} + (1 - β2) Δ_t² (FedAdam), v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²) (FedYogi);
# x_{t+1} = x_t + η m_t / (√v_t + τ). τ is added to √v, outside the square root. Here the
# pseudo-gradient is ``server - client`` (= -Δ_t) and optax subtracts η times the scaled update,
# which is the same step.


def _server_hyperparameters(learning_rate, eps, b1=None, b2=None, initial_accumulator_value=None):
  _v.learning_rate("learning_rate", learning_rate)
  _v.positive("eps", eps)  # τ > 0: the denominator √v + τ never vanishes
  if b1 is not None:
    _v.hyperparameter("b1", b1, low=0, high=1, high_open=True)
  if b2 is not None:
    _v.hyperparameter("b2", b2, low=0, high=1, high_open=True)
  if initial_accumulator_value is not None:
    _v.non_negative("initial_accumulator_value", initial_accumulator_value)


def fedavgm(
    learning_rate: float = 1.0, momentum: float | None = 0.9
) -> optax.GradientTransformation:
  """Server SGD with heavy-ball momentum (FedAvgM, Hsu et al. 2019).

  Args:
    learning_rate: server learning rate η > 0 (or an optax schedule).
    momentum: β in [0, 1) (None: plain server SGD).

  Returns:
    an ``optax.GradientTransformation`` for ``server_optimizer``.

  References:
    Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", 2019.

  Examples:
    >>> import fedjax_sim as fs
    >>> opt = fs.algorithms.fedavgm(1.0, momentum=0.9)
  """
  _v.learning_rate("learning_rate", learning_rate)
  if momentum is not None:
    _v.hyperparameter("momentum", momentum, low=0, high=1, high_open=True)
  return optax.sgd(learning_rate, momentum=momentum)


def fedadam(
    learning_rate: float = 1e-2, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3
) -> optax.GradientTransformation:
  """Server Adam of FedAdam (Reddi et al. 2021): β1 0.9, β2 0.99, τ (``eps``) 1e-3.

  One server step: ``m ← β1 m + (1 − β1) g``, ``v ← β2 v + (1 − β2) g²`` (from zero), then
  ``x ← x − η m̂ / (√v̂ + τ)`` with the bias-corrected ``m̂ = m / (1 − β1^t)``,
  ``v̂ = v / (1 − β2^t)`` (``optax.adam``, as ``fedjax.optimizers.adam``); ``g`` is the
  aggregated pseudo-gradient ``server − client``. τ is added to the square root, as in the
  paper. The paper's Algorithm 2 writes the moments without bias correction, which changes
  only the first rounds' steps (``1 − β^t → 1``).

  Args:
    learning_rate: server learning rate η > 0 (or an optax schedule).
    b1: β1 in [0, 1).
    b2: β2 in [0, 1).
    eps: τ > 0, the degree of adaptivity, added to ``√v̂``.

  Returns:
    an ``optax.GradientTransformation`` for ``server_optimizer``.

  References:
    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
    Optimization", ICLR 2021 (Algorithm 2).

  Examples:
    >>> import fedjax_sim as fs
    >>> opt = fs.algorithms.fedadam(1e-2, eps=1e-3)
  """
  _server_hyperparameters(learning_rate, eps, b1, b2)
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def fedyogi(
    learning_rate: float = 1e-2, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
    initial_accumulator_value: float = 1e-6,
) -> optax.GradientTransformation:
  """Server Yogi of FedYogi (Reddi et al. 2021): β1 0.9, β2 0.99, τ (``eps``) 1e-3.

  One server step: ``m ← β1 m + (1 − β1) g``, ``v ← v − (1 − β2) g² sign(v − g²)``, then
  ``x ← x − η m̂ / (√v̂ + τ)`` with the bias-corrected ``m̂ = m / (1 − β1^t)``,
  ``v̂ = v / (1 − β2^t)`` (``optax.scale_by_yogi``, as ``fedjax.optimizers.yogi``); ``m`` and ``v``
  start at ``initial_accumulator_value``. τ is added to the square root, as in the paper
  (whose Algorithm 2 writes the moments without bias correction).

  Args:
    learning_rate: server learning rate η > 0 (or an optax schedule).
    b1: β1 in [0, 1).
    b2: β2 in [0, 1).
    eps: τ > 0, the degree of adaptivity, added to ``√v̂``.
    initial_accumulator_value: the starting ``m`` and ``v`` (>= 0).

  Returns:
    an ``optax.GradientTransformation`` for ``server_optimizer``.

  References:
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2); Zaheer, Reddi,
    Sachan, Kale, Kumar, "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018 (Yogi).

  Examples:
    >>> import fedjax_sim as fs
    >>> opt = fs.algorithms.fedyogi(1e-2, eps=1e-3)
  """
  _server_hyperparameters(learning_rate, eps, b1, b2, initial_accumulator_value)
  # optax.yogi(...) is this chain but takes no initial_accumulator_value (optax 0.2.8).
  return optax.chain(
      optax.scale_by_yogi(b1=b1, b2=b2, eps=eps,
                          initial_accumulator_value=initial_accumulator_value),
      optax.scale_by_learning_rate(learning_rate),
  )


def _scale_by_adagrad(eps, initial_accumulator_value) -> optax.GradientTransformation:
  """``g / (√v + τ)`` with ``v`` the running sum of ``g²`` (τ outside the root, unlike
  ``optax.scale_by_rss``'s ``g / √(v + eps)``). Its state is ``optax.ScaleByRssState``, as
  ``optax.adagrad``'s."""

  def init(params):
    return optax.ScaleByRssState(sum_of_squares=jax.tree.map(
        lambda p: jnp.full_like(p, initial_accumulator_value), params))

  def update(updates, state, params=None):
    del params
    v = jax.tree.map(lambda g, s: s + jnp.square(g), updates, state.sum_of_squares)
    scaled = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, v)
    return scaled, optax.ScaleByRssState(sum_of_squares=v)

  return optax.GradientTransformation(init, update)


def fedadagrad(
    learning_rate: float = 1e-1, eps: float = 1e-3, initial_accumulator_value: float = 0.0
) -> optax.GradientTransformation:
  """Server Adagrad of FedAdagrad (Reddi et al. 2021): τ (``eps``) 1e-3, no server momentum.

  One server step: ``v ← v + g²`` (from ``initial_accumulator_value``), then
  ``x ← x − η g / (√v + τ)``, with ``g`` the aggregated pseudo-gradient ``server − client``.
  τ is added to the square root as in the paper (``optax.adagrad`` adds its ``eps`` inside the
  root, ``g / √(v + eps)``, and gives 0 where ``v`` is 0, so it is not used). This is the
  paper's Algorithm 2 with β1 = 0 (no momentum).

  Args:
    learning_rate: server learning rate η > 0 (or an optax schedule).
    eps: τ > 0, the degree of adaptivity, added to ``√v``.
    initial_accumulator_value: the starting ``v`` (>= 0; the paper's ``v_{-1}``).

  Returns:
    an ``optax.GradientTransformation`` for ``server_optimizer``.

  References:
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).

  Examples:
    >>> import jax.numpy as jnp, fedjax_sim as fs
    >>> opt = fs.algorithms.fedadagrad(1.0, eps=1.0)
    >>> g = {"w": jnp.array([3.0])}
    >>> step, _ = opt.update(g, opt.init(g))
    >>> step["w"].tolist()  # -1 * 3 / (sqrt(9) + 1)
    [-0.75]
  """
  _server_hyperparameters(learning_rate, eps, initial_accumulator_value=initial_accumulator_value)
  return optax.chain(_scale_by_adagrad(eps, initial_accumulator_value),
                     optax.scale_by_learning_rate(learning_rate))
