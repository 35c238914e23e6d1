"""Kubernetes manifests for tunedex, rendered from a tunedex config (`tunedex k8s render`).

What is written (a kustomize base, two overlays and two RayJob templates):

    base/              everything long-running, in namespace `tunedex`:
                       the config (ConfigMap), shared storage (PVC), the endpoint (KubeRay RayService),
                       an ad-hoc RayCluster, Milvus (Milvus Operator CR), a Prefect server and a worker
                       on the Kubernetes work pool `tunedex-pool`, NetworkPolicies, a PodDisruptionBudget
    overlays/dev/      small, CPU only, ReadWriteOnce storage (one-node clusters such as kind)
    overlays/prod/     a GPU worker group (scales from zero), Milvus in cluster mode, bigger pods
    jobs/finetune/     RayJob: `tunedex finetune` on its own Ray cluster (`kubectl create -k`)
    jobs/embed/        RayJob: `tunedex index` on its own Ray cluster

Targets KubeRay v1.6+ (`ray.io/v1`; `authOptions.secretName` is from v1.6) and Milvus Operator v1.3
(`milvus.io/v1beta1`). Secrets are referenced, never rendered: the API key and the Ray auth token
are created with `kubectl create secret` and mounted as files; the config names those files.
The image is never written into a manifest: every container says `tunedex`, and kustomize's
`images:` (from `--image`) names the real one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import re
import shutil
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ValidationError

from tunedex.infra.config import ConfigError, TunedexConfig, _read_yaml, format_problem
from tunedex.infra.errors import TunedexError

NAMESPACE = "tunedex"
IMAGE = "tunedex"  # the kustomize image name; `images:` maps it to `--image`
CONFIG_DIR = PurePosixPath("/etc/tunedex")  # the ConfigMap, mounted as a directory (updates reach running pods)
CONFIG_PATH = CONFIG_DIR / "config.yaml"
SECRETS_DIR = PurePosixPath("/var/run/secrets/tunedex")  # beside, not inside, the ConfigMap mount
API_KEY_SECRET = ("tunedex-api-key", "api_key")  # (Secret name, key)
RAY_TOKEN_SECRET = ("tunedex-ray-auth", "auth_token")  # `auth_token` is the key KubeRay's authOptions reads
SERVICE = "tunedex"  # RayService; KubeRay names its services tunedex-head-svc and tunedex-serve-svc
HEAD_SVC = f"{SERVICE}-head-svc"
MILVUS = "tunedex"  # Milvus CR; the operator names its service tunedex-milvus
MILVUS_HOST = f"{MILVUS}-milvus"
PREFECT_HOST = "tunedex-prefect-server"
POOL = "tunedex-pool"
UID = 10001  # the Dockerfile's non-root user
RENDERED = ("README.md", "base", "overlays", "jobs")

# Pod sizes: base values; the overlays patch them (dev smaller, prod bigger).
HEAD = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
CPU_WORKER = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}
GPU_WORKER = {"requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
              "limits": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"}}
# RayJob clusters live for one job: small requests, roomier limits (Ray sizes itself from the limits)
JOB_HEAD = {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
JOB_CPU_WORKER = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
AUTOSCALER = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}
SUBMITTER = {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "1Gi"}}
PREFECT_SERVER = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
PREFECT_WORKER = {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "1Gi"}}
FLOW_RUN = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
MILVUS_POD = {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
MILVUS_DEP = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


class RenderError(TunedexError, ValueError):
    """Manifests that cannot be written; the message names the thing and the fix."""


# ---------------------------------------------------------------------------------------------
# Entry point


def render(cfg_path: Path, out: Path, image: str | None = None, *, release_id: str | None = None,
           overwrite: bool = False) -> list[Path]:
    """Write the manifests for the config at `cfg_path` under `out`; return the files written.

    `image`: the tunedex image with a version tag or digest, written as kustomize `images:` in the
    overlays and jobs (without it, add `images:` there yourself). `release_id`: a release to load in the
    RayService's Serve config too, so a new Ray cluster (an image upgrade) serves it before traffic
    moves. `overwrite`: replace what an earlier render wrote in `out`.
    """
    raw = cluster_config(Path(cfg_path))
    cfg = validate_cluster_config(Path(cfg_path), raw)
    image_entries(image)  # refuse an unpinned image before writing anything
    if release_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", release_id):
        raise RenderError(f"release id {release_id!r} is not a release id; use one `tunedex status` prints, "
                          "e.g. rel-20250101-120000-abc123")
    prepare_out(Path(out), overwrite)
    files = manifests(cfg, raw, image, release_id, source=str(cfg_path))
    return write_files(Path(out), files)


# ---------------------------------------------------------------------------------------------
# The config: read, complete, check


def cluster_config(cfg_path: Path) -> dict[str, Any]:
    """The config file's keys, plus the two secret files the manifests mount (unless it names its own)."""
    raw = _read_yaml(cfg_path)
    serve, ray = raw.setdefault("serve", None) or {}, raw.setdefault("ray", None) or {}
    if not isinstance(serve, dict) or not isinstance(ray, dict):
        raise ConfigError(f"{cfg_path}: `serve` and `ray` must be mappings of keys")
    raw["serve"], raw["ray"] = serve, ray
    serve.setdefault("api_key_file", str(SECRETS_DIR / "api_key"))
    ray.setdefault("auth_token_path", str(SECRETS_DIR / "ray_auth_token"))
    return raw


def validate_cluster_config(cfg_path: Path, raw: dict[str, Any]) -> TunedexConfig:
    """Schema check, then what a cluster needs; every problem listed at once."""
    fixes = {("serve", "api_key"): f"remove it; the key comes from the Secret {API_KEY_SECRET[0]} (serve.api_key_file)",
             ("milvus", "token"): "remove it; tunedex cannot read it from a file yet: keep Milvus inside the namespace"}
    problems = [f"{section}.{key}: a secret would be written into the ConfigMap in plain text; {fix}"
                for (section, key), fix in fixes.items()
                if isinstance(raw.get(section), dict) and raw[section].get(key)]
    # The key file exists only inside the pods; a stand-in key lets the schema check everything else.
    check = {**raw, "serve": {**raw["serve"], "api_key": raw["serve"].get("api_key") or "<mounted Secret>"}}
    try:
        cfg = TunedexConfig.model_validate(check)
    except ValidationError as exc:  # listed the way load_config lists them
        problems += [format_problem(e) for e in exc.errors()]
        raise ConfigError(_problem_text(cfg_path, problems)) from None
    problems += cluster_problems(cfg)
    if problems:
        raise ConfigError(_problem_text(cfg_path, problems))
    return cfg


def _problem_text(cfg_path: Path, problems: list[str]) -> str:
    n = len(problems)
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"{cfg_path} has {n} problem{'s' if n > 1 else ''} for a cluster:\n{listed}"


def cluster_problems(cfg: TunedexConfig) -> list[str]:
    """Values that run on a laptop but not in pods."""
    problems = []
    if cfg.milvus.local_server:
        problems.append("milvus.local_server: set false; on a cluster Milvus is a server (the Milvus CR)")
    if cfg.ray.local_head:
        problems.append("ray.local_head: set false; on a cluster KubeRay runs the Ray head")
    if cfg.milvus.is_loopback:
        problems.append(f"milvus.uri: {cfg.milvus.uri} is this machine; use http://{MILVUS_HOST}:19530 "
                        "(the Milvus CR rendered here) or your Milvus server")
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
    secrets = {"serve.api_key_file": cfg.serve.api_key_file, "ray.auth_token_path": cfg.ray.auth_token_path}
    data = PurePosixPath("/var/lib/tunedex")
    for key, value in path_fields(cfg):
        if not value.is_absolute():
            example = data if key == "data_dir" else (SECRETS_DIR if key in secrets else data) / value.name
            problems.append(f"{key}: {value} is relative, and pods start in different dirs; "
                            f"use an absolute path, e.g. {example}")
    for key, value in secrets.items():
        file = PurePosixPath(str(value))
        for mount in (CONFIG_DIR, PurePosixPath(str(cfg.data_dir))):
            if mount in file.parents:  # no mount can be made inside the ConfigMap's
                problems.append(f"{key}: {file} is inside the mount at {mount}; put it under {SECRETS_DIR}")
    return problems


def path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, PurePosixPath]]:
    """Every path the config sets, by dotted key (new path keys are checked without a change here)."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from path_fields(value, f"{prefix}{name}.")
        elif isinstance(value, PurePath):
            yield f"{prefix}{name}", PurePosixPath(str(value))


def image_entries(image: str | None) -> list[dict[str, str]]:
    """Kustomize `images:` for `image`; it must be pinned (a tag other than latest, or a digest)."""
    if image is None:
        return []
    name, _, digest = image.partition("@")
    repo, tag = (name.rsplit(":", 1) + [""])[:2] if ":" in name.rsplit("/", 1)[-1] else (name, "")
    if not repo or (not tag and not digest) or tag == "latest":
        raise RenderError(f"image {image!r} is not pinned; pass a version tag or a digest, "
                          "e.g. registry.example.com/tunedex:0.1.0 (a moving tag like latest cannot be rolled back)")
    entry = {"name": IMAGE, "newName": repo}
    entry.update({"digest": digest} if digest else {"newTag": tag})
    return [entry]


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RenderError(f"{out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RenderError(f"{out} exists and is not empty; pass an empty or new directory, or --overwrite "
                              f"(it replaces {', '.join(RENDERED)} there and keeps the rest)")
        for name in RENDERED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_files(out: Path, files: dict[str, str]) -> list[Path]:
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Building blocks shared by every pod that runs tunedex


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tunedex", "app.kubernetes.io/part-of": "tunedex",
            "app.kubernetes.io/component": component}


def meta(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": labels(component)}


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def secret_items(cfg: TunedexConfig) -> list[tuple[tuple[str, str], PurePosixPath]]:
    return [(API_KEY_SECRET, PurePosixPath(str(cfg.serve.api_key_file))),
            (RAY_TOKEN_SECRET, PurePosixPath(str(cfg.ray.auth_token_path)))]


def tunedex_volumes(cfg: TunedexConfig) -> list[dict[str, Any]]:
    """The config, the two Secrets (one projected volume per directory) and the shared data volume."""
    by_dir: dict[PurePosixPath, list[dict[str, Any]]] = {}
    for (secret, key), path in secret_items(cfg):
        by_dir.setdefault(path.parent, []).append(
            {"secret": {"name": secret, "items": [{"key": key, "path": path.name, "mode": 0o440}]}})
    volumes = [{"name": "config", "configMap": {"name": "tunedex-config"}},
               {"name": "data", "persistentVolumeClaim": {"claimName": "tunedex-data"}}]
    volumes += [{"name": f"secrets-{i}", "projected": {"sources": sources, "defaultMode": 0o440}}
                for i, sources in enumerate(by_dir.values())]
    return volumes


def tunedex_mounts(cfg: TunedexConfig) -> list[dict[str, Any]]:
    dirs = list(dict.fromkeys(path.parent for _, path in secret_items(cfg)))
    return ([{"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
             {"name": "data", "mountPath": str(cfg.data_dir)}]
            + [{"name": f"secrets-{i}", "mountPath": str(d), "readOnly": True} for i, d in enumerate(dirs)])


def tunedex_env(cfg: TunedexConfig) -> list[dict[str, Any]]:
    return [{"name": "TUNEDEX_CONFIG", "value": str(CONFIG_PATH)},  # the CLI's default config in every pod
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN_PATH", "value": str(cfg.ray.auth_token_path)}]


# ---------------------------------------------------------------------------------------------
# Ray: pods, clusters, the RayService, the RayJobs


def ray_version() -> str:
    return importlib.metadata.version("ray")  # the image installs the same pinned Ray


def ray_container(cfg: TunedexConfig, name: str, resources: dict, ports: list[dict], **probes: Any) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "imagePullPolicy": "IfNotPresent", "resources": resources,
            "ports": ports, "env": tunedex_env(cfg), "volumeMounts": tunedex_mounts(cfg) + [
                {"name": "shm", "mountPath": "/dev/shm"}],
            "securityContext": container_security(), **probes}


def ray_pod(cfg: TunedexConfig, component: str, container: dict, gpu: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"securityContext": pod_security(), "containers": [container],
                            "volumes": tunedex_volumes(cfg) + [{"name": "shm", "emptyDir": {"medium": "Memory"}}]}
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels(component)}, "spec": spec}


def head_group(cfg: TunedexConfig, component: str, serve: bool, num_cpus: str | None,
               resources: dict = HEAD) -> dict[str, Any]:
    r = cfg.ray
    params = {"dashboard-host": "0.0.0.0", "dashboard-port": str(r.dashboard_port),
              "ray-client-server-port": str(r.client_server_port), "metrics-export-port": str(r.metrics_export_port)}
    if num_cpus is not None:
        params["num-cpus"] = num_cpus  # "0": no Serve replicas or tasks on the head
    ports = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": r.dashboard_port},
             {"name": "client", "containerPort": r.client_server_port},
             {"name": "metrics", "containerPort": r.metrics_export_port}]
    if serve:
        ports.append({"name": "serve", "containerPort": cfg.serve.port})
    # The head keeps KubeRay's own probes: KubeRay deploys the Serve config only once the head is
    # Ready, so a /readyz probe here would wait for itself.
    container = ray_container(cfg, "ray-head", resources, ports)
    return {"rayStartParams": params, "template": ray_pod(cfg, component, container)}


def worker_group(cfg: TunedexConfig, name: str, component: str, replicas: int, min_replicas: int,
                 max_replicas: int, resources: dict, serve: bool) -> dict[str, Any]:
    gpu = "nvidia.com/gpu" in resources["limits"]
    ports = [{"name": "metrics", "containerPort": cfg.ray.metrics_export_port}]
    probes = {}
    if serve:
        ports.append({"name": "serve", "containerPort": cfg.serve.port})
        # A worker joins tunedex-serve-svc only while a release is served through it (/readyz is 503
        # before). Liveness is lenient: Serve restarts its own replicas; this catches a wedged node.
        probes = {"readinessProbe": {"httpGet": {"path": "/readyz", "port": "serve"}, "initialDelaySeconds": 10,
                                     "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
                  "livenessProbe": {"httpGet": {"path": "/healthz", "port": "serve"}, "initialDelaySeconds": 120,
                                    "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 30}}
    container = ray_container(cfg, "ray-worker", resources, ports, **probes)
    return {"groupName": name, "replicas": replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {"metrics-export-port": str(cfg.ray.metrics_export_port)},
            "template": ray_pod(cfg, component, container, gpu=gpu)}


def cluster_spec(cfg: TunedexConfig, head: dict, workers: list[dict]) -> dict[str, Any]:
    return {"rayVersion": ray_version(),
            "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET[0]},
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"resources": AUTOSCALER, "securityContext": container_security(),
                                  "idleTimeoutSeconds": 300},
            "headGroupSpec": head, "workerGroupSpecs": workers}


def serve_config(cfg: TunedexConfig, release_id: str | None) -> str:
    """Ray Serve config for serveConfigV2: the `tunedex` app (the Ingress); release apps come from
    `tunedex promote`, or one from `release_id` so a new cluster serves it before traffic moves."""
    apps = [{"name": "tunedex", "route_prefix": "/", "import_path": "tunedex.serving.app:build_app",
             "args": {"config": str(CONFIG_PATH)}}]
    if release_id:
        apps.append({"name": release_id, "route_prefix": None, "import_path": "tunedex.serving.app:build_release_app",
                     "args": {"config": str(CONFIG_PATH), "release_id": release_id}})
    return dump({"http_options": {"host": "0.0.0.0", "port": cfg.serve.port}, "applications": apps})


def with_config_sha(group: dict[str, Any], sha: str) -> dict[str, Any]:
    """The config's hash on a RayService pod: a config change is a pod change, so KubeRay brings up a
    new cluster that reads it (and moves traffic once its Serve apps run) instead of leaving old values."""
    group["template"]["metadata"]["annotations"] = {"tunedex.io/config-sha256": sha}
    return group


def rayservice(cfg: TunedexConfig, release_id: str | None, sha: str) -> dict[str, Any]:
    head = with_config_sha(head_group(cfg, "serve-head", serve=True, num_cpus="0"), sha)
    workers = [with_config_sha(worker_group(cfg, "cpu", "serve-worker", 1, 1, 4, CPU_WORKER, serve=True), sha)]
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": meta(SERVICE, "serve"),
            "spec": {"upgradeStrategy": {"type": "NewCluster"},
                     "excludeHeadPodFromServeSvc": True,  # the head runs no replicas (num-cpus 0)
                     "serveConfigV2": serve_config(cfg, release_id),
                     "rayClusterConfig": cluster_spec(cfg, head, workers)}}


def raycluster(cfg: TunedexConfig) -> dict[str, Any]:
    head = head_group(cfg, "adhoc-head", serve=False, num_cpus="0")
    workers = [worker_group(cfg, "cpu", "adhoc-worker", 1, 0, 4, CPU_WORKER, serve=False)]
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta("tunedex-adhoc", "adhoc"),
            "spec": cluster_spec(cfg, head, workers)}


def rayjob(cfg: TunedexConfig, name: str, entrypoint: str, workers: list[dict], deadline_s: int) -> dict[str, Any]:
    head_cpus = "0" if workers else None  # with workers, Ray's work goes to them; the head runs the driver
    submitter = {"name": "ray-job-submitter", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                 "resources": SUBMITTER, "securityContext": container_security()}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta(name, "job"),
            "spec": {"entrypoint": entrypoint,
                     "metadata": {"tunedex.io/run": name},
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
                     "activeDeadlineSeconds": deadline_s,
                     "backoffLimit": 2,  # each retry is a new cluster; the work resumes (run name, manifest)
                     "submitterConfig": {"backoffLimit": 2},
                     "submitterPodTemplate": {"metadata": {"labels": labels("job-submitter")}, "spec": {
                         "restartPolicy": "Never", "securityContext": pod_security(), "containers": [submitter]}},
                     "rayClusterSpec": cluster_spec(
                         cfg, head_group(cfg, "job-head", serve=False, num_cpus=head_cpus, resources=JOB_HEAD),
                         workers)}}


def finetune_job(cfg: TunedexConfig) -> dict[str, Any]:
    """One Ray Train worker per pod; `ray.address=auto` keeps the run on the job's own cluster."""
    ft = cfg.finetune.ray
    name = ft.run_name or "tunedex-finetune"
    gpus = math.ceil(ft.resources_per_worker.get("GPU", 1 if ft.use_gpu else 0))
    if gpus:
        size = {"requests": {**GPU_WORKER["requests"], "nvidia.com/gpu": str(gpus)},
                "limits": {**GPU_WORKER["limits"], "nvidia.com/gpu": str(gpus)}}
    else:
        cpu = str(math.ceil(ft.resources_per_worker.get("CPU", 1)) + 1)  # +1: the raylet and data loading
        size = {"requests": JOB_CPU_WORKER["requests"], "limits": {**JOB_CPU_WORKER["limits"], "cpu": cpu}}
    group = worker_group(cfg, "gpu" if gpus else "cpu", "job-worker", ft.num_workers, ft.num_workers,
                         ft.num_workers, size, serve=False)
    entry = f"tunedex finetune {CONFIG_PATH} --set finetune.ray.run_name={name} --set ray.address=auto"
    return rayjob(cfg, name, entry, [group], deadline_s=24 * 3600)


def embed_job(cfg: TunedexConfig) -> dict[str, Any]:
    """`embedding.replicas` 0 embeds in the driver (on the head); N runs a Ray Data pool on N workers."""
    e = cfg.embedding
    corpus = cfg.corpus.path or cfg.data_dir / "corpus"
    workers = []
    if e.replicas:
        gpu = e.gpus_per_replica > 0
        workers = [worker_group(cfg, "gpu" if gpu else "cpu", "job-worker", e.replicas, e.replicas, e.replicas,
                                GPU_WORKER if gpu else JOB_CPU_WORKER, serve=False)]
    entry = f"tunedex index {corpus} -c {CONFIG_PATH} --set ray.address=auto"
    return rayjob(cfg, "tunedex-embed", entry, workers, deadline_s=6 * 3600)


# ---------------------------------------------------------------------------------------------
# Milvus, Prefect, storage, policies


def milvus(cfg: TunedexConfig) -> dict[str, Any]:
    """Milvus Operator CR, standalone (prod patches it to cluster mode); the image is the operator's default."""
    keep = {"deletionPolicy": "Retain", "pvcDeletion": False}  # deleting the CR keeps the index
    return {"apiVersion": "milvus.io/v1beta1", "kind": "Milvus", "metadata": meta(MILVUS, "milvus"),
            "spec": {"mode": "standalone",
                     # only part-of: the operator's own name/instance/component labels select its pods
                     "components": {"podLabels": {"app.kubernetes.io/part-of": "tunedex"}, "resources": MILVUS_POD},
                     "dependencies": {
                         "etcd": {"inCluster": {"values": {"replicaCount": 1, "resources": MILVUS_DEP}, **keep}},
                         "storage": {"inCluster": {"values": {"mode": "standalone", "resources": MILVUS_DEP,
                                                              "persistence": {"size": "20Gi"}}, **keep}}},
                     "config": {}}}


def prefect_server() -> list[dict[str, Any]]:
    """Prefect's API and UI from the tunedex image (Prefect is installed there); SQLite on a small volume."""
    probe = {"httpGet": {"path": "/api/health", "port": "api"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container = {"name": "prefect-server", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                 "command": ["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"],
                 "env": [{"name": "PREFECT_HOME", "value": "/var/lib/prefect"},
                         {"name": "PREFECT_UI_API_URL", "value": "http://localhost:4200/api"},  # via port-forward
                         {"name": "PREFECT_SERVER_ANALYTICS_ENABLED", "value": "false"}],
                 "ports": [{"name": "api", "containerPort": 4200}], "resources": PREFECT_SERVER,
                 "readinessProbe": probe, "livenessProbe": {**probe, "initialDelaySeconds": 30, "failureThreshold": 6},
                 "volumeMounts": [{"name": "prefect", "mountPath": "/var/lib/prefect"}],
                 "securityContext": container_security()}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(PREFECT_HOST, "prefect-server"),
                  "spec": {"replicas": 1, "strategy": {"type": "Recreate"},  # one SQLite writer
                           "selector": {"matchLabels": labels("prefect-server")},
                           "template": {"metadata": {"labels": labels("prefect-server")},
                                        "spec": {"securityContext": pod_security(), "containers": [container],
                                                 "volumes": [{"name": "prefect", "persistentVolumeClaim":
                                                              {"claimName": "tunedex-prefect"}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta(PREFECT_HOST, "prefect-server"),
               "spec": {"selector": labels("prefect-server"),
                        "ports": [{"name": "api", "port": 4200, "targetPort": "api"}]}}
    return [deployment, service]


def pool_template(cfg: TunedexConfig, image: str) -> dict[str, Any]:
    """Base job template of the `tunedex-pool` Kubernetes work pool: flow runs get the config, the
    Secrets and the data volume, like the Ray pods (prefect-kubernetes' template, with volumes)."""
    container = {"name": "prefect-job", "image": "{{ image }}", "imagePullPolicy": "IfNotPresent",
                 "args": "{{ command }}", "env": "{{ env }}", "resources": FLOW_RUN,
                 "volumeMounts": tunedex_mounts(cfg), "securityContext": container_security()}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"labels": "{{ labels }}", "namespace": "{{ namespace }}", "generateName": "{{ name }}-"},
           "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": "{{ finished_job_ttl }}",
                    # parallelism/completions: prefect-kubernetes requires them here (as in its own template)
                    "template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                          "serviceAccountName": "tunedex-flow-run",
                                          "securityContext": pod_security(), "containers": [container],
                                          "volumes": tunedex_volumes(cfg)}}}}
    string = {"type": "string"}
    variables = {"type": "object", "properties": {
        "name": {**string, "default": "tunedex-flow"}, "namespace": {**string, "default": NAMESPACE},
        "image": {**string, "default": image}, "command": string,
        "env": {"type": "object", "additionalProperties": string,
                "default": {e["name"]: e["value"] for e in tunedex_env(cfg)}},
        "labels": {"type": "object", "additionalProperties": string},
        "finished_job_ttl": {"type": "integer", "default": 3600},
        "stream_output": {"type": "boolean", "default": True}}}
    config = {"command": "{{ command }}", "env": "{{ env }}", "labels": "{{ labels }}", "name": "{{ name }}",
              "namespace": "{{ namespace }}", "stream_output": "{{ stream_output }}", "job_manifest": job}
    return {"job_configuration": config, "variables": variables}


def prefect_worker(cfg: TunedexConfig, image: str) -> list[dict[str, Any]]:
    """A worker polling `tunedex-pool`; its init container creates (or updates) the pool and its template."""
    env = [{"name": "PREFECT_API_URL", "value": cfg.prefect.api_url},
           {"name": "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    common = {"image": IMAGE, "imagePullPolicy": "IfNotPresent", "env": env, "resources": PREFECT_WORKER,
              "securityContext": container_security()}
    template_file = "/etc/prefect-pool/base-job-template.json"
    init = {"name": "create-pool", **common, "volumeMounts": [{"name": "pool", "mountPath": "/etc/prefect-pool"}],
            "command": ["prefect", "work-pool", "create", POOL, "--type", "kubernetes",
                        "--base-job-template", template_file, "--overwrite"]}
    probe = {"httpGet": {"path": "/health", "port": "health"}, "periodSeconds": 15, "timeoutSeconds": 5}
    worker = {"name": "prefect-worker", **common,
              "command": ["prefect", "worker", "start", "--pool", POOL, "--type", "kubernetes", "--with-healthcheck"],
              "ports": [{"name": "health", "containerPort": 8080}],
              "readinessProbe": probe, "livenessProbe": {**probe, "initialDelaySeconds": 30, "failureThreshold": 4}}
    rules = [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
             {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch", "create", "patch"]}]
    name = "tunedex-prefect-worker"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name, "prefect-worker")},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("tunedex-flow-run", "flow-run"),
         "automountServiceAccountToken": False},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(name, "prefect-worker"),
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(name, "prefect-worker"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("tunedex-prefect-pool", "prefect-worker"),
         "data": {"base-job-template.json": json.dumps(pool_template(cfg, image), indent=2) + "\n"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(name, "prefect-worker"),
         "spec": {"replicas": 1, "selector": {"matchLabels": labels("prefect-worker")},
                  "template": {"metadata": {"labels": labels("prefect-worker")},
                               "spec": {"serviceAccountName": name, "securityContext": pod_security(),
                                        "initContainers": [init], "containers": [worker],
                                        "volumes": [{"name": "pool",
                                                     "configMap": {"name": "tunedex-prefect-pool"}}]}}}},
    ]


def storage(cfg: TunedexConfig, prefect: bool) -> list[dict[str, Any]]:
    """The data dir (registry, models, corpus, Ray Train runs) is shared by every pod: ReadWriteMany."""
    claims = [("tunedex-data", "data", ["ReadWriteMany"], "50Gi")]
    if prefect:
        claims.append(("tunedex-prefect", "prefect-server", ["ReadWriteOnce"], "2Gi"))
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(name, component),
             "spec": {"accessModes": modes, "resources": {"requests": {"storage": size}}}}
            for name, component, modes, size in claims]


def config_map(raw: dict[str, Any], source: str) -> dict[str, Any]:
    text = f"# {source}, as rendered by `tunedex k8s render` (secret files added)\n" + dump(raw)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("tunedex-config", "config"),
            "data": {"config.yaml": text}}


def policies(cfg: TunedexConfig, prefect: bool) -> list[dict[str, Any]]:
    """Ray's dashboard, GCS and client ports take traffic from this namespace only (and the dashboard
    from the KubeRay operator, which deploys Serve configs and jobs through it); Serve's port is open."""
    r = cfg.ray
    ray_policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("tunedex-ray", "ray"),
                  "spec": {"podSelector": {"matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}]},
                           "policyTypes": ["Ingress"],
                           "ingress": [
                               {"from": [{"podSelector": {}}]},  # this namespace: every port (Ray's own traffic)
                               {"from": [{"namespaceSelector": {"matchLabels": {
                                   "kubernetes.io/metadata.name": "kuberay-system"}}}],
                                "ports": [{"port": r.dashboard_port, "protocol": "TCP"}]},
                               {"ports": [{"port": cfg.serve.port, "protocol": "TCP"}]}]}}
    out = [ray_policy]
    if prefect:
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": meta("tunedex-prefect-server", "prefect-server"),
                    "spec": {"podSelector": {"matchLabels": labels("prefect-server")}, "policyTypes": ["Ingress"],
                             "ingress": [{"from": [{"podSelector": {}}],
                                          "ports": [{"port": 4200, "protocol": "TCP"}]}]}})
    out.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta("tunedex-serve", "serve"),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels("serve-worker")}}})
    return out


# ---------------------------------------------------------------------------------------------
# Kustomize: base, overlays, jobs


def json_patch(kind: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {"target": {"kind": kind, "name": name}, "patch": dump(ops)}


def op(kind: str, path: str, value: Any) -> dict[str, Any]:
    return {"op": kind, "path": path, "value": value}


def group_ops(group: str, size: dict | None = None, **counts: int) -> list[dict[str, Any]]:
    """Replace a Ray group's pod resources and its replica counts (replicas, minReplicas, maxReplicas)."""
    ops = [op("replace", f"{group}/template/spec/containers/0/resources", size)] if size else []
    return ops + [op("replace", f"{group}/{key}", n) for key, n in counts.items()]


def dev_patches() -> list[dict[str, Any]]:
    head = {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    worker = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    rs, rc = "/spec/rayClusterConfig", "/spec"
    return [
        json_patch("RayService", SERVICE, group_ops(f"{rs}/headGroupSpec", head)
                   + group_ops(f"{rs}/workerGroupSpecs/0", worker, maxReplicas=2)),
        json_patch("RayCluster", "tunedex-adhoc", group_ops(f"{rc}/headGroupSpec", head)
                   + group_ops(f"{rc}/workerGroupSpecs/0", worker, replicas=0, maxReplicas=1)),
        # kind, minikube, k3d: one node, and their default storage class has no ReadWriteMany
        json_patch("PersistentVolumeClaim", "tunedex-data", [op("replace", "/spec/accessModes", ["ReadWriteOnce"]),
                                                             op("replace", "/spec/resources/requests/storage", "10Gi")]),
    ]


def prod_patches(cfg: TunedexConfig, with_milvus: bool, sha: str) -> list[dict[str, Any]]:
    worker = {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}
    rs = "/spec/rayClusterConfig"
    serve_gpu = with_config_sha(worker_group(cfg, "gpu", "serve-worker", 0, 0, 4, GPU_WORKER, serve=True), sha)
    adhoc_gpu = worker_group(cfg, "gpu", "adhoc-worker", 0, 0, 2, GPU_WORKER, serve=False)
    patches = [
        json_patch("RayService", SERVICE, group_ops(f"{rs}/workerGroupSpecs/0", worker, replicas=2, minReplicas=2,
                                                    maxReplicas=8)
                   + [op("add", f"{rs}/workerGroupSpecs/-", serve_gpu)]),
        json_patch("RayCluster", "tunedex-adhoc", [op("add", "/spec/workerGroupSpecs/-", adhoc_gpu)]),
        json_patch("PersistentVolumeClaim", "tunedex-data", [op("replace", "/spec/resources/requests/storage", "500Gi")]),
    ]
    if with_milvus:
        deps = "/spec/dependencies"
        patches.append(json_patch("Milvus", MILVUS, [
            op("replace", "/spec/mode", "cluster"),
            op("add", f"{deps}/msgStreamType", "woodpecker"),  # Milvus 2.6's own log service: no Pulsar or Kafka
            op("replace", f"{deps}/etcd/inCluster/values/replicaCount", 3),
            op("replace", f"{deps}/storage/inCluster/values/mode", "distributed"),
            op("replace", f"{deps}/storage/inCluster/values/persistence/size", "200Gi"),
            op("add", "/spec/components/proxy", {"replicas": 2}),
            op("add", "/spec/components/queryNode", {"replicas": 2})]))
    return patches


def kustomization(resources: list[str], images: list[dict], patches: list[dict] | None = None,
                  namespace: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        doc["namespace"] = NAMESPACE
    doc["resources"] = resources
    if images:
        doc["images"] = images
    if patches:
        doc["patches"] = patches
    return doc


def manifests(cfg: TunedexConfig, raw: dict[str, Any], image: str | None, release_id: str | None,
              source: str) -> dict[str, str]:
    """Every file, by path under OUT."""
    images = image_entries(image)
    with_milvus = urlparse(cfg.milvus.uri).hostname == MILVUS_HOST
    with_prefect = urlparse(cfg.prefect.api_url or "").hostname == PREFECT_HOST
    config = config_map(raw, source)
    sha = hashlib.sha256(config["data"]["config.yaml"].encode()).hexdigest()[:16]
    base = {"configmap.yaml": [config], "storage.yaml": storage(cfg, with_prefect),
            "rayservice.yaml": [rayservice(cfg, release_id, sha)], "raycluster.yaml": [raycluster(cfg)]}
    if with_milvus:
        base["milvus.yaml"] = [milvus(cfg)]
    if with_prefect:
        base["prefect-server.yaml"] = prefect_server()
    base["prefect-worker.yaml"] = prefect_worker(cfg, image or IMAGE)
    base["policies.yaml"] = policies(cfg, with_prefect)
    header = f"# Rendered by `tunedex k8s render --config {source}`; change the config and render again.\n"
    files = {f"base/{name}": header + dump_all(docs) for name, docs in base.items()}
    files["base/kustomization.yaml"] = header + dump(kustomization(list(base), []))
    # `images:` sits in the overlays: it must also reach the containers that their patches add
    files["overlays/dev/kustomization.yaml"] = header + dump(
        kustomization(["../../base"], images, dev_patches(), namespace=False))
    files["overlays/prod/kustomization.yaml"] = header + dump(
        kustomization(["../../base"], images, prod_patches(cfg, with_milvus, sha), namespace=False))
    for name, job in (("finetune", finetune_job(cfg)), ("embed", embed_job(cfg))):
        files[f"jobs/{name}/rayjob.yaml"] = header + dump(job)
        files[f"jobs/{name}/kustomization.yaml"] = header + dump(kustomization(["rayjob.yaml"], images))
    files["README.md"] = readme(source, cfg)
    return files


def readme(source: str, cfg: TunedexConfig) -> str:
    return f"""# tunedex on Kubernetes

Rendered from `{source}` by `tunedex k8s render`; do not edit by hand: change the config and render
again. The walk from laptop to cluster, step by step, is `docs/cluster.md`.

| path | what |
|---|---|
| `base/` | config (ConfigMap `tunedex-config`), data volume (PVC `tunedex-data`), endpoint (RayService `{SERVICE}`), ad-hoc RayCluster `tunedex-adhoc`, Milvus (Milvus Operator CR), Prefect server and worker (work pool `{POOL}`), NetworkPolicies, PodDisruptionBudget |
| `overlays/dev/` | small, CPU only, ReadWriteOnce storage: one-node clusters (kind, minikube) |
| `overlays/prod/` | GPU worker groups (scale from zero), Milvus in cluster mode, bigger pods, ReadWriteMany storage |
| `jobs/finetune/`, `jobs/embed/` | RayJobs, each on its own Ray cluster: `kubectl create -k jobs/finetune` |

Every container names the image `{IMAGE}`; `tunedex k8s render --image REGISTRY/tunedex:TAG` writes the
real one as kustomize `images:` into the overlays and jobs (this copy has none: render your own).

The namespace `{NAMESPACE}` and two Secrets come first; Secrets are never rendered:

```
kubectl create namespace {NAMESPACE}
kubectl -n {NAMESPACE} create secret generic {API_KEY_SECRET[0]} --from-literal={API_KEY_SECRET[1]}="$(openssl rand -hex 32)"
kubectl -n {NAMESPACE} create secret generic {RAY_TOKEN_SECRET[0]} --from-literal={RAY_TOKEN_SECRET[1]}="$(openssl rand -hex 32)"
kubectl apply -k overlays/dev
```

Pods mount the config at `{CONFIG_PATH}`, the Secrets at `{cfg.serve.api_key_file}` and
`{cfg.ray.auth_token_path}`, and the data volume at `{cfg.data_dir}`.
Targets KubeRay v1.6+ (`ray.io/v1`), Milvus Operator v1.3 (`milvus.io/v1beta1`), Ray {ray_version()}.
"""


# ---------------------------------------------------------------------------------------------
# YAML out: block style for multi-line strings (serveConfigV2, the config, patches)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def dump_all(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
