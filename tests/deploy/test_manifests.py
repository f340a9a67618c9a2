"""Offline checks of the deployment files in cluster/ and infra/.

- every YAML file parses;
- core Kubernetes objects validate (strict) against the Kubernetes OpenAPI schemas shipped with
  kubernetes-validate, for a pinned Kubernetes version;
- the KubeRay custom resources carry the fields KubeRay v1 needs, and their pod templates validate as
  Kubernetes PodTemplates;
- the Ray version is the same everywhere (rayVersion, rayproject/ray image tags, the cluster launcher,
  cluster/Dockerfile) and equals the ray pin in pyproject.toml;
- the Ray cluster launcher config validates against Ray's own schema;
- the Terraform files hold the resources the S3 store needs (parsed with python-hcl2).

No network, no cluster, no cloud account; runs in well under a second per file.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
INFRA = ROOT / "infra"
KUBERAY = CLUSTER / "kuberay"
MINIO = INFRA / "minio"
TERRAFORM = INFRA / "terraform"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

# Kubernetes version the manifests target (schemas are bundled with kubernetes-validate >= 1.30).
K8S_VERSION = "1.30.0"

YAML_FILES = sorted(
    p for base in (CLUSTER, INFRA) for p in base.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
)
CORE_KINDS = {"Namespace", "Secret", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service",
              "Job", "ConfigMap", "NetworkPolicy"}
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
JOB_FILE_NAME = re.compile(r"(?:^|[\s/=])jobs/[A-Za-z0-9][A-Za-z0-9._-]*\.ya?ml(?=\s|$)")


# ----------------------------------------------------------------------------------------------- helpers
def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def ray_pin(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The X of the `ray[...]==X` dependency in pyproject.toml."""
    text = pyproject.read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10
        deps = re.findall(r'"([^"]+)"', text.split("dependencies", 1)[1].split("]\n", 1)[0])
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"\s*ray(?:\[[^\]]*\])?\s*==\s*([0-9][^\s;,]*)\s*", d))]
    assert len(pins) == 1, f"expected exactly one ray==X pin in pyproject.toml, found {deps}"
    return pins[0]


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=None)
def _load_docs_cached(path: Path) -> tuple:
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None)


def load_docs(path: Path) -> list[dict]:
    """The YAML documents of a file (parsed once per session; deep-copy before mutating)."""
    return list(_load_docs_cached(path))


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in load_docs(p) if isinstance(d, dict) and "kind" in d]


def kuberay(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_docs() if d["kind"] == kind]


# Where each KubeRay kind keeps its RayClusterSpec (KubeRay CRDs ray.io/v1, ray-project/kuberay
# ray-operator/config/crd/bases/ray.io_{rayjobs,rayservices}.yaml): RayJob.spec.rayClusterSpec,
# RayService.spec.rayClusterConfig. The API server prunes unknown fields of a structural CRD schema, so a
# RayService with `rayClusterSpec` loses its cluster silently.
CLUSTER_FIELD = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
# The spec properties of the CRDs (same files; KubeRay v1.0 at commit 1184bc8 plus the fields added up to
# v1.5: upgradeStrategy, authOptions, submissionMode, ...). Anything else is pruned by the API server.
SPEC_FIELDS = {
    "RayService": {"rayClusterConfig", "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "upgradeStrategy",
                   "rayClusterDeletionDelaySeconds"},
    "RayJob": {"entrypoint", "rayClusterSpec", "clusterSelector", "submitterPodTemplate", "submitterConfig",
               "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
               "submissionMode", "runtimeEnvYAML", "jobId", "metadata", "entrypointNumCpus", "entrypointNumGpus",
               "entrypointResources", "suspend", "managedBy", "deletionStrategy"},
    "RayCluster": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
                   "authOptions", "upgradeStrategy"},
}
# `required` lists of the RayClusterSpec schema (KubeRay >= 1.1: rayStartParams became optional).
REQUIRED = {"cluster": {"headGroupSpec"}, "headGroupSpec": {"template"}, "workerGroupSpec": {"groupName", "template"}}


def crd_problems(kind: str, spec: dict) -> list[str]:
    """Fields of `spec` the KubeRay CRD does not know, and required fields it lacks."""
    bad = [f"{kind}.spec.{k}: not a field of the {kind} CRD" for k in sorted(set(spec) - SPEC_FIELDS[kind])]
    if kind in CLUSTER_FIELD and CLUSTER_FIELD[kind] not in spec:
        bad.append(f"{kind}.spec.{CLUSTER_FIELD[kind]}: required (the cluster to run on)")
    cluster = spec if kind == "RayCluster" else spec.get(CLUSTER_FIELD[kind], {})
    bad += [f"{kind}: cluster spec lacks {k}" for k in sorted(REQUIRED["cluster"] - set(cluster))]
    bad += [f"{kind}: unknown cluster spec field {k}" for k in sorted(set(cluster) - SPEC_FIELDS["RayCluster"])]
    bad += [f"{kind}: headGroupSpec lacks {k}" for k in sorted(REQUIRED["headGroupSpec"] - set(cluster.get("headGroupSpec", {})))]
    for g in cluster.get("workerGroupSpecs", []):
        bad += [f"{kind}: worker group lacks {k}" for k in sorted(REQUIRED["workerGroupSpec"] - set(g))]
    return bad


def cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayCluster spec) for the RayCluster, RayJob.spec.rayClusterSpec, RayService.spec.rayClusterConfig."""
    out = []
    for p, d in k8s_docs():
        if d["kind"] == "RayCluster":
            out.append((f"{_rel(p)}:{d['metadata']['name']}", d["spec"]))
        elif d["kind"] in CLUSTER_FIELD:
            out.append((f"{_rel(p)}:{d['metadata']['name']}", d["spec"].get(CLUSTER_FIELD[d["kind"]], {})))
    return out


def pod_templates() -> list[tuple[str, dict]]:
    out = []
    for label, spec in cluster_specs():
        out.append((f"{label}:head", spec["headGroupSpec"]["template"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{label}:{g['groupName']}", g["template"]))
    for p, d in kuberay("RayJob"):
        if "submitterPodTemplate" in d["spec"]:
            out.append((f"{_rel(p)}:submitter", d["spec"]["submitterPodTemplate"]))
    return out


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_pod_template(template: dict) -> None:
    validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


RAY_IMAGE = re.compile(r"rayproject/ray(?:-ml)?:(?P<tag>[^\s\"'@]+)")
PROJECT_IMAGE = re.compile(r"blockskip-ray:(?P<tag>[^\s\"'@]+)")


def version_mismatches(texts: dict[str, str], pin: str) -> list[str]:
    """Every Ray version reference in the given texts that disagrees with `pin` (and a note when none)."""
    bad, seen = [], 0
    for name, text in texts.items():
        for m in RAY_IMAGE.finditer(text):
            seen += 1
            tag = m.group("tag")
            if tag.split("-")[0] != pin:
                bad.append(f"{name}: {m.group(0)} (want rayproject/ray:{pin}-...)")
        for m in PROJECT_IMAGE.finditer(text):
            seen += 1
            ray_part = re.search(r"-ray([0-9][0-9.]*[0-9])", m.group("tag"))
            if not ray_part or ray_part.group(1) != pin:
                bad.append(f"{name}: {m.group(0)} (the tag must carry -ray{pin})")
        for m in re.finditer(r"rayVersion:\s*[\"']?([^\s\"']+)", text):
            seen += 1
            if m.group(1) != pin:
                bad.append(f"{name}: rayVersion {m.group(1)} (want {pin})")
    if not seen:
        bad.append("no Ray version reference found at all")
    return bad


def deploy_texts() -> dict[str, str]:
    files = [p for base in (CLUSTER, INFRA) for p in base.rglob("*") if p.is_file()
             and ".terraform" not in p.parts]
    return {_rel(p): p.read_text(errors="replace") for p in files}


# ----------------------------------------------------------------------------------------------- parsing
def test_yaml_files_exist():
    names = {_rel(p) for p in YAML_FILES}
    for required in ("cluster/aws-gpu.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
                     "cluster/kuberay/rayservice.yaml", "infra/minio/secret.example.yaml",
                     "infra/minio/bucket-job.yaml"):
        assert required in names


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{_rel(path)} has no YAML document"
    for d in docs:
        assert isinstance(d, dict)
        if path == LAUNCHER:
            continue
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), f"{_rel(path)}: not a Kubernetes object"
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace"), f"{_rel(path)}: {d['kind']} without an explicit namespace"


# ----------------------------------------------------------------------------------------------- core k8s
CORE = [(p, d) for p, d in k8s_docs() if d["kind"] in CORE_KINDS]


def test_all_objects_are_known():
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert kinds <= CORE_KINDS | KUBERAY_KINDS, f"unexpected kinds: {kinds - CORE_KINDS - KUBERAY_KINDS}"
    for needed in ("Secret", "PersistentVolumeClaim", "Service", "Job"):
        assert needed in kinds
    assert kinds & {"Deployment", "StatefulSet"}
    assert KUBERAY_KINDS <= kinds


@pytest.mark.parametrize("path,doc", CORE, ids=[f"{_rel(p)}:{d['kind']}:{d['metadata']['name']}" for p, d in CORE])
def test_core_objects_validate_strict(path, doc):
    validate(doc)


def test_strict_validation_can_fail():
    deployment = copy.deepcopy(next(d for _, d in CORE if d["kind"] == "Deployment"))
    validate(deployment)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullpolicy"] = "Always"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


WORKLOADS = [(p, d) for p, d in CORE if d["kind"] in ("Deployment", "StatefulSet", "Job")]


@pytest.mark.parametrize("path,doc", WORKLOADS, ids=[f"{_rel(p)}:{d['metadata']['name']}" for p, d in WORKLOADS])
def test_workload_hardening(path, doc):
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod.get("automountServiceAccountToken") is False
    for c in _containers(pod):
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"unpinned image {image}"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys()
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
        if doc["kind"] != "Job":
            assert "livenessProbe" in c and "readinessProbe" in c


def test_minio_deployment_uses_pvc_and_secret():
    dep = next(d for _, d in CORE if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == "minio")
    pod = dep["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    pvcs = {d["metadata"]["name"] for _, d in CORE if d["kind"] == "PersistentVolumeClaim"}
    assert claims and claims <= pvcs
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"]


def test_bucket_job_creates_bucket_and_lifecycle():
    job = next(d for _, d in CORE if d["kind"] == "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("minio/mc:")
    script = " ".join(c.get("command", []) + c.get("args", []))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["BUCKET"] == "blockskip"
    assert "mc mb" in script and "$BUCKET" in script
    assert "mc ilm" in script and "Expiration" in script and "features" in script


def test_secret_example_has_only_placeholders():
    for d in load_docs(MINIO / "secret.example.yaml"):
        assert d["kind"] == "Secret"
        for key, value in d.get("stringData", {}).items():
            if any(w in key for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "USER")):
                assert "REPLACE_ME" in value, f"{key} must be a REPLACE_ME placeholder"
        assert "data" not in d, "use stringData placeholders, never base64 values"


def test_no_credentials_in_deploy_files():
    for name, text in deploy_texts().items():
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{name}: AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}\b", text), \
            f"{name}: AWS secret key"
        assert "BEGIN RSA PRIVATE KEY" not in text and "BEGIN PRIVATE KEY" not in text


# ----------------------------------------------------------------------------------------------- KubeRay
def test_kuberay_api_versions():
    for kind in KUBERAY_KINDS:
        docs = kuberay(kind)
        assert docs, f"no {kind}"
        for _, d in docs:
            assert d["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize("label,spec", cluster_specs(), ids=[label for label, _ in cluster_specs()])
def test_raycluster_spec_fields(label, spec):
    assert isinstance(spec["rayVersion"], str) and spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head["template"]["spec"]["containers"]
    groups = spec["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    for g in groups:
        for f in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert f in g, f"{label}: worker group {g.get('groupName')} lacks {f}"
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["template"]["spec"]["containers"]
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu")
                  for g in groups for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits), f"{label}: no GPU worker group (nvidia.com/gpu limit)"


@pytest.mark.parametrize("label,template", pod_templates(), ids=[label for label, _ in pod_templates()])
def test_kuberay_pod_templates_validate(label, template):
    validate_pod_template(template)
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys()
        for e in c.get("env", []):
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", e["name"]):
                assert "value" not in e, f"{label}: {e['name']} must come from a Secret"
                assert "secretKeyRef" in e["valueFrom"]
        for src in c.get("envFrom", []):
            assert "secretRef" in src or "configMapRef" in src


def test_pod_template_validation_can_fail():
    _, template = pod_templates()[0]
    bad = copy.deepcopy(template)
    bad["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # typo of `limits`
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod_template(bad)


def test_ray_pods_get_s3_credentials_from_secret():
    secret_names = {d["metadata"]["name"] for p, d in k8s_docs() if d["kind"] == "Secret"}
    for label, template in pod_templates():
        if label.endswith(":submitter"):
            continue
        env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secret_names, f"{label}: Secret {ref['name']} is not in secret.example.yaml"


def test_rayjob():
    [(path, job)] = kuberay("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "rayClusterSpec" in spec
    entrypoint = spec["entrypoint"]
    assert re.match(r"^blockskip run \S+", entrypoint), entrypoint
    assert JOB_FILE_NAME.search(entrypoint), f"entrypoint must name a jobs/*.yaml file: {entrypoint}"
    assert re.search(r"--store\s+s3://[a-z0-9][a-z0-9.-]+/?\S*", entrypoint)


@pytest.mark.parametrize("entrypoint,ok", [
    ("blockskip run jobs/flux-dev-catalog.yaml --store s3://b/p", True),
    ("blockskip run /home/ray/blockskip-ray/jobs/sana-catalog.yaml", True),
    ("blockskip run jobs/demo-tiny.yml", True),
    ("blockskip run flux-dev-catalog.yaml --store s3://b", False),
    ("blockskip run jobs/flux-dev-catalog.json", False),
    ("blockskip run myjobs/flux.yaml", False),
])
def test_job_file_pattern(entrypoint, ok):
    assert bool(JOB_FILE_NAME.search(entrypoint)) is ok


@pytest.mark.parametrize("kind", sorted(KUBERAY_KINDS))
def test_kuberay_crd_fields(kind):
    for path, d in kuberay(kind):
        assert crd_problems(kind, d["spec"]) == [], _rel(path)


def test_crd_check_can_fail():
    [(_, svc)] = kuberay("RayService")
    wrong = copy.deepcopy(svc["spec"])
    wrong["rayClusterSpec"] = wrong.pop("rayClusterConfig")  # the name RayJob uses
    assert crd_problems("RayService", wrong) == [
        "RayService.spec.rayClusterSpec: not a field of the RayService CRD",
        "RayService.spec.rayClusterConfig: required (the cluster to run on)",
        "RayService: cluster spec lacks headGroupSpec", "RayService: headGroupSpec lacks template"]
    [(_, job)] = kuberay("RayJob")
    no_template = copy.deepcopy(job["spec"])
    del no_template["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert crd_problems("RayJob", no_template) == ["RayJob: worker group lacks template"]


def test_ray_token_auth_on_every_cluster():
    for label, spec in cluster_specs():
        assert spec.get("authOptions", {}).get("mode") == "token", label


def _ray_containers(kind: str) -> list[dict]:
    out = []
    for _, d in kuberay(kind):
        cluster = d["spec"] if kind == "RayCluster" else d["spec"][CLUSTER_FIELD[kind]]
        for t in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
            out += t["spec"]["containers"]
    return out


def test_rayservice_token_from_secret_and_proxy_guard():
    from blockskip_ray.http_guard import PROXY_CALLBACK, PROXY_CALLBACK_ENV, TOKEN_ENV

    secrets = {(d["metadata"]["name"], k) for _, d in k8s_docs() if d["kind"] == "Secret"
               for k in d.get("stringData", {})}
    for c in _ray_containers("RayService"):  # every node runs a Serve proxy (proxy_location: EveryNode)
        env = {e["name"]: e for e in c["env"]}
        ref = env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) in secrets and not ref.get("optional"), ref
        assert env[PROXY_CALLBACK_ENV]["value"] == PROXY_CALLBACK


def test_head_dashboard_port_limited_to_namespace():
    policies = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    heads = [t["metadata"]["labels"] for label, spec in cluster_specs()
             for t in [spec["headGroupSpec"]["template"]]]
    for labels in heads:
        mine = [p for p in policies if p["metadata"]["namespace"] == "blockskip"
                and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert mine, f"no NetworkPolicy selects head pods {labels}"
        for p in mine:
            assert "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"]["ingress"]:
                ports = {x["port"] for x in rule.get("ports", [])}
                if "from" not in rule:  # open to all: only the Serve HTTP port
                    assert ports == {8000}, rule
                for peer in rule.get("from", []):
                    if "namespaceSelector" in peer:  # another namespace: the operator, on the dashboard only
                        assert ports == {8265} and peer["namespaceSelector"]["matchLabels"], rule
                    else:
                        assert "ipBlock" not in peer, rule


def test_rayservice():
    [(path, svc)] = kuberay("RayService")
    spec = svc["spec"]
    assert "rayClusterConfig" in spec and "rayClusterSpec" not in spec
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    serve = yaml.safe_load(spec["serveConfigV2"])
    apps = serve["applications"]
    assert apps
    for app in apps:
        assert app["import_path"] == "blockskip_ray.distributed.serve_app:build_app"
        assert re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", app["import_path"])
        assert app["route_prefix"] == "/"
        assert {"model", "store"} <= app["args"].keys()
        assert app["args"]["store"].startswith("s3://")
        assert app["args"]["model"].startswith("s3://"), "the model comes from the store, not a hub id or volume"
    assert serve["http_options"]["keep_alive_timeout_s"] <= 10
    # Serve's HTTP port must be the one KubeRay's serve Service targets.
    assert serve.get("http_options", {}).get("port", 8000) == 8000


# ----------------------------------------------------------------------------------------------- versions
def test_ray_pin_is_read_from_pyproject():
    pin = ray_pin()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pin)


def test_ray_versions_agree_with_pyproject_pin():
    pin = ray_pin()
    assert version_mismatches(deploy_texts(), pin) == []
    for label, spec in cluster_specs():
        assert spec["rayVersion"] == pin, label


def test_version_check_can_fail():
    texts = deploy_texts()
    assert version_mismatches(texts, "0.0.1"), "a wrong pin must be reported"
    pin = ray_pin()
    one_off = {k: v.replace(f'rayVersion: "{pin}"', 'rayVersion: "0.0.1"', 1) for k, v in texts.items()}
    assert one_off != texts
    assert any("rayVersion 0.0.1" in b for b in version_mismatches(one_off, pin))
    image_off = {k: v.replace(f"rayproject/ray:{pin}-py311-gpu", "rayproject/ray:0.0.1-py311-gpu") for k, v in texts.items()}
    assert any("rayproject/ray:0.0.1" in b for b in version_mismatches(image_off, pin))
    assert version_mismatches({"x": "nothing here"}, ray_pin()) == ["no Ray version reference found at all"]


def test_launcher_and_dockerfile_images():
    pin = ray_pin()
    docker = load_docs(LAUNCHER)[0]["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images
    for image in images:
        assert image.startswith(f"rayproject/ray:{pin}-py3"), image
    assert any(i.endswith("-gpu") or "-cu" in i for i in images)
    froms = re.findall(r"(?im)^FROM\s+(\S+)", DOCKERFILE.read_text())
    assert froms and all(f.startswith(f"rayproject/ray:{pin}-") for f in froms), froms


def test_project_image_tag_matches_project_version():
    version = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    tags = {m.group("tag") for t in deploy_texts().values() for m in PROJECT_IMAGE.finditer(t)}
    assert tags
    for tag in tags:
        assert tag.startswith(f"{version}-"), f"blockskip-ray:{tag} does not start with the project version {version}"


# ----------------------------------------------------------------------------------------------- launcher
def test_launcher_config():
    cfg = load_docs(LAUNCHER)[0]
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m5.")
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
        assert "Arn" in t["node_config"]["IamInstanceProfile"] or "Name" in t["node_config"]["IamInstanceProfile"]
    assert any("pip install" in c for c in cfg["setup_commands"])
    text = LAUNCHER.read_text()
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key)", text)


def test_launcher_matches_ray_schema():
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip("this ray build ships no autoscaler schema")
    import jsonschema

    schema = json.loads(schema_path.read_text())
    cfg = load_docs(LAUNCHER)[0]
    jsonschema.validate(cfg, schema)
    bad = copy.deepcopy(cfg)
    bad["max_workerz"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# ----------------------------------------------------------------------------------------------- terraform
def _unquote(x):
    """python-hcl2 >= 7 keeps the quotes of keys and strings; older versions drop them."""
    if isinstance(x, dict):
        return {_unquote(k): _unquote(v) for k, v in x.items() if k not in ("__comments__", "__is_block__")}
    if isinstance(x, list):
        return [_unquote(v) for v in x]
    if isinstance(x, str) and len(x) >= 2 and x[0] == x[-1] == '"':
        return x[1:-1]
    return x


@pytest.fixture(scope="module")
def tf():
    hcl2 = pytest.importorskip("hcl2")
    merged: dict[str, list] = {}
    files = sorted(TERRAFORM.glob("*.tf"))
    assert {"main.tf", "variables.tf", "outputs.tf", "versions.tf"} <= {f.name for f in files}
    for f in files:
        with f.open() as fh:
            for key, blocks in _unquote(hcl2.load(fh)).items():
                merged.setdefault(key, []).extend(blocks if isinstance(blocks, list) else [blocks])
    return merged


def _resources(tf, rtype):
    return {name: body for block in tf.get("resource", []) for t, named in block.items() if t == rtype
            for name, body in named.items()}


def _one(blocks):
    return blocks[0] if isinstance(blocks, list) else blocks


def test_tf_provider_pinned(tf):
    tfblock = _one(tf["terraform"])
    aws = _one(tfblock["required_providers"])["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert re.match(r"^(~>|>=|=)\s*\d+\.\d+", aws["version"]), aws["version"]
    assert "required_version" in tfblock


def test_tf_kms_key_rotation(tf):
    keys = _resources(tf, "aws_kms_key")
    assert keys and all(k["enable_key_rotation"] is True for k in keys.values())
    assert all("policy" in k for k in keys.values())


def test_tf_store_bucket(tf):
    buckets = _resources(tf, "aws_s3_bucket")
    assert {"store", "logs"} <= buckets.keys()
    sse = _resources(tf, "aws_s3_bucket_server_side_encryption_configuration")["store"]
    rule = _one(sse["rule"])
    default = _one(rule["apply_server_side_encryption_by_default"])
    assert default["sse_algorithm"] == "aws:kms"
    assert "aws_kms_key." in default["kms_master_key_id"]
    assert rule.get("bucket_key_enabled") is True

    for b in ("store", "logs"):
        pab = _resources(tf, "aws_s3_bucket_public_access_block")[b]
        for f in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
            assert pab[f] is True, (b, f)
        versioning = _resources(tf, "aws_s3_bucket_versioning")[b]
        assert _one(versioning["versioning_configuration"])["status"] == "Enabled"
        own = _resources(tf, "aws_s3_bucket_ownership_controls")[b]
        assert _one(own["rule"])["object_ownership"] == "BucketOwnerEnforced"

    logging = _resources(tf, "aws_s3_bucket_logging")["store"]
    assert "aws_s3_bucket.logs" in logging["target_bucket"]


def test_tf_lifecycle(tf):
    rules = _resources(tf, "aws_s3_bucket_lifecycle_configuration")["store"]["rule"]
    by_id = {r["id"]: r for r in rules}
    assert all(r["status"] == "Enabled" for r in rules)
    features = next(r for r in rules if "expiration" in r and "days" in _one(r["expiration"]))
    flt = json.dumps(features["filter"])
    assert "subjects/" in flt and "var.feature_tag_key" in flt
    assert "var.feature_expiration_days" in _one(features["expiration"])["days"]
    assert any("noncurrent_version_expiration" in r for r in rules)
    assert any("abort_incomplete_multipart_upload" in r for r in rules)
    assert len(by_id) == len(rules)
    variables = {name for block in tf["variable"] for name in block}
    assert {"feature_expiration_days", "noncurrent_version_expiration_days", "bucket_name"} <= variables


def test_tf_tls_only_policy(tf):
    docs = {name: body for block in tf.get("data", []) for t, named in block.items()
            if t == "aws_iam_policy_document" for name, body in named.items()}
    stmts = docs["store_bucket"]["statement"]
    deny_tls = [s for s in stmts if s["effect"] == "Deny"
                and any(c["variable"] == "aws:SecureTransport" and c["values"] == ["false"] for c in s["condition"])]
    assert deny_tls and deny_tls[0]["actions"] == ["s3:*"]
    policy = _resources(tf, "aws_s3_bucket_policy")["store"]
    assert "store_bucket" in policy["policy"]


def test_tf_outputs(tf):
    outputs = {name for block in tf["output"] for name in block}
    assert {"bucket_name", "store_uri", "kms_key_arn", "node_instance_profile_arn"} <= outputs


def test_checkov_suppressions_have_reasons():
    """Every checkov suppression names a check and gives a reason (Terraform comments, k8s annotations)."""
    found = 0
    for name, text in deploy_texts().items():
        for m in re.finditer(r"checkov:skip=(CKV2?_[A-Z0-9]+_\d+)\s*:\s*(.*)", text):
            found += 1
            assert len(m.group(2).strip()) > 20, f"{name}: {m.group(1)} skipped without a real reason"
    for _, d in k8s_docs():
        for key, value in (d["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                found += 1
                check, _, reason = value.partition("=")
                assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", check), value
                assert len(reason.strip()) > 20, f"{d['metadata']['name']}: {check} skipped without a real reason"
    assert found, "expected the documented suppressions"
