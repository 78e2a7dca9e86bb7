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
FEDJAX_ROUNDS = {("logistic", 10): 104.0}  # rounds/s, WORKLOADS.md
COMMANDS = (
    "python -m benchmarks.run --workloads logistic dense --dp",
    "python -m benchmarks.run --workloads cnn cifar population",
    "python -m benchmarks.report cpu-2core",
)


def load(machine: str) -> list[dict]:
  path = os.path.join(os.path.dirname(__file__), "results", machine, "results.jsonl")
  rows = [json.loads(line) for line in open(path) if line.strip()]
  rows = [r for r in rows if r.get("engine") == "fedjax_sim"]
  latest = {}
  for r in rows:  # the newest row per configuration
    latest[(r["model"], r["cohort"], r["dp"], r["chunk_size"])] = r
  order = ["logistic", "dense", "cnn", "cifar", "population"]
  return sorted(latest.values(), key=lambda r: (order.index(r["model"]) if r["model"] in order
                                                else len(order), r["cohort"], r["dp"]))


def _fmt_range(fj):
  return f"{fj[0]:g}" if fj[0] == fj[1] else f"{fj[0]:g}–{fj[1]:g}"


def table(rows: list[dict]) -> str:
  out = ["| workload | cohort | DP | chunk | rounds/s | client-updates/s | examples/s "
         "| padding waste | GFLOP/s (% of GEMM peak) | compile (s) | in-process sequential "
         "| vs sequential | FedJAX (WORKLOADS.md) | vs best FedJAX | load avg |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    seq = r.get("sequential_client_updates_per_s")
    fj = FEDJAX_CLIENT_UPDATES.get((r["model"], r["cohort"]))
    fj_txt = "" if fj is None or r["dp"] else _fmt_range(fj)
    vs_fj = "" if fj is None or r["dp"] else f"{r['client_updates_per_s'] / fj[1]:.1f}×"
    comp = r.get("compile_s_estimate")
    load = r.get("load_avg_1min")
    out.append(
        f"| {r['model']} | {r['cohort']} | {'yes' if r['dp'] else 'no'} | {r['chunk_size']} "
        f"| {r['rounds_per_s']:.3g} | {r['client_updates_per_s']:.0f} | {r['examples_per_s']:.0f} "
        f"| {r['padding_waste']:.2f} | {r['gflops']:.0f} ({100 * r['fraction_of_peak']:.0f}%) "
        f"| {'' if comp is None else f'{comp:.1f}'} "
        f"| {'' if seq is None else f'{seq:.0f}'} "
        f"| {'' if seq is None else format(r['client_updates_per_s'] / seq, '.1f') + '×'} "
        f"| {fj_txt} | {vs_fj} | {'' if load is None else f'{load:.2f}'} |")
  return "\n".join(out)


def targets(rows: list[dict]) -> str:
  """The issue's CPU targets, each checked against the rows (ratios against best FedJAX)."""
  by = {(r["model"], r["cohort"], r["dp"]): r for r in rows}
  lines = ["| target | measured | holds? |", "|---|---|---|"]

  def add(name, measured, ok):
    verdict = "not measured" if ok is None else ("yes" if ok else "no")
    lines.append(f"| {name} | {measured} | {verdict} |")

  for model in ("logistic", "dense", "cnn"):
    for cohort in (100, 1000):
      r = by.get((model, cohort, False))
      if r is None:
        add(f"≥ 2× FedJAX client-updates/s, {model} cohort {cohort}", "—", None)
        continue
      ratio = r["client_updates_per_s"] / FEDJAX_CLIENT_UPDATES[(model, cohort)][1]
      add(f"≥ 2× FedJAX client-updates/s, {model} cohort {cohort}", f"{ratio:.2f}×", ratio >= 2)
  r = by.get(("logistic", 10, False))
  if r is not None:
    ratio = r["rounds_per_s"] / FEDJAX_ROUNDS[("logistic", 10)]
    add("≥ 10× FedJAX rounds/s, logistic cohort 10", f"{ratio:.2f}×", ratio >= 10)
  for model in ("dense", "cnn"):
    best = max((r["fraction_of_peak"] for r in rows if r["model"] == model and not r["dp"]),
               default=None)
    if best is not None:
      add(f"FLOP/s ≥ 60% of GEMM peak, {model} (best cohort)", f"{100 * best:.0f}%", best >= 0.6)
  worst = max(r["padding_waste"] for r in rows)
  add("padding waste ≤ 15% (all rows)", f"worst {100 * (worst - 1):.0f}%", worst <= 1.15)
  a, b = by.get(("dense", 1000, False)), by.get(("dense", 1000, True))
  if a and b:
    over = a["client_updates_per_s"] / b["client_updates_per_s"] - 1
    add("DP overhead ≤ 5% (dense, cohort 1000; separate timed blocks)", f"{100 * over:+.0f}%",
        over <= 0.05)
  c = by.get(("cifar", 50, False))
  if c is not None:
    add("pfl CIFAR-10 1500 rounds (GPU target ≤ 60 s; here on CPU, extrapolated from the "
        "measured rounds/s)", f"{1500 / c['rounds_per_s']:.0f} s", None)
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  models = (("logistic", "C0"), ("dense", "C1"), ("cnn", "C2"), ("cifar", "C3"),
            ("population", "C4"))
  for model, color in models:
    ours = [r for r in rows if r["model"] == model and (not r["dp"] or model == "population")]
    if not ours:
      continue
    cohorts = [r["cohort"] for r in ours]
    ax.plot(cohorts, [r["client_updates_per_s"] for r in ours], "o-", color=color,
            label=f"{model}: fedjax_sim")
    seq = [(r["cohort"], r["sequential_client_updates_per_s"]) for r in ours
           if "sequential_client_updates_per_s" in r]
    if seq:
      ax.plot(*zip(*seq, strict=True), "x:", color=color, label=f"{model}: sequential (same run)")
      ax2.plot([c for c, _ in seq], [r["client_updates_per_s"] / v for r, (_, v) in zip(
          [r for r in ours if "sequential_client_updates_per_s" in r], seq, strict=True)],
          "x:", color=color, label=f"{model}: vs sequential")
    fj = [(c, FEDJAX_CLIENT_UPDATES[(model, c)][1]) for c in cohorts
          if (model, c) in FEDJAX_CLIENT_UPDATES]
    if fj:
      ax.plot(*zip(*fj, strict=True), "s--", color=color, alpha=0.5,
              label=f"{model}: FedJAX (best recorded)")
      ax2.plot([c for c, _ in fj], [r["client_updates_per_s"] / v for r, (_, v) in zip(
          [r for r in ours if (model, r["cohort"]) in FEDJAX_CLIENT_UPDATES], fj, strict=True)],
          "s-", color=color, label=f"{model}: vs best FedJAX")
  for a in (ax, ax2):
    a.set_xscale("log")
    a.set_xlabel("cohort size (clients per round)")
    a.legend(fontsize=6)
  ax.set_yscale("log")
  ax2.set_yscale("log")
  ax2.axhline(2.0, color="grey", lw=0.8, ls="--")
  ax.set_ylabel("client-updates / s")
  ax2.set_ylabel("speed-up (×)")
  ax.set_title(f"FedAvg throughput, {rows[0]['machine']}", fontsize=9)
  ax2.set_title("speed-up vs cohort size (dashed: 2×)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  machine = sys.argv[1] if len(sys.argv) > 1 else "cpu-2core"
  rows = load(machine)
  base = os.path.join(os.path.dirname(__file__), "results", machine)
  r0 = rows[0]
  peaks = sorted({round(r["gemm_peak_gflops"]) for r in rows})
  text = (f"# {machine}\n\njax {r0['jax']}. Dense-GEMM peak (2048² f32) measured in the same "
          f"run as each row: {', '.join(map(str, peaks))} GFLOP/s; each row's % is against its "
          f"own run's peak. 'load avg' is the 1-minute load average when the row was recorded. "
          f"Commands: " + "; ".join(f"`{c}`" for c in COMMANDS) + ".\n\n" + table(rows)
          + "\n\n## Targets (CPU)\n\n" + targets(rows) + "\n")
  open(os.path.join(base, "results.md"), "w").write(text)
  plot(rows, os.path.join(base, "throughput.png"))
  print(text)


if __name__ == "__main__":
  main()
