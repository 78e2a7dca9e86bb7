"""Algorithms for heterogeneous clients: SCAFFOLD and FedDyn (client drift), FedNova
(heterogeneous local work), q-FFL (fairness) and Ditto (personalisation). Each is a composition
over the same engine: a one-client update, an aggregator process, server-side state through
``server_update`` and an optax server optimizer.

SCAFFOLD, FedDyn, FedNova and q-FFL send values besides the update (control variates, step
counts, curvature estimates) that bypass the aggregator, so ``Simulation`` refuses them with DP
aggregators. Ditto's personal models never leave the client; it composes with DP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import _validation as _v
from fedjax_sim import partition_views as _views
from fedjax_sim.aggregators import Process, as_process, global_norm, weighted_mean
from fedjax_sim.aggregators import mean as mean_process
from fedjax_sim.aggregators import sum as sum_process
from fedjax_sim.algorithms._base import Algorithm
from fedjax_sim.algorithms._base import check_loss as _check_loss
from fedjax_sim.algorithms._base import check_optimizer as _check_optimizer
from fedjax_sim.client import (
  client_mean_loss,
  make_local_trainer,
  proximal,
  result_metrics,
)
from fedjax_sim.types import LOSS_EVAL_SALT, PERSONAL_SALT, ClientOutput, LossFn


def _server(server_optimizer):
  opt = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  _check_optimizer("server_optimizer", opt)
  return opt


def _tree_sub(a, b):
  return jax.tree.map(jnp.subtract, a, b)


def scaffold(
    loss_fn: LossFn,
    *,
    client_learning_rate: float,
    server_optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    aggregator: Process | None = None,
    trainable: _views.TrainableSpec = None,
) -> Algorithm:
  """SCAFFOLD with option-II control variates (Karimireddy et al. 2020).

  Client i keeps a control variate ``c_i`` (in the population state, zero at start); the server
  keeps ``c`` (``ServerState.server_extra``). Each local SGD step uses the corrected gradient
  ``g(y) - c_i + c``. After K local steps the client sets
  ``c_i+ = c_i - c + (x - y) / (K η_l)`` and sends ``Δy`` (as the pseudo-gradient ``x - y``) and
  ``Δc = c_i+ - c_i``; the server applies the aggregated update with ``server_optimizer``
  (``sgd(η_g)``) and sets ``c ← c + Σ_{i ∈ S} Δc_i / N``. With both control variates at zero
  the round is FedAvg's.

  Args:
    loss_fn: the model loss.
    client_learning_rate: η_l of the clients' plain SGD (option II needs it).
    server_optimizer: default ``optax.sgd(1.0)`` (η_g = 1).
    batch_size, local_epochs, local_steps: local work, as in :func:`fedavg`.
    aggregator: default example-weighted mean (the paper averages uniformly: pass
      ``fs.aggregators.mean()`` for that).
    trainable: as in :func:`fedavg`; the control variates then cover the trainable
      parameters only.

  Returns:
    The :class:`Algorithm`.

  Returns:
    an :class:`Algorithm` whose per-client state is each client's control variate.

  References:
    Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
    for Federated Learning", ICML 2020.

  Examples:
    >>> import fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> fs.algorithms.scaffold(loss_fn, client_learning_rate=0.1, batch_size=10,
    ...                        local_epochs=1).name
    'scaffold'
  """
  _check_loss(loss_fn)
  lr = _v.positive("client_learning_rate", client_learning_rate)
  client_opt = optax.sgd(lr)
  return _views.partitioned(
      lambda loss: _scaffold(loss_fn, loss, lr, client_opt, server_optimizer, batch_size,
                             local_epochs, local_steps, aggregator), loss_fn, trainable)


def _scaffold(loss_fn, loss, lr, client_opt, server_optimizer, batch_size, local_epochs,
              local_steps, aggregator) -> Algorithm:
  train = make_local_trainer(loss, client_opt, batch_size=batch_size,
                             local_epochs=local_epochs, local_steps=local_steps)

  def client_update(broadcast, data, c_i, key):
    x, c = broadcast
    result = train(x, data, key, grad_shift=_tree_sub(c, c_i))
    delta = _tree_sub(x, result.params)
    k = result.num_steps.astype(jnp.float32)
    scale = 1.0 / (jnp.maximum(k, 1.0) * lr)
    c_new = jax.tree.map(lambda ci, cc, d: jnp.where(k > 0, ci - cc + d * scale, ci),
                         c_i, c, delta)
    return ClientOutput(delta, data.num_examples.astype(jnp.float32), result_metrics(result), c_new,
                        extra=_tree_sub(c_new, c_i))

  def server_update(delta, dc_sum, c, stats, context):
    del stats
    return delta, jax.tree.map(lambda cc, s: cc + s / context.num_clients, c, dc_sum)

  zeros = lambda params: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
  return Algorithm(
      client_update, weighted_mean() if aggregator is None else as_process(aggregator),
      _server(server_optimizer), client_state_init=zeros, name="scaffold", loss_fn=loss_fn,
      client_optimizer=client_opt, batch_size_hint=batch_size, server_extra_init=zeros,
      broadcast_fn=lambda params, c: (params, c), server_update=server_update,
      planned_steps=train.planned_steps,
  )


def fednova(
    loss_fn: LossFn,
    *,
    client_learning_rate: float,
    momentum: float = 0.0,
    server_optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    trainable: None = None,
) -> Algorithm:
  """FedNova: normalised averaging for clients that run different numbers of local steps.

  Client i with τ_i local SGD steps (momentum ρ) sends the normalised update
  ``d_i = Δ_i / a_i`` with ``a_i = τ_i`` for plain SGD and
  ``a_i = [τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)] / (1 − ρ)`` with momentum; the server applies
  ``τ_eff Σ p_i d_i`` with ``p_i = n_i / Σ n`` and ``τ_eff = Σ p_i a_i``. With equal step
  counts this is FedAvg; with unequal ones it removes FedAvg's bias toward clients that run
  more steps (objective inconsistency).

  Returns:
    an :class:`Algorithm` for :class:`fedjax_sim.Simulation`.

  References:
    Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS 2020.

  Examples:
    >>> import fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> fs.algorithms.fednova(loss_fn, client_learning_rate=0.1, batch_size=10,
    ...                       local_epochs=2).name
    'fednova'
  """
  _views.refuse("fednova", trainable)
  _check_loss(loss_fn)
  lr = _v.positive("client_learning_rate", client_learning_rate)
  rho = _v.probability("momentum", momentum)
  if rho == 1:
    raise ValueError(f"momentum must lie in [0, 1); got {momentum!r}.")
  client_opt = optax.sgd(lr, momentum=rho if rho > 0 else None)
  train = make_local_trainer(loss_fn, client_opt, batch_size=batch_size,
                             local_epochs=local_epochs, local_steps=local_steps)

  def norm_factor(tau):
    if rho == 0:
      return tau
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)

  def client_update(broadcast, data, client_state, key):
    result = train(broadcast, data, key)
    tau = result.num_steps.astype(jnp.float32)
    a = jnp.maximum(norm_factor(tau), 1e-12)
    delta = jax.tree.map(lambda b, p: (b - p) / a, broadcast, result.params)
    n = data.num_examples.astype(jnp.float32)
    extra = {"weighted_a": n * jnp.where(tau > 0, a, 0.0), "weight": n}
    return ClientOutput(delta, n, result_metrics(result), client_state, extra=extra)

  def server_update(delta, sums, server_extra, stats, context):
    del stats, context
    tau_eff = sums["weighted_a"] / jnp.maximum(sums["weight"], 1e-12)
    return jax.tree.map(lambda d: d * tau_eff, delta), server_extra

  return Algorithm(
      client_update, weighted_mean(), _server(server_optimizer), name="fednova",
      loss_fn=loss_fn, client_optimizer=client_opt, batch_size_hint=batch_size,
      server_update=server_update, planned_steps=train.planned_steps,
  )


def qffl(
    loss_fn: LossFn,
    *,
    q: float,
    client_learning_rate: float,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    loss_batch_size: int = 64,
    trainable: None = None,
) -> Algorithm:
  """q-FFL / q-FedAvg (Li et al. 2020): fair federated learning that up-weights clients with
  high loss.

  Each client computes its loss ``F_k`` at the global model (over all its data), trains locally
  with SGD at rate η (L = 1/η), and sends ``Δ_k = F_k^q · L (w − w̄_k)`` and
  ``h_k = q F_k^(q−1) ‖L (w − w̄_k)‖² + L F_k^q``; the server steps ``w ← w − Σ Δ_k / Σ h_k``.
  ``q = 0`` is FedAvg with an unweighted mean; larger q narrows the spread of client losses.

  Returns:
    an :class:`Algorithm` for :class:`fedjax_sim.Simulation`.

  References:
    Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020.

  Examples:
    >>> import fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> fs.algorithms.qffl(loss_fn, q=1.0, client_learning_rate=0.1, batch_size=10,
    ...                    local_epochs=1).name
    'qffl'
  """
  _views.refuse("qffl", trainable)
  _check_loss(loss_fn)
  lr = _v.positive("client_learning_rate", client_learning_rate)
  q = _v.non_negative("q", q)  # 0 is FedAvg
  loss_batch_size = _v.positive_int("loss_batch_size", loss_batch_size)
  lipschitz = 1.0 / lr
  client_opt = optax.sgd(lr)
  train = make_local_trainer(loss_fn, client_opt, batch_size=batch_size,
                             local_epochs=local_epochs, local_steps=local_steps)

  def client_update(broadcast, data, client_state, key):
    # Training uses the client key exactly as FedAvg does (so q = 0 reproduces FedAvg); the
    # loss evaluation (stochastic layers only) a key folded from it.
    has_data = data.num_examples > 0
    loss_key = jax.random.fold_in(key, LOSS_EVAL_SALT)
    f = jnp.maximum(client_mean_loss(loss_fn, broadcast, data, loss_batch_size, loss_key), 1e-10)
    result = train(broadcast, data, key)
    dw = jax.tree.map(lambda b, p: lipschitz * (b - p), broadcast, result.params)
    fq = f**q
    h = (q * f ** (q - 1) * jnp.square(global_norm(dw)) if q > 0 else 0.0) + lipschitz * fq
    delta = jax.tree.map(lambda d: jnp.where(has_data, fq * d, 0.0), dw)
    metrics = result_metrics(result)
    metrics["loss_at_global"] = f
    return ClientOutput(delta, data.num_examples.astype(jnp.float32), metrics, client_state,
                        extra=jnp.where(has_data, h, 0.0))

  def server_update(delta_sum, h_sum, server_extra, stats, context):
    del stats, context
    return jax.tree.map(lambda d: d / jnp.maximum(h_sum, 1e-12), delta_sum), server_extra

  return Algorithm(
      client_update, sum_process(), optax.sgd(1.0), name="qffl", loss_fn=loss_fn,
      client_optimizer=client_opt, batch_size_hint=batch_size, server_update=server_update,
      planned_steps=train.planned_steps,
  )


def ditto(
    loss_fn: LossFn,
    *,
    lam: float,
    client_optimizer: optax.GradientTransformation,
    personal_optimizer: optax.GradientTransformation | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    personal_epochs: int | None = None,
    personal_steps: int | None = None,
    aggregator: Process | None = None,
    trainable: _views.TrainableSpec = None,
) -> Algorithm:
  """Ditto: a global model trained by FedAvg plus one personal model per client.

  Each selected client (i) trains the global model from the broadcast exactly as FedAvg and
  sends the update, and (ii) trains its personal model ``v_k`` (kept in the population state,
  initialised to the initial global model) on ``F_k(v) + λ/2 ‖v − w‖²`` with ``w`` the broadcast
  global model. λ → ∞ pins the personal models to the global one; λ = 0 gives purely local
  models. Evaluate the personal models with
  ``fs.evaluation.evaluate_clients(..., client_params=state.client_states)``.

  Args:
    lam: λ >= 0.
    client_optimizer: optimizer of the global-model local training.
    personal_optimizer: optimizer of the personal model (default: ``client_optimizer``).
    personal_epochs / personal_steps: the personal model's local work (default: the same as
      the global model's).
    trainable: as in :func:`fedavg`: personal *heads*. Only the trainable parameters are
      trained, sent and personalised; ``state.client_states`` holds each client's trainable
      part, and a client's personal model is that part merged with the shared frozen
      backbone (``fs.peft.merge_views(personal, frozen)``).

  Returns:
    The :class:`Algorithm`.

  Returns:
    an :class:`Algorithm` whose per-client state is each client's personal model.

  References:
    Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021.

  Examples:
    >>> import optax, fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> fs.algorithms.ditto(loss_fn, lam=0.1, client_optimizer=optax.sgd(0.1), batch_size=10,
    ...                     local_epochs=1).name
    'ditto'
  """
  _check_loss(loss_fn)
  _check_optimizer("client_optimizer", client_optimizer)
  personal_optimizer = client_optimizer if personal_optimizer is None else personal_optimizer
  _check_optimizer("personal_optimizer", personal_optimizer)
  lam_value = _v.non_negative("lam", lam)
  if personal_epochs is None and personal_steps is None:
    personal_epochs, personal_steps = local_epochs, local_steps
  return _views.partitioned(
      lambda loss: _ditto(loss_fn, loss, lam_value, client_optimizer, personal_optimizer,
                          server_optimizer, batch_size, local_epochs, local_steps,
                          personal_epochs, personal_steps, aggregator), loss_fn, trainable)


def _ditto(loss_fn, loss, lam_value, client_optimizer, personal_optimizer, server_optimizer,
           batch_size, local_epochs, local_steps, personal_epochs, personal_steps,
           aggregator) -> Algorithm:
  global_train = make_local_trainer(loss, client_optimizer, batch_size=batch_size,
                                    local_epochs=local_epochs, local_steps=local_steps)

  personal_train = make_local_trainer(loss, personal_optimizer, batch_size=batch_size,
                                      local_epochs=personal_epochs, local_steps=personal_steps,
                                      regularizer=proximal(lam_value))

  def client_update(broadcast, data, personal, key):
    result = global_train(broadcast, data, key)  # the client key, as in FedAvg
    mine = personal_train(personal, data, jax.random.fold_in(key, PERSONAL_SALT), anchor=broadcast)
    metrics = result_metrics(result)
    metrics["personal_loss"] = mine.metrics["loss"]
    delta = _tree_sub(broadcast, result.params)
    return ClientOutput(delta, data.num_examples.astype(jnp.float32), metrics, mine.params)

  return Algorithm(
      client_update, weighted_mean() if aggregator is None else as_process(aggregator),
      _server(server_optimizer), client_state_init=lambda params: params, name="ditto",
      loss_fn=loss_fn, client_optimizer=client_optimizer,
      batch_size_hint=batch_size, planned_steps=lambda *a, **k: (  # both local loops run
          global_train.planned_steps(*a, **k) + personal_train.planned_steps(*a, **k)),
  )


def feddyn(
    loss_fn: LossFn,
    *,
    alpha: float,
    client_optimizer: optax.GradientTransformation,
    batch_size: int | None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    trainable: None = None,
) -> Algorithm:
  """FedDyn: federated learning with dynamic regularisation (Acar et al. 2021).

  Client k keeps a gradient state ``g_k`` (population state, zero at start) and minimises
  ``L_k(θ) − ⟨g_k, θ⟩ + α/2 ‖θ − θ^{t−1}‖²``; then ``g_k ← g_k − α (θ_k − θ^{t−1})``. The server
  keeps ``h`` (``ServerState.server_extra``): ``h ← h − α/N Σ_{k∈P} (θ_k − θ^{t−1})`` and
  ``θ^t = mean_{k∈P} θ_k − h / α`` (the server optimizer is ``sgd(1.0)`` on the implied
  pseudo-gradient; the mean is unweighted, as in the paper).

  Returns:
    an :class:`Algorithm` whose per-client state is each client's gradient correction
      and whose server state carries the running correction ``h``.

  References:
    Acar, Zhao, Navarro, Mattina, Whatmough, Saligrama, "Federated Learning Based on Dynamic
    Regularization", ICLR 2021.

  Examples:
    >>> import optax, fedjax_sim as fs
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p)
    >>> fs.algorithms.feddyn(loss_fn, alpha=0.01, client_optimizer=optax.sgd(0.1),
    ...                      batch_size=10, local_epochs=1).name
    'feddyn'
  """
  _views.refuse("feddyn", trainable)
  _check_loss(loss_fn)
  _check_optimizer("client_optimizer", client_optimizer)
  a = _v.positive("alpha", alpha)

  train = make_local_trainer(loss_fn, client_optimizer, batch_size=batch_size,
                             local_epochs=local_epochs, local_steps=local_steps,
                             regularizer=proximal(a))

  def client_update(broadcast, data, g_k, key):
    # The linear term −⟨g_k, θ⟩ adds −g_k to every gradient.
    result = train(broadcast, data, key, grad_shift=jax.tree.map(jnp.negative, g_k))
    delta = _tree_sub(broadcast, result.params)  # θ^{t−1} − θ_k
    g_new = jax.tree.map(lambda g, d: g + a * d, g_k, delta)
    return ClientOutput(delta, data.num_examples.astype(jnp.float32), result_metrics(result), g_new,
                        extra=delta)

  def server_update(mean_delta, delta_sum, h, stats, context):
    del stats
    h_new = jax.tree.map(lambda hh, s: hh + a * s / context.num_clients, h, delta_sum)
    return jax.tree.map(lambda d, hh: d + hh / a, mean_delta, h_new), h_new

  zeros = lambda params: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
  return Algorithm(
      client_update, mean_process(), optax.sgd(1.0), client_state_init=zeros, name="feddyn",
      loss_fn=loss_fn, client_optimizer=client_optimizer, batch_size_hint=batch_size,
      server_extra_init=zeros, server_update=server_update, planned_steps=train.planned_steps,
  )
