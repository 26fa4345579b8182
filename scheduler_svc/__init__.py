"""Scheduler service: admits prefill requests, forms batches and places them on attention ranks.

``core`` (with ``config``, ``costmodel``, ``placement``, ``policy``) holds the scheduling logic and has no
grpc imports; ``server`` adapts it to the ``asap.v1.Scheduler`` service.
"""
