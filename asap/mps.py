"""CUDA MPS for a local cluster whose ranks share a GPU.

Why: without MPS, processes on one GPU time-slice it, and every cross-process hand-off waits for a
context switch (DESIGN §9: a flag round trip of two small kernels 287 µs without MPS, 15.7 µs with it; a
2 MB put + signal 4.5 ms against 25 µs). ``asap up`` places attention rank r and expert rank r on the same
GPU, so on a GPU host it nearly always needs MPS.

Lifecycle: ``ClusterMps(mode, devices)`` decides at ``start()``, from the ranks' devices and what
``probe()`` finds, what to do (``decide``): nothing (no GPU shared, or ``--mps off``), use the daemon that
already serves (its pipe directory is passed on), start a private one, or warn that performance will
suffer. A private daemon (``MpsDaemon``) lives in its own temporary pipe and log directories, so it never
touches another user's daemon; every child gets ``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``
(``env``), and ``stop()`` sends it ``quit`` and removes the directories. Nothing here imports CUDA.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from asap.errors import InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
"""The MPS control program: ``-d`` starts the daemon; commands (``get_server_list``, ``quit``) on stdin."""
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
"""Where MPS clients and the control program look when ``CUDA_MPS_PIPE_DIRECTORY`` is unset."""
MODES = ("auto", "on", "off")
COMMAND_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class MpsStatus:
    """What this host offers: the control program, and whether a daemon answers at ``pipe_dir``."""

    control: str | None
    """Path of ``nvidia-cuda-mps-control``, None when it is not on PATH."""
    pipe_dir: str
    serving: bool


class Action(Enum):
    NONE = "none"
    """No GPU is shared, or MPS is off and nothing needs saying."""
    USE_EXISTING = "use-existing"
    START = "start"
    WARN = "warn"
    """Ranks share a GPU without MPS: they will time-slice it."""


@dataclass(frozen=True, slots=True)
class MpsDecision:
    action: Action
    reason: str


def control_command(
    control: str, command: str, env: Mapping[str, str], timeout_s: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Send one command (``get_server_list``, ``quit``) to the daemon that ``env`` points at."""
    return subprocess.run(
        [control],
        input=command + "\n",
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=timeout_s,
        check=False,
    )


def probe(environ: Mapping[str, str] | None = None) -> MpsStatus:
    """Whether an MPS control daemon serves clients started with ``environ`` (default: ours)."""
    env = dict(os.environ if environ is None else environ)
    control = shutil.which(CONTROL, path=env.get("PATH"))
    pipe_dir = env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    serving = False
    # Without the daemon's control pipe there is nothing to ask (and nothing that could answer).
    if control is not None and (Path(pipe_dir) / "control").exists():
        try:
            serving = control_command(control, "get_server_list", env).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            serving = False
    return MpsStatus(control=control, pipe_dir=pipe_dir, serving=serving)


def cuda_devices_shared(devices: Sequence[str]) -> bool:
    """Whether two of ``devices`` (torch device strings of all ranks) are the same GPU."""
    gpus = [d if ":" in d else f"{d}:0" for d in devices if d.startswith("cuda")]
    return len(gpus) != len(set(gpus))


def decide(mode: str, devices: Sequence[str], status: MpsStatus) -> MpsDecision:
    """What ``ClusterMps.start`` does for ranks on ``devices``. Raises ``InvalidArgument`` for an unknown
    mode, and for ``on`` where no daemon serves and none can be started."""
    if mode not in MODES:
        raise InvalidArgument(f"mps must be one of {', '.join(MODES)}, got {mode!r}")
    shared = cuda_devices_shared(devices)
    cuda = any(d.startswith("cuda") for d in devices)
    if mode == "off":
        if shared and not status.serving:
            return MpsDecision(Action.WARN, "MPS is off (--mps off) and ranks share a GPU")
        return MpsDecision(Action.NONE, "MPS is off (--mps off)")
    if mode == "on" and not cuda:
        raise InvalidArgument("--mps on needs CUDA ranks; every rank runs on the CPU")
    if status.serving:
        return MpsDecision(Action.USE_EXISTING, f"an MPS control daemon serves {status.pipe_dir}")
    if mode == "auto" and not shared:
        return MpsDecision(Action.NONE, "no GPU is shared by two ranks")
    if status.control is None:
        if mode == "on":
            raise InvalidArgument(
                f"--mps on: no MPS control daemon serves {status.pipe_dir} and {CONTROL} is not on PATH"
            )
        return MpsDecision(
            Action.WARN, f"ranks share a GPU, no MPS daemon serves and {CONTROL} is not on PATH"
        )
    return MpsDecision(Action.START, "ranks share a GPU" if shared else "--mps on")


class MpsDaemon:
    """A private MPS control daemon in its own pipe and log directories under ``root``."""

    def __init__(self, control: str, root: Path, environ: Mapping[str, str] | None = None) -> None:
        self.control = control
        self.root = root
        self.env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(root / "log"),
        }
        self._environ = dict(os.environ if environ is None else environ)
        self.running = False

    def _full_env(self) -> dict[str, str]:
        return {**self._environ, **self.env}

    def start(self, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        """Start the daemon and wait until it answers; ``Unavailable`` with its log if it does not."""
        for path in self.env.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        try:
            started = subprocess.run(
                [self.control, "-d"], capture_output=True, text=True, env=self._full_env(), timeout=timeout_s
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"cannot start the MPS control daemon ({self.control} -d): {exc}") from exc
        if started.returncode != 0:
            raise Unavailable(
                f"{self.control} -d exited with code {started.returncode}: "
                f"{(started.stderr or started.stdout).strip()}{self._log_tail()}"
            )
        self.running = True
        deadline = time.monotonic() + timeout_s
        while control_command(self.control, "get_server_list", self._full_env(), timeout_s).returncode != 0:
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(
                    f"the MPS control daemon did not answer within {timeout_s:g}s{self._log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Ask the daemon to quit (it stops its server first), then remove its directories. Idempotent."""
        if self.running:
            self.running = False
            try:
                reply = control_command(self.control, "quit", self._full_env())
                if reply.returncode != 0:
                    logger.warning(
                        "MPS control daemon: quit answered %s", reply.stderr.strip() or reply.returncode
                    )
            except (OSError, subprocess.TimeoutExpired) as exc:
                logger.warning("MPS control daemon did not take quit: %s", exc)
        shutil.rmtree(self.root, ignore_errors=True)

    def _log_tail(self) -> str:
        log = Path(self.env["CUDA_MPS_LOG_DIRECTORY"]) / "control.log"
        try:
            return "; control.log: " + " | ".join(log.read_text().splitlines()[-5:])
        except OSError:
            return ""


class ClusterMps:
    """MPS for one cluster's lifetime: ``start()`` returns the environment every child gets, ``stop()``
    stops what ``start()`` started. Use ``start()``/``stop()`` or ``with``."""

    def __init__(self, mode: str, devices: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
        self.mode = mode
        self.devices = list(devices)
        self._environ = dict(os.environ if environ is None else environ)
        self.decision: MpsDecision | None = None
        self.daemon: MpsDaemon | None = None

    def start(self) -> dict[str, str]:
        status = probe(self._environ)
        self.decision = decision = decide(self.mode, self.devices, status)
        if decision.action is Action.USE_EXISTING:
            logger.info("MPS: %s; the ranks use it", decision.reason)
            return {"CUDA_MPS_PIPE_DIRECTORY": status.pipe_dir}
        if decision.action is Action.WARN:
            logger.warning(
                "MPS: %s: the ranks sharing it will time-slice the GPU and cross-process hand-offs will be "
                "one to two orders of magnitude slower (start a daemon: nvidia-cuda-mps-control -d, or "
                "--mps auto where the binary is installed)",
                decision.reason,
            )
            return {}
        if decision.action is Action.NONE:
            return {}
        assert status.control is not None  # decide() starts only with the control program
        self.daemon = MpsDaemon(status.control, Path(tempfile.mkdtemp(prefix="asap-mps-")), self._environ)
        self.daemon.start()
        logger.info("MPS: %s; started a control daemon in %s", decision.reason, self.daemon.root)
        return dict(self.daemon.env)

    def stop(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            daemon.stop()

    def __enter__(self) -> dict[str, str]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "CONTROL",
    "DEFAULT_PIPE_DIR",
    "MODES",
    "Action",
    "ClusterMps",
    "MpsDaemon",
    "MpsDecision",
    "MpsStatus",
    "control_command",
    "cuda_devices_shared",
    "decide",
    "probe",
]
