"""Summarises benchmarks/results/<machine>/results.jsonl into results.md and a PNG plot.

  python -m benchmarks.report cpu-2core

FedJAX figures are the ones recorded on this machine type in shared/bench/WORKLOADS.md (FedJAX
0.0.17, default jit backend; ranges over repeated runs). They come from other runs than ours, so
the ratio uses the BEST FedJAX figure (the conservative choice); the sequential baseline column is
measured in the same process as our figure.
"""

from __future__ import annotations

import json
import os
import sys

FEDJAX_CLIENT_UPDATES = {  # (model, cohort) -> (low, high), WORKLOADS.md
    ("logistic", 10): (1049, 1049), ("logistic", 100): (1165, 1183),
    ("logistic", 1000): (777, 1150), ("dense", 10): (265, 309),
    ("dense", 100): (246, 321), ("dense", 1000): (257, 289),
    ("cnn", 10): (7.9, 9.5), ("cnn", 100): (8.3, 8.6), ("cnn", 1000): (7.9, 8.1),
}


def load(machine: str) -> list[dict]:
  path = os.path.join(os.path.dirname(__file__), "results", machine, "results.jsonl")
  rows = [json.loads(line) for line in open(path) if line.strip()]
  latest = {}
  for r in rows:  # the newest row per configuration
    latest[(r["model"], r["cohort"], r["dp"], r["chunk_size"])] = r
  return sorted(latest.values(), key=lambda r: (r["model"] != "logistic", r["model"],
                                                r["cohort"], r["dp"]))


def table(rows: list[dict]) -> str:
  out = ["| model | cohort | DP | chunk | rounds/s | client-updates/s | examples/s | padding waste"
         " | GFLOP/s (% of GEMM peak) | in-process sequential | vs sequential | FedJAX "
         "(WORKLOADS.md) | vs best FedJAX |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    seq = r.get("sequential_client_updates_per_s")
    fj = FEDJAX_CLIENT_UPDATES.get((r["model"], r["cohort"]))
    fj_txt = "" if fj is None else (f"{fj[0]:g}" if fj[0] == fj[1] else f"{fj[0]:g}–{fj[1]:g}")
    vs_fj = "" if fj is None or r["dp"] else f"{r['client_updates_per_s'] / fj[1]:.1f}×"
    out.append(
        f"| {r['model']} | {r['cohort']} | {'yes' if r['dp'] else 'no'} | {r['chunk_size']} "
        f"| {r['rounds_per_s']:.3g} | {r['client_updates_per_s']:.0f} | {r['examples_per_s']:.0f} "
        f"| {r['padding_waste']:.2f} | {r['gflops']:.0f} ({100 * r['fraction_of_peak']:.0f}%) "
        f"| {'' if seq is None else f'{seq:.0f}'} "
        f"| {'' if seq is None else format(r['client_updates_per_s'] / seq, '.1f') + '×'} "
        f"| {fj_txt if not r['dp'] else ''} | {vs_fj} |")
  return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for model, color in (("logistic", "C0"), ("dense", "C1"), ("cnn", "C2")):
    ours = [r for r in rows if r["model"] == model and not r["dp"]]
    if not ours:
      continue
    cohorts = [r["cohort"] for r in ours]
    ax.plot(cohorts, [r["client_updates_per_s"] for r in ours], "o-", color=color,
            label=f"{model}: fedjax_sim")
    seq = [(r["cohort"], r["sequential_client_updates_per_s"]) for r in ours
           if "sequential_client_updates_per_s" in r]
    if seq:
      ax.plot(*zip(*seq, strict=True), "x:", color=color, label=f"{model}: sequential (same run)")
    fj = [(c, FEDJAX_CLIENT_UPDATES[(model, c)][1]) for c in cohorts
          if (model, c) in FEDJAX_CLIENT_UPDATES]
    if fj:
      ax.plot(*zip(*fj, strict=True), "s--", color=color, alpha=0.5,
              label=f"{model}: FedJAX (best recorded)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("cohort size (clients per round)")
  ax.set_ylabel("client-updates / s")
  ax.legend(fontsize=7)
  ax.set_title(f"EMNIST-shaped FedAvg throughput, {rows[0]['machine']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  machine = sys.argv[1] if len(sys.argv) > 1 else "cpu-2core"
  rows = load(machine)
  base = os.path.join(os.path.dirname(__file__), "results", machine)
  r0 = rows[0]
  text = (f"# {machine}\n\njax {r0['jax']}; dense-GEMM peak measured in the same run: "
          f"{r0['gemm_peak_gflops']:.0f} GFLOP/s. Command: `python -m benchmarks.run --models "
          f"logistic dense --cohorts 10 100 1000 --dp` then `python -m benchmarks.report "
          f"{machine}`.\n\n" + table(rows) + "\n")
  open(os.path.join(base, "results.md"), "w").write(text)
  plot(rows, os.path.join(base, "throughput.png"))
  print(text)


if __name__ == "__main__":
  main()
