"""Start the tritonserver bundled in the nvidia-pytriton wheel on a model repository (`mambadeploy serve`).

The wheel carries the server binary, its libraries (`nvidia_pytriton.libs`), the Python backend and one Python stub per
interpreter version. The server needs (found on this machine; without them it hangs in "loading" or the stub cannot
import numpy):
- a backend directory holding the wheel's `backends/python` plus the stub built for the running Python;
- LD_LIBRARY_PATH with this interpreter's LIBDIR (the stub links libpython) and `nvidia_pytriton.libs`;
- this interpreter's bin directory first on PATH (the stub runs the `python` it finds there).
The Python backend keeps its tensors in /dev/shm regions named by a prefix: ours is unique per server, so stopping one
server removes its own regions (a killed server leaves them behind otherwise) and never another's.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import MambaDeployError, MissingDependencyError

READY_TIMEOUT_S = 120.0  # model load includes importing torch and building the model in the stub
# Triton's own bound on unloading at SIGTERM: a Python model whose responses were sent from another thread (ours:
# the batcher) was seen never to finish unloading, so Triton exits at this timeout
EXIT_TIMEOUT_S = 4
STOP_TIMEOUT_S = 8.0  # SIGTERM, then SIGKILL: the whole stop stays under 10 s
SHM_DIR = Path("/dev/shm")
# error lines every CPU-only start logs (no CUDA driver): not the reason a start failed
BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)


class ServeError(MambaDeployError):
    """The server could not start or stopped unexpectedly."""


@dataclass
class Bundle:
    binary: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python
    libs: Path  # nvidia_pytriton.libs


def bundle() -> Bundle:
    spec = importlib.util.find_spec("pytriton")  # located, not imported: its Python API is not needed
    if spec is None or spec.origin is None:
        raise MissingDependencyError("nvidia-pytriton", "serve", "the bundled Triton Inference Server")
    root = Path(spec.origin).parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = Bundle(root / "tritonserver" / "bin" / "tritonserver", root / "tritonserver" / "backends" / "python",
                   root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
                   root.parent / "nvidia_pytriton.libs")
    for what, path in vars(found).items():
        if not path.exists():
            raise ServeError(f"nvidia-pytriton at {root} has no {what} ({path}); Python {version} needs a stub built "
                             "for it (the wheel ships 3.8-3.13)")
    return found


def server_env(b: Bundle) -> dict:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(b.libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def backend_dir(b: Bundle, workdir: Path) -> Path:
    """workdir/backends/python = the wheel's Python backend + this interpreter's stub (links, nothing large copied)."""
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [*b.python_backend.iterdir(), b.stub]:
        if src.is_file():
            (python / src.name).symlink_to(src)
    return workdir / "backends"


def http_ready(url: str) -> bool:
    """Whether the server at url (http://host:port) reports ready (every model loaded)."""
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """One tritonserver process on `repo`, its log in workdir/server.log. start() returns once every model is ready."""

    def __init__(self, repo, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 address: str = "127.0.0.1", log_verbose: int = 0, extra_args=()):
        self.repo = Path(repo)
        if not self.repo.is_dir():
            raise ServeError(f"{repo}: no such model repository (write one with mambadeploy serve-repo)")
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.workdir = Path(tempfile.mkdtemp(prefix="mambadeploy-triton-"))
        self.log_path = self.workdir / "server.log"
        self.shm_prefix = f"mambadeploy_{os.getpid()}_{self.workdir.name[-8:]}_"
        self.process: subprocess.Popen | None = None
        self.stopping = False
        self._was_ready = False

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}"

    def command(self, b: Bundle) -> list[str]:
        return [str(b.binary), f"--model-repository={self.repo.resolve()}",
                f"--backend-directory={backend_dir(b, self.workdir)}",
                f"--http-address={self.address}", f"--http-port={self.http_port}",
                f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--log-verbose={self.log_verbose}", f"--exit-timeout-secs={EXIT_TIMEOUT_S}", *self.extra_args]

    def start(self, timeout: float = READY_TIMEOUT_S) -> TritonServer:
        b = bundle()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(b), env=server_env(b), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # its own group: the stubs are stopped with it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServeError(f"tritonserver exited with code {self.process.returncode}: {self.reason()} "
                                 f"(log: {self.log_path})")
            if self.ready():
                self._was_ready = True
                return self
            time.sleep(0.2)
        reason = self.reason()
        self.stop()
        raise ServeError(f"tritonserver was not ready after {timeout:.0f} s: {reason} (log: {self.log_path})")

    def ready(self) -> bool:
        return http_ready(f"http://{self.http_url}")

    def reason(self) -> str:
        """The server log's error lines (Triton marks them E<date>), or its last line."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no server log"
        errors = [re.sub(r"^E\d{4} [\d:.]+ \d+ \S+\] ", "", ln) for ln in lines
                  if re.match(r"^E\d{4} ", ln) and not any(b in ln for b in BENIGN_ERRORS)]
        failed = [ln for ln in lines if "UNAVAILABLE" in ln or "failed to load" in ln.lower()]
        picked = errors[-3:] or failed[-3:] or lines[-1:] or ["(empty log)"]
        return " | ".join(s.strip() for s in picked)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (Triton unloads its models and the stubs exit), SIGKILL to the process group if it hangs; then
        remove this server's shared-memory regions, and its work directory after a clean run (a failed one keeps its
        log)."""
        code = None
        self.stopping = True
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(5)
            code = self.process.returncode
            try:  # stubs left in the group (a SIGKILLed server does not stop them)
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for region in self.shm_regions():
            region.unlink(missing_ok=True)
        if self._was_ready and code == 0:  # a clean run: nothing to read in its log (a failed one keeps it)
            self.cleanup_workdir()
        return code

    def shm_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def cleanup_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.cleanup_workdir()
