"""Why the partitioner's split of a vmapped chunk over host devices was slow: its collectives.

Compiles one round of the tiny conv model of ``tests/test_host_cpu.py`` (with ``fs.zoo``'s CPU
conv, whose ``custom_vmap`` rule loops over the chunk's clients) at chunk 2 on a 2-device
``clients`` mesh, split by the partitioner (``per_device_scan=False``) or by the per-device
scan (``per_device_scan=True``, :func:`fedjax_sim.core.per_device_pass`), and counts the
collectives and grouped convolutions in the compiled HLO.

Usage (2 host devices; one JSON line per path):
  FEDJAX_SIM_HOST_DEVICES=2 python -m benchmarks.host_devices_hlo
"""

from __future__ import annotations

import json
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import core

OPS = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "convolution", "while")


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), padding="VALID", conv_general_dilated=fs.zoo.conv_general_dilated)(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def main():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
  from test_host_cpu import _conv_setup

  pop, _, _ = _conv_setup()
  params = Net().init(jax.random.key(0), np.zeros((1, 6, 6, 1), np.float32))["params"]
  algo = fs.algorithms.fedavg(fs.models.classifier_loss(fs.models.linen_apply(Net())),
                              client_optimizer=optax.sgd(0.1), batch_size=2, local_epochs=1)
  mesh = fs.sharding.clients_mesh()
  for per_device_scan in (False, True):
    plan = core.plan_for(algo, fs.sampling.uniform(6), pop, params, chunk_size=2, mesh=mesh,
                         per_device_scan=per_device_scan)
    state = fs.sharding.place_state(core.initial_state(plan, params, jax.random.key(3)), mesh)
    hlo = jax.jit(lambda s, p, plan=plan: core.round_step(plan, s, p)).lower(
        state, fs.sharding.place_population(pop, mesh)).compile().as_text()
    row = {op: len(re.findall(rf" {op}\(", hlo)) for op in OPS}
    row["grouped_conv"] = len(re.findall(r"(?:feature|batch)_group_count=[2-9]", hlo))
    row["all_gather_shapes"] = re.findall(r"= (f32\[[0-9,]*\])\S* all-gather\(", hlo)
    print(json.dumps({"devices": fs.sharding.mesh_size(mesh), "per_device_scan": per_device_scan,
                      **row}))


if __name__ == "__main__":
  main()
