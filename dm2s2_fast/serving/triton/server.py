"""Run the ``tritonserver`` binary that ships in the ``nvidia-pytriton`` wheel on a repository.

The wheel holds the server (``pytriton/tritonserver/bin/tritonserver``), the Python backend
(``backends/python/libtriton_python.so``) and one backend stub per Python version
(``python_backend_stubs/3.X/triton_python_backend_stub``). The backend runs the stub found in its
own directory, so ``backend_directory`` assembles one: the backend's files plus the stub of *this*
interpreter's version. The stub links ``libpython3.X.so``: ``server_env`` puts this interpreter's
library directory first on ``LD_LIBRARY_PATH`` (a system libpython of the same version would
otherwise load, with another ``sys.prefix`` and without torch), sets ``PYTHONHOME`` to its prefix and
puts its site directories on ``PYTHONPATH`` and in ``DM2S2_FAST_SITE_DIRS`` (``model.py`` runs
their ``.pth`` files, so a venv or an editable install is seen). Nothing here imports ``pytriton``
itself (its Python API needs pyzmq, and the wheel is installed ``--no-deps``).

``TritonServer`` owns one server process: free loopback ports, a bounded wait for readiness, the
log kept in a file (its tail in every error), and the process group killed at ``stop()``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ENV_SERVER = "DM2S2_FAST_TRITONSERVER"  # a tritonserver install to use instead of the wheel's


class TritonNotFound(RuntimeError):
    """No tritonserver binary (install nvidia-pytriton, or set DM2S2_FAST_TRITONSERVER)."""


def _wheel_root() -> Path:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound("the nvidia-pytriton wheel is not installed (it ships the tritonserver "
                             "binary): pip install --no-deps nvidia-pytriton==0.7.0")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def find_tritonserver() -> tuple[Path, Path]:
    """``(tritonserver binary, its backends directory)``: ``$DM2S2_FAST_TRITONSERVER`` (a Triton
    install's root, holding ``bin/`` and ``backends/``) or the nvidia-pytriton wheel's."""
    root = Path(os.environ[ENV_SERVER]) if os.environ.get(ENV_SERVER) else _wheel_root()
    binary, backends = root / "bin" / "tritonserver", root / "backends"
    if not binary.is_file():
        raise TritonNotFound(f"no tritonserver binary at {binary}")
    if not (backends / "python" / "libtriton_python.so").is_file():
        raise TritonNotFound(f"no Python backend at {backends / 'python'}")
    return binary, backends


def _stub_for_this_python(root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFound(f"no Python-backend stub for Python {version} at {stub}")
    return stub


def backend_directory(dest: str | os.PathLike) -> Path:
    """A backends directory under ``dest`` whose ``python/`` holds the Python backend and the stub of
    this interpreter's version (links where possible, else copies). Returns it."""
    binary, backends = find_tritonserver()
    python_dir = Path(dest) / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    stub = backends / "python" / "triton_python_backend_stub"
    if not stub.is_file():  # the wheel keeps the stubs beside the server, per Python version
        stub = _stub_for_this_python(binary.parent.parent)
    sources = [p for p in (backends / "python").iterdir() if p.is_file()] + [stub]
    for source in sources:
        target = python_dir / source.name
        if target.exists() or target.is_symlink():
            target.unlink()
        try:  # a link keeps the stub's $ORIGIN runpath (its bundled libraries) valid
            target.symlink_to(source.resolve())
        except OSError:
            shutil.copy2(source, target)
    return python_dir.parent


def server_env(base: dict | None = None) -> dict:
    """The environment for tritonserver and its Python-backend stubs (see the module doc)."""
    env = dict(os.environ if base is None else base)
    binary, _ = find_tritonserver()
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(binary.parent.parent.parent.parent / "nvidia_pytriton.libs")]
    libs = [p for p in libs if p and os.path.isdir(p)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PYTHONHOME"] = sys.base_prefix
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    dirs += [p for p in sys.path if p.endswith("site-packages") and p not in dirs]
    # the launcher's own dm2s2_fast first, so that a source checkout on PYTHONPATH serves itself
    dirs.insert(0, str(Path(__file__).resolve().parents[3]))
    env["DM2S2_FAST_SITE_DIRS"] = os.pathsep.join(dirs)
    # on the path from the start: the stub imports numpy (triton_python_backend_utils) before model.py
    env["PYTHONPATH"] = os.pathsep.join(dirs + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now (held together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """One tritonserver process on ``repository``, bound to ``host`` (loopback by default).

    ``with TritonServer(repo) as server:`` starts it and waits until it is ready (``start``), and
    kills it at the end (``stop``); ``server.http_url``, ``server.grpc_url``, ``server.metrics_url``;
    ``server.log()`` is its output so far. Ports left at None are picked free.
    """

    def __init__(self, repository: str | os.PathLike, *, host: str = "127.0.0.1",
                 http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_verbose: int = 0, workdir: str | None = None,
                 python_shm_bytes: int = 64 << 20, extra_args: tuple[str, ...] = (),
                 env: dict | None = None):
        self.repository = Path(repository).resolve()
        self.host = host
        picked = iter(free_ports(3, host))
        self.http_port = http_port or next(picked)
        self.grpc_port = grpc_port or next(picked)
        self.metrics_port = metrics_port or next(picked)
        self.log_verbose = log_verbose
        self.python_shm_bytes = python_shm_bytes
        self.extra_args = tuple(extra_args)
        self._env = env
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dm2s2_triton_"))
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        binary, _ = find_tritonserver()
        backends = backend_directory(self.workdir)
        shm = self.python_shm_bytes
        return [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--strict-readiness=true", "--exit-timeout-secs=10",
                f"--log-verbose={self.log_verbose}",
                f"--backend-config=python,shm-default-byte-size={shm}",
                f"--backend-config=python,shm-growth-byte-size={shm}",
                *self.extra_args]

    def log(self, tail: int | None = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text if tail is None else text[-tail:]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def start(self, timeout: float = 120.0) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("this server was started already")
        command = self.command()
        env = server_env(self._env)
        with open(self.log_path, "wb") as log:
            # its own process group: stop() reaches the backend stubs too
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise RuntimeError(f"tritonserver exited with code {code} before it was ready; "
                                   f"its log:\n{self.log(20000)}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"tritonserver was not ready after {timeout:.0f} s; its log:\n{self.log(20000)}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout`` s; idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if process is not None:
            try:  # whatever is left of the group (the stubs, a server that ignored SIGTERM)
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()

    def cleanup(self) -> None:
        """Remove the work directory (the log with it) if this server made it."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
