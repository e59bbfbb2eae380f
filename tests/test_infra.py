"""infra/: every file parses, and each one is checked against what consumes it.

* the Ray cluster-launcher YAML against Ray's own schema (``ray/autoscaler/ray-schema.json``);
* the KubeRay manifests: GPU worker groups (V100, A100) whose GPU limits, ``/dev/shm`` and
  object-store sizes agree, NCCL settings, secrets only by reference, and RayJob entrypoints
  that clipops' own config loader accepts with enough GPUs in the job's cluster;
* the compose file (no docker here): structural checks of the compose format, service
  references, and the variables it interpolates against the example env file;
* the Prefect work pool: a valid JSON schema of job variables, rendered by Prefect's own
  templating into a process-worker job configuration with ``RAY_ADDRESS``; the cluster
  deployments point at real flows, parameters and recipes.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from clip_train.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose" / "compose.yaml"
EXAMPLE_ENV = INFRA / "compose" / "example.env"
RAY_LAUNCHER = INFRA / "ray" / "cluster-aws.yaml"
KUBERAY = INFRA / "kuberay"
WORK_POOL = INFRA / "prefect" / "ray-work-pool.json"
DEPLOYMENTS = INFRA / "prefect" / "deployments.yaml"
GPU_GROUPS = {"v100": "V100", "a100": "A100"}
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN")


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _gib(quantity: str) -> float:
    """A Kubernetes memory quantity (``240Gi``, ``1Ti``) in GiB."""
    units = {"Gi": 1.0, "Ti": 1024.0, "Mi": 1 / 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    raise ValueError(f"unsupported quantity {quantity!r}")


# --------------------------------------------------------------------------- everything parses


def test_every_yaml_and_json_in_infra_parses() -> None:
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert {COMPOSE, RAY_LAUNCHER, WORK_POOL, DEPLOYMENTS} <= set(files)
    assert len([p for p in files if p.parent == KUBERAY]) >= 3
    for path in files:
        text = path.read_text(encoding="utf-8")
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        assert docs and all(isinstance(d, dict) and d for d in docs), path


# --------------------------------------------------------------------------- Ray launcher


def test_ray_cluster_yaml_validates_against_rays_schema() -> None:
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    config = _load_yaml(RAY_LAUNCHER)
    jsonschema.validate(config, schema)
    broken = {**config, "available_node_types": {"x": {"resources": {"GPU": 8}}}}
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        jsonschema.validate(broken, schema)  # the schema does check node types


def test_ray_launcher_gpu_types_match_the_kuberay_groups() -> None:
    config = _load_yaml(RAY_LAUNCHER)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    expected = {"v100": "p3dn.24xlarge", "a100": "p4de.24xlarge"}  # 8x V100 32GB, 8x A100 80GB
    for group, instance in expected.items():
        node = types[group]
        assert node["node_config"]["InstanceType"] == instance
        assert node["resources"]["GPU"] == 8
        assert node["resources"][GPU_GROUPS[group]] == 8
        assert node["min_workers"] == 0
    assert types["v100"]["max_workers"] * 8 >= 592  # the paper's RN50x64 run fits
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert "--ipc=host" in config["docker"]["run_options"]  # host /dev/shm for the store
    text = RAY_LAUNCHER.read_text(encoding="utf-8")
    assert "aws_secret_access_key" not in text.lower()


# --------------------------------------------------------------------------- KubeRay


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(file name, RayCluster spec) of every manifest: RayClusters and RayJobs' clusters."""
    specs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert doc["apiVersion"] == "ray.io/v1", path
            assert doc["kind"] in ("RayCluster", "RayJob"), path
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            specs.append((path.name, spec))
    return specs


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_gpu_groups_shm_object_store_and_nccl() -> None:
    import ray

    seen = set()
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__, name  # the image's Ray is the lock's
        for group in spec["workerGroupSpecs"]:
            label = f"{name}:{group['groupName']}"
            gpu_type = GPU_GROUPS[group["groupName"]]
            seen.add(gpu_type)
            params = group["rayStartParams"]
            pod = group["template"]["spec"]
            assert gpu_type in pod["nodeSelector"]["nvidia.com/gpu.product"], label
            (container,) = pod["containers"]
            gpus = int(params["num-gpus"])
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus, label
            assert json.loads(json.loads(params["resources"])) == {gpu_type: gpus}, label
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
            assert shm["medium"] == "Memory", label
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/dev/shm"] == "dshm", label
            store_gib = int(params["object-store-memory"]) / 2**30
            shm_gib = _gib(shm["sizeLimit"])
            assert store_gib < shm_gib < _gib(container["resources"]["limits"]["memory"]), label
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1", label
            assert "NCCL_P2P_LEVEL" in env, label
    assert seen == {"V100", "A100"}


def test_kuberay_secrets_only_by_reference() -> None:
    for name, spec in _cluster_specs():
        for container in _containers(spec):
            refs = {r["secretRef"]["name"] for r in container.get("envFrom", [])}
            assert {"clipops-s3", "clipops-ray-token"} <= refs, name
            for var in container.get("env", []):
                if any(word in var["name"] for word in SECRET_WORDS):
                    assert "value" not in var, f"{name}: literal {var['name']}"


def test_rayjob_entrypoints_load_and_fit_their_clusters() -> None:
    jobs = 0
    for path in sorted(KUBERAY.glob("rayjob-*.yaml")):
        job = _load_yaml(path)
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:4] == ["clipops", "train", "--config", argv[3]], path
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = load_run_config(argv[3], sets)  # clipops' own loader: unknown keys fail
        assert cfg.infra.ray_address == "auto" and cfg.infra.use_gpu, path
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert len({g["groupName"] for g in groups}) == 1, "one GPU type per synchronous run"
        gpus = sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in groups)
        assert cfg.infra.num_workers * cfg.infra.gpus_per_worker <= gpus, path
        assert cfg.data.global_batch_size % cfg.infra.num_workers == 0, path
        if groups[0]["groupName"] == "v100":  # no bf16 tensor cores on V100
            assert cfg.precision.precision == "fp16", path
        assert cfg.infra.accelerator_type == GPU_GROUPS[groups[0]["groupName"]], path
        jobs += 1
    assert jobs >= 2


# --------------------------------------------------------------------------- compose

_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
TOP_LEVEL = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports",
    "volumes", "depends_on", "healthcheck", "restart", "shm_size", "deploy", "networks",
    "ulimits", "ipc", "working_dir", "user", "labels", "profiles", "expose",
}  # fmt: skip
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _example_env() -> dict[str, str]:
    env = {}
    for line in EXAMPLE_ENV.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` substitution."""

    def sub(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if value:
            return value
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op else ""

    return _VAR.sub(sub, text).replace("$$", "$")


def test_compose_structure_and_references() -> None:
    raw = COMPOSE.read_text(encoding="utf-8")
    compose = yaml.safe_load(_interpolate(raw, _example_env()))
    assert set(compose) - {k for k in compose if k.startswith("x-")} <= TOP_LEVEL
    services = compose["services"]
    wanted = {"postgres", "minio", "prefect-server", "mlflow", "ray-head", "ray-worker"}
    assert wanted | {"prefect-worker"} <= set(services)
    for name, svc in services.items():
        assert set(svc) <= SERVICE_KEYS, f"{name}: {set(svc) - SERVICE_KEYS}"
        assert "image" in svc or "build" in svc, name
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in services and how["condition"] in CONDITIONS, f"{name} -> {dep}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} open beyond loopback"
    build = services["mlflow"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    for name in ("ray-head", "ray-worker"):
        assert services[name]["shm_size"] == _example_env()["RAY_SHM_SIZE"]
    worker = " ".join(services["prefect-worker"]["command"])
    assert "infra/prefect/ray-work-pool.json" in worker and "clipops-ray" in worker
    assert services["prefect-worker"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"


def test_compose_services_use_postgres_and_s3() -> None:
    env = _example_env()
    services = yaml.safe_load(_interpolate(COMPOSE.read_text(encoding="utf-8"), env))["services"]
    mlflow = services["mlflow"]
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql+psycopg2://") and store.endswith("@postgres:5432/mlflow")
    assert env["POSTGRES_PASSWORD"] in store
    assert f"--artifacts-destination=s3://{env['S3_BUCKET']}/mlflow" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    prefect_db = services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("/prefect")
    init = (INFRA / "compose" / "postgres-init.sh").read_text(encoding="utf-8")
    assert "CREATE DATABASE mlflow" in init and "pg_trgm" in init


def test_compose_variables_documented_and_no_secrets_in_git() -> None:
    raw = COMPOSE.read_text(encoding="utf-8")
    raw = "\n".join(line for line in raw.splitlines() if not line.lstrip().startswith("#"))
    used = {m.group(1) for m in _VAR.finditer(raw)}
    env = _example_env()
    assert used <= set(env), f"undocumented: {used - set(env)}"
    for key, value in env.items():
        if any(word in key for word in SECRET_WORDS):
            assert value == "change-me", key
    required = {m.group(1) for m in _VAR.finditer(raw) if m.group(2) == ":?"}
    assert {"POSTGRES_PASSWORD", "S3_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} <= required
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _interpolate(raw, {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"})
    for line in raw.splitlines():  # secrets only ever as ${VARIABLES}
        key, _, value = line.strip().partition(":")
        if any(word in key.upper() for word in SECRET_WORDS) and value.strip():
            assert value.strip().startswith("${"), line


# --------------------------------------------------------------------------- Prefect


def _render_pool(values: dict[str, Any]) -> Any:
    from prefect.utilities.templating import apply_values
    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads(WORK_POOL.read_text(encoding="utf-8"))
    props = template["variables"]["properties"]
    merged = {k: v["default"] for k, v in props.items() if "default" in v} | values
    jsonschema.validate(merged, template["variables"])
    rendered = apply_values(template["job_configuration"], merged)
    return ProcessJobConfiguration(**rendered)


def test_work_pool_template_renders_ray_address() -> None:
    from prefect.workers.process import ProcessWorker

    template = json.loads(WORK_POOL.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    default = ProcessWorker.get_default_base_job_template()
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template)))
    assert placeholders <= set(template["variables"]["properties"])
    config = _render_pool({"ray_address": "10.1.2.3:6379"})
    assert config.env["RAY_ADDRESS"] == "10.1.2.3:6379"
    assert config.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert str(config.working_dir) == "/opt/clipops"
    with pytest.raises(jsonschema.ValidationError):
        _render_pool({"ray_address": 6379})
    assert not any(w in json.dumps(template["variables"]).upper() for w in ("PASSWORD",))


def test_cluster_deployments_target_the_pool_and_real_flows() -> None:
    project = _load_yaml(DEPLOYMENTS)
    deployments = project["deployments"]
    assert {d["name"] for d in deployments} >= {"vit-b32-cluster", "vit-l14-cluster"}
    for dep in deployments:
        assert dep["work_pool"]["name"] == "clipops-ray"
        module, _, func = dep["entrypoint"].partition(":")
        source = (ROOT / module).read_text(encoding="utf-8")
        assert f"def {func}(" in source, dep["entrypoint"]
        from flows.pretrain import pretrain

        accepted = set(inspect.signature(pretrain.fn).parameters)
        params = dep["parameters"]
        assert set(params) <= accepted, set(params) - accepted
        assert params["ray_address"] == "auto"
        sets = [f"infra.num_workers={params['num_workers']}", *params.get("overrides", [])]
        load_run_config(params["recipe"], sets)


# --------------------------------------------------------------------------- capacity plan


def test_capacity_figures_come_from_the_real_model() -> None:
    """infra/capacity.py (docs/scaling.md's numbers) on the smallest plan model, ViT-B/32."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("clipops_capacity", INFRA / "capacity.py")
    assert spec is not None and spec.loader is not None
    capacity = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = capacity  # dataclasses look their module up there
    try:
        spec.loader.exec_module(capacity)
        fig = capacity.figures("ViT-B-32")
    finally:
        del sys.modules[spec.name]
    assert fig.params == 151_277_313  # OpenAI's released ViT-B/32 (clip-method.md)
    assert fig.embed_dim == 512
    # ~4.4 G multiply-adds for the image tower + ~3 G for 77 text tokens, 2 FLOPs each
    assert 13.0 < fig.forward_gflops < 16.5
    # 50 patch tokens x 768 wide x 12 layers in bf16 alone is 0.9 MB per pair
    assert 5.0 < fig.activation_mb < 60.0
    assert fig.activation_ckpt_mb < fig.activation_mb / 3
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert f"{fig.params:,}" in text and f"{fig.forward_gflops:.1f}" in text
