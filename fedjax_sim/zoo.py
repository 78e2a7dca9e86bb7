"""Standard federated-learning models (flax linen). Use them through ``fs.models.linen_apply``.

Every module takes ``train`` (dropout on when True); with ``linen_apply(module, train=True)``
dropout draws from the per-step key, which derives from the client's key.

Normalisation: the ResNet uses GroupNorm. BatchNorm keeps running statistics that differ per
client under non-IID data, and averaging them (or training with per-client batch statistics)
is known to hurt federated training (Hsieh et al., "The Non-IID Data Quagmire", ICML 2020); it
also needs mutable state that FedAvg does not average. Use GroupNorm / LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


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
  dense128-dropout(0.5)-dense(num_classes), valid 3x3 convolutions; ~1.2M parameters."""

  num_classes: int = 62

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(0.25, deterministic=not train)(x)
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class CifarCNN(nn.Module):
  """Small CIFAR CNN (conv-pool-conv-pool-dense), the model of pfl-research's CIFAR-10 setup."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  channels: int
  stride: int
  groups: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.channels, (3, 3), strides=self.stride, use_bias=False)(x)
    y = nn.relu(nn.GroupNorm(num_groups=self.groups)(y))
    y = nn.Conv(self.channels, (3, 3), use_bias=False)(y)
    y = nn.GroupNorm(num_groups=self.groups)(y)
    if x.shape[-1] != self.channels or self.stride != 1:
      x = nn.Conv(self.channels, (1, 1), strides=self.stride, use_bias=False)(x)
      x = nn.GroupNorm(num_groups=self.groups)(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """CIFAR-style ResNet-18 (3x3 stem, no max-pool, stages 64-128-256-512) with GroupNorm."""

  num_classes: int = 100
  width: int = 64
  groups: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
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
