"""infra/ checked offline with the tools' own validators: DeepSpeed's config parser, Ray's
cluster-config schema, the KubeRay CRDs' required fields, a static read of the Dockerfile, the
MLflow server setup, and every recipe in configs/ through the training config loader."""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
YAMLS = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
JSONS = sorted(INFRA.rglob("*.json"))
DS_CONFIGS = sorted((INFRA / "deepspeed").glob("*.json"))
RAY_CLUSTER = INFRA / "ray" / "aws-gpu-cluster.yaml"
KUBERAY = INFRA / "kuberay"


def _load_yaml(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def test_every_yaml_and_json_in_infra_parses():
    assert len(YAMLS) >= 5 and len(JSONS) >= 3
    for p in YAMLS:
        assert _load_yaml(p), p
    for p in JSONS:
        with open(p) as f:
            assert isinstance(json.load(f), dict), p


# ---------------------------------------------------------------------------------- DeepSpeed

# What the trainer fills in for "auto" (the HF-style placeholder), and only these keys.
AUTO_FILL = {
    "train_batch_size": 4096,
    "train_micro_batch_size_per_gpu": 64,
    "gradient_accumulation_steps": 4,
}


def _fill_auto(node, key=None):
    if isinstance(node, dict):
        return {k: _fill_auto(v, k) for k, v in node.items()}
    if node == "auto":
        assert key in AUTO_FILL, f"'auto' for {key!r}, which the trainer does not fill"
        return AUTO_FILL[key]
    return node


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_configs_pass_deepspeeds_parser(path):
    import deepspeed.runtime.config as dsc

    with open(path) as f:
        raw = json.load(f)
    cfg = _fill_auto(raw)
    world = 16  # 4096 = 64 x 4 x 16
    with mock.patch.object(dsc.dist, "get_world_size", return_value=world), \
            mock.patch.object(dsc.dist, "get_rank", return_value=0):
        parsed = dsc.DeepSpeedConfig(cfg)
    assert parsed.world_size == world
    assert parsed.zero_optimization_stage == 3
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.train_batch_size == 4096 and parsed.gradient_accumulation_steps == 4
    assert parsed.gradient_clipping == 1.0  # the paper's clip, every recipe
    off = parsed.zero_config.offload_optimizer
    expected = {"zero3_bf16.json": None, "zero3_offload_cpu.json": "cpu",
                "zero3_offload_nvme.json": "nvme"}[path.name]
    assert (str(getattr(off.device, "value", off.device)) if off else None) == expected
    if expected:
        dev = parsed.zero_config.offload_param.device
        assert str(getattr(dev, "value", dev)) == expected
    # The trainer passes its own optimizer; an 'optimizer' block as well would make
    # deepspeed.initialize refuse ("given an optimizer and a config optimizer").
    assert parsed.optimizer_name is None
    # Batch sizes inconsistent with the world size must be refused by the same parser.
    bad = {**cfg, "train_batch_size": 4000}
    with mock.patch.object(dsc.dist, "get_world_size", return_value=world), \
            mock.patch.object(dsc.dist, "get_rank", return_value=0), pytest.raises(AssertionError):
        dsc.DeepSpeedConfig(bad)


def test_deepspeed_parser_rejects_unknown_zero_keys():
    """The parser is strict (pydantic, extra=forbid), so the test above would catch a typo."""
    import deepspeed.runtime.config as dsc

    with open(INFRA / "deepspeed" / "zero3_bf16.json") as f:
        cfg = _fill_auto(json.load(f))
    cfg["zero_optimization"]["stage3_prefech_bucket_size"] = 1
    with mock.patch.object(dsc.dist, "get_world_size", return_value=16), \
            mock.patch.object(dsc.dist, "get_rank", return_value=0), pytest.raises(Exception):
        dsc.DeepSpeedConfig(cfg)


def test_planner_reads_the_reference_zero3_config():
    from pipeline.capacity import ZeroSettings

    with open(INFRA / "deepspeed" / "zero3_bf16.json") as f:
        assert ZeroSettings.from_deepspeed_config(json.load(f)) == ZeroSettings()
    with open(INFRA / "deepspeed" / "zero3_offload_nvme.json") as f:
        assert ZeroSettings.from_deepspeed_config(json.load(f)).offload == "nvme"


# ---------------------------------------------------------------------------- Ray cluster YAML


def test_ray_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = _load_yaml(RAY_CLUSTER)
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        schema = json.load(f)
    jsonschema.validate(cfg, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(cfg)))  # as `ray up` sees it, defaults merged

    # The schema is strict enough to catch a misspelt top-level key.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cfg, "idle_timeout_minute": 5}, schema)

    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers and all(v["resources"]["GPU"] >= 1 and v["max_workers"] > v["min_workers"]
                           for v in workers.values())
    assert {v["node_config"]["InstanceType"] for v in workers.values()} >= {"p4d.24xlarge", "p5.48xlarge"}
    run_opts = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_opts and "RAY_AUTH_TOKEN_PATH=" in run_opts
    assert "--gpus all" in cfg["docker"]["worker_run_options"]


def _no_inline_credentials(text: str, where: str):
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"AWS access key id in {where}"
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]", text), f"AWS secret in {where}"
    assert not re.search(r"RAY_AUTH_TOKEN=[\x27\"]?[A-Za-z0-9_-]{16,}", text), f"inline Ray token in {where}"


def test_no_credentials_in_infra_files():
    for p in INFRA.rglob("*"):
        if p.is_file():
            _no_inline_credentials(p.read_text(), str(p.relative_to(ROOT)))


# ------------------------------------------------------------------------------------ KubeRay


# Field names, required fields and enums of the ray.io/v1 CRDs, transcribed from KubeRay's
# ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go (master, Ray 2.60 era). With
# additionalProperties false a misspelt field fails here instead of being pruned by the API server.
_POD_TEMPLATE = {"type": "object", "required": ["spec"],
                 "properties": {"spec": {"type": "object", "required": ["containers"]}}}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_HEAD = {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
    "template": _POD_TEMPLATE, "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
    "ingressOptions": {"type": "object"}, "resources": _STR_MAP, "labels": _STR_MAP,
    "rayStartParams": _STR_MAP, "serviceType": {"type": "string"}}}
_WORKER = {"type": "object", "required": ["groupName", "minReplicas", "maxReplicas", "template"],
           "additionalProperties": False, "properties": {
    "suspend": {"type": "boolean"}, "groupName": {"type": "string", "minLength": 1},
    "replicas": {"type": "integer", "minimum": 0}, "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0}, "idleTimeoutSeconds": {"type": "integer"},
    "priority": {"type": "integer"}, "resources": _STR_MAP, "labels": _STR_MAP,
    "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE, "scaleStrategy": {"type": "object"},
    "numOfHosts": {"type": "integer", "minimum": 1}}}
_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
                 "properties": {
    "upgradeStrategy": {"type": "object"},
    "authOptions": {"type": "object", "additionalProperties": False, "properties": {
        "enableK8sTokenAuth": {"type": "boolean"}, "secretName": {"type": "string"},
        "mode": {"enum": ["disabled", "token"]}}},
    "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
    "autoscalerOptions": {"type": "object", "properties": {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": {"type": "integer"}}},
    "headServiceAnnotations": _STR_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
    "gcsFaultToleranceOptions": {"type": "object"}, "historyServerOptions": {"type": "object"},
    "networkPolicy": {"type": "object"}, "tlsOptions": {"type": "object"},
    "headGroupSpec": _HEAD, "rayVersion": {"type": "string"},
    "workerGroupSpecs": {"type": "array", "items": _WORKER}}}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}
CRD_SCHEMAS = {
    "RayCluster": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                   "properties": {"apiVersion": {"const": "ray.io/v1"}, "metadata": _META,
                                  "spec": _CLUSTER_SPEC}},
    "RayJob": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "ray.io/v1"}, "metadata": _META,
                              "spec": {"type": "object", "additionalProperties": False, "properties": {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0}, "clusterSelector": _STR_MAP,
        "entrypoint": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"}, "entrypointResources": {"type": "string"},
        "jobId": {"type": "string"}, "managedBy": {"type": "string"}, "metadata": _STR_MAP,
        "rayClusterSpec": _CLUSTER_SPEC, "runtimeEnvYAML": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterPodTemplate": _POD_TEMPLATE, "submitterConfig": {"type": "object"},
        "suspend": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "deletionStrategy": {"type": "object"}}}}},
}


def test_kuberay_manifests_match_the_crd_schemas():
    import jsonschema

    for kind, schema in CRD_SCHEMAS.items():
        (doc,) = _docs(kind)
        jsonschema.validate(doc, schema)
        bad = copy.deepcopy(doc)
        spec = bad["spec"].get("rayClusterSpec", bad["spec"])
        spec["workerGroupSpecs"][0]["maxReplica"] = spec["workerGroupSpecs"][0].pop("maxReplicas")
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def _docs(kind):
    out = []
    for p in sorted(KUBERAY.glob("*.yaml")):
        out += [d for d in _load_yaml(p) if d.get("kind") == kind]
    return out


def _check_pod_template(tpl, where):
    containers = tpl["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    for c in containers:
        for e in c.get("env", []):
            # Anything secret-looking must come from a Secret, never a literal value.
            if re.search(r"(?i)token|password|secret|key", e["name"]):
                assert "valueFrom" in e and "secretKeyRef" in e["valueFrom"], (where, e["name"])
        for src in c.get("envFrom", []):
            assert set(src) & {"secretRef", "configMapRef"}, where
        assert any("secretRef" in s for s in c.get("envFrom", [])), f"{where}: no secretRef"
    return containers


def _check_cluster_spec(spec, where):
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"
    major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _check_pod_template(head["template"], f"{where}.head")
    assert spec["workerGroupSpecs"]
    names = set()
    for g in spec["workerGroupSpecs"]:
        for k in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert k in g, f"{where}: worker group lacks {k}"
        names.add(g["groupName"])
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        for c in _check_pod_template(g["template"], f"{where}.{g['groupName']}"):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert len(names) == len(spec["workerGroupSpecs"])


def test_kuberay_raycluster_carries_the_crd_required_fields():
    (rc,) = _docs("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"], "RayCluster")


def test_kuberay_rayjob_runs_the_workflow():
    (job,) = _docs("RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/workflow.py"] and "--config" in argv
    config = argv[argv.index("--config") + 1]
    assert config.startswith("configs/")
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    # Service account (IRSA) and non-secret env exist in the same folder.
    kinds = {(d["kind"], d["metadata"]["name"]) for p in KUBERAY.glob("*.yaml") for d in _load_yaml(p)}
    assert ("ServiceAccount", "coatnet-ray") in kinds and ("ConfigMap", "coatnet-env") in kinds


# --------------------------------------------------------------------------------- Dockerfile

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                       "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                       "SHELL"}


def _dockerfile_instructions(path):
    lines, buf = [], ""
    for raw in Path(path).read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        buf += (" " if buf else "") + s.rstrip("\\").strip()
        if not s.endswith("\\"):
            lines.append(buf)
            buf = ""
    assert not buf, "dangling line continuation"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("dockerfile", [INFRA / "Dockerfile", INFRA / "mlflow" / "Dockerfile"],
                         ids=["project", "mlflow"])
def test_dockerfiles_parse_and_reference_existing_files(dockerfile):
    ins = _dockerfile_instructions(dockerfile)
    assert all(k in DOCKER_INSTRUCTIONS for k, _ in ins), [k for k, _ in ins]
    first = next(k for k, _ in ins if k != "ARG")
    assert first == "FROM"
    context = ROOT if dockerfile == INFRA / "Dockerfile" else dockerfile.parent
    for k, rest in ins:
        if k in ("COPY", "ADD"):
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            *srcs, _dest = [a for a in args if not a.startswith("--")]
            for s in srcs:
                assert (context / s).exists(), f"{dockerfile.name}: COPY source {s} missing"


def test_project_dockerfile_installs_cuda_torch_at_the_pinned_version():
    ins = _dockerfile_instructions(INFRA / "Dockerfile")
    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for k, rest in ins
                if k == "ARG" and "=" in rest)
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    runs = " ".join(rest for k, rest in ins if k == "RUN")
    assert "--index-url ${TORCH_INDEX_URL}" in runs and "torch==${TORCH_VERSION}" in runs
    assert "-c constraints.txt ." in runs  # the project itself, pinned
    assert "torch.version.cuda" in runs  # the build fails if a CPU-only torch slipped in
    # The project's packages are copied before they are installed.
    order = [rest for k, rest in ins if k in ("COPY", "RUN")]
    install = next(i for i, r in enumerate(order) if "-c constraints.txt ." in r)
    for pkg in ("models", "pipeline", "pyproject.toml"):
        assert any(pkg in r for r in order[:install]), pkg
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# ------------------------------------------------------------------------------------- MLflow


def test_mlflow_server_uses_postgres_s3_and_the_artifact_proxy():
    (compose,) = _load_yaml(INFRA / "mlflow" / "docker-compose.yaml")
    svc = compose["services"]["mlflow"]
    cmd = " ".join(svc["command"])
    assert "--backend-store-uri postgresql://" in cmd
    assert "--serve-artifacts" in cmd and "--artifacts-destination s3://" in cmd
    assert "--host 0.0.0.0" in cmd
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    assert svc["env_file"] == "mlflow.env"
    example = (INFRA / "mlflow" / "mlflow.env.example").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in example
    unit = (INFRA / "mlflow" / "mlflow-server.service").read_text()
    assert "EnvironmentFile=" in unit and "--serve-artifacts" in unit
    # The flags exist in the installed MLflow server.
    from click.testing import CliRunner
    from mlflow.cli import server

    help_text = CliRunner().invoke(server, ["--help"]).output
    for flag in ("--backend-store-uri", "--serve-artifacts", "--artifacts-destination",
                 "--allowed-hosts", "--workers"):
        assert flag in help_text


# ------------------------------------------------------------------------------------ configs


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert CONFIGS, "configs/ holds no recipes"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("workflow_")], ids=lambda p: p.name)
def test_each_workflow_plans(path):
    """A workflow file loads and plans before anything runs: every stage recipe it names exists and
    resolves (bases included) to a known variant, each stage has its own key, and fine-tuning runs
    at a higher resolution than pretraining. (Stage recipes themselves: tests/test_config.py.)"""
    from models import list_models
    from pipeline.workflow import load_workflow, plan_stages

    wf, base = load_workflow(str(path))
    plan = plan_stages(wf, base)
    stages = ([plan.pretrain] if plan.pretrain else []) + plan.finetune
    assert plan.finetune and len({stage.key for stage in stages}) == len(stages)
    assert all(stage.config.model.variant in list_models() for stage in stages)
    if plan.pretrain:
        assert all(s.config.model.img_size > plan.pretrain.config.model.img_size for s in plan.finetune)


def test_rayjob_runs_an_existing_workflow_config():
    (job,) = _docs("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    config = ROOT / argv[argv.index("--config") + 1]
    assert config.is_file() and config.name.startswith("workflow_")
    assert config in CONFIGS  # so test_each_workflow_plans covers it


# ------------------------------------------------------------------- cluster sizes vs recipes

CLUSTERS = yaml.safe_load((INFRA / "clusters.yaml").read_text())["clusters"]


def _run_configs(entry) -> list[tuple[str, object]]:
    """(label, Config) of every training stage an entry of a cluster's ``runs`` stands for."""
    from pipeline.config import load_config
    from pipeline.workflow import load_workflow, plan_stages

    if isinstance(entry, dict):
        return [(f"{entry['config']} {' '.join(entry.get('overrides', []))}",
                 load_config(ROOT / entry["config"], entry.get("overrides", [])))]
    paths = sorted(ROOT.glob(entry))
    assert paths, f"infra/clusters.yaml: {entry} names no file"
    out = []
    for p in paths:
        if p.name.startswith("workflow_"):
            plan = plan_stages(*load_workflow(str(p)))
            out += [(f"{p.name}:{s.name}", s.config) for s in [plan.pretrain, *plan.finetune] if s]
        else:
            out.append((p.name, load_config(p)))
    return out


def _cluster_runs():
    return [(name, label, cfg) for name, c in CLUSTERS.items() for entry in c["runs"]
            for label, cfg in _run_configs(entry)]


def _group(cluster: dict, cfg, label: str) -> dict:
    s = cfg.scaling
    assert s.use_gpu and s.accelerator_type, f"{label}: a GPU cluster's recipe names scaling.accelerator_type"
    groups = [g for g in cluster["groups"].values() if g["accelerator_type"] == s.accelerator_type]
    assert len(groups) == 1, f"{label}: {len(groups)} groups of {s.accelerator_type} in {cluster['file']}"
    return groups[0]


def test_cluster_files_say_what_clusters_yaml_says():
    from pipeline.capacity import GPUS

    files = {c["file"] for c in CLUSTERS.values()}
    assert files == {str(p.relative_to(ROOT)) for p in [RAY_CLUSTER, KUBERAY / "raycluster.yaml",
                                                        KUBERAY / "rayjob.yaml"]}
    for name, c in CLUSTERS.items():
        groups = c["groups"]
        for gname, g in groups.items():
            assert g["gpu"] in GPUS and g["instance"] in GPUS[g["gpu"]].note, (name, gname)
        if c["file"].endswith("aws-gpu-cluster.yaml"):
            (cfg,) = _load_yaml(ROOT / c["file"])
            assert "," not in cfg["provider"]["availability_zone"], "one zone: a placement group lives in one AZ"
            types = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
            assert set(types) == set(groups)
            assert cfg["max_workers"] == sum(g["nodes"] for g in groups.values())
            pgs = [t["node_config"]["Placement"]["GroupName"] for t in types.values()]
            assert len(set(pgs)) == len(pgs), "one placement group per node type"
            for gname, g in groups.items():
                t = types[gname]
                assert t["node_config"]["InstanceType"] == g["instance"] and t["max_workers"] == g["nodes"]
                assert t["resources"] == {"CPU": g["cpus_per_node"], "GPU": g["gpus_per_node"],
                                          f"accelerator_type:{g['accelerator_type']}": 1}, gname
            continue
        (doc,) = [d for d in _load_yaml(ROOT / c["file"]) if d["kind"] in ("RayCluster", "RayJob")]
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        specs = {w["groupName"]: w for w in spec["workerGroupSpecs"]}
        assert set(specs) == set(groups), name
        for gname, g in groups.items():
            w = specs[gname]
            (box,) = w["template"]["spec"]["containers"]
            assert w["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == g["instance"]
            assert int(box["resources"]["limits"]["nvidia.com/gpu"]) == g["gpus_per_node"]
            assert int(box["resources"]["limits"]["cpu"]) == g["cpus_per_node"]
            assert w["maxReplicas"] == g["nodes"]
            if doc["kind"] == "RayJob" or not spec.get("enableInTreeAutoscaling"):   # a fixed gang
                assert w["replicas"] == w["minReplicas"] == g["nodes"], gname
            assert w["resources"] == {f"accelerator_type:{g['accelerator_type']}": "1"}, gname
    # the RayJob's entrypoint is among what its cluster runs
    (job,) = _docs("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--config") + 1] in CLUSTERS["kuberay-workflow"]["runs"]


def test_every_recipe_and_workflow_fits_the_clusters_that_run_it():
    """Worker count, GPU type and CPUs of every stage a cluster runs; every GPU recipe is run somewhere."""
    seen = set()
    for name, label, cfg in _cluster_runs():
        c = CLUSTERS[name]
        g = _group(c, cfg, label)
        s = cfg.scaling
        assert s.num_workers <= g["nodes"] * g["gpus_per_node"], \
            f"{label}: {s.num_workers} workers, {name} holds {g['nodes'] * g['gpus_per_node']} {g['gpu']}"
        assert s.cpus_per_worker * g["gpus_per_node"] <= g["cpus_per_node"], label
        seen.add(label.split(":")[0].split(" ")[0])
    gpu_recipes = {p.name for p in CONFIGS if not p.name.startswith("workflow_")
                   and _run_configs(str(p.relative_to(ROOT)))[0][1].scaling.use_gpu}
    assert gpu_recipes <= seen, f"recipes no cluster runs: {sorted(gpu_recipes - seen)}"


@pytest.mark.slow    # the planner measures activations of each variant and resolution (meta device)
def test_every_recipe_fits_the_gpu_memory_of_its_cluster():
    import functools

    from pipeline.activations import activation_model
    from pipeline.capacity import DEFAULT_HEADROOM, GPUS, ZeroSettings, model_facts, zero3_memory
    from pipeline.engine import deepspeed_config

    act = functools.lru_cache(maxsize=None)(activation_model)
    checked = {}
    for name, label, cfg in _cluster_runs():
        g = _group(CLUSTERS[name], cfg, label)
        m, s = cfg.model, cfg.scaling
        arch = tuple(sorted(m.architecture().items()))
        key = (m.variant, m.img_size, arch, s.num_workers, cfg.train.micro_batch, m.grad_checkpointing,
               cfg.deepspeed.offload, g["gpu"])
        if key in checked:
            continue
        zero = ZeroSettings.from_deepspeed_config(deepspeed_config(cfg))
        facts = model_facts(m.variant, m.img_size, zero.param_persistence_threshold, arch)
        mem = zero3_memory(facts, s.num_workers, cfg.train.micro_batch, act(m.variant, m.img_size, architecture=arch),
                           zero, m.grad_checkpointing, g["gpus_per_node"])
        usable = GPUS[g["gpu"]].memory_bytes * (1 - DEFAULT_HEADROOM)
        checked[key] = mem.total
        assert mem.total <= usable, (f"{label} on {name}/{g['gpu']}: {mem.total / 2**30:.1f} GiB per GPU "
                                     f"at micro-batch {cfg.train.micro_batch}, {usable / 2**30:.1f} usable")
    assert len(checked) >= 10
