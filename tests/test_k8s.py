"""Kubernetes manifests: rendered from configs/cluster.yaml, valid, no image tag or secret value baked in."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from tunedex.infra import k8s
from tunedex.infra.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "configs/cluster.yaml"
K8S_VERSION = "1.32.0"  # kubernetes-validate ships this version's JSON schemas: no network needed
IMAGE = "registry.example.com/tunedex:1.2.3"
RAY_PORTS = {"dashboard": 8265, "gcs": 6379, "client": 10001}  # configs/cluster.yaml's values

# Field names the KubeRay CRDs accept where we write them: ray-project/kuberay v1.7.0,
# ray-operator/apis/ray/v1/{raycluster,rayjob,rayservice}_types.go and config/crd/bases/ray.io_*.yaml
# (`authOptions.secretName` exists since v1.6.0). Each entry: (required, allowed).
KUBERAY = {
    "RayService.spec": ({"rayClusterConfig"}, {
        "rayClusterConfig", "serveConfigV2", "upgradeStrategy", "excludeHeadPodFromServeSvc", "serveService",
        "rayClusterDeletionDelaySeconds", "managedBy", "suspend"}),
    "RayJob.spec": (set(), {
        "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
        "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
        "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
        "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}),
    "RayClusterSpec": ({"headGroupSpec"}, {
        "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
        "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy", "rayVersion", "suspend",
        "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}),
    "headGroupSpec": ({"template"}, {
        "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources", "serviceType",
        "template"}),
    "workerGroupSpec": ({"groupName", "maxReplicas", "minReplicas", "template"}, {
        "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
        "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}),
    "authOptions": (set(), {"enableK8sTokenAuth", "mode", "secretName"}),
    "autoscalerOptions": (set(), {
        "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
        "securityContext", "upscalingMode", "version", "volumeMounts"}),
    "upgradeStrategy": (set(), {"clusterUpgradeOptions", "type"}),
    "submitterConfig": (set(), {"backoffLimit"}),
}
# Milvus Operator v1.3.8 (zilliztech/milvus-operator, apis/milvus.io/v1beta1/*_types.go and
# config/crd/bases/milvus.io_milvuses.yaml).
MILVUS = {
    "spec": (set(), {"components", "config", "dependencies", "hookConfig", "mode"}),
    "dependencies": (set(), {"customMsgStream", "etcd", "kafka", "msgStreamType", "natsmq", "pulsar", "rocksmq",
                             "storage", "tei", "woodpecker"}),
    "etcd": (set(), {"endpoints", "external", "inCluster"}),
    "storage": (set(), {"endpoint", "external", "inCluster", "secretRef", "ssl", "type"}),
    "inCluster": (set(), {"chartVersion", "deletionPolicy", "pvcDeletion", "values"}),
    "components": (set(), {
        "activeConfigMap", "affinity", "cdc", "commands", "dataCoord", "dataNode", "disableMetric", "dnsPolicy",
        "dummyImage", "enableManualMode", "enableRollingUpdate", "env", "hostNetwork", "image", "imagePullPolicy",
        "imagePullSecrets", "imageUpdateMode", "indexCoord", "indexNode", "metricInterval", "metricLabels",
        "mixCoord", "nodeSelector", "paused", "podAnnotations", "podLabels", "priorityClassName", "probes", "proxy",
        "queryCoord", "queryNode", "resources", "rollingMode", "rootCoord", "runAsNonRoot", "runWithSubProcess",
        "schedulerName", "securityContext", "serviceAccountName", "standalone", "streamingMode", "streamingNode",
        "targetPortType", "tolerations", "toolImage", "topologySpreadConstraints", "updateConfigMapOnly",
        "updateToolImage", "version", "volumeMounts", "volumes"}),
}


# ---------------------------------------------------------------------------------------------
# Helpers: read what render wrote, apply the overlays' patches the way kustomize does


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("k8s") / "deploy"
    k8s.render(CLUSTER, path, IMAGE)
    return path


@pytest.fixture(scope="module")
def cfg():
    return k8s.validate_cluster_config(CLUSTER, k8s.cluster_config(CLUSTER))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def build(root: Path, images: bool = True) -> list[dict[str, Any]]:
    """A kustomization's objects: its resources, then its JSON 6902 patches, then its `images:`."""
    kz = kustomization(root)
    objs: list[dict[str, Any]] = []
    for res in kz["resources"]:
        objs += build(root / res, images) if (root / res).is_dir() else load_docs(root / res)
    for p in kz.get("patches", []):
        [target] = [o for o in objs if o["kind"] == p["target"]["kind"] and o["metadata"]["name"] == p["target"]["name"]]
        objs[objs.index(target)] = jsonpatch.apply_patch(target, yaml.safe_load(p["patch"]))
    for entry in kz.get("images", []) if images else []:
        new = entry["newName"] + (f"@{entry['digest']}" if "digest" in entry else f":{entry['newTag']}")
        for c in containers_of(objs):
            if c["image"] == entry["name"]:
                c["image"] = new
    if "namespace" in kz:
        for o in objs:
            o["metadata"]["namespace"] = kz["namespace"]
    return objs


def overlay(out: Path, name: str) -> list[dict[str, Any]]:
    return build(out / "overlays" / name)


def jobs(out: Path) -> list[dict[str, Any]]:
    return build(out / "jobs/finetune") + build(out / "jobs/embed")


def ray_cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    return {"RayService": lambda: [spec["rayClusterConfig"]], "RayCluster": lambda: [spec],
            "RayJob": lambda: [spec["rayClusterSpec"]]}.get(obj["kind"], list)()


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod an object makes."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] == "Deployment":
        yield name, obj["spec"]["template"]
    for spec in ray_cluster_specs(obj):
        yield f"{name} head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{name} {group['groupName']}", group["template"]
    if obj["kind"] == "RayJob":
        yield f"{name} submitter", obj["spec"]["submitterPodTemplate"]


def containers_of(objs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for obj in objs:
        for _, tmpl in pod_templates(obj):
            yield from tmpl["spec"].get("initContainers", []) + tmpl["spec"]["containers"]


def group(obj: dict[str, Any], name: str) -> dict[str, Any]:
    [g] = [g for g in ray_cluster_specs(obj)[0]["workerGroupSpecs"] if g["groupName"] == name]
    return g


def by_kind(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [o] = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return o


def pool_job(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Prefect work pool's Job manifest, its `{{ placeholders }}` filled as the worker fills them."""
    template = json.loads(by_kind(objs, "ConfigMap", "tunedex-prefect-pool")["data"]["base-job-template.json"])
    values = {"{{ image }}": "tunedex", "{{ command }}": ["prefect", "flow-run", "execute"], "{{ env }}": [],
              "{{ labels }}": {}, "{{ namespace }}": "tunedex", "{{ name }}-": "tunedex-flow-",
              "{{ finished_job_ttl }}": 3600}

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return values.get(node, node) if isinstance(node, str) else node

    job = fill(template["job_configuration"]["job_manifest"])
    # prefect-kubernetes insists on these two inside the pod spec (its own template has them there);
    # the API server drops them, Kubernetes' schema does not know them
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    return job


def check_keys(where: str, data: dict[str, Any], schema: tuple[set[str], set[str]]) -> list[str]:
    required, allowed = schema
    problems = [f"{where}: unknown field {k}" for k in sorted(set(data) - allowed)]
    return problems + [f"{where}: missing {k}" for k in sorted(required - set(data))]


# ---------------------------------------------------------------------------------------------
# Every manifest validates


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_core_manifests_and_pod_templates_validate(out, name):
    objs = overlay(out, name) + jobs(out)
    core = [o for o in objs if not o["apiVersion"].startswith(("ray.io/", "milvus.io/"))]
    assert {o["kind"] for o in core} >= {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                                         "NetworkPolicy", "PodDisruptionBudget", "Role", "RoleBinding", "ServiceAccount"}
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # the pods inside the KubeRay resources, and the Prefect work pool's Job, are core objects too
    for obj in objs:
        if obj["apiVersion"].startswith("ray.io/"):
            for where, tmpl in pod_templates(obj):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tmpl}
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
    kubernetes_validate.validate(pool_job(objs), K8S_VERSION, strict=True)


def test_validation_catches_a_bad_manifest(out):
    """The check above can fail: a misspelt field in a pod is rejected."""
    deployment = by_kind(overlay(out, "dev"), "Deployment", "tunedex-prefect-server")
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_kuberay_resources_use_fields_the_crds_define(out, name):
    objs = [o for o in overlay(out, name) + jobs(out) if o["apiVersion"] == "ray.io/v1"]
    assert sorted(o["kind"] for o in objs) == ["RayCluster", "RayJob", "RayJob", "RayService"]
    problems = []
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("RayService", "RayJob"):
            problems += check_keys(where, obj["spec"], KUBERAY[f"{obj['kind']}.spec"])
        for spec in ray_cluster_specs(obj):
            problems += check_keys(where, spec, KUBERAY["RayClusterSpec"])
            problems += check_keys(f"{where} head", spec["headGroupSpec"], KUBERAY["headGroupSpec"])
            for key in ("authOptions", "autoscalerOptions"):
                problems += check_keys(f"{where} {key}", spec[key], KUBERAY[key])
            assert spec["authOptions"] == {"mode": "token", "secretName": "tunedex-ray-auth"}
            assert Version(spec["rayVersion"]) >= Version("2.52")  # KubeRay's token auth needs Ray 2.52+
            params = [spec["headGroupSpec"]["rayStartParams"]]
            for g in spec["workerGroupSpecs"]:
                problems += check_keys(f"{where} {g['groupName']}", g, KUBERAY["workerGroupSpec"])
                assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (where, g["groupName"])
                params.append(g["rayStartParams"])
            assert all(isinstance(v, str) for p in params for v in p.values()), "rayStartParams is map[string]string"
        if obj["kind"] == "RayService":
            problems += check_keys(where, obj["spec"]["upgradeStrategy"], KUBERAY["upgradeStrategy"])
            assert obj["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
        if obj["kind"] == "RayJob":
            problems += check_keys(where, obj["spec"]["submitterConfig"], KUBERAY["submitterConfig"])
            assert all(isinstance(v, str) for v in obj["spec"]["metadata"].values())
    assert not problems, problems


def test_serve_config_is_a_ray_serve_config_with_the_tunedex_app(out, cfg):
    from ray.serve.schema import ServeDeploySchema

    service = by_kind(overlay(out, "dev"), "RayService")
    serve = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    [app] = serve.applications
    assert (app.name, app.route_prefix, app.import_path) == ("tunedex", "/", "tunedex.serving.app:build_app")
    assert app.args == {"config": str(k8s.CONFIG_PATH)}
    assert (serve.http_options.host, serve.http_options.port) == ("0.0.0.0", cfg.serve.port)
    ports = {p["name"]: p["containerPort"] for p in group(service, "cpu")["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == cfg.serve.port  # KubeRay's tunedex-serve-svc targets the port named `serve`


def test_a_pinned_release_is_loaded_by_a_new_cluster_too(tmp_path):
    k8s.render(CLUSTER, tmp_path / "o", IMAGE, release_id="rel-20250101-120000-abc123")
    from ray.serve.schema import ServeDeploySchema

    service = load_docs(tmp_path / "o/base/rayservice.yaml")[0]
    apps = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])).applications
    release = {a.name: a for a in apps}["rel-20250101-120000-abc123"]
    assert release.route_prefix is None and release.import_path == "tunedex.serving.app:build_release_app"
    assert release.args == {"config": str(k8s.CONFIG_PATH), "release_id": "rel-20250101-120000-abc123"}
    with pytest.raises(k8s.RenderError, match="not a release id"):
        k8s.render(CLUSTER, tmp_path / "p", IMAGE, release_id="../etc")


def test_a_config_change_rolls_the_endpoint_onto_a_new_cluster(out, tmp_path):
    """KubeRay upgrades a RayService when its pods change: the config's hash on them makes a config change one."""
    objs = overlay(out, "prod")
    text = by_kind(objs, "ConfigMap", "tunedex-config")["data"]["config.yaml"]
    sha = hashlib.sha256(text.encode()).hexdigest()[:16]
    templates = list(pod_templates(by_kind(objs, "RayService")))
    assert len(templates) == 3  # head, cpu, gpu
    for where, tmpl in templates:
        assert tmpl["metadata"]["annotations"] == {"tunedex.io/config-sha256": sha}, where
    changed = tmp_path / "changed.yaml"
    changed.write_text(CLUSTER.read_text().replace("  top_k: 3", "  top_k: 5"))
    k8s.render(changed, tmp_path / "o", IMAGE)
    [service] = load_docs(tmp_path / "o/base/rayservice.yaml")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert head["tunedex.io/config-sha256"] != sha


@pytest.mark.parametrize("name, mode", [("dev", "standalone"), ("prod", "cluster")])
def test_milvus_cr_uses_fields_the_crd_defines(out, cfg, name, mode):
    milvus = by_kind(overlay(out, name), "Milvus")
    assert milvus["apiVersion"] == "milvus.io/v1beta1"
    spec = milvus["spec"]
    deps = spec["dependencies"]
    problems = check_keys("spec", spec, MILVUS["spec"]) + check_keys("dependencies", deps, MILVUS["dependencies"])
    problems += check_keys("components", spec["components"], MILVUS["components"])
    for dep in ("etcd", "storage"):
        problems += check_keys(dep, deps[dep], MILVUS[dep]) + check_keys(dep, deps[dep]["inCluster"], MILVUS["inCluster"])
        assert deps[dep]["inCluster"]["deletionPolicy"] in ("Delete", "Retain")
    assert not problems, problems
    assert spec["mode"] == mode and deps.get("msgStreamType", "") in ("", "woodpecker", "pulsar", "kafka", "rocksmq")
    # the operator names the service <name>-milvus: the config's milvus.uri must point at it
    assert cfg.milvus.uri == f"http://{milvus['metadata']['name']}-milvus:19530"


# ---------------------------------------------------------------------------------------------
# Nothing baked in: image tags, secret values


def test_image_comes_only_from_the_parameter(out, tmp_path):
    for path in out.rglob("*.yaml"):
        text = path.read_text()
        assert ":latest" not in text, path
        images = [c["image"] for c in containers_of(load_docs(path))] if "kustomization" not in path.name else []
        assert set(images) <= {"tunedex"}, f"{path} names an image itself: {images}"
        if "1.2.3" in text and path.name == "kustomization.yaml":  # the tag given to render: kustomize's `images:`
            assert path.parent.name != "base" and kustomization(path.parent)["images"] == [
                {"name": "tunedex", "newName": "registry.example.com/tunedex", "newTag": "1.2.3"}]
        elif "1.2.3" in text:  # ... and the work pool's default image for flow runs (a JSON string)
            assert path.name == "prefect-worker.yaml" and text.count("1.2.3") == 1, path
    assert {c["image"] for c in containers_of(overlay(out, "prod") + jobs(out))} == {IMAGE}
    # the work pool's flow-run image: a Prefect variable whose default is the parameter
    template = json.loads(by_kind(overlay(out, "dev"), "ConfigMap", "tunedex-prefect-pool")["data"]["base-job-template.json"])
    assert template["variables"]["properties"]["image"]["default"] == IMAGE

    k8s.render(CLUSTER, tmp_path / "plain")  # no --image: no tag anywhere, kustomize `images:` left to the user
    text = "".join(p.read_text() for p in (tmp_path / "plain").rglob("*.yaml"))
    assert "1.2.3" not in text and "images:" not in text
    for bad in ("registry.example.com/tunedex", "tunedex:latest", "tunedex"):
        with pytest.raises(k8s.RenderError, match="not pinned"):
            k8s.render(CLUSTER, tmp_path / "bad", bad)
    assert k8s.image_entries("r.io:5000/t/tunedex@sha256:ab") == [
        {"name": "tunedex", "newName": "r.io:5000/t/tunedex", "digest": "sha256:ab"}]


def test_secrets_are_referenced_never_rendered(out):
    objs = overlay(out, "prod") + jobs(out)
    assert not [o for o in objs if o["kind"] == "Secret"]
    text = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert "stringData" not in text
    names = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if "secret" in node:
                names.add(node["secret"]["name"])
            if "secretKeyRef" in node:
                names.add(node["secretKeyRef"]["name"])
            if "secretName" in node:
                names.add(node["secretName"])
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(objs)
    assert names == {"tunedex-api-key", "tunedex-ray-auth"}


@pytest.mark.parametrize("key, value", [("serve.api_key", "sk-live-0123456789"), ("milvus.token", "root:Milvus")])
def test_secret_values_in_the_config_are_refused(tmp_path, key, value):
    raw = yaml.safe_load(CLUSTER.read_text())
    section, field = key.split(".")
    raw[section][field] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{key}: a secret would be written into the ConfigMap"):
        k8s.render(bad, tmp_path / "out", IMAGE)
    assert not (tmp_path / "out").exists()


def test_config_in_the_configmap_loads_and_names_the_mounted_files(out, tmp_path, cfg):
    objs = overlay(out, "dev")
    text = by_kind(objs, "ConfigMap", "tunedex-config")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    raw = yaml.safe_load(text)
    assert raw["serve"]["api_key_file"] == "/var/run/secrets/tunedex/api_key"
    assert raw["ray"]["auth_token_path"] == "/var/run/secrets/tunedex/ray_auth_token"
    assert "api_key" not in raw["serve"]
    key = tmp_path / "api_key"  # the Secret's file exists only in pods; stand in for it here
    key.write_text("test-key\n")
    loaded = load_config(path, [f"serve.api_key_file={key}"])
    assert loaded.serve.api_key == "test-key"
    assert not loaded.milvus.local_server and not loaded.ray.local_head
    assert loaded.model_dump(exclude={"serve"}) == cfg.model_dump(exclude={"serve"})


def test_every_tunedex_pod_mounts_config_secrets_and_data_at_the_configured_paths(out, cfg):
    objs = overlay(out, "prod") + jobs(out)
    pods = [(w, t) for o in objs if o["apiVersion"] == "ray.io/v1" for w, t in pod_templates(o) if "submitter" not in w]
    pods.append(("flow run", pool_job(objs)["spec"]["template"]))
    assert len(pods) >= 8
    for where, tmpl in pods:
        spec, [c] = tmpl["spec"], tmpl["spec"]["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        assert mounts["/etc/tunedex"]["configMap"]["name"] == "tunedex-config", where
        assert mounts[str(cfg.data_dir)]["persistentVolumeClaim"]["claimName"] == "tunedex-data", where
        files = {}
        for mount, volume in mounts.items():
            for source in volume.get("projected", {}).get("sources", []):
                for item in source["secret"]["items"]:
                    files[f"{mount}/{item['path']}"] = (source["secret"]["name"], item["key"])
        assert files == {str(cfg.serve.api_key_file): ("tunedex-api-key", "api_key"),
                         str(cfg.ray.auth_token_path): ("tunedex-ray-auth", "auth_token")}, where
        if where != "flow run":
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(cfg.ray.auth_token_path)
            assert env["TUNEDEX_CONFIG"] == str(k8s.CONFIG_PATH)


# ---------------------------------------------------------------------------------------------
# Network, probes, disruption, resources


def admitted_from(policy: dict[str, Any], port: int) -> list[list[dict[str, Any]] | None]:
    """The `from` of every ingress rule that admits `port` (None: from anywhere)."""
    rules = [r for r in policy["spec"]["ingress"] if "ports" not in r or any(p["port"] == port for p in r["ports"])]
    return [r.get("from") for r in rules]


def test_network_policy_keeps_ray_dashboard_gcs_and_client_inside_the_cluster(out, cfg):
    policy = by_kind(overlay(out, "prod"), "NetworkPolicy", "tunedex-ray")
    assert policy["spec"]["podSelector"] == {"matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert (cfg.ray.dashboard_port, cfg.ray.client_server_port) == (RAY_PORTS["dashboard"], RAY_PORTS["client"])
    for name, port in RAY_PORTS.items():
        sources = admitted_from(policy, port)
        assert sources and None not in sources, f"{name} port {port} is open to anyone"
        for peers in sources:
            for peer in peers:
                assert "ipBlock" not in peer, f"{name} port {port} admits an address block"
                if "namespaceSelector" in peer:  # only the KubeRay operator, and only to the dashboard
                    assert port == cfg.ray.dashboard_port
                    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
                else:
                    assert peer == {"podSelector": {}}  # this namespace
    assert None in admitted_from(policy, cfg.serve.port)  # the endpoint is reachable (it checks its API key)
    prefect = by_kind(overlay(out, "prod"), "NetworkPolicy", "tunedex-prefect-server")
    assert admitted_from(prefect, 4200) == [[{"podSelector": {}}]]


def test_serve_workers_probe_readyz_and_healthz_and_the_head_keeps_kuberays(out, cfg):
    service = by_kind(overlay(out, "prod"), "RayService")
    for name in ("cpu", "gpu"):
        [c] = group(service, name)["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "serve"}, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "serve"}, name
        assert {"name": "serve", "containerPort": cfg.serve.port} in c["ports"]
    # KubeRay deploys the Serve config once the head is Ready: a /readyz probe there would never pass
    [head] = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "readinessProbe" not in head and "livenessProbe" not in head
    assert service["spec"]["excludeHeadPodFromServeSvc"] is True
    for name, path in (("tunedex-prefect-server", "/api/health"), ("tunedex-prefect-worker", "/health")):
        [c] = by_kind(overlay(out, "dev"), "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == path


def test_pdb_covers_the_serve_workers(out):
    objs = overlay(out, "prod")
    pdb = by_kind(objs, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    service = by_kind(objs, "RayService")
    for name in ("cpu", "gpu"):
        assert selector.items() <= group(service, name)["template"]["metadata"]["labels"].items()
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= head.items()
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_every_container_has_requests_and_limits(out, name):
    objs = overlay(out, name) + jobs(out)
    sized = [(c["name"], c["resources"]) for c in containers_of(objs)]
    sized += [("autoscaler", s["autoscalerOptions"]["resources"]) for o in objs for s in ray_cluster_specs(o)]
    sized += [("flow run", pool_job(objs)["spec"]["template"]["spec"]["containers"][0]["resources"])]
    milvus = by_kind(objs, "Milvus")["spec"]
    sized += [("milvus", milvus["components"]["resources"])]
    sized += [(f"milvus {d}", milvus["dependencies"][d]["inCluster"]["values"]["resources"]) for d in ("etcd", "storage")]
    assert len(sized) > 15
    for who, res in sized:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{who} has no {kind}"
        gpus = res["limits"].get("nvidia.com/gpu")
        assert gpus is None or res["requests"]["nvidia.com/gpu"] == gpus, who
        assert (name == "prod") or gpus is None, f"dev is CPU only, {who} asks for GPUs"


def test_prod_adds_gpu_worker_groups_that_scale_from_zero(out):
    objs = overlay(out, "prod")
    for kind in ("RayService", "RayCluster"):
        gpu = group(by_kind(objs, kind), "gpu")
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
        spec = gpu["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert ray_cluster_specs(by_kind(objs, kind))[0]["enableInTreeAutoscaling"] is True
    assert by_kind(objs, "PersistentVolumeClaim", "tunedex-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    dev = overlay(out, "dev")
    assert by_kind(dev, "PersistentVolumeClaim", "tunedex-data")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_rayjobs_run_the_tunedex_commands_on_their_own_cluster(out, cfg):
    finetune, embed = jobs(out)
    assert finetune["metadata"]["name"] == "tunedex-finetune"
    assert finetune["spec"]["entrypoint"].startswith(
        "tunedex finetune /etc/tunedex/config.yaml --set finetune.ray.run_name=tunedex-finetune")
    assert embed["spec"]["entrypoint"].startswith(f"tunedex index {cfg.corpus.path} -c /etc/tunedex/config.yaml")
    for job in (finetune, embed):
        assert "ray.address=auto" in job["spec"]["entrypoint"]  # not the endpoint's cluster in the config
        assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["activeDeadlineSeconds"] > 0
        assert "clusterSelector" not in job["spec"]
    train = group(finetune, "cpu")
    assert train["replicas"] == train["minReplicas"] == train["maxReplicas"] == cfg.finetune.ray.num_workers
    assert finetune["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # workers train


def test_a_gpu_fine_tune_gets_gpu_workers_and_its_run_name_names_the_rayjob(tmp_path):
    text = CLUSTER.read_text().replace(
        "ray: {num_workers: 2, use_gpu: false, resources_per_worker: {CPU: 1},",
        "ray: {num_workers: 4, use_gpu: true, run_name: ft-0301, resources_per_worker: {GPU: 1},")
    (tmp_path / "gpu.yaml").write_text(text)
    k8s.render(tmp_path / "gpu.yaml", tmp_path / "o", IMAGE)
    [job] = load_docs(tmp_path / "o/jobs/finetune/rayjob.yaml")
    assert job["metadata"]["name"] == "ft-0301" and "finetune.ray.run_name=ft-0301" in job["spec"]["entrypoint"]
    gpu = group(job, "gpu")
    assert gpu["replicas"] == 4 and gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (tmp_path / "bad.yaml").write_text(text.replace("run_name: ft-0301", "run_name: FT_0301"))
    with pytest.raises(ConfigError, match="finetune.ray.run_name: 'FT_0301' also names the RayJob"):
        k8s.render(tmp_path / "bad.yaml", tmp_path / "p", IMAGE)


# ---------------------------------------------------------------------------------------------
# What render refuses


def test_a_laptop_config_is_refused_with_every_problem_listed(tmp_path):
    with pytest.raises(ConfigError) as exc:
        k8s.render(REPO / "configs/local.yaml", tmp_path / "out", IMAGE)
    msg = str(exc.value)
    for needle in ("milvus.local_server: set false", "ray.local_head: set false", "milvus.uri: http://127.0.0.1:19530",
                   "ray.address: use ray://tunedex-head-svc:10001", "serve.host: 127.0.0.1",
                   "prefect.api_url: set it", "data_dir: .tunedex is relative"):
        assert needle in msg, msg
    assert "problems for a cluster" in msg and not (tmp_path / "out").exists()


def test_secret_files_inside_another_mount_are_refused(tmp_path):
    """A volume cannot be mounted inside the ConfigMap's (read-only) mount."""
    raw = yaml.safe_load(CLUSTER.read_text())
    raw["serve"]["api_key_file"] = "/etc/tunedex/secrets/api_key"
    (tmp_path / "nested.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="serve.api_key_file: /etc/tunedex/secrets/api_key is inside the mount at"):
        k8s.render(tmp_path / "nested.yaml", tmp_path / "out", IMAGE)


def test_a_config_that_fails_the_schema_is_refused_with_the_schema_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLUSTER.read_text().replace("  collection: tunedex_docs", "  colection: tunedex_docs"))
    with pytest.raises(ConfigError, match="milvus.colection: unknown key; did you mean 'collection'"):
        k8s.render(bad, tmp_path / "out", IMAGE)
    with pytest.raises(ConfigError, match="does not exist"):
        k8s.render(tmp_path / "missing.yaml", tmp_path / "out", IMAGE)


def test_a_non_empty_output_dir_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "deploy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(k8s.RenderError, match="exists and is not empty"):
        k8s.render(CLUSTER, target, IMAGE)
    (target / "base").mkdir()
    (target / "base" / "stale.yaml").write_text("kind: Old\n")
    written = k8s.render(CLUSTER, target, IMAGE, overwrite=True)
    assert not (target / "base" / "stale.yaml").exists() and (target / "notes.txt").read_text() == "mine"
    assert {p.relative_to(target).as_posix() for p in written} == {
        p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() and p.name != "notes.txt"}


# ---------------------------------------------------------------------------------------------
# The checked-in k8s/ and the Dockerfile


def test_checked_in_k8s_dir_is_the_render_of_configs_cluster_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    k8s.render(Path("configs/cluster.yaml"), tmp_path / "k8s")
    want = {p.relative_to(tmp_path / "k8s").as_posix(): p.read_text() for p in (tmp_path / "k8s").rglob("*") if p.is_file()}
    have = {p.relative_to(REPO / "k8s").as_posix(): p.read_text() for p in (REPO / "k8s").rglob("*") if p.is_file()}
    assert sorted(have) == sorted(want), "k8s/ is stale: tunedex k8s render --config configs/cluster.yaml k8s --overwrite"
    stale = [name for name in want if have[name] != want[name]]
    assert not stale, f"k8s/ is stale ({stale}): tunedex k8s render --config configs/cluster.yaml k8s --overwrite"


def test_kustomize_builds_every_overlay_and_job(out):
    """A failure, not a skip, without kubectl: a manifest kustomize cannot build must not pass CI unseen."""
    kustomize = (["kubectl", "kustomize"] if shutil.which("kubectl") else ["kustomize", "build"] if shutil.which("kustomize")
                 else pytest.fail("neither kubectl nor kustomize is on PATH: install kubectl (it carries kustomize) "
                                  "to check the manifests"))
    for rel in ("overlays/dev", "overlays/prod", "jobs/finetune", "jobs/embed"):
        built = subprocess.run([*kustomize, str(out / rel)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        objs = [d for d in yaml.safe_load_all(built.stdout) if d]
        assert {c["image"] for c in containers_of(objs)} == {IMAGE}, rel
        assert {o["metadata"].get("namespace") for o in objs} == {"tunedex"}, rel


def test_dockerfile_takes_the_cuda_base_as_an_argument_runs_as_non_root_and_bakes_no_secret():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(ln.startswith("ARG BASE_IMAGE=nvidia/cuda:") for ln in lines)
    assert "FROM ${BASE_IMAGE}" in lines
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and "ARG UID=10001" in lines and str(k8s.UID) == "10001"
    settings = [ln for ln in lines if ln.startswith(("ENV", "ARG"))]
    for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"):
        assert not [ln for ln in settings if word in ln.upper()], f"the Dockerfile sets a {word}"
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", ".tunedex", "**/secrets", ".env"} <= set(ignored)


def test_cli_renders_and_refuses_a_laptop_config(tmp_path):
    from conftest import run_cli

    ok = run_cli("k8s", "render", str(tmp_path / "out"), "-c", str(REPO / "configs/cluster.yaml"),
                 "--image", "ghcr.io/acme/tunedex:1.2.3", cwd=REPO)
    assert "wrote" in ok.stdout and (tmp_path / "out" / "overlays" / "dev" / "kustomization.yaml").is_file()
    again = run_cli("k8s", "render", str(tmp_path / "out"), "-c", str(REPO / "configs/cluster.yaml"), cwd=REPO, check=False)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    laptop = run_cli("k8s", "render", str(tmp_path / "laptop"), "-c", str(REPO / "configs/local.yaml"), cwd=REPO,
                     check=False)
    assert laptop.returncode == 2 and "Traceback" not in laptop.stderr
