"""Scheduler service: admits prefill requests, forms batches and places them on attention ranks.

No grpc below the glue:

- ``core``: admission, the request queue, rank health, lifecycle; picks the mode's dispatcher.
- ``dispatch``: the ``Dispatcher`` interface, the core API it uses, and the async dispatcher;
  ``sync``: the global-step dispatcher of the sync baselines (``steps`` plans each step).
- ``policy`` / ``minbatch``: when an async batch goes; ``placement``: which rank runs it (every mode).
- ``ranks``: the rank table (the one record of rank health) and the ``RankClient`` interface;
  ``health``: the monitor that probes ranks and records changes in the core.
- ``costmodel``: predicted batch time; ``calibration``: fitting it on a rank at start-up.
- ``requests``, ``config``: the values the core takes and returns, and its settings.

The boundary and the grpc glue: ``validation`` (a ``PrefillRequest`` at the boundary), ``tracing`` (a
request's trace context and spans), ``attention_client`` (the streams to the attention ranks), ``server``
(the ``asap.v1.Scheduler`` servicer, which only adapts messages, and the service lifecycle).
"""
