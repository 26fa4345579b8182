"""Whether two ``asap simulate --json`` outputs are the same simulation, field for field.

Everything is compared except what measures the simulating host (wall and CPU seconds, events per
second, host CPU busy); the loop's event count is compared unless ``--ignore-events``. Prints the first
differences; exit status 0 when identical.
    python benchmarks/sim_json_same.py BEFORE.json AFTER.json [--ignore-events]
"""

from __future__ import annotations

import json
import sys
from typing import Any

HOST_FIELDS = {"wall_s", "cpu_s", "events_per_s", "events_per_cpu_s", "host_cpu_busy"}


def _diff(a: Any, b: Any, path: str, skip: set[str], out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in skip:
                continue
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'after' if key not in a else 'before'}")
                continue
            _diff(a[key], b[key], f"{path}.{key}", skip, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(x, y, f"{path}[{i}]", skip, out)
    elif a != b:
        out.append(f"{path}: {a!r} vs {b!r}")


def main(argv: list[str]) -> int:
    paths = [a for a in argv if not a.startswith("--")]
    skip = set(HOST_FIELDS)
    if "--ignore-events" in argv:
        skip.add("events")
    with open(paths[0]) as f:
        before = json.load(f)
    with open(paths[1]) as f:
        after = json.load(f)
    out: list[str] = []
    _diff(before, after, "", skip, out)
    for line in out[:20]:
        print(line)
    print("identical" if not out else f"{len(out)} differences")
    return 0 if not out else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
