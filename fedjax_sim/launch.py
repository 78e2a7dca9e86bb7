"""Local processes: one JAX process per core (or group of cores) of this machine, in one mesh.

On a CPU, XLA runs one client's training step on all cores, and a small model gains little from
the second one; pfl-research's answer is several single-threaded worker processes, each
training its own clients. This is fedjax_sim's: ``python -m fedjax_sim.launch --processes N``
starts the script ``N`` times, each process pinned to its own cores, joined by
:func:`fedjax_sim.sharding.initialize` (``jax.distributed`` over 127.0.0.1, gloo collectives)
into one program over ``N`` CPU devices. A :class:`~fedjax_sim.Simulation` without a ``mesh``
then splits every cohort across the processes: each device scans its own clients with the
one-client function (``Performance.per_device_scan``) and the cohort sums are all-reduced, so
the parameters equal the single-process run's up to the float summation order (clients'
randomness depends on the run key and their ids only).

The script needs one line more than a single-process one, before anything touches a device::

    import fedjax_sim as fs
    fs.sharding.initialize()   # reads what the launcher set; does nothing when not launched
    sim = fs.Simulation(algorithm, population, cohort_size=100)
    ...
    if jax.process_index() == 0:   # every process holds the same (replicated) results
      print(metrics["loss"][-1])

and is started with::

    python -m fedjax_sim.launch --processes 2 train.py --my-flag 1
    python -m fedjax_sim.launch --processes 2 -m mypackage.train

Process 0 writes to this terminal; the others to ``--log-dir`` (``process-<i>.log``; a
temporary folder, removed after a clean exit, by default). When one process fails the launcher
stops the others, prints the end of the failed process's log and exits with its status; Ctrl-C
or SIGTERM stops them all. Each process gets ``FEDJAX_SIM_HOST_DEVICES=1`` (one CPU device)
and, pinned to one core, ``--xla_cpu_multi_thread_eigen=false`` (its kernels keep to that
core). Process 0 alone writes a run's ``log_dir``; checkpoints are saved by all of them
together (orbax). The figures that compare it with one process are in docs/benchmarks.md.

This is for one machine. Across machines, start one process per host with your cluster's
launcher and call ``fs.sharding.initialize(address, num_processes, process_id)``
(docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

#: Environment variables the launcher sets for each process; :func:`fedjax_sim.sharding.
#: initialize` reads them.
ENV_COORDINATOR = "FEDJAX_SIM_COORDINATOR"
ENV_NUM_PROCESSES = "FEDJAX_SIM_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_SIM_PROCESS_ID"
#: The CPUs a process is pinned to (comma-separated; absent when not pinned).
ENV_CPUS = "FEDJAX_SIM_CPUS"
#: XLA:CPU flag that keeps a device's kernels on one thread (set for one-core processes).
SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"
#: Seconds between SIGTERM and SIGKILL when the launcher stops its processes.
GRACE_S = 10.0


def launched() -> bool:
  """Whether this process was started by the launcher (its environment names a process id).

  Returns:
    True inside ``python -m fedjax_sim.launch``'s processes.
  """
  return os.environ.get(ENV_PROCESS_ID) is not None


def launched_config() -> dict | None:
  """What the launcher told this process, or None when it was not launched.

  Returns:
    ``{"coordinator_address": str, "num_processes": int, "process_id": int}``.

  Raises:
    ValueError: the variables are set but incomplete or not numbers (naming the variable).
  """
  if not launched():
    return None
  values = {}
  for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID):
    if not os.environ.get(name):
      raise ValueError(f"{name} is not set while {ENV_PROCESS_ID} is: start the processes with "
                       "`python -m fedjax_sim.launch --processes N script.py` (or set all three "
                       f"of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).")
    values[name] = os.environ[name]
  try:
    num, pid = int(values[ENV_NUM_PROCESSES]), int(values[ENV_PROCESS_ID])
  except ValueError:
    raise ValueError(f"{ENV_NUM_PROCESSES}={values[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
                     f"{values[ENV_PROCESS_ID]!r} must be integers.") from None
  if not 0 <= pid < num:
    raise ValueError(f"{ENV_PROCESS_ID}={pid} must lie in [0, {ENV_NUM_PROCESSES}={num}).")
  return {"coordinator_address": values[ENV_COORDINATOR], "num_processes": num,
          "process_id": pid}


def available_cpus() -> list[int]:
  """The CPUs this process may run on (its affinity mask), sorted; ``os.cpu_count()`` ids where
  the platform has no affinity mask.

  Returns:
    A list of CPU ids.
  """
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def cpu_groups(processes: int, cpus_per_process: int,
               available: list[int] | None = None) -> list[tuple[int, ...]]:
  """Splits the available CPUs into one disjoint group per process, in order.

  Args:
    processes: number of processes (>= 1).
    cpus_per_process: CPUs each process is pinned to (>= 1).
    available: the CPUs to split (default :func:`available_cpus`).

  Returns:
    ``processes`` tuples of ``cpus_per_process`` CPU ids each.

  Raises:
    ValueError: a count below 1, or more CPUs asked for than there are (naming both flags).

  Examples:
    >>> cpu_groups(2, 1, available=[0, 1, 2, 3])
    [(0,), (1,)]
    >>> cpu_groups(2, 2, available=[0, 1, 2, 3])
    [(0, 1), (2, 3)]
  """
  if not isinstance(processes, int) or processes < 1:
    raise ValueError(f"--processes must be a positive integer; got {processes!r}.")
  if not isinstance(cpus_per_process, int) or cpus_per_process < 1:
    raise ValueError(f"--cpus-per-process must be a positive integer; got "
                     f"{cpus_per_process!r}.")
  cpus = available_cpus() if available is None else sorted(available)
  need = processes * cpus_per_process
  if need > len(cpus):
    raise ValueError(
        f"--processes {processes} x --cpus-per-process {cpus_per_process} pins {need} CPUs, but "
        f"this process may run on {len(cpus)} ({', '.join(map(str, cpus))}): lower --processes "
        "or --cpus-per-process, or pass --no-pin to let the processes share the CPUs.")
  return [tuple(cpus[i * cpus_per_process:(i + 1) * cpus_per_process])
          for i in range(processes)]


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free on ``host`` a moment ago (for the coordinator).

  Returns:
    The port number.
  """
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def child_env(base: dict, coordinator: str, processes: int, process_id: int,
              cpus: tuple[int, ...] | None) -> dict:
  """The environment of process ``process_id``.

  One host device per process (``FEDJAX_SIM_HOST_DEVICES=1``; a count the user set in
  ``XLA_FLAGS`` is theirs to keep), and single-threaded kernels when pinned to one CPU (unless
  ``XLA_FLAGS`` already sets ``xla_cpu_multi_thread_eigen``).

  Args:
    base: the environment to start from.
    coordinator: ``"host:port"`` of process 0's coordinator.
    processes: number of processes.
    process_id: this process's index.
    cpus: the CPUs it is pinned to, or None.

  Returns:
    A new environment dict.
  """
  env = dict(base)
  env[ENV_COORDINATOR] = coordinator
  env[ENV_NUM_PROCESSES] = str(processes)
  env[ENV_PROCESS_ID] = str(process_id)
  env["FEDJAX_SIM_HOST_DEVICES"] = "1"
  if cpus is None:
    env.pop(ENV_CPUS, None)
  else:
    env[ENV_CPUS] = ",".join(map(str, cpus))
    flags = env.get("XLA_FLAGS", "")
    if len(cpus) == 1 and "xla_cpu_multi_thread_eigen" not in flags:
      env["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_FLAG}".strip()
  return env


def pinned(command: list[str], cpus: tuple[int, ...] | None) -> list[str]:
  """``command`` started through a small python that pins itself to ``cpus`` and then execs it
  (the affinity survives ``exec``; no ``preexec_fn``, which is unsafe in a threaded parent).

  Returns:
    The command to start (``command`` itself when ``cpus`` is None).
  """
  if cpus is None:
    return list(command)
  code = (f"import os, sys; os.sched_setaffinity(0, {sorted(cpus)!r}); "
          "os.execvp(sys.argv[1], sys.argv[1:])")
  return [sys.executable, "-c", code, *command]


class _Terminated(Exception):
  """The launcher got SIGTERM."""


def _terminated(signum, frame):
  raise _Terminated


def _stop(procs, sig=signal.SIGTERM) -> None:
  """Signals every live process, then kills those still alive after :data:`GRACE_S`."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(sig)
  deadline = time.monotonic() + GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _tail(path: str, chars: int = 4000) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()[-chars:]
  except OSError as e:
    return f"(its log {path} could not be read: {e})"


def launch(command: list[str], processes: int, *, cpus_per_process: int = 1, pin: bool = True,
           log_dir: str | None = None, env: dict | None = None, poll_s: float = 0.1) -> int:
  """Runs ``command`` as ``processes`` local processes of one JAX run; returns the exit status.

  Args:
    command: the program and its arguments, e.g. ``[sys.executable, "train.py"]``.
    processes: number of processes (>= 1).
    cpus_per_process: CPUs each process is pinned to when ``pin``.
    pin: pin each process to its own CPUs (``os.sched_setaffinity``; on platforms without it,
      the processes are not pinned and a warning says so).
    log_dir: where processes 1.. write ``process-<i>.log``; default a temporary folder that is
      removed when every process exits cleanly (kept, and named, otherwise).
    env: the base environment (default ``os.environ``).
    poll_s: seconds between checks on the processes.

  Returns:
    0 when every process exited 0; else the status of the first that failed (130 on Ctrl-C,
    143 on SIGTERM: the processes are stopped either way).

  Raises:
    ValueError: bad counts, an empty command, or more CPUs than there are (before starting
      anything).

  Examples:
    >>> import sys
    >>> launch([sys.executable, "-c", "print('hi')"], 2, pin=False)  # doctest: +SKIP
    hi
    0
  """
  if not command:
    raise ValueError("command is empty: name the script to run, e.g. `python -m "
                     "fedjax_sim.launch --processes 2 train.py`.")
  if not isinstance(processes, int) or processes < 1:
    raise ValueError(f"--processes must be a positive integer; got {processes!r}.")
  groups: list = cpu_groups(processes, cpus_per_process) if pin else [None] * processes
  if pin and not hasattr(os, "sched_setaffinity"):
    print("fedjax_sim.launch: this platform cannot pin processes to CPUs; running unpinned.",
          file=sys.stderr)
    groups = [None] * processes
  own_log_dir = log_dir is None
  log_dir = tempfile.mkdtemp(prefix="fedjax_sim_launch_") if own_log_dir else log_dir
  os.makedirs(log_dir, exist_ok=True)
  coordinator = f"127.0.0.1:{free_port()}"
  base = dict(os.environ if env is None else env)
  procs, logs, paths = [], [], []
  previous = None
  if threading.current_thread() is threading.main_thread():  # SIGTERM stops them all, too
    previous = signal.signal(signal.SIGTERM, _terminated)
  try:
    for i, cpus in enumerate(groups):
      out = None
      if i > 0:
        paths.append(os.path.join(log_dir, f"process-{i}.log"))
        out = open(paths[-1], "w")  # noqa: SIM115 - closed in finally
        logs.append(out)
      procs.append(subprocess.Popen(pinned(command, cpus),
                                    env=child_env(base, coordinator, processes, i, cpus),
                                    stdout=out, stderr=subprocess.STDOUT if out else None))
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        _stop(procs)
        where = "above" if i == 0 else f"{paths[i - 1]}, its end:\n{_tail(paths[i - 1])}"
        print(f"fedjax_sim.launch: process {i} of {processes} exited with status {codes[i]} "
              f"({shlex.join(command)}); the others were stopped. Its output: {where}",
              file=sys.stderr)
        own_log_dir = False  # keep the logs
        return codes[i]
      if all(c == 0 for c in codes):
        return 0
      time.sleep(poll_s)
  except (KeyboardInterrupt, _Terminated) as e:
    term = isinstance(e, _Terminated)
    _stop(procs, signal.SIGTERM if term else signal.SIGINT)
    own_log_dir = False
    print(f"fedjax_sim.launch: {'terminated' if term else 'interrupted'}; processes stopped "
          f"(logs in {log_dir}).", file=sys.stderr)
    return 143 if term else 130
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    if any(p.poll() is None for p in procs):
      _stop(procs)
    for f in logs:
      f.close()
    if own_log_dir:
      shutil.rmtree(log_dir, ignore_errors=True)


#: The launcher's own options that take a value (the rest of the command line is the script's).
_VALUED = ("--processes", "-n", "--cpus-per-process", "--log-dir")


def _split(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
  """``(launcher options, module or None, command)``: the options end at the script, at ``-m
  MODULE`` or at ``--``; everything after belongs to the script."""
  i = 0
  while i < len(argv):
    token = argv[i]
    if token == "--":
      return argv[:i], None, argv[i + 1:]
    if token == "-m":
      if i + 1 >= len(argv):
        return argv[:i + 1], None, []  # argparse names the missing module
      return argv[:i], argv[i + 1], argv[i + 2:]
    if not token.startswith("-"):
      return argv[:i], None, argv[i:]
    i += 2 if token in _VALUED else 1
  return argv, None, []


def main(argv=None) -> int:
  """``python -m fedjax_sim.launch``: parses the command line and runs :func:`launch`.

  Returns:
    The exit status.
  """
  ap = argparse.ArgumentParser(
      prog="python -m fedjax_sim.launch",
      usage="python -m fedjax_sim.launch --processes N [options] (SCRIPT.py | -m MODULE | -- "
            "PROGRAM) [ARGS ...]",
      description="Start a fedjax_sim script as N local processes of one JAX run (one per core "
                  "by default). The script calls fs.sharding.initialize() first.")
  ap.add_argument("--processes", "-n", type=int, required=True, help="number of processes")
  ap.add_argument("--cpus-per-process", type=int, default=1,
                  help="CPUs each process is pinned to (default 1)")
  ap.add_argument("--no-pin", action="store_true", help="do not pin the processes to CPUs")
  ap.add_argument("--log-dir", default=None,
                  help="where processes 1.. write process-<i>.log (default: a temporary folder, "
                       "removed after a clean exit)")
  ap.add_argument("-m", dest="module", default=None, help="run a module, as `python -m`")
  options, module, command = _split(list(sys.argv[1:] if argv is None else argv))
  args = ap.parse_args(options)
  if module:
    command = [sys.executable, "-m", module, *command]
  elif command and command[0].endswith(".py"):
    command = [sys.executable, *command]
  if not command:
    ap.error("name the script to run: python -m fedjax_sim.launch --processes 2 train.py "
             "[ARGS] (or -m MODULE [ARGS])")
  try:
    return launch(command, args.processes, cpus_per_process=args.cpus_per_process,
                  pin=not args.no_pin, log_dir=args.log_dir)
  except ValueError as e:
    ap.error(str(e))
  except OSError as e:  # the program cannot start (not found, not executable)
    ap.error(f"cannot start {shlex.join(command)}: {e}")


if __name__ == "__main__":
  sys.exit(main())
