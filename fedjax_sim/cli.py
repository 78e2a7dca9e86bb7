"""The ``fedjax-sim`` command line.

Every error is one line on stderr that names the flag or config key and the fix, with exit
code 2 (never a Python traceback); an interrupted ``run`` exits 130 after checkpointing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import warnings


class UsageError(ValueError):
  """A bad flag value; the message names the flag and the fix."""


# The API names its arguments; on the command line they are flags.
_FLAGS = {"num_clients": "--num-clients", "cohort_size": "--cohort-size", "alpha": "--alpha",
          "shards_per_client": "--shards-per-client", "min_examples": "--min-examples",
          "noise_multiplier": "--noise-multiplier", "target_epsilon": "--target-epsilon",
          "max_cohort_size": "--max-cohort-size", "num_rounds": "--rounds", "delta": "--delta",
          "batch_size": "--batch-size", "local_epochs": "--local-epochs", "clip": "--clip",
          "max_participations": "--max-participations"}


def _as_flags(message: str) -> str:
  """The API's argument names in ``message`` spelled as this command's flags."""
  return re.sub(r"(?<!\()\b(" + "|".join(_FLAGS) + r")\b(?!-)",
                lambda m: _FLAGS[m.group(1)], message)


def _check_flags(args: argparse.Namespace, rules: dict[str, str]) -> None:
  """``rules``: dest -> 'pos' (> 0), 'nonneg' (>= 0), 'prob' ((0, 1]), 'open01' ((0, 1))."""
  for dest, rule in rules.items():
    v = getattr(args, dest, None)
    if v is None:
      continue
    flag = "--" + dest.replace("_", "-")
    ok = {"pos": v > 0, "nonneg": v >= 0, "prob": 0 < v <= 1, "open01": 0 < v < 1}[rule]
    want = {"pos": "> 0", "nonneg": ">= 0", "prob": "in (0, 1]", "open01": "in (0, 1)"}[rule]
    if not ok or v != v:
      raise UsageError(f"{flag} must be {want}; got {v}.")
    if v in (float("inf"), float("-inf")):  # an inf z, epsilon or rate answers nothing
      raise UsageError(f"{flag} must be a finite number {want}; got {v}.")


def _demo(args: argparse.Namespace) -> int:
  _check_flags(args, {"num_clients": "pos", "alpha": "pos", "cohort_size": "pos",
                      "rounds": "pos", "eval_every": "pos", "local_epochs": "pos",
                      "batch_size": "pos", "client_lr": "pos", "server_lr": "pos", "clip": "pos",
                      "noise_multiplier": "nonneg"})
  if args.cohort_size > args.num_clients:
    raise UsageError(f"--cohort-size {args.cohort_size} exceeds --num-clients "
                     f"{args.num_clients}; lower --cohort-size.")
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  import fedjax_sim as fs
  from fedjax_sim import plots

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.2, random_state=args.seed, stratify=y
  )
  client_ids = fs.partition.dirichlet(y_train, args.num_clients, args.alpha, seed=args.seed)
  pop = fs.Population.from_arrays({"x": x_train, "y": y_train}, client_ids)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(64)(x))
      return nn.Dense(10)(x)

  model = MLP()
  params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
  apply_fn = fs.models.linen_apply(model)
  aggregator = (
      fs.aggregators.weighted_mean()
      if args.noise_multiplier is None
      else fs.aggregators.dp_mean(clip=args.clip, noise_multiplier=args.noise_multiplier)
  )
  algo = fs.algorithms.fedavg(
      fs.models.classifier_loss(apply_fn),
      client_optimizer=optax.sgd(args.client_lr),
      server_optimizer=fs.algorithms.fedavgm(args.server_lr, momentum=0.9),
      local_epochs=args.local_epochs,
      batch_size=args.batch_size,
      aggregator=aggregator,
  )
  sim = fs.Simulation(algo, pop, cohort_size=args.cohort_size)
  state = sim.init(params, jax.random.key(args.seed))

  test_x, test_y = jnp.asarray(x_test), jnp.asarray(y_test)
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(apply_fn(p, test_x, None), -1) == test_y))

  sizes = np.asarray(pop.num_examples)
  dp = (
      "no DP"
      if args.noise_multiplier is None
      else f"DP-FedAvg clip={args.clip} z={args.noise_multiplier}"
  )
  print(
      f"fedjax-sim demo: digits ({len(y_train)} train / {len(y_test)} test), "
      f"{pop.num_clients} devices, Dirichlet(alpha={args.alpha}) non-IID "
      f"(examples per device {sizes.min()}-{sizes.max()}), cohort {args.cohort_size}, {dp}, "
      f"jax {jax.__version__} on {jax.devices()[0].platform}",
      flush=True,
  )
  t0 = time.perf_counter()
  last = [t0]

  def progress(rounds_done, block):
    now = time.perf_counter()
    clipped = block.get("fraction_clipped", np.zeros(1))[-1]
    rate = len(block["loss"]) * args.cohort_size / (now - last[0])
    print(
        f"  round {rounds_done:4d}  train loss {float(block['loss'][-1]):.3f}  "
        f"clipped {float(clipped):.2f}  {rate:8.0f} client-updates/s",
        flush=True,
    )
    last[0] = now

  # The run directory: a previous demo's log there is replaced (with a warning); any other
  # run's log is refused by sim.run before a file is touched (fedjax_sim.run_dir).
  previous = {}
  with contextlib.suppress(OSError, ValueError):
    with open(os.path.join(args.out, "config.json")) as f:
      previous = json.load(f).get("settings") or {}
  delta = None if args.noise_multiplier is None else args.delta
  state, metrics = sim.run(
      state,
      num_rounds=args.rounds,
      eval_every=args.eval_every,
      eval_fn=lambda p: {"accuracy": float(accuracy(p))},
      callback=progress,
      delta=delta,
      log_dir=args.out,
      settings={"command": "demo"},
      overwrite=args.overwrite or previous.get("command") == "demo",
  )
  elapsed = time.perf_counter() - t0
  acc = metrics["eval_accuracy"][-1]
  updates = args.rounds * args.cohort_size
  print(
      f"final test accuracy {acc:.4f} after {args.rounds} rounds; {elapsed:.1f} s including "
      f"compilation ({updates / elapsed:.0f} client-updates/s, "
      f"{metrics['examples'].sum() / elapsed:.0f} examples/s)",
      flush=True,
  )
  summary = {"rounds": int(state.round), "test_accuracy": float(acc), "seconds": elapsed}
  if delta is not None:
    summary.update(epsilon=float(metrics["epsilon"][-1]), delta=delta)
    print(f"user-level epsilon {summary['epsilon']:.4g} at delta {delta:g} (illustrative: "
          f"{pop.num_clients} devices, cohorts of {args.cohort_size})", flush=True)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  paths = plots.plot_run(args.out)
  print(f"wrote {args.out}/metrics.jsonl, config.json, summary.json and {', '.join(paths)}",
        flush=True)
  return 0


def _privacy(args: argparse.Namespace) -> int:
  from absl import logging as absl_logging

  from fedjax_sim import privacy, sampling

  absl_logging.set_verbosity(absl_logging.ERROR)  # dp-accounting's notes on excluded RDP orders

  _check_flags(args, {"num_clients": "pos", "cohort_size": "pos", "q": "prob",
                      "max_cohort_size": "pos", "noise_multiplier": "nonneg",
                      "target_epsilon": "pos", "rounds": "pos", "delta": "open01",
                      "min_separation": "pos", "bands": "pos", "max_participations": "pos"})
  n = args.num_clients
  if (args.cohort_size is None) == (args.q is None):
    raise UsageError("pass exactly one of --cohort-size K (fixed-size) or --q Q (Poisson).")
  if args.cohort_size is not None and args.cohort_size > n:
    raise UsageError(f"--cohort-size {args.cohort_size} exceeds --num-clients {n}; lower it.")
  if (args.noise_multiplier is None) == (args.target_epsilon is None):
    raise UsageError("pass exactly one of --noise-multiplier Z or --target-epsilon EPS.")
  bands = args.bands or 1
  if args.min_separation is not None and args.cohort_size is not None:
    raise UsageError("--min-separation B samples with --q Q within one of B bins (cyclic Poisson); "
                     "it does not combine with --cohort-size.")
  k = args.max_participations
  if k is not None and args.cohort_size is not None:
    raise UsageError("--max-participations K caps a cyclic Poisson schedule (--q Q, with or "
                     "without --min-separation B); it does not combine with --cohort-size.")
  if args.min_separation is not None or k is not None:
    cap = args.max_cohort_size or n
    sep = args.min_separation or 1
    try:
      sampler = sampling.cyclic_poisson(args.q, sep, max_cohort_size=cap, max_participations=k,
                                        num_rounds=None if k is None else args.rounds)
      sampler.validate(n)  # a cap that cannot fill the rounds, empty bins
    except ValueError as e:
      raise UsageError(_as_flags(str(e))) from None
    what = (f"cyclic Poisson q={args.q}, min-separation {sep} (add/remove-one)"
            + (f", at most {k} participations per client" if k is not None else "")
            + (f", truncated at {cap}" if cap < n else ""))
  elif args.cohort_size is not None:
    sampler = sampling.uniform(args.cohort_size)
    what = f"fixed-size cohorts of {args.cohort_size} (replace-one, sensitivity 2S)"
  else:
    cap = args.max_cohort_size or n
    sampler = sampling.poisson(args.q, max_cohort_size=cap)
    what = f"Poisson sampling q={args.q} (add/remove-one)" + (
        f", truncated at {cap}" if cap < n else "")
  if args.tree and bands > 1:
    raise UsageError("--tree (DP-FTRL tree aggregation) and --bands (BandMF) are two mechanisms; "
                     "pass one of them.")
  gram = None
  if args.tree:  # the tree's C^T C over the run (jax_privacy's sensitivity in fs.privacy)
    from fedjax_sim.aggregators import dp_ftrl_mean

    gram = dp_ftrl_mean(1.0, 1.0, num_rounds=args.rounds).strategy_gram
    what += ", DP-FTRL tree aggregation (no amplification)"
  if bands > 1:
    what += f", BandMF with {bands} bands"
  print(f"population {n}, {what}, {args.rounds} rounds, delta={args.delta}")
  failed = []
  for accountant in privacy.ACCOUNTANTS:
    try:
      if args.noise_multiplier is not None:
        eps = privacy.epsilon(sampler, n, args.noise_multiplier, args.rounds, args.delta,
                              accountant=accountant, num_bands=bands, strategy_gram=gram)
        print(f"  {accountant.upper():3s}: epsilon = {eps:.4f} at z = {args.noise_multiplier}")
      else:
        z = privacy.calibrate_noise_multiplier(args.target_epsilon, args.delta, args.rounds,
                                               sampler, n, accountant=accountant,
                                               num_bands=bands, strategy_gram=gram)
        eps = privacy.epsilon(sampler, n, z, args.rounds, args.delta, accountant=accountant,
                              num_bands=bands, strategy_gram=gram)
        print(f"  {accountant.upper():3s}: noise multiplier z = {z:.4f} "
              f"(epsilon = {eps:.4f} <= {args.target_epsilon})")
    except ValueError as e:
      print(f"  {accountant.upper():3s}: not available: {_as_flags(str(e))}")
      failed.append(f"{accountant.upper()}: {_as_flags(str(e))}")
  if len(failed) == len(privacy.ACCOUNTANTS):  # no answer at all is an error, not a result
    raise UsageError(f"no accountant could answer: {' '.join(failed)}")
  return 0


def _run(args: argparse.Namespace) -> int:
  import dataclasses
  import json
  import os
  import shutil

  import jax
  import numpy as np

  from fedjax_sim import config as cfglib
  from fedjax_sim import plots
  from fedjax_sim.checkpoint import SimulationInterrupted
  from fedjax_sim.nonfinite import NonFiniteError
  from fedjax_sim.run_dir import CheckpointSaveError

  if args.resume and args.overwrite:
    raise UsageError("pass one of --resume (continue the run in run.out_dir) and --overwrite "
                     "(delete it and start over), not both.")
  cfg = cfglib.load(args.config, args.set or [])
  out = cfg.run.out_dir
  ckpt = os.path.join(out, "checkpoints")
  ours = ["config.json", "metrics.jsonl", "metrics.csv", "summary.json", "learning_curves.png",
          "checkpoints"]
  if os.path.exists(out) and not os.path.isdir(out):
    raise cfglib.ConfigError(f"run.out_dir={out!r} is a file; set run.out_dir to a directory.")
  found = [n for n in (os.listdir(out) if os.path.isdir(out) else [])
           if n in ours or n.startswith("events.out.tfevents")]
  if found and not (args.resume or args.overwrite):
    raise cfglib.ConfigError(
        f"run.out_dir={out!r} already holds a run ({', '.join(sorted(found))}); pass --resume "
        "to continue it, --overwrite to delete it and start over, or --set run.out_dir=NEW.")
  if args.resume:
    _check_resume(out, dataclasses.asdict(cfg))
  sim, params, eval_fn, _ = cfglib.build(cfg)
  if args.overwrite and found:
    for n in found:
      path = os.path.join(out, n)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    print(f"--overwrite: deleted {', '.join(sorted(found))} in {out}", flush=True)
  os.makedirs(out, exist_ok=True)
  steps = [n for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
  if args.resume and steps:  # checkpoint steps (not the directory's owner file)
    state = sim.restore(ckpt, params)
    print(f"resumed from round {int(state.round)} ({ckpt})", flush=True)
  else:
    if args.resume:
      print(f"--resume: no checkpoint in {ckpt}; starting at round 0", flush=True)
    state = sim.init(params, jax.random.key(cfg.run.seed))
  remaining = cfg.run.rounds - int(state.round)
  if remaining <= 0:
    print(f"nothing to do: {int(state.round)} of {cfg.run.rounds} rounds done.")
    return 0
  delta = cfg.privacy.delta if sim.algorithm.aggregator.noise_multiplier else None
  try:
    state, metrics = sim.run(
        state, remaining, eval_every=cfg.run.eval_every, eval_fn=eval_fn, delta=delta,
        checkpoint_dir=ckpt, checkpoint_every=cfg.run.checkpoint_every, log_dir=out,
        progress=cfg.run.progress and not args.quiet, settings=dataclasses.asdict(cfg),
    )
  except SimulationInterrupted as e:
    print(f"fedjax-sim run: {e}", file=sys.stderr)
    return 130
  except CheckpointSaveError as e:  # the rounds ran; keep them where the user can find them
    rescue = os.path.join(out, f"rescued_round_{int(e.state.round)}")
    try:
      sim.save(e.state, rescue)
      where = f"the state after round {int(e.state.round)} was saved in {rescue}"
    except Exception as e2:  # noqa: BLE001
      where = f"saving it to {rescue} failed too ({e2})"
    print(f"fedjax-sim run: {' '.join(str(e).split())}; {where}.", file=sys.stderr)
    return 1
  except NonFiniteError as e:  # training diverged: one line, the finite rounds are in metrics.jsonl
    print(f"fedjax-sim run: {' '.join(str(e).split())} Rounds before it are in "
          f"{os.path.join(out, 'metrics.jsonl')}; lower the config's learning rates or clip.",
          file=sys.stderr)
    return 1
  summary = {k: float(v[-1]) for k, v in metrics.items() if np.isfinite(v[-1])}
  if delta is not None:
    summary["delta"] = float(delta)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"rounds": int(state.round), **summary}, f, indent=1)
  paths = plots.plot_run(out)
  shown = {k: round(v, 4) for k, v in summary.items() if k.startswith("eval_") or k in (
      "loss", "epsilon")}
  print(f"done: {int(state.round)} rounds; {shown}; logs, checkpoints and {paths} in {out}")
  return 0


#: Config keys a resumed run can take new values of: how far it runs, how often it evaluates and
#: checkpoints, whether a progress bar is shown, and where the run directory now is (a moved
#: run). Every other key is the run's identity.
RESUMABLE = ("run.rounds", "run.eval_every", "run.checkpoint_every", "run.progress",
             "run.out_dir")


def _check_resume(out: str, settings: dict) -> None:
  """Refuses ``--resume`` with a config that differs from the run's own (``config.json``) in a
  key a resume cannot honour, naming each changed key with both values."""
  import dataclasses
  import json
  import os

  from fedjax_sim.config import ConfigError

  path = os.path.join(out, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f).get("settings")
  except (ValueError, AttributeError) as e:
    raise ConfigError(f"--resume: {path} is corrupt (not valid JSON: {e}), so the run's settings "
                      "cannot be compared with this config. Repair or remove it, or start over "
                      "with --overwrite.") from None
  if not isinstance(old, dict):
    return  # a log written by the Python API, which records no config

  def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

  # A key the run's config.json lacks was added to fedjax-sim after that run started (e.g.
  # privacy.mechanism): the run used its default, so compare against the default.
  from fedjax_sim.config import Config

  was = {**flat(dataclasses.asdict(Config())), **flat(old)}
  now = flat(settings)
  changed = [k for k in sorted(set(was) | set(now))
             if k not in RESUMABLE and was.get(k) != now.get(k)]
  if changed:
    diff = "; ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed)
    raise ConfigError(
        f"--resume: the run in {out!r} was started with other settings ({diff}); a resumed run "
        "continues on its own settings and key, so these changes cannot be honoured. Drop them "
        f"(resuming may change only {', '.join(RESUMABLE)}), or start a new run with --set "
        "run.out_dir=NEW or --overwrite.")


def _plot(args: argparse.Namespace) -> int:
  import os

  from fedjax_sim import plots

  if not os.path.isfile(os.path.join(args.run_dir, "metrics.jsonl")):
    raise UsageError(f"RUN_DIR {args.run_dir!r} has no metrics.jsonl; pass the run.out_dir of a "
                     "finished or running `fedjax-sim run`.")
  # (plot_run refuses a log with no rounds, and skips a row cut short with a warning)

  for path in plots.plot_run(args.run_dir):
    print(f"wrote {path}")
  return 0


def _describe(args: argparse.Namespace) -> int:
  import numpy as np

  import fedjax_sim as fs

  _check_flags(args, {"num_clients": "pos", "alpha": "pos", "shards_per_client": "pos",
                      "min_examples": "nonneg"})
  alpha = None if args.partition == "iid" else args.alpha
  if args.partition == "shards":
    pop, _ = fs.datasets.sklearn_dataset(args.dataset, args.num_clients, alpha=None,
                                         seed=args.seed, min_examples=0)
    y = np.asarray(pop.features["y"])
    ids = fs.partition.shards(y, args.num_clients, args.shards_per_client, seed=args.seed)
  else:
    pop, _ = fs.datasets.sklearn_dataset(args.dataset, args.num_clients, alpha=alpha,
                                         seed=args.seed, min_examples=args.min_examples)
    y = np.asarray(pop.features["y"])
    ids = np.repeat(np.arange(pop.num_clients), np.asarray(pop.num_examples))
  split = {"iid": "IID", "shards": f"{args.shards_per_client} label shards per client",
           "dirichlet": f"Dirichlet(alpha={args.alpha})"}[args.partition]
  stats = fs.partition.describe(ids, y, num_clients=args.num_clients, plot_path=args.plot,
                                plot_title=f"{args.dataset}: {split} over {args.num_clients} "
                                           "clients")
  for k, v in stats.as_dict().items():
    print(f"{k:28s} {v:.4g}")
  if args.plot:
    print(f"wrote {args.plot}")
  return 0


def main(argv: list[str] | None = None) -> int:
  from fedjax_sim import __version__

  parser = _Parser(prog="fedjax-sim", description=__doc__)
  parser.add_argument("--version", action="version", version=f"fedjax-sim {__version__}")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  demo = sub.add_parser(
      "demo", help="DP-FedAvg on scikit-learn's handwritten digits, split non-IID over devices"
  )
  demo.add_argument("--num-clients", type=int, default=100)
  demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
  demo.add_argument("--cohort-size", type=int, default=50)
  demo.add_argument("--rounds", type=int, default=200)
  demo.add_argument("--eval-every", type=int, default=25)
  demo.add_argument("--local-epochs", type=int, default=2)
  demo.add_argument("--batch-size", type=int, default=8)
  demo.add_argument("--client-lr", type=float, default=0.1)
  demo.add_argument("--server-lr", type=float, default=1.0)
  demo.add_argument("--clip", type=float, default=1.0)
  demo.add_argument(
      "--noise-multiplier", type=float, default=0.3, help="z; pass --no-dp for plain FedAvg"
  )
  demo.add_argument("--no-dp", dest="noise_multiplier", action="store_const", const=None)
  demo.add_argument("--delta", type=float, default=1e-5, help="delta of the reported epsilon")
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--out", default="runs/demo",
                    help="run directory: metrics.jsonl, config.json, summary.json, PNG")
  demo.add_argument("--overwrite", action="store_true",
                    help="replace another run's log in --out (a previous demo's always is)")
  demo.set_defaults(func=_demo)
  priv = sub.add_parser(
      "privacy", help="user-level epsilon of DP-FedAvg for a sampler (or z for a target epsilon)"
  )
  priv.add_argument("--num-clients", type=int, required=True)
  priv.add_argument("--cohort-size", type=int, help="fixed-size cohorts of K")
  priv.add_argument("--q", type=float, help="Poisson sampling probability")
  priv.add_argument("--max-cohort-size", type=int, help="Poisson cap (truncation); default N")
  priv.add_argument("--noise-multiplier", type=float)
  priv.add_argument("--target-epsilon", type=float)
  priv.add_argument("--rounds", type=int, required=True)
  priv.add_argument("--delta", type=float, default=1e-5)
  priv.add_argument("--min-separation", type=int,
                    help="cyclic Poisson sampling: B bins, each client in one, --q within the bin "
                         "(a client participates at most once every B rounds)")
  priv.add_argument("--bands", type=int,
                    help="BandMF correlated noise with this many bands (needs --min-separation "
                         ">= bands); default 1 (independent noise, DP-FedAvg)")
  priv.add_argument("--max-participations", type=int, metavar="K",
                    help="at most K participations per client over --rounds (each client a "
                         "random window of K of its cycles; with --q, and --min-separation or "
                         "min-separation 1)")
  priv.add_argument("--tree", action="store_true",
                    help="DP-FTRL tree aggregation over --rounds rounds (Kairouz et al. 2021): one "
                         "Gaussian mechanism with the tree's sensitivity under the sampler's "
                         "participation schema, no amplification")
  priv.set_defaults(func=_privacy)
  run = sub.add_parser("run", help="run a simulation from a YAML config")
  run.add_argument("config")
  run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
  run.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in run.out_dir")
  run.add_argument("--overwrite", action="store_true",
                   help="delete the run already in run.out_dir and start over")
  run.add_argument("--quiet", action="store_true", help="no progress bar")
  run.set_defaults(func=_run)
  plot = sub.add_parser("plot", help="PNG learning curves of a run directory")
  plot.add_argument("run_dir")
  plot.set_defaults(func=_plot)
  data = sub.add_parser("data", help="dataset tools")
  data_sub = data.add_subparsers(dest="data_command", required=True)
  desc = data_sub.add_parser("describe", help="size and label statistics of a partition")
  desc.add_argument("--dataset", default="digits",
                    choices=["digits", "iris", "wine", "breast_cancer"])
  desc.add_argument("--num-clients", type=int, default=100)
  desc.add_argument("--partition", default="dirichlet", choices=["dirichlet", "iid", "shards"])
  desc.add_argument("--alpha", type=float, default=0.5)
  desc.add_argument("--shards-per-client", type=int, default=2)
  desc.add_argument("--min-examples", type=int, default=1,
                    help="fewest examples per client (0 allows empty clients)")
  desc.add_argument("--seed", type=int, default=0)
  desc.add_argument("--plot", default=None, help="PNG path for the histograms")
  desc.set_defaults(func=_describe)
  from fedjax_sim.data import disk as _disk  # fedjax-sim data convert

  _disk.add_convert_command(data_sub)
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help, --version, or a one-line usage error (code 2)
    return 0 if e.code is None else e.code
  from fedjax_sim.config import ConfigError

  name = " ".join(x for x in (args.command, getattr(args, "data_command", None)) if x)
  try:
    with warnings.catch_warnings():
      warnings.showwarning = lambda message, *_, **__: print(
          f"fedjax-sim {name}: warning: {' '.join(str(message).split())}", file=sys.stderr)
      return args.func(args)
  except (ConfigError, UsageError) as e:
    message = str(e)
  except (ValueError, TypeError, FileNotFoundError, PermissionError) as e:
    # An error of the API under the command: its argument names become this command's flags
    # (``run`` checks its config first, so this is a last resort there).
    message = str(e) if args.command == "run" else _as_flags(str(e))
  print(f"fedjax-sim {name}: {' '.join(message.split())}", file=sys.stderr)
  return 2


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (exit code 2, as argparse) instead of the usage block."""

  def error(self, message):
    self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


if __name__ == "__main__":
  sys.exit(main())
