"""Populations larger than memory: a Stack-Overflow-shaped token dataset streamed from disk.

Three steps (the data is generated, never committed; keep it under /tmp):

  # 1. >= 1e5 clients, >= 2 GB: x, y int32[20] per sentence (next-word prediction), vocab 10k
  python -m benchmarks.disk_scale generate --out /tmp/so_native --clients 100000 --target-gb 2
  # 2. reading cohorts: native format vs FedJAX SQLite read lazily (same clients, same data)
  python -m benchmarks.disk_scale read --data /tmp/so_native --sqlite-clients 2000
  # 3. training: the disk population (whole dataset, streamed) vs the in-memory engine on a
  #    subset that fits, interleaved in one process; then the disk run alone for its peak RSS
  python -m benchmarks.disk_scale train --data /tmp/so_native --mode both
  python -m benchmarks.disk_scale train --data /tmp/so_native --mode disk

Rows are appended to ``benchmarks/results/cpu-2core/disk_scale.jsonl`` with the load
(``os.getloadavg``) at the time. Host memory of the disk run is bounded by the feeder's two
staged blocks (``2 * block_size * capacity`` rows, ``capacity`` = the rows of the cohort-size
largest clients) plus the model and XLA's working set, never by the dataset: the ``disk`` row
reports ``ru_maxrss`` next to the dataset's size and that bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import sys
import time
import zlib

import numpy as np

SEQ, VOCAB = 20, 10_000
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-2core",
                       "disk_scale.jsonl")


def _row(**kw):
  kw.update(load=os.getloadavg(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
  print(json.dumps(kw))
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "a") as f:
    f.write(json.dumps(kw) + "\n")


def _sizes(clients: int, target_bytes: float, seed: int) -> np.ndarray:
  """Heavy-tailed sentences per client (lognormal, 1..1000, like Stack Overflow's users),
  scaled so that the total reaches ``target_bytes``."""
  z = np.random.default_rng(seed).standard_normal(clients)
  row = 2 * SEQ * 4
  for mu in np.arange(3.0, 7.0, 0.05):
    n = np.clip(np.exp(mu + 1.2 * z), 1, 1000).astype(np.int64)
    if n.sum() * row >= target_bytes:
      return n
  raise SystemExit("target too large for 1000 sentences per client; raise --clients")


def _client_data(rng, n):
  # Zipf-like token ids (rank-frequency of a vocabulary), 0 = padding only at the tail.
  tok = np.minimum(rng.zipf(1.3, (n, SEQ + 1)), VOCAB - 1).astype(np.int32)
  lens = rng.integers(4, SEQ + 1, n)
  tok[np.arange(SEQ + 1)[None, :] > lens[:, None]] = 0
  return {"x": tok[:, :-1], "y": tok[:, 1:]}


def generate(args):
  from fedjax_sim.data import disk

  sizes = _sizes(args.clients, args.target_gb * 1e9, args.seed)
  rng = np.random.default_rng(args.seed + 1)
  t = time.perf_counter()
  clients = ((f"u{i:07d}", _client_data(rng, int(n))) for i, n in enumerate(sizes))
  disk.write_native(args.out, clients, num_clients=len(sizes), overwrite=args.overwrite,
                    progress=True)
  secs = time.perf_counter() - t
  total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
  _row(step="generate", clients=len(sizes), examples=int(sizes.sum()), bytes=total,
       seconds=round(secs, 1))


def _write_fedjax_sqlite(path, pop, n):
  from fedjax_sim.data.sqlite import msgpack_serialize

  if os.path.exists(path):
    os.remove(path)
  db = sqlite3.connect(path)
  db.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
             "data BLOB NOT NULL, num_examples INTEGER NOT NULL)")
  for i in range(n):
    ex = pop.client(i)
    db.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
               (str(pop.labels[i]).encode(), zlib.compress(msgpack_serialize(ex)),
                len(ex["x"])))
  db.commit()
  db.close()


def read(args):
  """Reads the same random cohorts from the native files and from a FedJAX SQLite copy."""
  from fedjax_sim.data import disk, sqlite

  pop = disk.open_native(args.data)
  n = args.sqlite_clients
  sq = os.path.join(os.path.dirname(os.path.abspath(args.data)), "so_subset.sqlite")
  _write_fedjax_sqlite(sq, pop, n)
  rng = np.random.default_rng(0)
  cohorts = [rng.choice(n, args.cohort, replace=False) for _ in range(args.cohorts)]
  offsets, sizes = np.asarray(pop.offsets), np.asarray(pop.num_examples)
  reader = disk.CohortReader(pop.features, pop.labels)
  cap = int(np.sort(sizes[:n])[-args.cohort:].sum())
  bufs = {k: np.zeros((cap, SEQ), np.int32) for k in pop.features}
  res = {"native": [], "sqlite": []}
  for _ in range(args.reps):  # interleaved
    t = time.perf_counter()
    for ids in cohorts:
      for k in bufs:
        reader.read(k, bufs[k], offsets, sizes, ids, np.ones(len(ids), bool))
    res["native"].append(time.perf_counter() - t)
    t = time.perf_counter()
    with sqlite.open_federated(sq) as r:
      for ids in cohorts:
        exs = [r.client(str(pop.labels[i]).encode()) for i in ids]
        for k in bufs:
          np.concatenate([e[k] for e in exs])
    res["sqlite"].append(time.perf_counter() - t)
  rows = sum(int(sizes[ids].sum()) for ids in cohorts)
  best = {k: min(v) for k, v in res.items()}
  _row(step="read", cohort=args.cohort, cohorts=args.cohorts, rows=rows,
       native_rows_per_s=round(rows / best["native"]),
       sqlite_rows_per_s=round(rows / best["sqlite"]),
       native_over_sqlite=round(best["sqlite"] / best["native"], 2), warm_page_cache=True)
  os.remove(sq)


def _model():
  import jax
  import jax.numpy as jnp

  import fedjax_sim as fs

  d = 16

  def apply(p, x):
    h = p["emb"][x]  # [B, T, d]
    return h @ p["out"] + p["b"]

  loss = fs.models.sequence_loss(apply)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"emb": 0.1 * jax.random.normal(k1, (VOCAB, d)),
            "out": 0.1 * jax.random.normal(k2, (d, VOCAB)), "b": jnp.zeros(VOCAB)}
  return loss, params


def _cap_memory(kind: str, mb: int) -> None:
  """Caps this process's memory before JAX starts: ``as`` (RLIMIT_AS, all virtual memory,
  file mappings and XLA's reservations included) or ``data`` (RLIMIT_DATA: heap and private
  writable mappings, which Linux >= 4.7 counts; the memory-mapped dataset is not counted)."""
  res = {"as": resource.RLIMIT_AS, "data": resource.RLIMIT_DATA}[kind]
  _, hard = resource.getrlimit(res)
  limit = mb * 2**20
  resource.setrlimit(res, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def train(args):
  if args.rlimit_mb:
    _cap_memory(args.rlimit, args.rlimit_mb)
  import jax
  import optax

  import fedjax_sim as fs
  from fedjax_sim.data import disk

  loss, params = _model()
  algo = fs.algorithms.fedavg(loss, client_optimizer=optax.sgd(0.1), batch_size=16,
                              local_steps=args.local_steps)
  disk_pop = disk.open_native(args.data)
  sims = {}
  if args.mode in ("disk", "both"):
    sims["disk"] = fs.Simulation(algo, disk_pop, cohort_size=args.cohort, population_on="host",
                                 chunk_size=args.chunk)
  if args.mode in ("memory", "both"):
    m = args.memory_clients
    off, cnt = np.asarray(disk_pop.offsets), np.asarray(disk_pop.num_examples)
    end = int(off[m - 1] + cnt[m - 1])
    feats = {k: np.array(v[:end]) for k, v in disk_pop.features.items()}
    sims["memory"] = fs.Simulation(
        algo, fs.Population.from_arrays(feats, np.repeat(np.arange(m), cnt[:m]), num_clients=m),
        cohort_size=args.cohort, chunk_size=args.chunk)
  states, times = {}, {k: [] for k in sims}
  for name, sim in sims.items():  # compile and warm up
    st = sim.init(params, jax.random.key(1))
    st, _ = sim.run(st, num_rounds=args.block, block_size=args.block)
    states[name] = st
  for _ in range(args.reps):  # interleaved timed blocks
    for name, sim in sims.items():
      t = time.perf_counter()
      states[name], m = sim.run(states[name], num_rounds=args.block, block_size=args.block)
      jax.block_until_ready(states[name].params)
      times[name].append(time.perf_counter() - t)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  ds_bytes = sum(os.path.getsize(f.filename) for f in disk_pop.features.values())
  out = {"step": "train", "mode": args.mode, "cohort": args.cohort, "block": args.block,
         "local_steps": args.local_steps, "chunk": args.chunk,
         "dataset_clients": disk_pop.num_clients, "dataset_bytes": ds_bytes,
         "peak_rss_bytes": rss,
         "rlimit": f"{args.rlimit}={args.rlimit_mb}MiB" if args.rlimit_mb else None}
  for name, ts in times.items():
    out[f"{name}_client_updates_per_s"] = round(args.cohort * args.block / min(ts), 2)
    out[f"{name}_seconds"] = [round(t, 2) for t in ts]
  if "disk" in sims:
    from fedjax_sim.host_population import cohort_capacity

    cap = cohort_capacity(np.asarray(disk_pop.num_examples), args.cohort)
    out["staging_bound_bytes"] = 2 * args.block * cap * 2 * SEQ * 4
  if "memory" in sims:
    out["memory_clients"] = args.memory_clients
  if len(sims) == 2:
    out["disk_over_memory"] = round(out["disk_client_updates_per_s"]
                                    / out["memory_client_updates_per_s"], 3)
  _row(**out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  g = sub.add_parser("generate")
  g.add_argument("--out", required=True)
  g.add_argument("--clients", type=int, default=100_000)
  g.add_argument("--target-gb", type=float, default=2.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--overwrite", action="store_true")
  r = sub.add_parser("read")
  r.add_argument("--data", required=True)
  r.add_argument("--sqlite-clients", type=int, default=2000)
  r.add_argument("--cohort", type=int, default=50)
  r.add_argument("--cohorts", type=int, default=20)
  r.add_argument("--reps", type=int, default=3)
  t = sub.add_parser("train")
  t.add_argument("--data", required=True)
  t.add_argument("--mode", choices=["disk", "memory", "both"], default="both")
  t.add_argument("--cohort", type=int, default=20)
  t.add_argument("--block", type=int, default=5)
  t.add_argument("--reps", type=int, default=3)
  t.add_argument("--local-steps", type=int, default=2)
  t.add_argument("--chunk", type=int, default=10)
  t.add_argument("--memory-clients", type=int, default=5000)
  t.add_argument("--rlimit-mb", type=int, default=0,
                 help="cap the process's memory at this many MiB (0: no cap)")
  t.add_argument("--rlimit", choices=["as", "data"], default="data",
                 help="which limit: RLIMIT_AS (virtual) or RLIMIT_DATA (heap, private maps)")
  args = p.parse_args(argv)
  {"generate": generate, "read": read, "train": train}[args.cmd](args)


if __name__ == "__main__":
  sys.exit(main())
