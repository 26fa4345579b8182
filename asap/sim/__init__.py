"""``asap simulate``: the services' own code in one process on a virtual clock (docs: README, DESIGN §11).

- ``loop``: the virtual-clock event loop; ``devices``: virtual compute queues and devices;
- ``transport``: the in-process transport (servicers called directly, no gRPC);
- ``cluster``: a whole cluster of a ``ClusterSpec`` on them, in a ``Layout``;
- ``client``: the benchmark's client of it; ``run``: one run per mode, tuned baselines.
"""
