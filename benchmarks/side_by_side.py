"""fedjax_sim and its peers (FedJAX, pfl-research, Flower) interleaved in one run on one machine.

``python -m benchmarks.run --peers fedjax pfl flwr`` lands here. For each (workload, cohort) it
runs, ``--repeats`` times (default 2) in the order fedjax_sim, peer 1 (every setting), peer 2,
... (A-B-C-A-B-C), each engine in its own process: fedjax_sim as ``python -m benchmarks.run``
(this interpreter), each peer with its script in ``benchmarks/peers/`` under the python of its
virtualenv ``<--peer-venvs>/<peer>/bin/python`` (``bash benchmarks/peers/setup.sh`` builds them).

Peer settings tried (every one, every repeat): FedJAX its default ``jit`` backend; pfl 1 and 2
torch threads and two single-threaded worker processes; Flower 1 and 2 Ray CPUs per client (=
torch threads per client). A peer is compared **at its best**: the setting with the highest mean
client-updates/s over the repeats. fedjax_sim runs each of ``--ours-settings`` (``default``;
``processes=N``: N local processes, ``python -m fedjax_sim.launch``) every repeat and is taken
at its best the same way; the summary names the setting when more than one was tried.
Client sizes vary on most workloads and each engine draws its own cohorts, so where the peer
reports the examples it trained (FedJAX, pfl) the summary also gives the work-normalised
ratio of mean examples/s (``ratio_of_means_examples``), the fair one for lognormal sizes.

Every run is one JSON row in ``--out`` (default ``benchmarks/results/<machine>/peers.jsonl``)
with the 1-min load average before and after it; then one ``"summary"`` row per (workload,
cohort, peer) with both engines' figures, the peer's best setting, the ratio of means and the
per-repeat ratios (fedjax_sim's run against the peer's best-setting run of the same repeat, run
back to back). A markdown table is printed (and written beside ``--out`` as ``.md``).

Bad input: a peer whose venv is missing or broken, whose script fails, or whose parameters are
not finite gets an ``"error"`` row naming the problem and the setup command; no ratio is
computed from it, the other peers go on, and the run exits 3 at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.peers.common import host_cpu
from benchmarks.workloads import WORKLOADS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS_DIR = os.path.join(HERE, "peers")
SETUP = "bash benchmarks/peers/setup.sh"


@dataclasses.dataclass(frozen=True)
class Peer:
  """How to run one peer engine.

  Attributes:
    name: venv folder name and ``--peers`` name.
    script: the peer script under ``benchmarks/peers/``.
    models: the workloads it defines (None: ask the script, see :func:`peer_models`).
    settings: ``(label, extra argv)`` per setting to try.
    lm_script: the script for the language-model workloads (``stackoverflow``, ``shakespeare``)
      where the peer defines those models; None: it has none.
  """

  name: str
  script: str
  models: tuple[str, ...] | None
  settings: tuple[tuple[str, tuple[str, ...]], ...]
  lm_script: str | None = None


LM_MODELS = ("stackoverflow", "shakespeare", "stackoverflow-transformer")
#: the language models each LM script runs (pfl's benchmarks define a Stack Overflow transformer)
LM_SCRIPT_MODELS = {"fedjax_lm.py": ("stackoverflow", "shakespeare"),
                    "pfl_lm.py": ("stackoverflow-transformer",)}

PEERS = {
    "fedjax": Peer("fedjax", "fedjax_fedavg.py",
                   ("logistic", "dense", "cnn", *LM_SCRIPT_MODELS["fedjax_lm.py"]),
                   (("backend=jit", ("--backend", "jit")),), lm_script="fedjax_lm.py"),
    "pfl": Peer("pfl", "pfl_fedavg.py", None,
                (("torch_threads=1", ("--torch-threads", "1")),
                 ("torch_threads=2", ("--torch-threads", "2")),
                 # pfl's own multi-process simulation: one single-threaded worker per core.
                 ("workers=2", ("--workers", "2", "--torch-threads", "1"))),
                lm_script="pfl_lm.py"),
    "flwr": Peer("flwr", "flwr_fedavg.py", ("logistic", "dense", "cnn", "cifar"),
                 (("num_cpus=1", ("--num_cpus", "1")), ("num_cpus=2", ("--num_cpus", "2")))),
}


#: peer name -> whether its script takes --model (filled in by :func:`peer_models`)
MODEL_FLAG: dict[str, bool] = {}


class PeerError(Exception):
  """A peer run that yields no figure (the message says why and what to run)."""


def settings_of(args, peer: Peer) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """The peer's settings to try: those named in ``--peer-settings``, else all of them."""
  chosen = tuple(s for s in peer.settings if s[0] in (args.peer_settings or ()))
  return chosen or peer.settings


def venv_python(args, peer: str) -> str:
  return os.path.join(args.peer_venvs, peer, "bin", "python")


def script_path(args, peer: Peer, model: str | None = None) -> str:
  """The peer's script (its language-model script for ``stackoverflow``/``shakespeare``)."""
  if (peer.lm_script and model in LM_SCRIPT_MODELS[peer.lm_script]
      and not (args.peer_scripts or {}).get(peer.name)):
    return os.path.join(PEERS_DIR, peer.lm_script)
  return (args.peer_scripts or {}).get(peer.name) or os.path.join(PEERS_DIR, peer.script)


def check_peer(args, peer: Peer) -> None:
  """Raises :class:`PeerError` unless the peer's venv python and script exist."""
  py = venv_python(args, peer.name)
  if not (os.path.isfile(py) and os.access(py, os.X_OK)):
    raise PeerError(f"the {peer.name} peer's virtualenv python {py} does not exist; build it "
                    f"with `PEER_VENVS={args.peer_venvs} {SETUP} {peer.name}` (or pass "
                    f"--peer-venvs DIR holding {peer.name}/bin/python)")
  if not os.path.isfile(script_path(args, peer)):
    raise PeerError(f"the {peer.name} peer script {script_path(args, peer)} is missing")


def peer_models(args, peer: Peer) -> tuple[str, ...]:
  """The workloads the peer script runs: fixed, or ``cifar`` plus any its --model accepts."""
  if peer.models is not None:
    return peer.models
  res = subprocess.run([venv_python(args, peer.name), script_path(args, peer), "--help"],
                       capture_output=True, text=True, timeout=300)
  if res.returncode != 0:
    raise PeerError(f"the {peer.name} peer script does not start under "
                    f"{venv_python(args, peer.name)} ({res.stderr.strip()[-800:]}); rebuild "
                    f"the venv: `FORCE=1 PEER_VENVS={args.peer_venvs} {SETUP} {peer.name}`")
  MODEL_FLAG[peer.name] = "--model" in res.stdout
  lm = LM_SCRIPT_MODELS[peer.lm_script] if peer.lm_script else ()
  if not MODEL_FLAG[peer.name]:
    return ("cifar", *lm)
  return (*(m for m in ("logistic", "dense", "cnn", "cifar") if m in res.stdout), *lm)


def peer_argv(args, peer: Peer, model: str, cohort: int, num_clients: int,
              extra: tuple[str, ...]) -> list[str]:
  """The command line of one peer run (each script's own flag spelling)."""
  batch = str(WORKLOADS[model].batch_size)
  common = [venv_python(args, peer.name), script_path(args, peer, model)]
  if peer.name == "pfl":  # dash-style flags; --model only where the script has one
    argv = common + ["--cohort", str(cohort), "--num-clients", str(num_clients),
                     "--batch-size", batch, "--client-lr", str(args.client_lr),
                     "--server-lr", str(args.server_lr), "--rounds", str(args.peer_rounds),
                     "--max-seconds", str(args.peer_max_seconds)]
    if MODEL_FLAG.get(peer.name):
      argv += ["--model", model]
    return argv + list(extra)
  argv = common + ["--model", model, "--cohort", str(cohort), "--num_clients", str(num_clients),
                   "--batch_size", batch, "--client_lr", str(args.client_lr),
                   "--server_lr", str(args.server_lr), "--rounds", str(args.peer_rounds),
                   "--max_seconds", str(args.peer_max_seconds)]
  if peer.name == "fedjax" and cohort >= 1000:
    argv += ["--warmup_cohort", "10"]  # FedJAX compiles per batch shape, not per cohort
  return argv + list(extra)


def last_json(stdout: str) -> dict | None:
  lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
  return json.loads(lines[-1]) if lines else None


def run_peer(args, peer: Peer, model, cohort, num_clients, extra, ours_params=None) -> dict:
  """One peer run; its JSON line, or :class:`PeerError`."""
  argv = peer_argv(args, peer, model, cohort, num_clients, extra)
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)  # the peer's venv only, never this repository's packages
  from fedjax_sim import host_cpu  # the user's XLA_FLAGS, not those fedjax_sim added

  if host_cpu.USER_XLA_FLAGS is None:
    env.pop("XLA_FLAGS", None)
  else:
    env["XLA_FLAGS"] = host_cpu.USER_XLA_FLAGS
  try:
    res = subprocess.run(argv, capture_output=True, text=True, env=env,
                         timeout=args.peer_max_seconds * 4 + 600)
  except subprocess.TimeoutExpired as e:
    raise PeerError(f"the {peer.name} peer timed out after {e.timeout:.0f} s: "
                    f"{' '.join(argv)}") from None
  row = last_json(res.stdout)
  if res.returncode != 0 or row is None:
    raise PeerError(f"the {peer.name} peer failed (exit {res.returncode}): {' '.join(argv)}\n"
                    f"{res.stderr.strip()[-1500:]}\nIf its venv is broken, rebuild it: "
                    f"`FORCE=1 PEER_VENVS={args.peer_venvs} {SETUP} {peer.name}`")
  if not row.get("params_finite", False):
    raise PeerError(f"the {peer.name} peer diverged (non-finite parameters) on {model} cohort "
                    f"{cohort}; no ratio is recorded")
  if not row.get("client_updates_per_s"):
    raise PeerError(f"the {peer.name} peer printed no client_updates_per_s: {row}")
  theirs = row.get("params", row.get("num_params"))
  if ours_params and theirs and int(theirs) != int(ours_params):
    raise PeerError(f"the {peer.name} peer's {model} model has {theirs} parameters, "
                    f"fedjax_sim's {ours_params}: not the same model, so no ratio")
  return row


def ours_argv(setting: str) -> tuple[str, ...]:
  """The extra ``benchmarks.run`` arguments of one fedjax_sim setting (``--ours-settings``).

  Args:
    setting: ``"default"`` or ``"processes=N"`` (N local processes, ``fedjax_sim.launch``).

  Returns:
    The arguments, e.g. ``("--processes", "2")``.

  Raises:
    ValueError: an unknown setting, or N below 2.
  """
  if setting == "default":
    return ()
  name, _, value = setting.partition("=")
  if name == "processes" and value.isdigit() and int(value) >= 2:
    return ("--processes", value)
  raise ValueError(f"{setting!r} is not a fedjax_sim setting; use 'default' or 'processes=N' "
                   "with N >= 2")


def run_ours(args, model: str, cohort: int, extra: tuple[str, ...] = ()) -> dict:
  """fedjax_sim in its own process (``python -m benchmarks.run``); its result row."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.jsonl")
    argv = [sys.executable, "-m", "benchmarks.run", "--workloads", model, "--cohorts",
            str(cohort), "--no-sequential", "--target-seconds", str(args.target_seconds),
            "--client-lr", str(args.client_lr), "--server-lr", str(args.server_lr),
            "--out", out, *extra]
    if args.num_clients:
      argv += ["--num-clients", str(args.num_clients)]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0 or not os.path.exists(out):
      raise PeerError(f"fedjax_sim failed (exit {res.returncode}): {' '.join(argv)}\n"
                      f"{res.stderr.strip()[-1500:]}")
    with open(out) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("engine") == "fedjax_sim"][-1]


def _examples(row: dict) -> float | None:
  """A run row's examples/s (the row's own, or its engine's printed detail; None if neither)."""
  return row.get("examples_per_s") or (row.get("detail") or {}).get("examples_per_s")


def summarize(rows: list[dict]) -> list[dict]:
  """One summary per (model, cohort, peer) from the run rows (failed rows give no ratio)."""
  out = []
  keys = sorted({(r["model"], r["cohort"], r.get("sitting") or 0.0) for r in rows})
  for model, cohort, sitting in keys:  # a sitting: one interleaved invocation
    here = [r for r in rows if r["model"] == model and r["cohort"] == cohort
            and (r.get("sitting") or 0.0) == sitting]
    # fedjax_sim at its best too: the setting (--ours-settings) with the highest mean.
    mine = [r for r in here if r["engine"] == "fedjax_sim" and "error" not in r]
    mine_by: dict[str, list[float]] = {}
    for r in mine:
      mine_by.setdefault(_ours_setting(r), []).append(r["client_updates_per_s"])
    mine_means = {k: statistics.fmean(v) for k, v in mine_by.items()}
    mine_best = max(mine_means, key=mine_means.get) if mine_means else None
    ours = {r["repeat"]: r["client_updates_per_s"] for r in mine
            if _ours_setting(r) == mine_best}
    for peer in sorted({r["engine"] for r in here} - {"fedjax_sim"}):
      prow = [r for r in here if r["engine"] == peer]
      ok = [r for r in prow if "error" not in r]
      s = {"summary": True, "model": model, "cohort": cohort, "peer": peer,
           "fedjax_sim_client_updates_per_s": sorted(ours.values()),
           "settings_tried": sorted({r["setting"] for r in prow})}
      if len(mine_means) > 1 or (mine_best or "default") != "default":
        s["fedjax_sim_setting_means"] = mine_means
        s["fedjax_sim_best_setting"] = mine_best
      errors = [r["error"] for r in prow if "error" in r]
      if errors:
        s["errors"] = errors
      if ok and ours:
        by_setting: dict[str, list[float]] = {}
        for r in ok:
          by_setting.setdefault(r["setting"], []).append(r["client_updates_per_s"])
        means = {k: statistics.fmean(v) for k, v in by_setting.items()}
        best = max(means, key=means.get)
        s["setting_means"] = means
        s["best_setting"] = best
        s["peer_client_updates_per_s"] = sorted(by_setting[best])
        s["ratio_of_means"] = statistics.fmean(ours.values()) / means[best]
        s["ratios_per_repeat"] = [ours[r["repeat"]] / r["client_updates_per_s"] for r in ok
                                  if r["setting"] == best and r["repeat"] in ours]
        s["load_avg_1min"] = sorted(r["load_avg_1min"] for r in here if "load_avg_1min" in r)
        # Work-normalised: client sizes vary (lognormal workloads) and each engine draws its own
        # cohorts, so client-updates/s compares unequal work; examples/s does not.
        mine_ex: dict[str, list[float]] = {}
        for r in mine:
          if _examples(r):
            mine_ex.setdefault(_ours_setting(r), []).append(_examples(r))
        ours_ex = {}
        if mine_ex:
          ex_mine_best = max(mine_ex, key=lambda k: statistics.fmean(mine_ex[k]))
          ours_ex = {r["repeat"]: _examples(r) for r in mine
                     if _ours_setting(r) == ex_mine_best and _examples(r)}
          if "fedjax_sim_best_setting" in s:
            s["fedjax_sim_best_setting_examples"] = ex_mine_best
        # The peer at its best by this measure too: the setting with the highest mean
        # examples/s (which can differ from the best by client-updates/s).
        ex_by_setting: dict[str, list[float]] = {}
        for r in ok:
          if _examples(r):
            ex_by_setting.setdefault(r["setting"], []).append(_examples(r))
        best_ex = []
        if ex_by_setting:
          ex_best = max(ex_by_setting, key=lambda k: statistics.fmean(ex_by_setting[k]))
          s["best_setting_examples"] = ex_best
          best_ex = [r for r in ok if r["setting"] == ex_best and _examples(r)]
        if ours_ex and best_ex:
          s["fedjax_sim_examples_per_s"] = sorted(ours_ex.values())
          s["peer_examples_per_s"] = sorted(_examples(r) for r in best_ex)
          s["ratio_of_means_examples"] = (statistics.fmean(ours_ex.values())
                                          / statistics.fmean(s["peer_examples_per_s"]))
          s["ratios_per_repeat_examples"] = [ours_ex[r["repeat"]] / _examples(r)
                                             for r in best_ex if r["repeat"] in ours_ex]
      out.append(s)
  return out


def _ours_setting(row: dict) -> str:
  """A fedjax_sim run row's setting (``--ours-settings``; rows before it: ``"default"``)."""
  return row.get("ours_setting") or "default"


def _rng(values, fmt="{:.0f}"):
  lo, hi = fmt.format(min(values)), fmt.format(max(values))
  return lo if lo == hi else f"{lo}–{hi}"


def markdown(summaries: list[dict]) -> str:
  lines = ["| workload | cohort | peer | fedjax_sim client-updates/s | peer at its best "
           "(setting) | settings tried | ratio of means (per repeat) | ratio of means, "
           "examples/s (per repeat) | load avg |",
           "|---|---|---|---|---|---|---|---|---|"]
  for s in summaries:
    ours = (_rng(s["fedjax_sim_client_updates_per_s"], "{:.3g}")
            if s["fedjax_sim_client_updates_per_s"] else "failed")
    if s.get("fedjax_sim_best_setting") and ours != "failed":
      ours += f" ({s['fedjax_sim_best_setting']})"
    if "ratio_of_means" in s:
      peer = f"{_rng(s['peer_client_updates_per_s'], '{:.3g}')} ({s['best_setting']})"
      ratio = (f"**{s['ratio_of_means']:.2f}×** "
               f"({', '.join(format(r, '.2f') for r in s['ratios_per_repeat'])})")
      load = _rng(s["load_avg_1min"], "{:.1f}")
    else:
      peer, ratio, load = "failed: " + s.get("errors", ["no run"])[0].split("\n")[0], "—", ""
    ratio_ex = "—"  # a peer that does not report the examples it trained
    if "ratio_of_means_examples" in s:
      ratio_ex = (f"**{s['ratio_of_means_examples']:.2f}×** ("
                  f"{', '.join(format(r, '.2f') for r in s['ratios_per_repeat_examples'])})")
    lines.append(f"| {s['model']} | {s['cohort']} | {s['peer']} | {ours} | {peer} "
                 f"| {', '.join(s['settings_tried'])} | {ratio} | {ratio_ex} | {load} |")
  return "\n".join(lines)


def main(args) -> int:
  """Runs the interleaved comparison described in the module docstring; the exit status."""
  machine = args.machine or f"cpu-{os.cpu_count()}core"
  out = args.out or os.path.join(HERE, "results", machine, "peers.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  peers = [PEERS[p] for p in args.peers]
  usable, models_of, rows = {}, {}, []

  sitting, cpu = time.time(), host_cpu()

  def record(row):
    row.update(machine=machine, cpu=cpu, time=time.time(), sitting=sitting)
    rows.append(row)
    with open(out, "a") as f:
      f.write(json.dumps(row) + "\n")
    brief = {k: row[k] for k in ("engine", "setting", "model", "cohort", "repeat",
                                 "client_updates_per_s", "load_avg_1min", "error") if k in row}
    print(json.dumps(brief), flush=True)

  for p in peers:
    try:
      check_peer(args, p)
      models_of[p.name] = peer_models(args, p)
      usable[p.name] = None
    except PeerError as e:
      usable[p.name] = str(e)
  for model in args.workloads:
    w = WORKLOADS[model]
    for cohort in args.cohorts or w.default_cohorts:
      num_clients = args.num_clients or w.num_clients
      ours_params = None
      for rep in range(args.repeats):
        base = {"model": model, "cohort": cohort, "repeat": rep}
        for setting in getattr(args, "ours_settings", None) or ["default"]:
          load0 = os.getloadavg()[0]
          try:
            r = run_ours(args, model, cohort, ours_argv(setting))
            ours_params = r["params"]
            record({**base, "engine": "fedjax_sim", "ours_setting": setting,
                    "setting": f"{setting} chunk={r['chunk_size']}",
                    "client_updates_per_s": r["client_updates_per_s"],
                    "examples_per_s": r["examples_per_s"],
                    "rounds_per_s": r["rounds_per_s"], "rounds": r["rounds"],
                    "load_avg_1min_before": load0, "load_avg_1min": os.getloadavg()[0],
                    "detail": r})
          except PeerError as e:
            record({**base, "engine": "fedjax_sim", "ours_setting": setting, "setting": setting,
                    "error": str(e)})
        for p in peers:
          if usable[p.name] is not None:
            if rep == 0:
              record({**base, "engine": p.name, "setting": "", "error": usable[p.name]})
            continue
          if model not in models_of[p.name]:
            continue
          for label, extra in settings_of(args, p):
            load0 = os.getloadavg()[0]
            try:
              pr = run_peer(args, p, model, cohort, num_clients, extra, ours_params)
              record({**base, "engine": p.name, "setting": label,
                      "client_updates_per_s": float(pr["client_updates_per_s"]),
                      "examples_per_s": pr.get("examples_per_s"),
                      "rounds_per_s": float(pr["rounds_per_s"]),
                      "load_avg_1min_before": load0, "load_avg_1min": os.getloadavg()[0],
                      "detail": pr})
            except PeerError as e:
              record({**base, "engine": p.name, "setting": label, "error": str(e)})
  summaries = summarize(rows)
  with open(out, "a") as f:
    for s in summaries:
      f.write(json.dumps({**s, "machine": machine, "cpu": cpu, "time": time.time()}) + "\n")
  table = markdown(summaries)
  print("\n" + table)
  with open(os.path.splitext(out)[0] + ".md", "a") as f:
    f.write(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"`python -m benchmarks.run --peers {' '.join(args.peers)} --workloads "
            f"{' '.join(args.workloads)}`; CPU: {cpu} -->\n{table}\n")
  return 3 if any("error" in r for r in rows) else 0


def resummarize(path: str) -> str:
  """The markdown table of every run row in a ``peers.jsonl`` (summary rows are ignored)."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return markdown(summarize([r for r in rows if not r.get("summary")]))


if __name__ == "__main__":  # python -m benchmarks.side_by_side benchmarks/results/.../peers.jsonl
  print(resummarize(sys.argv[1]))
