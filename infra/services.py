"""Local services for one machine: a Milvus Lite server and a Ray head with token auth.

The indexer, the endpoint and the flows all reach Milvus through `milvus.uri`; one
process (the Milvus Lite server) owns the data dir, so they can use the index at once.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import psutil

from tunedex.infra.config import MilvusConfig, TunedexConfig
from tunedex.infra.errors import TunedexError


class ServiceError(TunedexError, RuntimeError):
    """A local service could not be started or is not healthy; the message says why and what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    address: str
    detail: str


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts connections there (an unresolvable host counts as no)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            return sock.connect_ex((host, port)) == 0
        except OSError:  # socket.gaierror: the name does not resolve from here
            return False


# Ports handed out for services we start: below Linux's ephemeral range (32768-60999), from which the kernel gives
# every bind(0) and outgoing connection a port (vLLM's ZMQ sockets, Ray's gRPC clients), and above Ray's worker
# ports (10002-19999). A port taken from bind(0) could be handed to one of those before our service bound it.
SERVICE_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, outside the ranges other processes draw from."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(SERVICE_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {SERVICE_PORTS.start}-{SERVICE_PORTS.stop - 1} after 200 tries")


def _bin(name: str) -> str:
    """A console script of this environment (beside the running interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@contextmanager
def connect_ray(cfg: TunedexConfig, log_to_driver: bool = False) -> Iterator[Any]:
    """This process connected to the cluster (`ray.address`; inside a Ray job's driver, the job's own cluster);
    disconnected at the end if this call connected it. Yields the `ray` module. The token settings go into the
    environment first: Ray reads them once, when it is imported."""
    os.environ.update(ray_env(cfg))
    import ray

    if ray.is_initialized():
        yield ray
        return
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # Ray set RAY_ADDRESS for the job's driver
    pinned = not in_job and cfg.ray.is_local  # Ray's own lookups in this process: this cluster, not the latest
    previous = os.environ.get("RAY_ADDRESS")
    if pinned:
        os.environ["RAY_ADDRESS"] = cfg.ray.address
    try:
        ray.init(address=None if in_job else cfg.ray.address, logging_level="WARNING", log_to_driver=log_to_driver)
        yield ray
    finally:
        ray.shutdown()  # also flushes the workers' streamed logs; a no-op when init failed
        if pinned and previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        elif pinned:
            os.environ["RAY_ADDRESS"] = previous


def ray_env(cfg: TunedexConfig) -> dict[str, str]:
    """Environment every process that talks to the local Ray needs: token auth on, the token file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cfg.ray_token_path.resolve())}


# Ray Serve settings of the local head, each overridable from the environment `tunedex up` runs in. On a small
# machine the model's OpenMP threads share the cores with every Ray process, and CPU taken from them costs the
# model about twice its share (a thread's barrier waits for the preempted one: a burner taking 17% of one core cut
# `vllm.LLM` on 2 cores from 6.1 to 5.0 req/s). Serve's defaults run its controller loop every 100 ms and flush
# each replica's metric cache every 100 ms, though Ray exports metrics every 10 s: the idle stack took 21-24% of
# a core. Measured on 2 cores with the loop at 0.5 s: 15-17%, and the endpoint's requests/s ÷ the in-process
# engine's went from a median 0.73 (0.67-0.78, 7 runs) to 0.81 (0.77-0.88, 5 runs); but 0.5 s added ~4.5 s to
# `tunedex serve`'s start and 1-2 s to a swap. At 0.25 s deploys are as fast as at 0.1 s and Serve takes 35
# instead of 42 ms of CPU per request, but the ratio gain is not shown (0.77, 0.73; the paired defaults 0.73;
# bench/README.md). Serve's logs go to its log files under Ray's session logs only, not also to stderr.
LOCAL_SERVE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.25", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
                   "RAY_SERVE_LOG_TO_STDERR": "0"}


def ensure_ray_token(cfg: TunedexConfig) -> Path:
    path = cfg.ray_token_path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def _pid_file(cfg: TunedexConfig, name: str) -> Path:
    return cfg.run_dir / f"{name}.pid"


def _read_pid(path: Path) -> int | None:
    """The pid in `path` if that process is alive (a zombie counts as dead)."""
    try:
        pid = int(path.read_text().strip())
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    return pid if alive else None


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def milvus_lite_25_binary() -> Path:
    """The C++ server of milvus-lite 2.5, installed by `make install` in .venv-milvus beside this environment."""
    venv = Path(sys.prefix).parent / ".venv-milvus"
    found = sorted(venv.glob("lib/python3*/site-packages/milvus_lite/lib/milvus"))
    if not found:
        raise ServiceError(
            f"milvus-lite 2.5 is not installed in {venv}; run `make install` "
            "(or set milvus.local_engine: milvus-lite-3)"
        )
    return found[0]


def launch_milvus(cfg: MilvusConfig, data: Path, log_path: Path) -> subprocess.Popen:
    """Start the `milvus.local_engine` server on `milvus.uri`'s port, its data in `data`, output to `log_path`."""
    host, port = urlparse(cfg.uri).hostname, cfg.port
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if cfg.local_engine == "milvus-lite-2.5":
        # the binary itself (what milvus_lite.server.Server runs), so its pid is the server's
        binary = milvus_lite_25_binary()
        cmd = [str(binary), str(data / "milvus.db"), f"{host}:{port}", "ERROR"]
        env["LD_LIBRARY_PATH"] = f"{binary.parent}:{env.get('LD_LIBRARY_PATH', '')}"
    else:
        cmd = [_bin("milvus-lite"), "server", "--data-dir", str(data), "--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=data,
                                env=env, start_new_session=True)


def wait_listening(cfg: MilvusConfig, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    host, port = urlparse(cfg.uri).hostname, cfg.port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{cfg.local_engine} server exited with code {proc.returncode}; log {log_path}:\n{_log_tail(log_path)}")
        if port_open(host, port):
            return
        time.sleep(0.3)
    proc.kill()
    raise ServiceError(f"{cfg.local_engine} server did not listen on {port} within {timeout:.0f}s; log {log_path}")


def start_milvus(cfg: TunedexConfig, timeout: float = 60.0) -> ServiceStatus:
    host, port = urlparse(cfg.milvus.uri).hostname, cfg.milvus.port
    pid_file = _pid_file(cfg, "milvus")
    if _read_pid(pid_file) and port_open(host, port):
        return milvus_status(cfg)
    if port_open(host, port):
        raise ServiceError(
            f"port {port} ({cfg.milvus.uri}) is taken by another process; stop it, or set milvus.uri to a free port"
        )
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = cfg.run_dir / "milvus.log"
    proc = launch_milvus(cfg.milvus, (cfg.data_dir / "milvus").resolve(), log_path)
    pid_file.write_text(str(proc.pid))
    wait_listening(cfg.milvus, proc, log_path, timeout)
    return milvus_status(cfg)


def milvus_status(cfg: TunedexConfig) -> ServiceStatus:
    host, port = urlparse(cfg.milvus.uri).hostname, cfg.milvus.port
    pid = _read_pid(_pid_file(cfg, "milvus"))
    listening = port_open(host, port)
    if pid and listening:
        detail = f"{cfg.milvus.local_engine} server pid {pid}, data {cfg.data_dir / 'milvus'}"
    elif listening:
        detail = "listening (not started by tunedex)"
    elif pid:
        detail = f"pid {pid} alive but not listening; see {cfg.run_dir / 'milvus.log'}"
    elif _pid_file(cfg, "milvus").exists():
        detail = f"died; see {cfg.run_dir / 'milvus.log'} and run `tunedex up`"
    else:
        detail = "not running; run `tunedex up`"
    return ServiceStatus("milvus", listening, cfg.milvus.uri, detail)


def stop_milvus(cfg: TunedexConfig, timeout: float = 15.0) -> bool:
    pid_file = _pid_file(cfg, "milvus")
    pid = _read_pid(pid_file)
    pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    proc = psutil.Process(pid)
    proc.terminate()
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    return True


def start_ray(cfg: TunedexConfig, timeout: float = 90.0) -> ServiceStatus:
    host, port = cfg.ray.host, cfg.ray.port
    if (cfg.run_dir / "ray.started").exists() and port_open(host, port):
        return ray_status(cfg)
    for taken in (port, cfg.ray.dashboard_port, cfg.ray.client_server_port, cfg.ray.metrics_export_port):
        if port_open(host, taken):
            raise ServiceError(
                f"port {taken} is taken by another process (another Ray?); stop it (`ray stop`), "
                "or set ray.address / ray.dashboard_port / ray.client_server_port / ray.metrics_export_port to free ports"
            )
    ensure_ray_token(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        _bin("ray"), "start", "--head", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(cfg.ray.dashboard_port),
        "--ray-client-server-port", str(cfg.ray.client_server_port),
        "--metrics-export-port", str(cfg.ray.metrics_export_port),
        # the Jobs API reaches the node through this agent; Ray's fixed default (52365) is taken by the
        # first cluster on a machine, and a second one then has "no available agent to submit job"
        "--dashboard-agent-listen-port", str(free_port()),
        "--disable-usage-stats",
    ]
    if cfg.ray.num_cpus:
        cmd += ["--num-cpus", str(cfg.ray.num_cpus)]
    log_path = cfg.run_dir / "ray.log"
    with open(log_path, "ab") as log:
        rc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # RAY_ADDRESS for everything this head starts: Ray's own address lookups inside workers (the state
            # API, Ray Train's controller) otherwise take the machine's most recently started cluster, another
            # stack's when two run on one machine, and a fine-tune then hung on the wrong cluster
            env={**LOCAL_SERVE_ENV, **os.environ, **ray_env(cfg), "RAY_ADDRESS": f"{host}:{port}"}, timeout=timeout,
        ).returncode
    if rc != 0:
        raise ServiceError(f"`ray start` failed with code {rc}; log {log_path}:\n{_log_tail(log_path)}")
    (cfg.run_dir / "ray.started").write_text(" ".join(cmd))
    return ray_status(cfg)


def ray_status(cfg: TunedexConfig) -> ServiceStatus:
    listening = port_open(cfg.ray.host, cfg.ray.port)
    dashboard = f"http://127.0.0.1:{cfg.ray.dashboard_port}"
    if listening:
        detail = f"dashboard {dashboard}, token auth on ({cfg.ray_token_path})"
    elif (cfg.run_dir / "ray.started").exists():
        detail = f"died; see {cfg.run_dir / 'ray.log'} and run `tunedex up`"
    else:
        detail = "not running; run `tunedex up`"
    return ServiceStatus("ray", listening, cfg.ray.address, detail)


def ray_head_processes(gcs_port: int) -> list[psutil.Process]:
    """Every process of the Ray head whose GCS listens on `gcs_port`, and their children.

    `ray stop` would stop every Ray on the machine (another user's, or a test's); this finds ours:
    the GCS by its port, the rest by that session's dir or by the GCS address they were given.
    """
    procs = list(psutil.process_iter(["cmdline"]))
    args = {p.pid: " ".join(p.info["cmdline"] or []) for p in procs}
    gcs = [p for p in procs if "gcs_server" in args[p.pid] and f"--gcs_server_port={gcs_port} " in args[p.pid] + " "]
    if not gcs:
        return []
    session = re.search(r"--session-dir=(\S+)", args[gcs[0].pid])
    address = re.compile(rf"--(gcs-)?address=\S+:{gcs_port}(\s|$)")
    roots = [p for p in procs if (session and session.group(1) in args[p.pid]) or address.search(args[p.pid])]
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def stop_ray(cfg: TunedexConfig, timeout: float = 20.0) -> bool:
    marker = cfg.run_dir / "ray.started"
    if not marker.exists():
        return False
    procs = ray_head_processes(cfg.ray.port)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    marker.unlink(missing_ok=True)
    return True


def up(cfg: TunedexConfig) -> list[ServiceStatus]:
    started = []
    if cfg.milvus.local_server and cfg.milvus.is_loopback:
        started.append(start_milvus(cfg))
    if cfg.ray.local_head and cfg.ray.is_local:
        started.append(start_ray(cfg))
    return started


def down(cfg: TunedexConfig) -> list[str]:
    stopped = []
    if stop_milvus(cfg):
        stopped.append("milvus")
    if stop_ray(cfg):
        stopped.append("ray")
    return stopped


def status(cfg: TunedexConfig) -> list[ServiceStatus]:
    return [milvus_status(cfg), ray_status(cfg)]
