"""Shared fixtures: a real local stack (Milvus Lite server + Ray head with token auth) on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunedex.demo_data import write_demo_data
from tunedex.infra import services
from tunedex.infra.config import TunedexConfig, load_config
from tunedex.infra.services import free_port

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, data_dir: Path, **sections: dict) -> Path:
    """A local config on free ports, data under `data_dir`, small enough for 2 cores."""
    raw = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    raw["data_dir"] = str(data_dir)
    raw["milvus"]["uri"] = f"http://127.0.0.1:{free_port()}"
    raw["ray"].update(address=f"127.0.0.1:{free_port()}", dashboard_port=free_port(), client_server_port=free_port(),
                      metrics_export_port=free_port())
    raw["serve"].update(port=free_port(), api_key="test-key-123")
    raw["corpus"]["path"] = None
    raw["finetune"].update(max_steps=30, logging_steps=10, train_file=None)
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `tunedex ARGS` as a user would, in its own process."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tunedex"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tunedex {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, demo: dict[str, Path]):
    """`tunedex up` on free ports; yields (config path, config); `tunedex down` at the end."""
    root = tmp_path_factory.mktemp("stack")
    path = write_config(root / "tunedex.yaml", root / "data", finetune={"train_file": str(demo["train"])})
    cfg: TunedexConfig = load_config(path)
    try:
        services.up(cfg)
        os.environ.update(services.ray_env(cfg))
        yield path, cfg
    finally:
        services.down(cfg)
