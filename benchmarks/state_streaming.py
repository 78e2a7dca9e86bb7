"""Round time of SCAFFOLD (per-client state for the whole population) at a given chunk size.

MLP 16-512-4 (10,240 params), one example per client, cohort 100, batch 2; 2 warm-up rounds,
then 4 timed rounds in blocks of 2. Run it with this tree and with another on PYTHONPATH to
compare round implementations side by side:

  PYTHONPATH=$PWD python -m benchmarks.state_streaming --num-clients 10000 --chunk 1
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.state_streaming")
  ap.add_argument("--num-clients", type=int, default=10_000)
  ap.add_argument("--chunk", type=int, default=1)
  args = ap.parse_args(argv)
  n, (d, h, c) = args.num_clients, (16, 512, 4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n).astype(np.int32)
  pop = fs.Population.from_arrays({"x": x, "y": y}, np.arange(n))
  loss = fs.models.classifier_loss(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"])
  algo = fs.algorithms.scaffold(loss, client_learning_rate=0.1, batch_size=2, local_epochs=1)
  sim = fs.Simulation(algo, pop, cohort_size=100, chunk_size=args.chunk)
  state = sim.init({"w1": jnp.zeros((d, h)), "w2": jnp.zeros((h, c))}, jax.random.key(0))
  state, _ = sim.run(state, 2, block_size=2)
  jax.block_until_ready(state.params)
  t0 = time.perf_counter()
  state, m = sim.run(state, 4, block_size=2)
  jax.block_until_ready(state.params)
  print(f"{fs.__file__} N={n} chunk={args.chunk} "
        f"s/round={(time.perf_counter() - t0) / 4:.4f} loss={m['loss'][-1]:.6f} "
        f"load={os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
  main()
