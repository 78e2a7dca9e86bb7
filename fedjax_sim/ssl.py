"""Federated self-supervised learning: FedAlignUniform and SSD (soft separation + distillation).

Every client trains an encoder ``f`` and a projector ``g`` on two augmented views of its own
unlabelled data; FedAvg averages both. The base, **FedAlignUniform**, minimises the alignment and
uniformity losses of Wang & Isola (2020) on the unit-normalised projections ``ẑ = g(f(x)) / ‖·‖``.
**SSD** adds (i) dimension-scaled regularisation (DSR): client ``k`` pulls its projections toward
``normalize(ẑ Q diag(s_k) Qᵀ)`` (stop-gradient), where ``Q`` is one random orthonormal basis
shared by all clients and ``s_k`` scales a block of ``dim // num_clients`` basis directions of its
own by ``alpha`` (blocks are disjoint across clients), and (ii) projector distillation (PD): a
KL divergence at temperature ``T`` between the softmax of the projector output and of the
encoder output, so that DSR's effect reaches the representation. Total client loss:

    L = L_align + β L_unif + γ L_DSR + δ L_PD      (β = 1, γ = 1, δ = 0.1, α = 10, T = 0.5)

The defaults follow the official code (hc-fang/ssd), including where it differs from the paper:
DSR is a Frobenius norm (not squared) divided by the batch size, on renormalised targets; PD is
``KL(σ(z/T) ‖ σ(h/T))`` on the raw outputs without stop-gradient; every term except alignment is
averaged over the two views. ``dsr_mode="paper"`` and ``pd_direction="paper"`` give the paper's
forms. Client augmentation runs in-jit, keyed per client and local step by the engine.

Cross-silo (every client every round) and cross-device (sampled clients) are the same algorithm
under ``Simulation(..., cohort_size=num_clients)`` or a smaller cohort.

References:
  Wang, Isola, "Understanding Contrastive Representation Learning through Alignment and
  Uniformity on the Hypersphere", ICML 2020. Fang, Lin, King, Zhang, "Soft Separation and
  Distillation: Toward Global Uniformity in Federated Unsupervised Learning", ICCV 2025
  (arXiv:2508.01251).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import _validation as _v
from fedjax_sim.aggregators import as_process, weighted_mean
from fedjax_sim.algorithms import Algorithm, fedavg
from fedjax_sim.algorithms import check_optimizer as _check_optimizer
from fedjax_sim.client import ClientData, make_local_trainer, result_metrics
from fedjax_sim.data.population import Population
from fedjax_sim.models import masked_mean
from fedjax_sim.types import MASK_KEY, ClientOutput

#: Feature holding every example's client index (see :func:`with_client_ids`); SSD reads it to
#: pick the client's DSR block.
CLIENT_ID_KEY = "client_id"

# -- losses (per batch, masked) ------------------------------------------------------------------


def normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (``torch.nn.functional.normalize`` semantics, gradient
  included: a zero row maps to zero with a zero gradient, not NaN).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> g = jax.grad(lambda z: normalize(z).sum())(jnp.zeros((1, 3)))
    >>> bool(jnp.all(jnp.isfinite(g)))
    True
  """
  sq = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
  return z * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _mask(z, mask):
  return jnp.ones(z.shape[0], z.dtype) if mask is None else mask.astype(z.dtype)


def alignment_loss(z1: jax.Array, z2: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """``E ‖ẑ1 − ẑ2‖²`` over the real rows (α = 2 of Wang & Isola); inputs are normalised here.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(alignment_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 2.0]])))
    2.0
  """
  m = _mask(z1, mask)
  d = jnp.sum(jnp.square(normalize(z1) - normalize(z2)), -1)
  return masked_mean(d, m)


def uniformity_loss(z: jax.Array, mask: jax.Array | None = None, t: float = 2.0) -> jax.Array:
  """``log E_{i<j} exp(−t ‖ẑ_i − ẑ_j‖²)`` over pairs of real rows (0.0 with fewer than two).

  Lower is more uniform; ``−uniformity_loss`` is the reported uniformity (at most ``≈ 4`` for
  t = 2).

  Examples:
    >>> import jax.numpy as jnp
    >>> round(float(uniformity_loss(jnp.array([[1.0, 0.0], [-1.0, 0.0]]))), 3)
    -8.0
  """
  m = _mask(z, mask)
  zn = normalize(z)
  d2 = jnp.maximum(2.0 - 2.0 * zn @ zn.T, 0.0)
  n = z.shape[0]
  pairs = (jnp.arange(n)[:, None] < jnp.arange(n)[None, :]) & (m[:, None] * m[None, :] > 0)
  count = jnp.sum(pairs)
  lse = jax.nn.logsumexp(jnp.where(pairs, -t * d2, -jnp.inf))
  return jnp.where(count > 0, lse - jnp.log(jnp.maximum(count, 1).astype(z.dtype)), 0.0)


class DSRBasis(NamedTuple):
  """The shared DSR geometry: ``q`` an orthonormal ``[dim, dim]`` basis (columns) and
  ``scales[b]`` the per-direction factors of block ``b`` (``alpha`` on its directions, 1 else)."""

  q: jax.Array
  scales: jax.Array


def dsr_basis(dim: int, num_blocks: int, *, alpha: float = 10.0, seed: int = 0) -> DSRBasis:
  """One random orthonormal basis (QR of a Gaussian) and ``num_blocks`` disjoint blocks of
  ``dim // num_blocks`` randomly permuted directions, each scaled by ``alpha`` (drawn once, on
  the host, before round 0, as the official code does).

  Examples:
    >>> b = dsr_basis(8, 3, alpha=10.0)
    >>> b.q.shape, b.scales.shape, (np.asarray(b.scales) == 10).sum(1).tolist()
    ((8, 8), (3, 8), [2, 2, 2])
  """
  _v.positive_int("dim", dim)
  _v.positive_int("num_blocks (the number of clients)", num_blocks)
  alpha = _v.positive("alpha", alpha)
  size = dim // num_blocks
  if size == 0:
    raise ValueError(
        f"DSR needs disjoint blocks of dim // num_clients directions, but dim={dim} < "
        f"num_clients={num_blocks} leaves 0 per client; use a projector of dim >= {num_blocks} "
        "or fewer clients.")
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
  q = q * np.sign(np.diag(r))[None, :]
  perm = rng.permutation(dim)
  scales = np.ones((num_blocks, dim))
  scales[np.repeat(np.arange(num_blocks), size), perm[:num_blocks * size]] = alpha
  return DSRBasis(jnp.asarray(q, jnp.float32), jnp.asarray(scales, jnp.float32))


def dsr_target(z: jax.Array, q: jax.Array, scale: jax.Array, *, renormalize: bool = True):
  """``ẑ Q diag(scale) Qᵀ`` (renormalised to the sphere by default), without gradient."""
  t = ((normalize(z) @ q) * scale) @ q.T
  return jax.lax.stop_gradient(normalize(t) if renormalize else t)


def dsr_loss(z: jax.Array, q: jax.Array, scale: jax.Array, mask: jax.Array | None = None, *,
             mode: str = "code") -> jax.Array:
  """Dimension-scaled regularisation of one view.

  ``mode="code"`` (official code): ``‖Ẑ − T‖_F / B`` with ``T`` the renormalised target.
  ``mode="paper"``: ``E ‖ẑ − sg(ẑ Q diag(s) Qᵀ)‖²`` (squared, no renormalisation; with
  ``Q = I`` this is the paper's ``E ‖z − sg(z ⊙ d_k)‖²`` on the sphere).
  """
  m = _mask(z, mask)
  count = jnp.maximum(m.sum(), 1.0)
  if mode == "code":
    sq = jnp.sum(jnp.sum(jnp.square(normalize(z) - dsr_target(z, q, scale)), -1) * m)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0) / count
  if mode == "paper":
    d = jnp.sum(jnp.square(normalize(z) - dsr_target(z, q, scale, renormalize=False)), -1)
    return masked_mean(d, m)
  raise ValueError(f"dsr mode must be 'code' or 'paper'; got {mode!r}.")


def distillation_loss(h: jax.Array, z: jax.Array, mask: jax.Array | None = None, *,
                      temperature: float = 0.5, direction: str = "code",
                      method: str = "kl") -> jax.Array:
  """Projector distillation between encoder output ``h`` and projector output ``z`` (raw).

  ``direction="code"``: ``KL(σ(z/T) ‖ σ(h/T))`` (what ``kl_div(log_softmax(h/T),
  softmax(z/T))`` computes); ``"paper"``: ``KL(σ(h/T) ‖ σ(z/T))``. Batch mean over real rows,
  no stop-gradient. ``method="mse"``: mean squared difference per element instead.
  """
  if h.shape[-1] != z.shape[-1]:
    raise ValueError(
        f"projector distillation needs equal encoder and projector dims; got h dim "
        f"{h.shape[-1]} and z dim {z.shape[-1]}. Give the projector output dim {h.shape[-1]} "
        "or set delta=0 (no PD).")
  m = _mask(z, mask)
  if method == "mse":
    per = jnp.mean(jnp.square(h - z), -1)
  elif method == "kl":
    lh, lz = jax.nn.log_softmax(h / temperature, -1), jax.nn.log_softmax(z / temperature, -1)
    if direction == "code":
      per = jnp.sum(jnp.exp(lz) * (lz - lh), -1)
    elif direction == "paper":
      per = jnp.sum(jnp.exp(lh) * (lh - lz), -1)
    else:
      raise ValueError(f"direction must be 'code' or 'paper'; got {direction!r}.")
  else:
    raise ValueError(f"method must be 'kl' or 'mse'; got {method!r}.")
  return masked_mean(per, m)


# -- augmentation (in-jit) -----------------------------------------------------------------------


def image_augment(image_shape: Sequence[int], *, pad: int = 1, flip_prob: float = 0.5,
                  noise_std: float = 0.1) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns ``augment(key, x) -> x'`` for a batch of small images, traced into the client step.

  Per example: a random crop of the image zero-padded by ``pad`` pixels (a shift of up to
  ``pad`` pixels), a horizontal flip with probability ``flip_prob``, and additive Gaussian noise
  of std ``noise_std``. ``x`` is ``[B, *image_shape]`` or flattened ``[B, prod(image_shape)]``
  (``image_shape`` = ``(H, W)`` or ``(H, W, C)``); the output has the input's shape.

  Returns:
    ``augment(key, x) -> x'`` (same shape and dtype).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> aug = image_augment((8, 8))
    >>> aug(jax.random.key(0), jnp.ones((4, 64))).shape
    (4, 64)
  """
  shape = tuple(int(s) for s in image_shape)
  if len(shape) not in (2, 3) or min(shape) < 1:
    raise ValueError(f"image_shape must be (H, W) or (H, W, C); got {image_shape!r}.")
  if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
    raise ValueError(f"pad must be an int >= 0; got {pad!r}.")
  flip_prob = _v.probability("flip_prob", flip_prob)
  noise_std = _v.non_negative("noise_std", noise_std)
  widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (len(shape) - 2)
  h, w = shape[:2]

  def pick(candidates, index):
    # Select candidates[index[b]] per example with static slices and selects (no gather).
    out = candidates[0]
    for a in range(1, len(candidates)):
      sel = (index == a).reshape((-1,) + (1,) * (out.ndim - 1))
      out = jnp.where(sel, candidates[a], out)
    return out

  def augment(key, x):
    flat = x.shape[1:] != shape
    imgs = x.reshape((x.shape[0], *shape)).astype(jnp.float32)
    b = imgs.shape[0]
    k_row, k_col, k_flip, k_noise = jax.random.split(key, 4)
    padded = jnp.pad(imgs, widths)
    rows = pick([padded[:, a:a + h] for a in range(2 * pad + 1)],
                jax.random.randint(k_row, (b,), 0, 2 * pad + 1))
    out = pick([rows[:, :, a:a + w] for a in range(2 * pad + 1)],
               jax.random.randint(k_col, (b,), 0, 2 * pad + 1))
    flip = (jax.random.uniform(k_flip, (b,)) < flip_prob).reshape((b,) + (1,) * len(shape))
    out = jnp.where(flip, out[:, :, ::-1], out)
    if noise_std > 0:
      out = out + noise_std * jax.random.normal(k_noise, out.shape, out.dtype)
    return out.reshape(x.shape) if flat else out

  return augment


# -- a plain MLP for encoders / projectors --------------------------------------------------------


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
  """He-initialised dense layers ``sizes[0] → … → sizes[-1]`` (a list of ``{"w", "b"}``)."""
  if len(sizes) < 2:
    raise ValueError(f"sizes needs an input and an output size; got {sizes!r}.")
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params, x: jax.Array) -> jax.Array:
  """ReLU between layers, linear output; ``x`` is flattened per example."""
  h = x.reshape(x.shape[0], -1).astype(jnp.float32)
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return h


# -- the client loss and the algorithms ----------------------------------------------------------


class SSDConfig(NamedTuple):
  """Loss weights and variants (floats are traced, so a sweep is a vmap)."""

  beta: float = 1.0
  gamma: float = 1.0
  delta: float = 0.1
  temperature: float = 0.5
  t: float = 2.0
  dsr_mode: str = "code"
  pd_direction: str = "code"
  pd_method: str = "kl"


def _views(params, batch, key, encoder_apply, projector_apply, augment, feature_key):
  x = batch[feature_key]
  k1, k2 = jax.random.split(key)
  x1, x2 = (x, x) if augment is None else (augment(k1, x), augment(k2, x))
  h1, h2 = encoder_apply(params["encoder"], x1), encoder_apply(params["encoder"], x2)
  return (h1, h2), (projector_apply(params["projector"], h1),
                    projector_apply(params["projector"], h2))


def _check_params(params):
  if not (isinstance(params, dict) and set(params) == {"encoder", "projector"}):
    raise ValueError("self-supervised params must be a dict {'encoder': ..., 'projector': ...}; "
                     f"got {type(params).__name__} with keys "
                     f"{sorted(params) if isinstance(params, dict) else None}.")


def align_uniform_loss(encoder_apply, projector_apply, *, augment=None, beta: float = 1.0,
                       t: float = 2.0, feature_key: str = "x"):
  """The FedAlignUniform client loss ``L_align + β L_unif`` as a ``loss_fn(params, batch, key)``.

  ``params = {"encoder": ..., "projector": ...}``; the two views are ``augment(k1, x)`` and
  ``augment(k2, x)`` with ``k1, k2 = split(key)`` (the engine's per-client, per-step key).
  Aux metrics: ``align`` and ``unif`` (``L_unif``, averaged over the two views).
  """
  beta, t = _v.non_negative("beta", beta), _v.positive("t", t)

  def loss_fn(params, batch, key):
    _check_params(params)
    m = batch[MASK_KEY]
    _, (z1, z2) = _views(params, batch, key, encoder_apply, projector_apply, augment, feature_key)
    align = alignment_loss(z1, z2, m)
    unif = 0.5 * (uniformity_loss(z1, m, t) + uniformity_loss(z2, m, t))
    return align + beta * unif, {"align": align, "unif": unif}

  return loss_fn


def ssd_loss(encoder_apply, projector_apply, basis: DSRBasis, *, config: SSDConfig | None = None,
             augment=None, feature_key: str = "x"):
  """The SSD client loss as ``loss_fn(params, batch, key, block)``; ``block`` is the client's DSR
  block index (traced). Aux metrics: ``align``, ``unif``, ``dsr``, ``pd``."""
  config = SSDConfig() if config is None else config
  beta, gamma, delta = (jnp.float32(config.beta), jnp.float32(config.gamma),
                        jnp.float32(config.delta))

  def loss_fn(params, batch, key, block):
    _check_params(params)
    m = batch[MASK_KEY]
    (h1, h2), (z1, z2) = _views(params, batch, key, encoder_apply, projector_apply, augment,
                                feature_key)
    if z1.shape[-1] != basis.q.shape[0]:
      raise ValueError(f"the projector outputs dim {z1.shape[-1]} but the DSR basis was built "
                       f"for dim={basis.q.shape[0]}; pass dim={z1.shape[-1]}.")
    if config.delta != 0 and h1.shape[-1] != z1.shape[-1]:
      raise ValueError(
          f"projector distillation (delta={config.delta}) needs the encoder output dim "
          f"({h1.shape[-1]}) to equal the projector output dim ({z1.shape[-1]}); make them "
          "equal or pass delta=0.")
    align = alignment_loss(z1, z2, m)
    unif = 0.5 * (uniformity_loss(z1, m, config.t) + uniformity_loss(z2, m, config.t))
    total = align + beta * unif
    # A term whose weight is exactly 0 is left out of the program (not multiplied by 0), so SSD
    # with gamma = delta = 0 runs the same computation as FedAlignUniform, bit for bit.
    dsr = pd = jnp.zeros((), jnp.float32)
    if config.gamma != 0:
      scale = basis.scales[block]
      dsr = 0.5 * (dsr_loss(z1, basis.q, scale, m, mode=config.dsr_mode)
                   + dsr_loss(z2, basis.q, scale, m, mode=config.dsr_mode))
      total = total + gamma * dsr
    if config.delta != 0:
      kw = dict(temperature=config.temperature, direction=config.pd_direction,
                method=config.pd_method)
      pd = 0.5 * (distillation_loss(h1, z1, m, **kw) + distillation_loss(h2, z2, m, **kw))
      total = total + delta * pd
    return total, {"align": align, "unif": unif, "dsr": dsr, "pd": pd}

  return loss_fn


def with_client_ids(population: Population, key: str = CLIENT_ID_KEY) -> Population:
  """The population with an int32 feature ``key`` holding every example's client index.

  Examples:
    >>> import numpy as np, fedjax_sim as fs
    >>> pop = fs.Population.from_arrays({"x": np.zeros((3, 2), np.float32)}, np.array([1, 0, 1]))
    >>> with_client_ids(pop).features["client_id"].tolist()
    [0, 1, 1]
  """
  ids = np.repeat(np.arange(population.num_clients, dtype=np.int32),
                  np.asarray(population.num_examples))
  features = dict(population.features, **{key: jnp.asarray(ids)})
  return Population(features, population.offsets, population.num_examples,
                    population.max_examples, population.labels)


def fed_align_uniform(
    encoder_apply, projector_apply, *, client_optimizer: optax.GradientTransformation,
    batch_size: int, local_epochs: int | None = None, local_steps: int | None = None,
    augment=None, beta: float = 1.0, t: float = 2.0, feature_key: str = "x",
    server_optimizer: optax.GradientTransformation | None = None, aggregator=None,
) -> Algorithm:
  """FedAlignUniform: FedAvg of encoder + projector, each client minimising
  ``L_align + β L_unif`` on two augmented views (the base of SSD).

  Returns:
    an :class:`~fedjax_sim.Algorithm` whose params are
      ``{"encoder": ..., "projector": ...}``.

  References:
    Wang, Isola, ICML 2020 (losses); Fang et al., ICCV 2025 (the federated base).

  Examples:
    >>> import optax, fedjax_sim as fs
    >>> algo = fs.ssl.fed_align_uniform(fs.ssl.mlp_apply, fs.ssl.mlp_apply,
    ...     client_optimizer=optax.sgd(0.1), batch_size=32, local_epochs=1)
    >>> algo.name
    'fedalignuniform'
  """
  loss_fn = align_uniform_loss(encoder_apply, projector_apply, augment=augment, beta=beta, t=t,
                               feature_key=feature_key)
  algo = fedavg(loss_fn, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                batch_size=batch_size, local_epochs=local_epochs, local_steps=local_steps,
                aggregator=aggregator)
  return algo._replace(name="fedalignuniform")


def ssd(
    encoder_apply, projector_apply, *, dim: int, num_clients: int,
    client_optimizer: optax.GradientTransformation, batch_size: int,
    local_epochs: int | None = None, local_steps: int | None = None, augment=None,
    beta: float = 1.0, gamma: float = 1.0, delta: float = 0.1, alpha: float = 10.0,
    temperature: float = 0.5, t: float = 2.0, dsr_mode: str = "code", pd_direction: str = "code",
    pd_method: str = "kl", dsr_assign: str = "client", num_slots: int | None = None,
    seed: int = 0, feature_key: str = "x", client_id_key: str = CLIENT_ID_KEY,
    server_optimizer: optax.GradientTransformation | None = None, aggregator=None,
) -> Algorithm:
  """SSD: FedAlignUniform + dimension-scaled regularisation (γ) + projector distillation (δ).

  The population needs a client-index feature (:func:`with_client_ids`). Client ``k`` uses DSR
  block ``k`` (``dsr_assign="client"``, the paper's fixed ``d_k``). ``dsr_assign="slot"``
  reproduces the official code's assignment, in which a client's block is its position in the
  round's sampled list: only blocks ``0 .. num_slots-1`` are used (``num_slots`` = clients per
  round) and they move between clients every round. With ``num_slots == num_clients``
  (cross-silo) a client keeps block ``k`` as in the code; otherwise each round a random
  permutation ``π_r`` of the clients (shared, seeded by ``seed``) gives client ``k`` the block
  ``π_r(k) mod num_slots`` — the code's per-round reshuffle, except that two sampled clients may
  share a block (a client update does not see the rest of its cohort).

  With ``gamma = delta = 0`` SSD trains exactly as :func:`fed_align_uniform`.

  Args:
    encoder_apply: ``f(params["encoder"], x) -> h [B, dh]``.
    projector_apply: ``g(params["projector"], h) -> z [B, dim]``.
    dim: projector output dimension (the DSR basis size).
    num_clients: population size K; DSR blocks hold ``dim // K`` directions (must be >= 1).
    client_optimizer, batch_size, local_epochs, local_steps: local training (as FedAvg).
    augment: ``augment(key, x)`` (e.g. :func:`image_augment`); None: identical views.
    beta, gamma, delta: weights of uniformity, DSR and PD.
    alpha: DSR scaling factor on a client's block.
    temperature: PD temperature T.
    t: uniformity temperature.
    dsr_mode, pd_direction, pd_method: ``"code"`` (official code) or ``"paper"`` forms; PD
      ``"kl"`` or ``"mse"``.
    dsr_assign: ``"client"`` or ``"slot"``; num_slots: clients per round for ``"slot"``.
    seed: seed of the DSR basis (and of the slot permutations).

  Returns:
    an :class:`~fedjax_sim.Algorithm` whose params are ``{"encoder": ..., "projector": ...}``.

  References:
    Fang, Lin, King, Zhang, "Soft Separation and Distillation: Toward Global Uniformity in
    Federated Unsupervised Learning", ICCV 2025 (arXiv:2508.01251).

  Examples:
    >>> import optax, fedjax_sim as fs
    >>> algo = fs.ssl.ssd(fs.ssl.mlp_apply, fs.ssl.mlp_apply, dim=16, num_clients=4,
    ...                   client_optimizer=optax.sgd(0.1), batch_size=32, local_epochs=1)
    >>> algo.name
    'ssd'
  """
  _v.positive_int("num_clients", num_clients)
  basis = dsr_basis(dim, num_clients, alpha=alpha, seed=seed)
  config = SSDConfig(_v.non_negative("beta", beta), _v.non_negative("gamma", gamma),
                     _v.non_negative("delta", delta), _v.positive("temperature", temperature),
                     _v.positive("t", t), dsr_mode, pd_direction, pd_method)
  if dsr_mode not in ("code", "paper"):
    raise ValueError(f"dsr_mode must be 'code' or 'paper'; got {dsr_mode!r}.")
  if pd_direction not in ("code", "paper") or pd_method not in ("kl", "mse"):
    raise ValueError(f"pd_direction must be 'code' or 'paper' and pd_method 'kl' or 'mse'; got "
                     f"{pd_direction!r}, {pd_method!r}.")
  if dsr_assign not in ("client", "slot"):
    raise ValueError(f"dsr_assign must be 'client' or 'slot'; got {dsr_assign!r}.")
  if dsr_assign == "slot":
    _v.positive_int("num_slots (clients per round, for dsr_assign='slot')", num_slots)
    if num_slots > num_clients:
      raise ValueError(f"num_slots ({num_slots}) must be <= num_clients ({num_clients}).")
  _check_optimizer("client_optimizer", client_optimizer)
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  _check_optimizer("server_optimizer", server_optimizer)
  process = weighted_mean() if aggregator is None else as_process(aggregator)
  loss4 = ssd_loss(encoder_apply, projector_apply, basis, config=config, augment=augment,
                   feature_key=feature_key)
  slot_mode = dsr_assign == "slot" and num_slots != num_clients
  perm_key = jax.random.key(seed)

  def block_of(batch):
    if client_id_key not in batch:
      raise ValueError(f"ssd reads each client's index from feature {client_id_key!r}; build "
                       "the population with fs.ssl.with_client_ids(population).")
    return batch[client_id_key][0]

  def loss3(params, batch, key):  # the client-id form (validation, dsr_assign="client")
    return loss4(params, batch, key, block_of(batch))

  def check_population(params, population):
    del params
    if client_id_key not in population.features:
      raise ValueError(f"ssd reads each client's index from feature {client_id_key!r}; build "
                       "the population with fs.ssl.with_client_ids(population).")
    if population.num_clients > num_clients:
      raise ValueError(f"the population has {population.num_clients} clients but ssd was built "
                       f"with num_clients={num_clients} DSR blocks; pass "
                       f"num_clients={population.num_clients}.")

  loss3.check_population = check_population

  # Built once here only to validate batch_size / local_epochs / local_steps before compiling;
  # each client builds its own with its DSR block below.
  make_local_trainer(loss3, client_optimizer, batch_size=batch_size, local_epochs=local_epochs,
                     local_steps=local_steps)

  def client_update(broadcast, data: ClientData, client_state, key):
    params, rnd = (broadcast, None) if not slot_mode else broadcast
    cid = data.features[client_id_key][data.offset]
    if slot_mode:
      block = slot_blocks(perm_key, rnd, num_clients, num_slots)[cid]
    else:
      block = cid
    train = make_local_trainer(lambda p, b, k: loss4(p, b, k, block), client_optimizer,
                               batch_size=batch_size, local_epochs=local_epochs,
                               local_steps=local_steps)
    result = train(params, data, key)
    delta_ = jax.tree.map(lambda b, p: b - p, params, result.params)
    return ClientOutput(delta_, data.num_examples.astype(jnp.float32), result_metrics(result),
                        client_state)

  extra: dict[str, Any] = {}
  if slot_mode:
    extra = dict(server_extra_init=lambda params: jnp.zeros((), jnp.int32),
                 broadcast_fn=lambda params, rnd: (params, rnd),
                 server_update=lambda d, s, rnd, stats, ctx: (d, rnd + 1))
  return Algorithm(client_update, process, server_optimizer, None, "ssd", loss3, client_optimizer,
                   batch_size, **extra)


def slot_blocks(key: jax.Array, round_index, num_clients: int, num_slots: int) -> jax.Array:
  """DSR block of every client in round ``round_index`` under ``dsr_assign="slot"``:
  ``π_r(k) mod num_slots`` for a random permutation ``π_r`` drawn from ``fold_in(key, r)``."""
  perm = jax.random.permutation(jax.random.fold_in(key, round_index), num_clients)
  return perm % num_slots


# -- evaluation ----------------------------------------------------------------------------------


def embed(apply_fn, params, x, *, batch_size: int = 1024) -> np.ndarray:
  """``apply_fn(params, x)`` over ``x`` in batches, as a NumPy array (host-side evaluation)."""
  fn = jax.jit(apply_fn)
  x = np.asarray(x)
  return np.concatenate([np.asarray(fn(params, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, len(x), batch_size)])


def _gauss_kernel(f, t):
  f = np.asarray(f, np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  return np.exp(-t * np.maximum(2.0 - 2.0 * f @ f.T, 0.0))


def _check_pairs(features) -> None:
  if np.ndim(features) != 2 or np.shape(features)[0] < 2:
    raise ValueError(
        "uniformity needs a 2-D feature matrix with at least 2 rows (it averages over pairs); "
        f"got shape {np.shape(features)}."
    )


def uniformity(features, t: float = 2.0) -> float:
  """``−L_unif = −log mean_{i<j} exp(−t ‖f̂_i − f̂_j‖²)`` on L2-normalised rows (higher is more
  uniform).

  Examples:
    >>> round(uniformity(np.eye(3)), 3)
    4.0
  """
  _check_pairs(features)
  g = _gauss_kernel(features, t)
  iu = np.triu_indices(len(g), 1)
  return float(-np.log(np.mean(g[iu])))


def uniformity_decomposition(features, client_ids, t: float = 2.0) -> dict[str, float]:
  """Global uniformity of the pooled features and its intra/inter-client decomposition.

  With ``G`` the Gaussian kernel over all ordered pairs ``a ≠ b`` of the ``n`` pooled examples,
  ``mean G = intra + inter`` exactly, where ``intra = Σ_k Σ_{a≠b ∈ k} G_ab / (n(n−1))``
  (≈ ``Σ_k π_k² E_kk``) and ``inter = Σ_{k≠l} Σ_{a∈k, b∈l} G_ab / (n(n−1))``
  (≈ ``Σ_{k≠l} π_k π_l E_kl``).

  Returns:
    ``global`` (−log of the pooled mean), ``local`` (example-weighted mean over clients of each
    client's own −L_unif; clients with < 2 examples skipped), ``inter_client`` (−log of the mean
    kernel over cross-client pairs), and the two summands ``intra`` and ``inter``.
  """
  _check_pairs(features)
  ids = np.asarray(client_ids)
  if ids.shape != (np.shape(features)[0],):
    raise ValueError(f"client_ids must hold one id per feature row ({np.shape(features)[0]}); "
                     f"got shape {ids.shape}.")
  g = _gauss_kernel(features, t)
  n = len(g)
  np.fill_diagonal(g, 0.0)
  same = ids[:, None] == ids[None, :]
  total = n * (n - 1)
  intra, inter = g[same].sum() / total, g[~same].sum() / total
  _, dense = np.unique(ids, return_inverse=True)
  onehot = np.eye(dense.max() + 1)[dense]
  counts = onehot.sum(0)
  block_sums = np.einsum("ak,ab,bk->k", onehot, g, onehot)  # each client's own pairs
  ok = counts > 1
  local = -np.log(block_sums[ok] / (counts[ok] * (counts[ok] - 1)))
  cross = (~same).sum()
  return {
      "global": float(-np.log(intra + inter)),
      "local": float(np.sum(counts[ok] * local) / max(counts[ok].sum(), 1)),
      "inter_client": float(-np.log(g[~same].sum() / cross)) if cross else float("nan"),
      "intra": float(intra),
      "inter": float(inter),
  }


def effective_rank(features, *, center: bool = False) -> float:
  """Effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p = σ / Σσ`` over the singular values.

  Examples:
    >>> round(effective_rank(np.eye(5)), 6)
    5.0
  """
  f = np.asarray(features, np.float64)
  if center:
    f = f - f.mean(0)
  s = np.linalg.svd(f, compute_uv=False)
  p = s / max(s.sum(), 1e-300)
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate", "weight_decay"))
def _fit_probe(params, x, y, *, steps, learning_rate, weight_decay):
  """Full-batch AdamW on the softmax probe; the data are arguments, so repeated probes of the
  same shapes reuse one compiled program."""
  opt = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(x @ p[0] + p[1], y).mean()

  def step(carry, _):
    p, s = carry
    upd, s = opt.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, upd), s), None

  (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return p


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, *,
                          steps: int = 500, learning_rate: float = 3e-3,
                          weight_decay: float = 0.0) -> float:
  """Test accuracy of a softmax-regression probe on frozen features (full-batch Adam in JAX;
  features standardised with the train statistics).

  Examples:
    >>> x = np.array([[0.0], [1.0], [0.1], [0.9]]); y = np.array([0, 1, 0, 1])
    >>> linear_probe_accuracy(x, y, x, y, steps=200, learning_rate=0.1)
    1.0
  """
  _v.positive_int("steps", steps)
  _v.positive("learning_rate", learning_rate)
  _v.non_negative("weight_decay", weight_decay)
  xtr, xte = np.asarray(train_features, np.float32), np.asarray(test_features, np.float32)
  ytr, yte = np.asarray(train_labels), np.asarray(test_labels)
  if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
    raise ValueError(f"train and test features must be 2-D with the same width; got "
                     f"{xtr.shape} and {xte.shape}.")
  for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer) or (
        y.size and y.min() < 0):
      raise ValueError(f"{name}_labels must be non-negative integer class ids, one per "
                       f"{name} feature row ({x.shape[0]}); got {y.dtype} {y.shape}.")
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  classes = int(max(ytr.max(), yte.max())) + 1
  params = (jnp.zeros((xtr.shape[1], classes)), jnp.zeros(classes))
  w, b = _fit_probe(params, jnp.asarray(xtr), jnp.asarray(ytr), steps=steps,
                    learning_rate=float(learning_rate), weight_decay=float(weight_decay))
  pred = np.asarray(jnp.argmax(jnp.asarray(xte) @ w + b, -1))
  return float(np.mean(pred == yte))
