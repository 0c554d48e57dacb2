"""Schema checks for everything under ``infra/``: each manifest is validated, not only parsed.

- Kubernetes core objects (Namespace, PVC, Secret, Deployment, Service): the Kubernetes OpenAPI schemas shipped by
  ``kubernetes-validate`` (strict mode: unknown fields fail).
- KubeRay RayCluster / RayJob: ``infra/schemas/kuberay-ray.io-v1.schema.json``, whose pod templates refer to the same
  Kubernetes definitions.
- Ray cluster launcher: Ray's own ``ray/autoscaler/ray-schema.json`` (raw) and ``prepare_config`` + ``validate_config``
  (what ``ray up`` runs before contacting the cloud).
- DeepSpeed presets: ``deepspeed.runtime.config.DeepSpeedConfig`` plus DeepSpeed's own top-level key constants.
- MLflow server arguments: parsed by MLflow's real ``mlflow server`` click command.
Every check has a negative twin that breaks one field and expects the validator to say no.
"""
from __future__ import annotations

import copy
import importlib.resources
import json
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S_VERSION = "1.35"
RAY_VERSION = "2.60.0"
KUBERAY_SCHEMA = INFRA / "schemas" / "kuberay-ray.io-v1.schema.json"
CORE_MANIFESTS = ["kuberay/namespace.yaml", "kuberay/storage.yaml", "kuberay/secrets.template.yaml",
                  "mlflow/mlflow.yaml", "mlflow/secret.template.yaml"]
RAY_MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
PRESETS = {"zero2.json": (2, False), "zero3.json": (3, False), "zero3_offload.json": (3, True)}
CREDENTIAL_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|USERNAME|TRACKING_URI|BACKEND_STORE_URI")


# ---------------------------------------------------------------- helpers

def docs(rel: str) -> list[dict[str, Any]]:
    """All YAML documents of ``infra/<rel>`` (deep copies, safe to mutate)."""
    return [d for d in yaml.safe_load_all((INFRA / rel).read_text()) if d]


def k8s_validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@lru_cache(maxsize=1)
def kuberay_validators() -> dict[str, jsonschema.Draft202012Validator]:
    """One validator per kind, resolving ``https://kubernetes.io/api/_definitions.json`` offline."""
    from referencing import Registry, Resource

    schema_dir = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    k8s_defs = json.loads((schema_dir / "_definitions.json").read_text())
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    registry = Registry().with_resources([(k8s_defs["$id"], Resource.from_contents(k8s_defs)),
                                          (schema["$id"], Resource.from_contents(schema))])
    return {kind: jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)
            for kind in ("RayCluster", "RayJob")}


def kuberay_errors(obj: dict[str, Any]) -> list[str]:
    validator = kuberay_validators()[obj["kind"]]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:160]}" for e in validator.iter_errors(obj)]


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group, pod spec) for the head and every worker group of a RayCluster/RayJob, or a Deployment's pod."""
    if obj["kind"] == "Deployment":
        yield "pod", obj["spec"]["template"]["spec"]
        return
    spec = cluster_spec(obj)
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def template_secrets() -> dict[str, dict[str, str]]:
    out = {}
    for rel in ("kuberay/secrets.template.yaml", "mlflow/secret.template.yaml"):
        for d in docs(rel):
            out[d["metadata"]["name"]] = d["stringData"]
    return out


# ---------------------------------------------------------------- Kubernetes core objects

@pytest.mark.parametrize("rel", CORE_MANIFESTS)
def test_core_manifests_match_kubernetes_schema(rel: str) -> None:
    objects = docs(rel)
    assert objects, rel
    for obj in objects:
        k8s_validate(obj)
        assert obj["metadata"].get("namespace", "flowrail") == "flowrail" or obj["kind"] == "Namespace"


@pytest.mark.parametrize("mutate, what", [
    (lambda d: d["spec"].pop("selector"), "Deployment without spec.selector"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolice="Always"), "unknown container field"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"][0].update(valueFrom="secret"), "env valueFrom not an object"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="http"), "port name as number"),
])
def test_core_schema_rejects_broken_deployment(mutate, what: str) -> None:
    import kubernetes_validate

    deployment = docs("mlflow/mlflow.yaml")[0]
    assert deployment["kind"] == "Deployment"
    mutate(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)


def test_core_schema_rejects_broken_pvc_and_secret() -> None:
    import kubernetes_validate

    pvc = docs("kuberay/storage.yaml")[0]
    pvc["spec"]["resources"]["request"] = pvc["spec"]["resources"].pop("requests")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(pvc)
    secret = docs("kuberay/secrets.template.yaml")[0]
    secret["stringData"]["password"] = 1234
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(secret)


def test_shared_volume_is_read_write_many() -> None:
    (pvc,) = docs("kuberay/storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------- KubeRay

def test_kuberay_schema_header_names_its_source() -> None:
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    assert "raycluster_types.go" in schema["$comment"] and "KubeRay v1." in schema["$comment"]


@pytest.mark.parametrize("rel", RAY_MANIFESTS)
def test_kuberay_manifests_match_crd_schema(rel: str) -> None:
    (obj,) = docs(rel)
    assert kuberay_errors(obj) == []


RAYCLUSTER_BREAKS = [
    (lambda s: s["headGroupSpec"].pop("template"), "headGroupSpec.template is required"),
    (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "rayStartParams values are strings"),
    (lambda s: s["workerGroupSpecs"][0].pop("groupName"), "worker groups need a name"),
    (lambda s: s["workerGroupSpecs"][0].update(replicas=-1), "replicas >= 0"),
    (lambda s: s["authOptions"].update(mode="tokens"), "authOptions.mode enum"),
    (lambda s: s.update(workerGroupSpec=s.pop("workerGroupSpecs")), "misspelt workerGroupSpecs"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"].update(nodeSelecter={}), "pod spec typo"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("name"), "container needs a name"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"].pop("claimName"),
     "PVC volume needs claimName"),
]


@pytest.mark.parametrize("rel", RAY_MANIFESTS)
@pytest.mark.parametrize("mutate, what", RAYCLUSTER_BREAKS, ids=[w for _, w in RAYCLUSTER_BREAKS])
def test_kuberay_schema_rejects_broken_cluster_spec(rel: str, mutate, what: str) -> None:
    (obj,) = docs(rel)
    mutate(cluster_spec(obj))
    assert kuberay_errors(obj), what


@pytest.mark.parametrize("mutate, what", [
    (lambda s: s.pop("entrypoint"), "entrypoint required outside InteractiveMode"),
    (lambda s: s.pop("rayClusterSpec"), "a RayJob needs a cluster"),
    (lambda s: s.update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"),
    (lambda s: s.update(submissionMode="K8sMode"), "submissionMode enum"),
    (lambda s: s.update(entryPoint=s.pop("entrypoint")), "misspelt entrypoint"),
])
def test_kuberay_schema_rejects_broken_rayjob(mutate, what: str) -> None:
    (obj,) = docs("kuberay/rayjob.yaml")
    mutate(obj["spec"])
    assert kuberay_errors(obj), what


@pytest.mark.parametrize("rel", RAY_MANIFESTS)
def test_ray_token_authentication_stays_on(rel: str) -> None:
    (obj,) = docs(rel)
    spec = cluster_spec(obj)
    assert spec["authOptions"]["mode"] == "token"
    secret = spec["authOptions"]["secretName"]
    assert "auth_token" in template_secrets()[secret]  # KubeRay reads the data key `auth_token`
    assert spec["rayVersion"] == RAY_VERSION
    for _, pod in pod_specs(obj):
        for container in pod["containers"]:
            for env in container.get("env", []):
                assert env["name"] not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"), "let KubeRay's authOptions set these"


@pytest.mark.parametrize("rel", RAY_MANIFESTS + ["mlflow/mlflow.yaml"])
def test_credentials_only_from_secrets(rel: str) -> None:
    """Every credential-like env var is a secretKeyRef to a key that the Secret templates define."""
    secrets = template_secrets()
    obj = docs(rel)[0]
    seen = set()
    for _, pod in pod_specs(obj):
        for container in pod["containers"]:
            for env in container.get("env", []):
                if not CREDENTIAL_ENV.search(env["name"]):
                    continue
                seen.add(env["name"])
                assert "value" not in env, f"{rel}: {env['name']} has a literal value"
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]], f"{rel}: {ref} not in the Secret templates"
    if obj["kind"] != "Deployment":
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= seen
    else:
        assert "MLFLOW_BACKEND_STORE_URI" in seen


def test_secret_templates_hold_no_real_values() -> None:
    for name, data in template_secrets().items():
        for key, value in data.items():
            if key in ("tracking_uri",):
                assert "@" not in value, "no credentials inside URIs"
                continue
            assert "CHANGE_ME" in value, f"secret template {name}.{key} must hold a placeholder, not a value"


@pytest.mark.parametrize("rel", RAY_MANIFESTS)
def test_every_ray_pod_mounts_shared_storage_and_gpu_workers_ask_for_gpus(rel: str) -> None:
    (obj,) = docs(rel)
    (pvc,) = docs("kuberay/storage.yaml")
    for group, pod in pod_specs(obj):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts["/mnt/flowrail"]] == pvc["metadata"]["name"], group
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        # the driver (on the GPU-less head) forwards its DS_ACCELERATOR to all workers: it must say cuda everywhere
        assert {e["name"]: e.get("value") for e in container["env"]}["DS_ACCELERATOR"] == "cuda", group
        if group != "head":
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_rayjob_entrypoint_is_a_valid_flowrail_train_command() -> None:
    """The entrypoint parses with the real ``flowrail train`` parser and fits the cluster it runs on."""
    from jobs.train import parse

    (job,) = docs("kuberay/rayjob.yaml")
    argv = job["spec"]["entrypoint"].split()
    assert argv[:2] == ["flowrail", "train"]
    cfg = parse(argv[2:])
    assert cfg.run_dir.startswith("/mnt/flowrail/") and cfg.data.shards.startswith("/mnt/flowrail/")
    assert cfg.train.use_gpu
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.train.num_workers == gpus
    cpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.train.num_workers * cfg.train.cpus_per_worker < cpus, "leave CPUs for Ray Data"


def resume_problems(job: dict[str, Any]) -> list[str]:
    """Why a failed RayJob would not resume by itself: KubeRay retries a failed job on a new cluster
    (``backoffLimit`` > 0) with the same entrypoint; that resumes only if the run's name is fixed and everything a
    re-run reads (checkpoints, MLflow run record, metric spool under ``run_dir/ray/<run_name>``) is on the PVC
    mounted on the head, where the driver runs (or checkpoints in an object store)."""
    from jobs.train import parse
    from pipeline.tracking import metric_spool, run_record

    spec, problems = job["spec"], []
    if spec.get("backoffLimit", 0) < 1:
        problems.append("backoffLimit < 1: no retry")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true: a failed cluster is kept instead of replaced")
    argv = spec["entrypoint"].split()
    if not any(a.startswith("run_name=") for a in argv):
        problems.append("no run_name=: a retry would not name the same run")
    cfg = parse(argv[2:])
    if cfg.train.max_failures < 1:
        problems.append("train.max_failures < 1")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    claims = {v["name"] for v in head["volumes"] if "persistentVolumeClaim" in v}
    mounts = [m["mountPath"].rstrip("/") + "/" for m in head["containers"][0]["volumeMounts"] if m["name"] in claims]
    for path in (cfg.run_dir + "/", cfg.train.storage_path or cfg.run_dir + "/", str(run_record(cfg)),
                 str(metric_spool(cfg))):
        if "://" not in path and not any(path.startswith(m) for m in mounts):
            problems.append(f"{path} is not on the head's PVC")
    return problems


def test_rayjob_resumes_by_itself_after_a_driver_or_head_failure() -> None:
    (job,) = docs("kuberay/rayjob.yaml")
    assert resume_problems(job) == []


@pytest.mark.parametrize("mutate,what", [
    (lambda j: j["spec"].update(backoffLimit=0), "backoffLimit"),
    (lambda j: j["spec"].update(entrypoint=j["spec"]["entrypoint"].replace("run_dir=/mnt/flowrail/runs",
                                                                            "run_dir=/tmp/runs")), "/tmp/runs"),
    (lambda j: j["spec"].update(entrypoint=re.sub(r"run_name=\S+", "", j["spec"]["entrypoint"])), "run_name"),
    (lambda j: j["spec"].update(entrypoint=j["spec"]["entrypoint"] + " train.max_failures=0"), "max_failures"),
])
def test_rayjob_that_would_not_resume_is_caught(mutate, what: str) -> None:
    (job,) = docs("kuberay/rayjob.yaml")
    mutate(job)
    assert any(what in p for p in resume_problems(job)), resume_problems(job)


def test_rayjob_entrypoint_typo_is_rejected() -> None:
    from jobs.train import parse

    (job,) = docs("kuberay/rayjob.yaml")
    argv = job["spec"]["entrypoint"].replace("train.zero_stage", "train.zero_stages").split()
    with pytest.raises(ValueError, match="zero_stages"):
        parse(argv[2:])


# ---------------------------------------------------------------- Ray cluster launcher

def ray_launcher_schema() -> dict[str, Any]:
    path = importlib.resources.files("ray") / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_config() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "cluster-launcher" / "cluster.yaml").read_text())


def test_launcher_config_matches_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    jsonschema.validate(config, ray_launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU="8"),
    lambda c: c.update(setup_comands=c.pop("setup_commands")),
    lambda c: c["provider"].pop("type"),
    lambda c: c["available_node_types"]["ray.worker.gpu"].pop("node_config"),
    lambda c: c.update(max_workers="four"),
])
def test_launcher_schema_rejects_broken_config(mutate) -> None:
    config = launcher_config()
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_launcher_schema())


def test_launcher_installs_flowrail_and_keeps_token_auth() -> None:
    config = launcher_config()
    assert any("pip install" in c and "/home/ray/flowrail" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/flowrail"] == "."
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    for cmd in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd
    text = (INFRA / "cluster-launcher" / "cluster.yaml").read_text()
    assert not re.search(r"(PASSWORD|SECRET_ACCESS_KEY|AUTH_TOKEN)\s*[:=]\s*\S", text), "credentials belong in files/env"


# ---------------------------------------------------------------- DeepSpeed presets

@lru_cache(maxsize=1)
def deepspeed_top_level_keys() -> frozenset[str]:
    """Top-level keys DeepSpeed knows, from its own constants (DeepSpeedConfig ignores unknown top-level keys)."""
    import deepspeed.runtime.zero.config as zero_config
    from deepspeed.runtime import constants

    return frozenset(v for m in (constants, zero_config) for k, v in vars(m).items() if k.isupper() and isinstance(v, str))


def check_preset(config: dict[str, Any]) -> Any:
    """Raise if DeepSpeed would refuse or silently drop part of ``config``; return the parsed config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    if '"auto"' in json.dumps(config):  # the value "auto", not keys such as torch_autocast
        raise ValueError("preset holds an 'auto' value (DeepSpeed drops them outside the HF integration)")
    unknown = set(config) - deepspeed_top_level_keys()
    if unknown:
        raise ValueError(f"unknown DeepSpeed keys: {sorted(unknown)}")
    return DeepSpeedConfig(copy.deepcopy(config))


def preset(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "pipeline" / "train" / "presets" / name).read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_deepspeed_presets_are_accepted_by_deepspeed(name: str) -> None:
    stage, offload = PRESETS[name]
    ds = check_preset(preset(name))
    assert ds.zero_optimization_stage == stage
    assert ds.torch_autocast_enabled and not ds.bfloat16_config.enabled  # bf16: autocast over fp32 weights
    assert (ds.zero_config.offload_optimizer is not None) == offload
    assert (ds.zero_config.offload_param is not None) == offload
    if offload:
        assert ds.zero_config.offload_optimizer.device == "cpu" and not ds.zero_force_ds_cpu_optimizer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flowrail_owned_keys_merge_into_each_preset(name: str) -> None:
    """The keys flowrail's engine sets (infra/deepspeed/README.md) override a preset and still validate."""
    from pipeline.config import TrainConfig
    from pipeline.train.engine import deepspeed_config

    stage, offload = PRESETS[name]
    ours = deepspeed_config(TrainConfig(zero_stage=stage, offload=offload, use_gpu=True, precision="bf16",
                                        grad_clip=0.5, stage0_single_worker=False), micro_batch=4, world_size=1)
    merged = preset(name)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping", "bf16", "torch_autocast"):
        merged[key] = ours[key]
    merged["zero_optimization"]["stage"] = ours["zero_optimization"]["stage"]
    ds = check_preset(merged)
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_clipping, ds.zero_optimization_stage) == (4, 0.5, stage)
    assert ds.torch_autocast_enabled and not ds.bfloat16_config.enabled  # bf16 = autocast over fp32 weights


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c["zero_optimization"].update(stage3_prefetch_bukket_size=1), Exception),
    (lambda c: c["zero_optimization"].update(stage=5), Exception),
    (lambda c: c["zero_optimization"].setdefault("offload_optimizer", {}).update(device="gpu"), Exception),
    (lambda c: c["bf16"].update(enabled="maybe"), Exception),
    (lambda c: c.update(gradient_clippin=1.0), ValueError),
    (lambda c: c["zero_optimization"].update(reduce_bucket_size="auto"), ValueError),
])
def test_deepspeed_check_rejects_broken_presets(mutate, error) -> None:
    config = preset("zero3_offload.json")
    mutate(config)
    with pytest.raises(error):
        check_preset(config)


# ---------------------------------------------------------------- MLflow server

def mlflow_objects() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs("mlflow/mlflow.yaml")}


def test_mlflow_server_arguments_parse_with_mlflow_cli() -> None:
    from mlflow.cli import server

    deployment = mlflow_objects()["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "server"
    params = server.make_context("server", list(container["args"][1:])).params
    assert params["host"] == "0.0.0.0" and params["serve_artifacts"]
    assert params["artifacts_destination"].startswith(("s3://", "/"))
    assert params["app_name"] == "basic-auth"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"] == "backend_store_uri"
    assert template_secrets()["mlflow-server"]["backend_store_uri"].startswith("postgresql://")
    # the basic-auth config file is mounted from the Secret where MLFLOW_AUTH_CONFIG_PATH points
    mount = next(m for m in container["volumeMounts"] if env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(m["mountPath"]))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["items"][0]["key"] in template_secrets()[volume["secret"]["secretName"]]


def test_mlflow_server_rejects_unknown_flag() -> None:
    import click
    from mlflow.cli import server

    with pytest.raises(click.exceptions.NoSuchOption):
        server.make_context("server", ["--artifact-destination=s3://x"])


def test_mlflow_allows_the_host_names_clients_use() -> None:
    """MLflow's DNS-rebinding guard must accept the Service name in the clients' tracking URI."""
    from urllib.parse import urlparse

    from mlflow.server.security_utils import is_allowed_host_header

    objs = mlflow_objects()
    args = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")).split(",")
    port = objs["Service"]["spec"]["ports"][0]["port"]
    service = objs["Service"]["metadata"]
    assert is_allowed_host_header(allowed, f"{service['name']}.{service['namespace']}.svc.cluster.local:{port}")
    client_uri = urlparse(template_secrets()["flowrail-mlflow-client"]["tracking_uri"])
    assert is_allowed_host_header(allowed, client_uri.netloc)
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")


# ---------------------------------------------------------------- container image

def dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile").read_text()


def test_dockerfile_base_user_and_sources() -> None:
    text = dockerfile()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-(gpu|cu\d+)", base), base
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for src in line.split():
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r'pip install "torch==', text) and re.search(r'pip install "deepspeed==', text)
    assert re.search(r"pip install \"\.\[", text), "flowrail itself is installed with pip"


def test_dockerfile_bakes_in_no_secrets_and_pins_match_launcher() -> None:
    text = dockerfile()
    for name in re.findall(r"^(?:ARG|ENV)\s+([A-Z_]+)", text, re.MULTILINE):
        assert not CREDENTIAL_ENV.search(name), f"Dockerfile declares {name}"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text()
    assert "**/.env" in ignore
    pins = dict(re.findall(r"^ARG (TORCH_VERSION|DEEPSPEED_VERSION)=(\S+)$", text, re.MULTILINE))
    setup = " ".join(launcher_config()["setup_commands"])
    assert f"torch=={pins['TORCH_VERSION']}" in setup and f"deepspeed=={pins['DEEPSPEED_VERSION']}" in setup


@pytest.mark.slow
def test_mlflow_deployment_serves_basic_auth_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a real ``mlflow server`` with the Deployment's arguments and env (Secret values swapped for local ones:
    sqlite instead of PostgreSQL, a local artifact directory instead of S3) and log a run as the trainer user."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import requests
    from mlflow import MlflowClient

    objs = mlflow_objects()
    (container,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    swap = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
            "--artifacts-destination": str(tmp_path / "artifacts")}
    args = [a if "=" not in a or a.split("=", 1)[0] not in swap else f"{a.split('=', 1)[0]}={swap[a.split('=', 1)[0]]}"
            for a in container["args"]]
    ini = template_secrets()["mlflow-server"]["basic_auth.ini"]
    ini = re.sub(r"database_uri = .*", f"database_uri = sqlite:///{tmp_path / 'auth.db'}", ini)
    local_secret_values = {"backend_store_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "admin_password": "admin-pw-123",
                           "flask_secret_key": "test-flask-key"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for var in container["env"]:
        if "value" in var:
            value = var["value"]
            for path in mounts.values():  # the auth config file is mounted from the Secret
                if value.startswith(path):
                    value = str(tmp_path / Path(value).name)
                    Path(value).write_text(ini)
            env[var["name"]] = value
        elif var["valueFrom"]["secretKeyRef"]["key"] in local_secret_values:
            env[var["name"]] = local_secret_values[var["valueFrom"]["secretKeyRef"]["key"]]
    log = (tmp_path / "server.log").open("w")
    # its own process group: `mlflow server` starts uvicorn as a child, and both must go at the end
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # minutes on a loaded 2-core machine, seconds otherwise
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            except requests.RequestException:  # not listening yet, or still starting its workers
                pass
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up:\n" + (tmp_path / "server.log").read_text()[-2000:])
        admin = ("admin", local_secret_values["admin_password"])
        r = requests.post(f"{url}/api/2.0/mlflow/users/create", auth=admin, timeout=120,
                          json={"username": "flowrail-trainer", "password": "trainer-pw-456"})
        assert r.ok, r.text
        assert requests.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=120).status_code == 401
        # the trainer logs the way flowrail does: credentials only in MLFLOW_TRACKING_USERNAME/PASSWORD
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "flowrail-trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "trainer-pw-456")
        client = MlflowClient(tracking_uri=f"http://localhost:{port}")
        run_id = client.create_run(client.create_experiment("flowrail")).info.run_id
        client.log_param(run_id, "train.lr", 0.001)
        client.log_metric(run_id, "loss", 0.5, step=1)
        client.log_text(run_id, "ok", "note.txt")
        assert list((tmp_path / "artifacts").rglob("note.txt")), "artifact not proxied to --artifacts-destination"
        run = requests.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=admin, timeout=120).json()
        assert {p["key"] for p in run["run"]["data"]["params"]} == {"train.lr"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
