"""Host CPU set-up: one client per host device, and faster XLA:CPU flags, before jax starts.

Step-only (issue 14), one client per *host device* (``jax_num_cpu_devices``, a ``shard_map``
over 2 devices) was the fastest way to run a CNN on 2 cores, and two XLA:CPU flags sped a
single-device step up. Both the device count and the flags are read once, when jax initialises
its CPU backend (the first ``jax.devices()``, array or compile), so they must be set before it.
In the engine, a :class:`~fedjax_sim.Simulation` on several host devices runs the chunk pass
inside a ``jax.shard_map`` over them (``Performance.per_device_scan``,
:func:`fedjax_sim.core.per_device_pass`): each device scans its own clients with the one-client
function (no batch dimension, so a CNN runs a single client's plain convolution) and the sums
are reduced with one ``psum``. (The partitioner's split of a vmapped chunk, used before, gathered
both clients' kernels, inputs and gradients on every device at every local step and ran them
twice: ``python -m benchmarks.host_devices_hlo``.) The flags are on by default; the host devices
stay opt-in until a quiet re-measure shows the split ahead on every workload
(docs/benchmarks.md):

* ``import fedjax_sim`` does it automatically when jax's backend has not started yet: it appends
  :data:`FAST_XLA_FLAGS` to ``XLA_FLAGS`` and, when ``FEDJAX_SIM_HOST_DEVICES`` asks for it
  (``auto`` or a number; the default is ``1``, see :data:`DEFAULT_DEVICES`), sets
  ``jax_num_cpu_devices``. With more than one such device a :class:`~fedjax_sim.Simulation`
  without a ``mesh`` (and with an automatic ``chunk_size``) on CPU runs each device's share of
  every chunk there (:func:`default_mesh`, ``per_device_scan``). Results equal the
  single-device ones up to the float summation order (clients' randomness depends on their ids
  only).
* Nothing is overridden: a flag already named in ``XLA_FLAGS`` keeps the user's value; a device
  count the user chose (``--xla_force_host_platform_device_count`` or ``jax_num_cpu_devices``)
  is kept, and then no mesh is added for them. Flags are only added on the jaxlib versions they
  were tested on (:data:`FLAGS_TESTED_ON`): XLA aborts the process on a flag it does not know.
* If jax already started (``jax.devices()`` before ``import fedjax_sim``), nothing changes and
  the engine runs as before on the devices there are.
* Switches (environment, read at import): ``FEDJAX_SIM_HOST_DEVICES`` = ``1``/``off``
  (default: one device, no mesh), ``auto`` (the core count) or a number;
  ``FEDJAX_SIM_XLA_FLAGS`` = ``1`` (default) or ``0``. Or call :func:`configure` yourself,
  right after ``import jax``.

Figures: ``python -m benchmarks.host_devices --workloads cifar cnn dense --modes 1dev-fast
Ndev-fast --repeats 3 --num-clients 200 --target-seconds 4`` (engine end to end, interleaved)
and ``benchmarks/ceiling.py`` (step-only); see docs/benchmarks.md.
"""

from __future__ import annotations

import os
import shlex

import jax

#: Environment switch for the host device count ("auto", a number, "1" or "off").
ENV_DEVICES = "FEDJAX_SIM_HOST_DEVICES"
#: Environment switch for :data:`FAST_XLA_FLAGS` ("1" or "0").
ENV_FLAGS = "FEDJAX_SIM_XLA_FLAGS"
#: XLA:CPU flags that made a CNN training step faster (YNNPACK fusion off, XNNPACK greedy
#: graph fusion; +11-16% on one device in issue 14's step-only measurements, jaxlib 0.10.2).
FAST_XLA_FLAGS = (
    ("xla_cpu_experimental_ynn_fusion_type", ""),
    ("xla_cpu_experimental_xnn_graph_fusion_mode", "XNN_GRAPH_FUSION_MODE_GREEDY"),
)
#: jaxlib versions on which :data:`FAST_XLA_FLAGS` exist (XLA aborts on an unknown flag).
FLAGS_TESTED_ON = ("0.10.2",)
#: ``FEDJAX_SIM_HOST_DEVICES`` when unset. "1" (one device) because the engine figures measured
#: so far (benchmarks/host_devices.py at load 5-11, docs/benchmarks.md) do not show the
#: per-device scan ahead on every workload; "auto" once a quiet re-measure does.
DEFAULT_DEVICES = "1"
#: Most host devices set automatically.
MAX_AUTO_DEVICES = 8

#: ``XLA_FLAGS`` as it was when fedjax_sim was imported (None: unset); give this to child
#: processes that run another jax (the benchmark peers), whose XLA may not know our flags.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")

_state = {"devices": None, "flags": ()}


def backend_started() -> bool:
  """Whether jax has initialised its backends (after which device count and flags are fixed)."""
  from jax._src import xla_bridge

  return bool(xla_bridge.backends_are_initialized())


def _flag_names(xla_flags: str) -> set[str]:
  return {tok.lstrip("-").split("=", 1)[0] for tok in shlex.split(xla_flags)}


def _jaxlib_version() -> str:
  import jaxlib

  return jaxlib.__version__


def configure(num_devices: int | str | None = "auto", fast_flags: bool = True) -> dict:
  """Sets the host device count and the fast XLA:CPU flags; call it before jax starts.

  Args:
    num_devices: ``"auto"`` (the core count, at most :data:`MAX_AUTO_DEVICES`), a positive
      int, or None (leave jax's default, one CPU device). Left alone when the user already
      chose a count (``XLA_FLAGS``' ``--xla_force_host_platform_device_count`` or
      ``jax_num_cpu_devices``).
    fast_flags: append :data:`FAST_XLA_FLAGS` to ``XLA_FLAGS`` (each unless ``XLA_FLAGS``
      already names it, and only on the jaxlib versions of :data:`FLAGS_TESTED_ON`).

  Returns:
    ``{"devices": count set or None, "flags": flags added}``.

  Raises:
    RuntimeError: jax's backend already started; the message says how to call it earlier.
    ValueError: ``num_devices`` is not ``"auto"`` or a positive int.

  Examples:
    >>> import jax                          # doctest: +SKIP
    >>> import fedjax_sim as fs             # doctest: +SKIP
    >>> fs.host_cpu.configure(2)            # doctest: +SKIP
    {'devices': 2, 'flags': (...)}
  """
  if num_devices not in ("auto", None) and not (isinstance(num_devices, int)
                                                and num_devices >= 1):
    raise ValueError(f"num_devices must be 'auto', a positive int or None; got "
                     f"{num_devices!r}.")
  if backend_started():
    raise RuntimeError(
        "fedjax_sim.host_cpu.configure() must run before jax starts its backend (the first "
        "jax.devices(), array or jit call fixes the device count and XLA flags); call it right "
        "after `import jax`, or set FEDJAX_SIM_HOST_DEVICES / FEDJAX_SIM_XLA_FLAGS before "
        "`import fedjax_sim`.")
  xla_flags = os.environ.get("XLA_FLAGS", "")
  names = _flag_names(xla_flags)
  done = {"devices": None, "flags": ()}
  user_count = ("xla_force_host_platform_device_count" in names
                or jax.config.jax_num_cpu_devices >= 0)
  if not user_count and num_devices is not None:
    n = min(os.cpu_count() or 1, MAX_AUTO_DEVICES) if num_devices == "auto" else num_devices
    jax.config.update("jax_num_cpu_devices", n)
    done["devices"] = n
  if fast_flags and _jaxlib_version() in FLAGS_TESTED_ON:
    added = tuple(f"--{k}={v}" for k, v in FAST_XLA_FLAGS if k not in names)
    if added:
      os.environ["XLA_FLAGS"] = " ".join([xla_flags, *added]).strip()
    done["flags"] = added
  _state.update(done)
  return done


def auto_configure() -> dict | None:
  """What ``import fedjax_sim`` runs: :func:`configure` from the environment switches.

  Returns:
    :func:`configure`'s result, or None when jax had already started or both switches are off.
  """
  devices = os.environ.get(ENV_DEVICES, DEFAULT_DEVICES).strip().lower()
  flags = os.environ.get(ENV_FLAGS, "1").strip() not in ("0", "off", "false", "")
  if backend_started():
    return None
  if devices in ("off", "0", "1"):
    devices = None
  elif devices != "auto":
    try:
      devices = int(devices)
      if devices < 1:
        raise ValueError
    except ValueError:
      raise ValueError(f"{ENV_DEVICES}={os.environ[ENV_DEVICES]!r}: use 'auto', a positive "
                       "number of host devices, or 'off'.") from None
  return configure(devices, fast_flags=flags)


def added_flags() -> tuple[str, ...]:
  """The XLA flags :func:`configure` added to ``XLA_FLAGS`` in this process (a run records them
  in its ``config.json``).

  Returns:
    e.g. ``("--xla_cpu_experimental_ynn_fusion_type=", ...)``; ``()`` when none were added.
  """
  return tuple(_state["flags"])


def default_mesh():
  """The mesh a :class:`~fedjax_sim.Simulation` without one uses, or None.

  A ``clients`` mesh over the CPU devices when :func:`configure` set more than one of them and
  CPU is jax's default backend, or over every process's CPU devices in a multi-process run
  (``python -m fedjax_sim.launch``, :func:`fedjax_sim.sharding.initialize`); None otherwise
  (one device, a GPU/TPU, or a device count the user chose, whose mesh the user passes).

  Returns:
    A :class:`jax.sharding.Mesh` or None.
  """
  if jax.process_count() > 1:  # several processes (python -m fedjax_sim.launch): all of them
    devices = jax.devices()
    if devices[0].platform != "cpu":
      return None
  else:
    if not _state["devices"] or _state["devices"] < 2:
      return None
    devices = jax.devices()
    if devices[0].platform != "cpu" or len(devices) < 2:
      return None
  from fedjax_sim.sharding import clients_mesh

  return clients_mesh(devices)


auto_configure()  # at import (fedjax_sim/__init__.py imports this module first)
