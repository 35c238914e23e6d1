"""What a tunedex config needs to run on Kubernetes, checked against the manifests in k8s/.

The manifests are YAML that people edit (a kustomize base, overlays dev and prod, RayJobs; see k8s/README.md).
The config reaches the pods through kustomize's configMapGenerator (k8s/config/); this module is what
`tunedex config check CONFIG --cluster` adds to the schema check: values that work on a laptop but not in
pods, and the paths and ports the manifests fix (mounts, Secrets, Ray and Serve ports), each with its fix.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Iterator

from pydantic import BaseModel, ValidationError

from tunedex.infra.config import ConfigError, TunedexConfig, _read_yaml, format_problem

# What the manifests in k8s/ fix; tests/test_k8s.py checks that the built manifests use exactly these.
CONFIG_DIR = PurePosixPath("/etc/tunedex")  # the ConfigMap, mounted as a directory
CONFIG_PATH = CONFIG_DIR / "config.yaml"  # TUNEDEX_CONFIG in every pod, the Serve app's config
SECRETS_DIR = PurePosixPath("/var/run/secrets/tunedex")  # beside, not inside, the ConfigMap mount
DATA_DIR = PurePosixPath("/var/lib/tunedex")  # the shared volume (PVC tunedex-data)
SECRET_FILES = {"serve.api_key_file": (SECRETS_DIR / "api_key", "tunedex-api-key"),
                "ray.auth_token_path": (SECRETS_DIR / "ray_auth_token", "tunedex-ray-auth")}
PORTS = {"ray.dashboard_port": 8265, "ray.client_server_port": 10001, "ray.metrics_export_port": 8080,
         "serve.port": 8000}
SERVICE = "tunedex"  # RayService; KubeRay names its services tunedex-head-svc and tunedex-serve-svc
HEAD_SVC = f"{SERVICE}-head-svc"
MILVUS_HOST = "tunedex-milvus"  # the Milvus CR `tunedex`: the operator names its service so
PREFECT_HOST = "tunedex-prefect-server"


def check_cluster_config(cfg_path: Path) -> TunedexConfig:
    """The config at `cfg_path`, checked for a cluster; every problem listed at once (ConfigError)."""
    raw = _read_yaml(cfg_path)
    problems = [f"{section}.{key}: a secret would be written into the ConfigMap in plain text; {fix}"
                for (section, key), fix in {
                    ("serve", "api_key"): "remove it; the key comes from the Secret tunedex-api-key (serve.api_key_file)",
                    ("milvus", "token"): "remove it; tunedex cannot read it from a file yet: keep Milvus inside the namespace",
                }.items() if isinstance(raw.get(section), dict) and raw[section].get(key)]
    # The key file exists only inside the pods; a stand-in key lets the schema check everything else.
    serve = raw.get("serve") if isinstance(raw.get("serve"), dict) else {}
    check = {**raw, "serve": {**serve, "api_key": serve.get("api_key") or "<mounted Secret>"}}
    try:
        cfg = TunedexConfig.model_validate(check)
    except ValidationError as exc:  # listed the way load_config lists them
        problems += [format_problem(e) for e in exc.errors()]
        raise ConfigError(_problem_text(cfg_path, problems)) from None
    problems += cluster_problems(cfg, serve.get("api_key_file"))
    if problems:
        raise ConfigError(_problem_text(cfg_path, problems))
    return cfg


def _problem_text(cfg_path: Path, problems: list[str]) -> str:
    n = len(problems)
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"{cfg_path} has {n} problem{'s' if n > 1 else ''} for a cluster:\n{listed}"


def cluster_problems(cfg: TunedexConfig, api_key_file: Any = None) -> list[str]:
    """Values that run on a laptop but not in pods, and values the manifests in k8s/ fix. `api_key_file`:
    the file's own value (the schema check ran with a stand-in key)."""
    problems = []
    if cfg.milvus.local_server:
        problems.append("milvus.local_server: set false; on a cluster Milvus is a server (the Milvus CR)")
    if cfg.ray.local_head:
        problems.append("ray.local_head: set false; on a cluster KubeRay runs the Ray head")
    if cfg.milvus.is_loopback:
        problems.append(f"milvus.uri: {cfg.milvus.uri} is this machine; use http://{MILVUS_HOST}:19530 "
                        "(the Milvus CR in k8s/base) or your Milvus server")
    want = f"ray://{HEAD_SVC}:{cfg.ray.client_server_port}"
    if cfg.ray.address != want:
        problems.append(f"ray.address: use {want}, the RayService's head, so `tunedex promote` reaches the endpoint")
    if cfg.serve.host in ("127.0.0.1", "localhost", "0.0.0.0"):
        problems.append(f"serve.host: {cfg.serve.host} is not reachable from other pods; use {SERVICE}-serve-svc")
    if not cfg.prefect.api_url:
        problems.append(f"prefect.api_url: set it, e.g. http://{PREFECT_HOST}:4200/api")
    run = cfg.finetune.ray.run_name
    if run is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,45}[a-z0-9])?", run):
        problems.append(f"finetune.ray.run_name: {run!r} also names the RayJob; use at most 47 lowercase letters, "
                        "digits and '-', e.g. ft-20250101 (or leave it unset)")
    for key, value in path_fields(cfg):
        if not value.is_absolute() and key != "data_dir":  # data_dir: checked against the mount below
            problems.append(f"{key}: {value} is relative, and pods start in different dirs; "
                            f"use an absolute path, e.g. {DATA_DIR / value.name}")
    if PurePosixPath(str(cfg.data_dir)) != DATA_DIR:
        problems.append(f"data_dir: the manifests mount the data volume at {DATA_DIR}; use it "
                        "(or change the mounts in k8s/base and k8s/jobs to match)")
    files = {"serve.api_key_file": api_key_file, "ray.auth_token_path": cfg.ray.auth_token_path}
    for key, (path, secret) in SECRET_FILES.items():
        if files[key] is None or PurePosixPath(str(files[key])) != path:
            problems.append(f"{key}: set it to {path}, where the manifests mount the Secret {secret}")
    for key, port in PORTS.items():
        section, name = key.split(".")
        if (value := getattr(getattr(cfg, section), name)) != port:
            problems.append(f"{key}: {value}, but the manifests use {port}; set {key}: {port} (or change the manifests)")
    return problems


def path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, PurePosixPath]]:
    """Every path the config sets, by dotted key (new path keys are checked without a change here)."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from path_fields(value, f"{prefix}{name}.")
        elif isinstance(value, PurePath):
            yield f"{prefix}{name}", PurePosixPath(str(value))
