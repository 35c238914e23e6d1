"""Local services: clear errors when a port is taken or a service died."""

import os
import signal
import socket
import time

import pytest

from tunedex.infra import services
from tunedex.infra.config import load_config

from conftest import free_port


def test_taken_port_is_named_with_the_fix(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        cfg = load_config(None, [f"data_dir={tmp_path}", f"milvus.uri=http://127.0.0.1:{port}"])
        with pytest.raises(services.ServiceError, match=f"port {port} .* is taken by another process; stop it, or set milvus.uri"):
            services.start_milvus(cfg)


@pytest.mark.parametrize("engine", ["milvus-lite-2.5", "milvus-lite-3"])
def test_milvus_lite_server_starts_is_idempotent_and_death_is_reported(tmp_path, engine):
    cfg = load_config(None, [f"data_dir={tmp_path}", f"milvus.uri=http://127.0.0.1:{free_port()}",
                             f"milvus.local_engine={engine}"])
    assert services.milvus_status(cfg).detail.startswith("not running")
    try:
        first = services.start_milvus(cfg)
        assert first.running and f"{engine} server pid" in first.detail
        assert services.start_milvus(cfg).detail == first.detail  # a second `up` reuses it
        pid = int((cfg.run_dir / "milvus.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while services.port_open("127.0.0.1", cfg.milvus.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        status = services.milvus_status(cfg)
        assert not status.running and status.detail.startswith("died; see")
    finally:
        services.stop_milvus(cfg)


def in_a_worker(path, cfg, expression: str) -> str:
    """What `expression` evaluates to inside a Ray task on the cluster `path` configures, as its repr."""
    import subprocess
    import sys

    probe = ("import sys\nfrom tunedex.infra.config import load_config\n"
             "from tunedex.infra.services import connect_ray\n"
             "with connect_ray(load_config(sys.argv[1])) as ray:\n"
             f"    probe = ray.remote(lambda: repr({expression}))\n"
             "    print(ray.get(probe.remote()))")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, **services.ray_env(cfg)}, timeout=300)
    return out.stdout.strip().splitlines()[-1]


SERVE_SETTINGS = ("(lambda c: (c.CONTROL_LOOP_INTERVAL_S, c.RAY_SERVE_METRICS_EXPORT_INTERVAL_MS, "
                  "c.RAY_SERVE_LOG_TO_STDERR))(__import__('ray.serve._private.constants', fromlist=['_']))")


def local_serve_settings() -> tuple:
    """What Serve should parse on a head `tunedex up` starts from this environment: `LOCAL_SERVE_ENV`, where
    the environment does not set a value itself."""
    env = {k: os.environ.get(k, v) for k, v in services.LOCAL_SERVE_ENV.items()}
    return (float(env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]), int(env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]),
            env["RAY_SERVE_LOG_TO_STDERR"] == "1")


def test_the_local_head_runs_serve_quieter_than_its_defaults(stack):
    """Serve's controller loop and metric flushes run at `LOCAL_SERVE_ENV`'s pace on the head `tunedex up`
    started, as Serve itself reads them inside a worker (Serve's own defaults: (0.1, 100, True))."""
    path, cfg = stack
    assert in_a_worker(path, cfg, SERVE_SETTINGS) == repr(local_serve_settings())


def test_a_second_cluster_keeps_to_its_own_workers_and_its_environment_wins(stack, tmp_path, monkeypatch):
    """Ray's own address lookups inside a worker (the state API, Ray Train's controller: `ray.init()` with no
    address) take the machine's latest cluster; every worker of a tunedex head carries its own RAY_ADDRESS, so
    with a second cluster started after it they still find their own. A Serve setting in the environment of
    the second head's start wins over `LOCAL_SERVE_ENV`."""
    from conftest import write_config

    path, cfg = stack
    other_path = write_config(tmp_path / "other.yaml", tmp_path / "data")
    other = load_config(other_path)
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.1")
    services.start_ray(other)
    try:
        found = in_a_worker(path, cfg, "__import__('ray')._private.services.get_ray_address_from_environment(None, None)")
        assert found.strip("'").rsplit(":", 1)[-1] == str(cfg.ray.port), (found, cfg.ray.address, other.ray.address)
        assert in_a_worker(other_path, other, SERVE_SETTINGS) == repr((0.1, *local_serve_settings()[1:]))
    finally:
        services.stop_ray(other)
