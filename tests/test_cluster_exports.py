"""asap.cluster still exports what it did before it was split, as the objects of their home modules."""

from __future__ import annotations

import asap.child_process
import asap.cluster
import asap.clusterspec
import asap.knee_cache

HOMES = {
    "METRICS_LINE": asap.child_process,
    "READY_LINE": asap.child_process,
    "ChildProcess": asap.child_process,
    "wait_healthy": asap.child_process,
    "calibrated_knee": asap.knee_cache,
    "LocalCluster": asap.cluster,
    "ClusterSpec": asap.clusterspec,
    "RankSpec": asap.clusterspec,
    "ServiceCommand": asap.clusterspec,
    "attention_commands": asap.clusterspec,
    "expert_commands": asap.clusterspec,
    "load_cluster_yaml": asap.clusterspec,
    "scheduler_command": asap.clusterspec,
}


def test_asap_cluster_exports_every_name_from_its_home_module() -> None:
    assert sorted(asap.cluster.__all__) == sorted(HOMES)
    for name, home in HOMES.items():
        assert getattr(asap.cluster, name) is getattr(home, name), name
