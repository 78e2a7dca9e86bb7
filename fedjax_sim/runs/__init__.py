"""The host wing: how a run is planned, identified, stored and recorded, from values.

Read in this order (each imports only those before it, never the facade):

* :mod:`fedjax_sim.runs.store`: orbax I/O of a state and its saved fingerprint (imports nothing
  of the package);
* :mod:`fedjax_sim.runs.identity`: the digests, the fingerprint, the run id and the one
  :func:`~fedjax_sim.runs.identity.compare`, from the plan, the population and the state;
* :mod:`fedjax_sim.runs.ownership`: which run a checkpoint or log directory belongs to;
* :mod:`fedjax_sim.runs.log`: the metrics log (``metrics.jsonl``, ``config.json``, CSV);
* :mod:`fedjax_sim.runs.recorder`: the run loop's bookkeeping, the signal flag and the run
  exceptions (one base class carrying the state);
* :mod:`fedjax_sim.runs.planning`: every pre-compile check and
  :func:`~fedjax_sim.runs.planning.plan`, the one place a
  :class:`~fedjax_sim.core.RoundPlan` is assembled;
* :mod:`fedjax_sim.runs.simulation`: :class:`~fedjax_sim.Simulation`, the facade over them.

This ``__init__`` imports nothing, so importing one module of the wing does not import the rest.
"""
