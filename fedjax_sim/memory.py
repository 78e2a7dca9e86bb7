"""Device memory: what a compiled round needs (XLA's own figures) and the automatic budget.

A round holds the population and the server state (arguments; the state is donated, so the new
state reuses its buffers) plus temporaries. The client pass runs the cohort in chunks inside a
``lax.scan``, so its temporaries are O(chunk x params); only the cohort's ids, masks and sort
keys are O(cohort) (a few bytes per client), and drawing the cohort is O(population) (one score
per client). :func:`round_memory` reads these figures from XLA's compiled memory analysis
(``jax.jit(...).lower(...).compile().memory_analysis()``), without running the round.

On an accelerator the automatic chunk size comes from ``Simulation.memory_budget``, which by
default is :func:`device_memory_budget`: a fraction of the device memory that the population and
the state leave free (``device.memory_stats()["bytes_limit"]``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

#: Fraction of the free device memory (after the population and the state) given to the client
#: pass by default. The rest is headroom for the server update, the cohort draw and the
#: allocator's fragmentation; the client-pass estimate itself is conservative
#: (``benchmarks/results/cpu-2core/memory.md``).
BUDGET_FRACTION = 0.5
#: The default budget on CPU, where the chunk is chosen for speed (FLOPs per step), not memory.
CPU_BUDGET_BYTES = 256 * 2**20
#: Assumed device memory when a backend reports no ``memory_stats()``.
FALLBACK_DEVICE_BYTES = 16 * 2**30


#: On CPU, a chunk is sized so that one vmapped local step does at least about this many FLOPs
#: (tiny models: a digits MLP's 227 kFLOP step ran 8.1k client-updates/s at chunk 1, 16.1k at 5).
CPU_STEP_FLOPS = 1e6
#: On CPU, clients of a dense (non-convolutional) model whose local step is at most this many
#: FLOPs (counted from the loss's jaxpr, else ``6 * params * batch_size``) are vmapped in chunks
#: chosen against their padding (:func:`cpu_vmap_chunk`); heavier or convolutional models run
#: one client at a time.
CPU_VMAP_STEP_FLOPS = 5e7
#: The modelled speed-up per step slot of a vmapped chunk of ``c`` such clients on CPU, from
#: batching the step's kernels: ``1 + CPU_VMAP_GAIN * log2(min(c, CPU_VMAP_GAIN_CHUNK))``, i.e.
#: 1.225x at chunk 8, 1.30x at 16, 1.375x at 32 and above. Measured on a 2-core CPU, jax 0.10.2,
#: EMNIST-shaped logistic and dense models at cohorts 100 and 1000, same cohorts (chunk 1's
#: median time / chunk c's, times their padding ratio, two sittings): 1.03-1.33x at chunk 8,
#: 1.14-1.45x at 16, 1.16-1.55x at 32; ``benchmarks/chunk_check.py``, docs/benchmarks.md "The
#: automatic chunk on CPU".
CPU_VMAP_GAIN = 0.075
#: The batching gain is not modelled past this chunk (the largest measured on the dense models).
CPU_VMAP_GAIN_CHUNK = 32
#: What one vmapped local step costs on CPU beyond its clients' own work, in FLOPs of their
#: work: the loop iteration, the batch gather and the per-op dispatch, paid once per chunk and
#: so shared by its clients. Fitted on the population workload (a 610-parameter model, 38 kFLOP
#: per step, cohort 10^4: per step slot chunk 1 ran 3.1x slower than 16 and 3.4x slower than 256,
#: which give 6.5e4 and 5.7e4; chunk_check.jsonl sitting 4b). The light dense models' gains
#: above are explained without it (it is 1.0 % of the logistic model's 5.9 MFLOP step and
#: 0.24 % of the dense model's 25 MFLOP).
CPU_VMAP_STEP_OVERHEAD_FLOPS = 6e4
#: ``Performance.trim_last_batch=None`` trims the partial last batches of clients that run
#: alone (one-client chunks, per-device scans) when one local step counts at least this many
#: FLOPs: there the masked slots cost more than compiling the step at three more batch sizes
#: (the EMNIST CNN's step, ~5.6e8 FLOPs at batch 20, paid 9.4 % masked slots; a logistic
#: model's 5.9e6 FLOP step is mostly fixed cost).
TRIM_STEP_FLOPS = 1e7
#: :func:`cpu_vmap_chunk` takes the smallest chunk modelled within this fraction of the fastest
#: (the model is no finer than that; a larger chunk must earn its place).
CPU_VMAP_MARGIN = 0.01
#: The largest chunk :func:`cpu_vmap_chunk` considers (the largest measured to gain: the
#: population workload's chunks 256 and 512 ran level).
CPU_MAX_CHUNK = 256


def padding_factor(steps: Any, chunk: int, sort_by_size: bool = True) -> float:
  """Step slots paid / steps needed when ``steps`` (per-client local step counts) run in chunks.

  A chunk runs as many steps as its largest client; the cohort is padded with zero-step clients
  to whole chunks. Computed exactly on the host.

  Returns:
    A factor >= 1 (1.0 when no client has a step).

  Example:
    >>> padding_factor([5, 1, 1, 1], 2)  # sorted: [5, 1 | 1, 1] -> 2*5 + 2*1 = 12 slots for 8
    1.5
  """
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  s = np.asarray(steps, np.int64)
  if sort_by_size:
    s = np.sort(s)[::-1]
  n = math.ceil(len(s) / chunk) * chunk
  s = np.concatenate([s, np.zeros(n - len(s), np.int64)]).reshape(-1, chunk)
  need = int(s.sum())
  return float(chunk * s.max(1).sum() / need) if need else 1.0


def cpu_vmap_chunk(steps: Any, limit: int, sort_by_size: bool = True,
                   step_flops: float | None = None) -> int:
  """The CPU chunk for a light dense model: of the powers of two ``c <= limit``, each balanced
  over the cohort (``ceil(K / ceil(K / c))`` for ``K = len(steps)`` clients), the smallest whose
  modelled time per step is within ``CPU_VMAP_MARGIN`` of the least; chunk ``c``'s is
  ``padding_factor(steps, c) * (CPU_VMAP_STEP_OVERHEAD_FLOPS / c + step_flops / (1 +
  CPU_VMAP_GAIN * log2(min(c, CPU_VMAP_GAIN_CHUNK))))``.

  A vmapped chunk runs as many local steps as its largest client, so a larger chunk pays more
  padding (much less in a large cohort, which the round sorts by size). Against it: XLA:CPU
  runs a light model's batched step a little faster per client than a single client's, and a
  chunk shares one step's fixed cost (loop, gather, dispatch) among its clients, which is most
  of a tiny model's step. ``steps`` is one cohort's local steps
  (:func:`fedjax_sim.autotune.cohort_steps`), so the padding is exact for it.

  Args:
    steps: one cohort's local steps per client.
    limit: the largest chunk allowed (the memory bound).
    sort_by_size: the round sorts the cohort by size.
    step_flops: one client's local step in FLOPs; None: a step heavy enough that its fixed
      cost does not count.

  Returns:
    The chunk size: the smallest modelled within ``CPU_VMAP_MARGIN`` of the fastest.

  Example:
    >>> cpu_vmap_chunk([4] * 100, 16)  # equal clients, at most 16: 7 chunks of 15, not 7 of 16
    15
    >>> cpu_vmap_chunk([40, 1, 1, 1, 1, 1, 1, 1], 8)  # a chunk with the big client pays its steps
    1
    >>> cpu_vmap_chunk([1] * 10_000, 10_000, step_flops=4e4)  # tiny: the cap, 40 chunks of 250
    250
  """
  k = max(len(steps), 1)
  work = 1.0 if step_flops is None else max(float(step_flops), 1.0)
  overhead = 0.0 if step_flops is None else CPU_VMAP_STEP_OVERHEAD_FLOPS / work

  def cost(c: int) -> float:
    gain = 1.0 + CPU_VMAP_GAIN * math.log2(min(c, CPU_VMAP_GAIN_CHUNK))
    return padding_factor(steps, c, sort_by_size) * (overhead / c + 1.0 / gain)

  costs = {1: cost(1)}
  c = 2
  while c <= min(limit, CPU_MAX_CHUNK):
    balanced = math.ceil(k / math.ceil(k / c))
    costs.setdefault(balanced, cost(balanced))
    c *= 2
  least = min(costs.values())
  return min(c for c, t in costs.items() if t <= least * (1.0 + CPU_VMAP_MARGIN))


def auto_chunk_size(
    cohort_size: int,
    num_params: int,
    example_bytes: int,
    batch_size: int,
    memory_budget: int,
    platform: str = "cpu",
    frozen_params: int = 0,
    *,
    steps: Any = None,
    convolutional: bool = False,
    sort_by_size: bool = True,
    step_flops: float | None = None,
) -> int:
  """Clients per vmapped chunk.

  Memory bound (every backend): one client in flight holds ~8 copies of the parameters (local
  params, gradient, optimizer state, delta, loop carries) plus its batch with activations
  (estimated as 4x the input bytes); the chunk fits in ``memory_budget``.

  CPU (the chunk is chosen for speed): a client's local step costs ``step_flops`` (the loss's
  jaxpr counted by :func:`fedjax_sim.flops.count_flops`, times 3 for the backward pass; when not
  given, estimated as ``6 * params * batch_size``, which undercounts sequence models by their
  length and convolutions by their weight sharing).

  * Convolutional models (convolutions in the counted step; without a count, a parameter of 4
    or more dimensions) and steps above
    ``CPU_VMAP_STEP_FLOPS`` run one client at a time: the CPU convolution's vmap rule loops over
    the chunk's clients, and a heavy step keeps both cores busy alone (measured: EMNIST CNN
    cohort 10, chunk 2 0.79x chunk 1; pfl's CIFAR CNN and the language models the same way).
  * Lighter dense models with ``steps`` (one cohort's local steps, known to the host): the
    chunk of :func:`cpu_vmap_chunk`, which weighs the padding a chunk pays (exact for that
    cohort) against XLA:CPU's per-client gain from batching and the step's fixed cost that a
    chunk shares (measured: EMNIST-shaped MLP, cohort 1000, chunk 1 0.71x the best chunk of
    1-32, chunks 16-32 best; cohort 100, chunks 2-8 best; the population workload's 38 kFLOP
    step, cohort 10^4, chunk 1 0.30x and 32 0.88-0.94x the best, 256-512).
  * Otherwise (``steps`` not known, or one client a chunk by the rules above) tiny steps are
    still vmapped up to ``CPU_STEP_FLOPS`` per vmapped step (digits MLP, 227 kFLOP per step:
    8.1k client-updates/s at 1, 16.1k at 5).

  Frozen parameters (``trainable=``; ``frozen_params`` of the ``num_params``) are held once for
  the whole chunk, not per client: they take ``4 * frozen_params`` bytes off the budget.

  The number of chunks is then balanced so that padded slots are fewer than the chunks.

  Args:
    cohort_size: the cohort capacity K.
    num_params: the model's parameters (all of them).
    example_bytes: bytes of one example's features.
    batch_size: the local batch size.
    memory_budget: bytes for the client pass.
    platform: the backend (``"cpu"``: the chunk is chosen for speed).
    frozen_params: the parameters not trained (held once per chunk).
    steps: on CPU, one cohort's local steps per client (the padding of a light model's
      chunk); None: ``CPU_STEP_FLOPS`` per vmapped step (one client for any model above it).
    convolutional: the model has convolution kernels (one client at a time on CPU).
    sort_by_size: the round sorts the cohort by size (``Performance.sort_by_size``).
    step_flops: the FLOPs of one client's local step (forward and backward), or None.

  Returns:
    The chunk size, between 1 and ``cohort_size``.

  Examples:
    >>> from fedjax_sim.memory import auto_chunk_size
    >>> auto_chunk_size(1000, 10_000, 4 * 784, 32, 2**30, "gpu")
    1000
    >>> auto_chunk_size(1000, 10_000, 4 * 784, 32, 2**30, "cpu")  # ~1 MFLOP per vmapped step
    1
    >>> auto_chunk_size(1000, 200_000, 4 * 784, 20, 2**28, "cpu", steps=[5] * 1000)  # light MLP
    32
  """
  chunk = min(cohort_size, memory_bound_chunk(num_params, example_bytes, batch_size,
                                              memory_budget, frozen_params))
  if platform == "cpu":
    if step_flops is None:
      step_flops = 6.0 * num_params * batch_size
    if steps is not None and not convolutional and step_flops <= CPU_VMAP_STEP_FLOPS:
      want = cpu_vmap_chunk(steps, chunk, sort_by_size, step_flops)
    else:
      want = int(round(CPU_STEP_FLOPS / max(step_flops, 1.0)))
    chunk = max(1, min(chunk, want))
  num_chunks = math.ceil(cohort_size / chunk)
  return math.ceil(cohort_size / num_chunks)


def memory_bound_chunk(num_params: int, example_bytes: int, batch_size: int,
                       memory_budget: int, frozen_params: int = 0) -> int:
  """The most clients in flight that fit ``memory_budget`` (:func:`auto_chunk_size`'s memory
  bound, before the CPU rule and the balancing of chunks).

  Returns:
    An int >= 1.

  Example:
    >>> memory_bound_chunk(10_000, 4 * 784, 32, 2**30)
    1488
  """
  per_client = 8 * 4 * (num_params - frozen_params) + 4 * example_bytes * batch_size
  budget = max(memory_budget - 4 * frozen_params, 0)
  return max(1, budget // max(per_client, 1))


def chunk_size_for(cohort_size: int, params: Any, frozen: Any, batch_spec: dict,
                   batch_size: int, memory_budget: int, mesh: Any = None,
                   requested: int | None = None, *, steps: Any = None,
                   sort_by_size: bool = True, step_flops: float | None = None,
                   convolutional: bool | None = None) -> int:
  """The chunk a :class:`~fedjax_sim.Simulation` runs: ``requested`` (fitted to the mesh) or
  :func:`auto_chunk_size` per device (with a mesh each device holds ``chunk / n`` clients).

  Args:
    cohort_size: the cohort capacity K.
    params: the model (its size).
    frozen: the frozen view of the params (``trainable=``), or None.
    batch_spec: the shapes of one batch (``fedjax_sim.runs.planning.batch_spec``).
    batch_size: its batch size.
    memory_budget: bytes per device for the client pass.
    mesh: the mesh with a ``clients`` axis, or None.
    requested: the user's ``chunk_size``, or None.
    steps: one cohort's local steps per client (:func:`fedjax_sim.autotune.cohort_steps`), for
      the CPU rule of a light model without a mesh (:func:`auto_chunk_size`); None: not known.
    sort_by_size: the round sorts the cohort by size.
    step_flops: one client's local step in FLOPs (:func:`auto_chunk_size`), or None.
    convolutional: the model convolves (from the FLOP count); None: it has a parameter of 4
      or more dimensions.

  Returns:
    The chunk size (a multiple of the mesh's ``clients`` axis).
  """
  from fedjax_sim import sharding

  n = 1 if mesh is None else sharding.mesh_size(mesh)
  count = lambda tree: int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
  chunk = requested
  if chunk is None:
    example_bytes = sum(int(np.prod(v.shape[1:])) * np.dtype(v.dtype).itemsize
                        for v in batch_spec.values())
    conv = (any(np.ndim(x) >= 4 for x in jax.tree.leaves(params)) if convolutional is None
            else convolutional)
    chunk = n * auto_chunk_size(-(-cohort_size // n), count(params), example_bytes, batch_size,
                                memory_budget, default_device().platform,
                                frozen_params=count(frozen), steps=steps if n == 1 else None,
                                convolutional=conv, sort_by_size=sort_by_size,
                                step_flops=step_flops)
  elif n == 1:
    chunk = min(chunk, cohort_size)
  return sharding.fit_chunk(chunk, cohort_size, n, requested)


class MemoryAnalysis(NamedTuple):
  """XLA's memory figures for one compiled program, in bytes (per device under a mesh).

  Attributes:
    argument_bytes: inputs: the server state and the population.
    output_bytes: outputs: the new server state and the metrics.
    alias_bytes: outputs written into donated inputs (the state); counted once in ``peak_bytes``.
    temp_bytes: temporaries (the client pass, the cohort draw, the server update).
    generated_code_bytes: compiled code (0 on backends that do not report it).
  """

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int

  @property
  def peak_bytes(self) -> int:
    """An upper bound on the device memory the program holds at once (excluding code)."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def default_device() -> Any:
  """The device whose memory the budget refers to: ``jax.devices()[0]`` (patched in tests)."""
  return jax.devices()[0]


def tree_bytes(tree: Any) -> int:
  """Bytes held by the array leaves of ``tree`` (arrays or ``ShapeDtypeStruct``s).

  Returns:
    The sum of ``size * itemsize`` over the leaves.
  """
  def nbytes(x) -> int:
    dtype = x.dtype
    itemsize = dtype.itemsize if hasattr(dtype, "itemsize") else np.dtype(dtype).itemsize
    return int(np.prod(np.shape(x))) * int(itemsize)  # typed PRNG keys report their data size

  return sum(nbytes(x) for x in jax.tree.leaves(tree))


def device_memory_budget(reserved_bytes: int = 0, device: Any = None) -> int:
  """Bytes the client pass may use on ``device`` after ``reserved_bytes`` of resident data.

  On CPU: :data:`CPU_BUDGET_BYTES` (the chunk is sized for speed there). On an accelerator:
  ``BUDGET_FRACTION * (bytes_limit - max(reserved_bytes, bytes_in_use))`` from
  ``device.memory_stats()``, where ``reserved_bytes`` is what the simulation keeps on the device
  (its population and server state; ``bytes_in_use`` also counts what else is allocated).

  Args:
    reserved_bytes: the population and state bytes on this device.
    device: default :func:`default_device`.

  Returns:
    The budget in bytes (at least 1).

  Examples:
    >>> import fedjax_sim as fs
    >>> fs.memory.device_memory_budget(0) > 0
    True
  """
  dev = default_device() if device is None else device
  if dev.platform == "cpu":
    return CPU_BUDGET_BYTES
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # noqa: BLE001 - memory_stats is optional per backend
    stats = {}
  limit = int(stats.get("bytes_limit", FALLBACK_DEVICE_BYTES))
  used = max(int(reserved_bytes), int(stats.get("bytes_in_use", 0)))
  return max(1, int(BUDGET_FRACTION * max(limit - used, 0)))


def resident_bytes(population: Any, state: Any = None, *, mesh: Any = None,
                   population_on: str = "device") -> int:
  """Bytes a run keeps on one device: its population and (optionally) ``state``.

  A population split over a mesh (``population_on="sharded"``) counts ``1/n`` per device; one
  kept on the host (``population_on="host"``) counts nothing. Per-client state split along the
  mesh counts ``1/n``.

  Args:
    population: the clients' data (arrays or ``ShapeDtypeStruct`` leaves).
    state: the ``ServerState`` (or its shapes), or None.
    mesh: the run's mesh, or None.
    population_on: ``"device"``, ``"sharded"`` or ``"host"``.

  Returns:
    The byte count.
  """
  from fedjax_sim import sharding  # (sharding imports nothing of this module)

  shards = 1 if mesh is None else sharding.mesh_size(mesh)
  pop = 0 if population_on == "host" else tree_bytes(population)
  if population_on == "sharded":
    pop = -(-pop // shards)
  if state is None:
    return pop
  per_client = tree_bytes((state.client_states, state.agg_client_states))
  server = tree_bytes(state) - per_client
  return pop + server + -(-per_client // shards)


def round_memory(sim: Any, state: Any, *, block_size: int | None = None) -> MemoryAnalysis:
  """``sim.round_memory(state, block_size=...)`` (:meth:`fedjax_sim.Simulation.round_memory`).

  The analysis itself takes values: :func:`fedjax_sim.programs.memory_analysis` (plan,
  population, state); this form is kept for callers of ``fs.memory.round_memory(sim, state)``.

  Returns:
    A :class:`MemoryAnalysis` (per device under a mesh).

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_sim as fs
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 3)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
    >>> pop = fs.Population.from_arrays({"x": x, "y": y}, rng.integers(0, 20, 200))
    >>> loss_fn = fs.models.classifier_loss(lambda p, x: x @ p["w"] + p["b"])
    >>> algo = fs.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.5), batch_size=8,
    ...                             local_epochs=1)
    >>> sim = fs.Simulation(algo, pop, cohort_size=5, chunk_size=5)
    >>> state = sim.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, jax.random.key(0))
    >>> m = fs.memory.round_memory(sim, state)
    >>> m.temp_bytes > 0 and m.peak_bytes >= m.argument_bytes
    True
  """
  return sim.round_memory(state, block_size=block_size)


def analysis_of(compiled: Any) -> MemoryAnalysis:
  """The :class:`MemoryAnalysis` of a compiled program (``jax.jit(f).lower(...).compile()``).

  Returns:
    The figures.

  Raises:
    ValueError: the backend gives no memory analysis.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    raise ValueError(
        f"the {default_device().platform} backend gives no compiled memory analysis.")
  return MemoryAnalysis(
      argument_bytes=int(stats.argument_size_in_bytes),
      output_bytes=int(stats.output_size_in_bytes),
      alias_bytes=int(stats.alias_size_in_bytes),
      temp_bytes=int(stats.temp_size_in_bytes),
      generated_code_bytes=int(getattr(stats, "generated_code_size_in_bytes", 0)),
  )
