"""Kubernetes manifests (k8s/, edited as YAML, built by kustomize): valid, agreeing with the cluster config, no image
tag or secret value baked in."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from tunedex.infra import k8s
from tunedex.infra.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CLUSTER = K8S / "config/tunedex.yaml"
K8S_VERSION = "1.32.0"  # kubernetes-validate ships this version's JSON schemas: no network needed
IMAGE = "registry.example.com/tunedex:1.2.3"
RAY_PORTS = {"dashboard": 8265, "gcs": 6379, "client": 10001}  # k8s/config/tunedex.yaml's values

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
# Helpers: the checked-in tree with `images:` set, built by kustomize itself


def kustomize() -> list[str]:
    """A failure, not a skip, without kubectl: manifests kustomize cannot build must not pass CI unseen."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    pytest.fail("neither kubectl nor kustomize is on PATH: install kubectl (it carries kustomize) to check the manifests")


def set_image(root: Path, image: str) -> None:
    """What `kustomize edit set image tunedex=IMAGE` writes into a kustomization."""
    name, tag = image.rsplit(":", 1)
    kz = kustomization(root)
    kz["images"] = [{"name": "tunedex", "newName": name, "newTag": tag}]
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kz, sort_keys=False))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """A copy of k8s/ as a user deploys it: the image set in the overlays and the jobs."""
    path = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, path)
    for rel in BUILT:
        set_image(path / rel, IMAGE)
    return path


@pytest.fixture(scope="module")
def cfg():
    return k8s.check_cluster_config(CLUSTER)


BUILT = ("overlays/dev", "overlays/prod", "jobs/finetune", "jobs/embed")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def build(root: Path) -> list[dict[str, Any]]:
    built = subprocess.run([*kustomize(), str(root)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def config_maps(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Ray pods' ConfigMap, its name hashed by kustomize; the flow runs' ConfigMap)."""
    maps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}  # each job builds them too
    [hashed] = [m for name, m in maps.items() if name.startswith("tunedex-config-") and name != "tunedex-config-flows"]
    return hashed, maps["tunedex-config-flows"]


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
            assert spec["rayVersion"] == importlib.metadata.version("ray")  # the image installs this Ray
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
    assert app.args == {"config": str(k8s.CONFIG_PATH)}  # the ConfigMap mount
    assert (serve.http_options.host, serve.http_options.port) == ("0.0.0.0", cfg.serve.port)
    ports = {p["name"]: p["containerPort"] for p in group(service, "cpu")["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == cfg.serve.port  # KubeRay's tunedex-serve-svc targets the port named `serve`


def test_the_documented_patch_pins_a_release_that_a_new_cluster_loads(out, tmp_path):
    """docs/cluster.md step 10: the overlay patch that names the serving release in the Serve config."""
    from ray.serve.schema import ServeDeploySchema

    doc = (REPO / "docs/cluster.md").read_text()
    block = re.search(r"add it to the Serve config with a patch.*?```yaml\n(.*?)```", doc, re.S).group(1)
    release = "rel-20250101-120000-abc123"
    overlay_dir = tmp_path / "k8s/overlays/prod"
    shutil.copytree(out, tmp_path / "k8s")
    kz = kustomization(overlay_dir)
    kz["patches"] += yaml.safe_load(block.replace("rel-...", release))
    (overlay_dir / "kustomization.yaml").write_text(yaml.safe_dump(kz, sort_keys=False))
    service = by_kind(build(overlay_dir), "RayService")
    apps = {a.name: a for a in ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])).applications}
    assert apps[release].route_prefix is None and apps[release].import_path == "tunedex.serving.app:build_release_app"
    assert apps[release].args == {"config": str(k8s.CONFIG_PATH), "release_id": release}
    assert apps["tunedex"].import_path == "tunedex.serving.app:build_app" and apps["tunedex"].route_prefix == "/"


def test_a_config_change_rolls_the_endpoint_onto_a_new_cluster(out, tmp_path):
    """KubeRay upgrades a RayService when its pods change: kustomize names the Ray pods' ConfigMap by a hash of the
    config, so a config change renames what they mount. Flow runs (a new pod each) mount a name that stays."""
    before = overlay(out, "prod")
    hashed, flows = config_maps(before)
    assert hashed["data"] == flows["data"] == {"config.yaml": CLUSTER.read_text()}
    assert config_maps(before + jobs(out))[0] == hashed  # each job builds the same one
    changed = tmp_path / "k8s"
    shutil.copytree(out, changed)
    (changed / "config/tunedex.yaml").write_text(CLUSTER.read_text().replace("  top_k: 3", "  top_k: 5"))
    after = overlay(changed, "prod")
    renamed = config_maps(after)[0]
    assert renamed["metadata"]["name"] != hashed["metadata"]["name"] and "top_k: 5" in renamed["data"]["config.yaml"]
    for objs, name in ((before, hashed["metadata"]["name"]), (after, renamed["metadata"]["name"])):
        mounted = [(where, v["configMap"]["name"]) for o in objs if o["apiVersion"] == "ray.io/v1"
                   for where, tmpl in pod_templates(o) for v in tmpl["spec"]["volumes"] if "configMap" in v]
        assert len(mounted) == 6 and {n for _, n in mounted} == {name}, mounted  # RayService and RayCluster: 3 each
    assert pool_job(after)["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "tunedex-config-flows"


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


def test_the_image_comes_only_from_kustomize_images(out):
    """Every container in k8s/ names the image `tunedex`; an overlay's `images:` (`kustomize edit set image`) names
    the real one for all of them, those prod's patches add and the Prefect flow runs' included."""
    for path in K8S.rglob("*.yaml"):
        text = path.read_text()
        assert ":latest" not in text and "newTag" not in text, path
        if path.parent.name != "config" and path.name != "kustomization.yaml":
            assert {c["image"] for c in containers_of(load_docs(path))} <= {"tunedex"}, path
    for rel in BUILT:
        assert {c["image"] for c in containers_of(build(K8S / rel))} == {"tunedex"}, rel
        assert {c["image"] for c in containers_of(build(out / rel))} == {IMAGE}, rel
    for name in ("dev", "prod"):
        worker = by_kind(overlay(out, name), "Deployment", "tunedex-prefect-worker")["spec"]["template"]["spec"]
        [init] = worker["initContainers"]
        assert {e["name"]: e.get("value") for e in init["env"]}["FLOW_RUN_IMAGE"] == IMAGE, name
        assert init["command"][:2] == ["sh", "-c"] and "$FLOW_RUN_IMAGE" in init["command"][2]
    template = json.loads(by_kind(overlay(out, "dev"), "ConfigMap", "tunedex-prefect-pool")["data"]["base-job-template.json"])
    assert template["variables"]["properties"]["image"]["default"] == "FLOW_RUN_IMAGE"  # what the init container fills


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
        k8s.check_cluster_config(bad)


def test_config_in_the_configmap_loads_and_names_the_mounted_files(out, tmp_path, cfg):
    text = config_maps(overlay(out, "dev"))[0]["data"]["config.yaml"]
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
        config = "tunedex-config-flows" if where == "flow run" else config_maps(objs)[0]["metadata"]["name"]
        assert mounts[str(k8s.CONFIG_DIR)]["configMap"]["name"] == config, where
        assert mounts[str(cfg.data_dir)]["persistentVolumeClaim"]["claimName"] == "tunedex-data", where
        files = {}
        for mount, volume in mounts.items():
            for source in volume.get("projected", {}).get("sources", []):
                for item in source["secret"]["items"]:
                    files[f"{mount}/{item['path']}"] = (source["secret"]["name"], item["key"])
        assert files == {str(k8s.SECRET_FILES["serve.api_key_file"][0]): ("tunedex-api-key", "api_key"),
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
    finetune, embed = (by_kind(build(out / "jobs" / name), "RayJob") for name in ("finetune", "embed"))
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


# ---------------------------------------------------------------------------------------------
# What `tunedex config check --cluster` refuses


def test_a_laptop_config_is_refused_with_every_problem_listed():
    with pytest.raises(ConfigError) as exc:
        k8s.check_cluster_config(REPO / "configs/local.yaml")
    msg = str(exc.value)
    for needle in ("milvus.local_server: set false", "ray.local_head: set false", "milvus.uri: http://127.0.0.1:19530",
                   "ray.address: use ray://tunedex-head-svc:10001", "serve.host: 127.0.0.1",
                   "prefect.api_url: set it", "corpus.path: demo-data/day1/corpus is relative",
                   "data_dir: the manifests mount the data volume at /var/lib/tunedex",
                   "serve.api_key_file: set it to /var/run/secrets/tunedex/api_key",
                   "ray.auth_token_path: set it to /var/run/secrets/tunedex/ray_auth_token"):
        assert needle in msg, msg
    assert "problems for a cluster" in msg


@pytest.mark.parametrize("old, new, problem", [
    ("  port: 8000\n", "  port: 8001\n", "serve.port: 8001, but the manifests use 8000"),
    ("  dashboard_port: 8265", "  dashboard_port: 8266", "ray.dashboard_port: 8266, but the manifests use 8265"),
    ("/var/run/secrets/tunedex/api_key ", "/etc/tunedex/secrets/api_key ", "serve.api_key_file: set it to /var/run"),
    ("run_name: null", "run_name: FT_0301", "finetune.ray.run_name: 'FT_0301' also names the RayJob"),
])
def test_values_the_manifests_fix_are_checked(tmp_path, old, new, problem):
    text = CLUSTER.read_text().replace("storage_path:", "run_name: null, storage_path:")
    assert old in text
    (tmp_path / "c.yaml").write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        k8s.check_cluster_config(tmp_path / "c.yaml")


def test_a_config_that_fails_the_schema_is_refused_with_the_schema_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLUSTER.read_text().replace("  collection: tunedex_docs", "  colection: tunedex_docs"))
    with pytest.raises(ConfigError, match="milvus.colection: unknown key; did you mean 'collection'"):
        k8s.check_cluster_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        k8s.check_cluster_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------
# The checked-in k8s/ and the Dockerfile


def test_the_checked_in_config_passes_the_cluster_check_and_the_manifests_use_its_ports(cfg):
    """The ports the manifests open are the config's: Ray's head and workers, Serve, the network policy."""
    service = by_kind(build(K8S / "overlays/prod"), "RayService")
    spec = service["spec"]["rayClusterConfig"]
    params = spec["headGroupSpec"]["rayStartParams"]
    assert (params["dashboard-port"], params["ray-client-server-port"], params["metrics-export-port"]) == (
        str(cfg.ray.dashboard_port), str(cfg.ray.client_server_port), str(cfg.ray.metrics_export_port))
    for name, port in k8s.PORTS.items():
        section, key = name.split(".")
        assert getattr(getattr(cfg, section), key) == port, name
    head_ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == cfg.serve.port and head_ports["dashboard"] == cfg.ray.dashboard_port


def test_kustomize_builds_every_overlay_and_job_into_the_namespace(out):
    for rel in BUILT:
        objs = build(out / rel)
        assert {o["metadata"].get("namespace") for o in objs} == {"tunedex"}, rel
        assert len({(o["kind"], o["metadata"]["name"]) for o in objs}) == len(objs), rel


def test_dockerfile_takes_the_cuda_base_as_an_argument_runs_as_non_root_and_bakes_no_secret():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(ln.startswith("ARG BASE_IMAGE=nvidia/cuda:") for ln in lines)
    assert "FROM ${BASE_IMAGE}" in lines
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and "ARG UID=10001" in lines
    pods = [t for o in build(K8S / "overlays/prod") for _, t in pod_templates(o)]
    assert {t["spec"]["securityContext"]["runAsUser"] for t in pods} == {10001}  # the image's user
    settings = [ln for ln in lines if ln.startswith(("ENV", "ARG"))]
    for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"):
        assert not [ln for ln in settings if word in ln.upper()], f"the Dockerfile sets a {word}"
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", ".tunedex", "**/secrets", ".env"} <= set(ignored)


def test_cli_checks_a_cluster_config(tmp_path):
    from conftest import run_cli

    ok = run_cli("config", "check", str(CLUSTER), "--cluster", cwd=REPO)
    assert "ok for a cluster" in ok.stdout
    laptop = run_cli("config", "check", "configs/local.yaml", "--cluster", cwd=REPO, check=False)
    assert laptop.returncode == 2 and "problems for a cluster" in laptop.stderr and "Traceback" not in laptop.stderr
    assert run_cli("config", "check", "configs/local.yaml", cwd=REPO).returncode == 0  # fine on a laptop
