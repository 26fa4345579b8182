"""The expert knee of a cluster spec for ``asap up --optimizations min-batch``: modelled for emulated
compute, else measured once (``asap.knee``) and cached under the cache directory, so later starts of the
same cluster skip the measurement.
"""

from __future__ import annotations

from asap.clusterspec import ClusterSpec


def calibrated_knee(spec: ClusterSpec, model_dir: str) -> int:
    """The expert knee for ``spec``'s backend: modeled for emulated compute, else measured once and cached
    under the cache directory (``asap calibrate`` measures and prints the same curve)."""
    import hashlib
    import json

    from asap.knee import measure_knee
    from asap.model.resolve import resolve_model
    from asap.model.tiny import tiny_cache_root

    # The knee depends on shapes only (calibration uses random weights), so random:DIR shares DIR's entry.
    config_dir = str(resolve_model(model_dir).resolve())
    key = json.dumps([config_dir, spec.compute, spec.experts, spec.device, spec.dtype])
    cache = tiny_cache_root().parent / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        return int(json.loads(cache.read_text())["knee_tokens"])
    from asap.dtypes import torch_dtype

    counts = (
        (128, 256, 512, 1024, 2048, 4096)
        if spec.compute == "torch"
        else (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    )
    result = measure_knee(
        model_dir,
        spec.compute,
        spec.experts,
        counts,
        device=spec.device,
        dtype=torch_dtype(spec.dtype),
        repeats=2,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"knee_tokens": result.knee_tokens, "backend": result.backend, "key": key}))
    return result.knee_tokens


__all__ = ["calibrated_knee"]
