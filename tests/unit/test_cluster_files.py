"""The deployment files hold together: ray_cluster.yaml passes Ray's own autoscaler validation, the
run config's `scaling` asks for resources its node types offer, the KubeRay manifests parse and
run a real `mmpt` command, and the Dockerfile pins what the tests run against."""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.config import ScalingConfig
from orchestrator.config import ConfigError, load_config
from orchestrator.run.scaling import data_remote_args, train_scaling

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
EXAMPLE = ROOT / "jobs" / "configs" / "cluster_2x8gpu.yaml"
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def _custom(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if k not in _BUILTIN and not k.startswith("accelerator_type:")}


def _per_node(node: dict[str, float], need: dict[str, float]) -> int:
    """How many workers needing `need` fit on a node with `node` (resources it lacks -> 0)."""
    return min(math.floor(node.get(k, 0) / v) for k, v in need.items() if v > 0)


# -- ray_cluster.yaml ---------------------------------------------------------------------------

def test_ray_cluster_yaml_passes_the_ray_autoscaler_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(CLUSTER))  # what `ray up` does before validating
    validate_config(cfg)  # raises jsonschema.ValidationError / ValueError on a bad file
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "ray.head.default" and types["ray.head.default"]["resources"] == {"CPU": 0}
    assert {n: (t["min_workers"], t["max_workers"]) for n, t in types.items()} == {
        "ray.head.default": (0, 0), "gpu_train": (0, 2), "cpu_data": (0, 4)}
    assert cfg["provider"]["type"] == "aws" and 0 < cfg["idle_timeout_minutes"] <= 30
    assert cfg["docker"]["image"].endswith(":0.1.0")


def test_ray_autoscaler_validation_rejects_a_broken_cluster_file() -> None:
    """The check above has teeth: Ray's schema refuses what `ray up` would refuse."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    fractional = copy.deepcopy(CLUSTER)
    fractional["available_node_types"]["gpu_train"]["resources"]["train_gpu"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="0.5 is not of type 'integer'"):
        validate_config(prepare_config(fractional))
    too_few = copy.deepcopy(CLUSTER) | {"max_workers": 0}
    too_few["available_node_types"]["cpu_data"]["min_workers"] = 1
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        validate_config(prepare_config(too_few))


def test_ray_cluster_yaml_installs_the_project_and_keeps_ray_private() -> None:
    assert CLUSTER["file_mounts"]["~/mmpt"] == "."  # `mmpt cluster up` runs ray from the repo root
    assert CLUSTER["setup_commands"] == ["pip install --no-deps -e ~/mmpt"]
    assert CLUSTER["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(CLUSTER["head_start_ray_commands"])
    workers = " ".join(CLUSTER["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in workers
    assert "--env RAY_AUTH_MODE=token" in CLUSTER["docker"]["run_options"]
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    assert "type: gcp" in text and "type: azure" in text  # what to change for GCP / Azure


# -- scaling: run config -> Ray resources -> node types ---------------------------------------

def test_local_default_scaling_is_unchanged() -> None:
    s = ScalingConfig()
    assert train_scaling(s) == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    assert data_remote_args(s) == {}
    gpu = ScalingConfig(use_gpu=True, num_workers=4, cpus_per_worker=6)
    assert train_scaling(gpu)["resources_per_worker"] == {"CPU": 6.0, "GPU": 1}


def test_example_config_lands_training_on_gpu_nodes_and_preprocessing_on_cpu_nodes() -> None:
    cfg = load_config(EXAMPLE)
    train, data = train_scaling(cfg.scaling), data_remote_args(cfg.scaling)
    assert train == {"num_workers": 16, "use_gpu": True, "accelerator_type": "A100",
                     "resources_per_worker": {"CPU": 8.0, "GPU": 1, "train_gpu": 1.0}}
    assert data == {"num_cpus": 1.0, "resources": {"data_cpu": 1.0}}
    types = {n: t["resources"] for n, t in CLUSTER["available_node_types"].items()}
    need = train["resources_per_worker"]
    # Workers fit only on gpu_train, 8 per node (one per GPU): 16 workers = 2 nodes <= max_workers.
    fits = {n: _per_node(res, need) for n, res in types.items()}
    assert fits == {"ray.head.default": 0, "gpu_train": 8, "cpu_data": 0}
    assert math.ceil(train["num_workers"] / fits["gpu_train"]) == 2 <= CLUSTER["available_node_types"]["gpu_train"]["max_workers"]
    # Preprocessing tasks fit only on cpu_data, one per vCPU.
    task = {"CPU": data["num_cpus"], **data["resources"]}
    assert {n: _per_node(res, task) for n, res in types.items()} == {"ray.head.default": 0, "gpu_train": 0, "cpu_data": 32}
    assert cfg.moe.ep_size == 8  # experts split within one node's 8 GPUs


@pytest.mark.parametrize(("override", "message"), [
    ("scaling.resources_per_worker={GPU: 2}", "scaling.resources_per_worker = {'GPU': 2}: GPU is set by "
     "scaling.cpus_per_worker / scaling.use_gpu; list only custom resources here"),
    ("scaling.data_resources={CPU: 4}", "scaling.data_resources = {'CPU': 4}: CPU is set by scaling.data_num_cpus; "
     "list only custom resources here"),
    ("scaling.data_resources={data_cpu: 0}", "scaling.data_resources.data_cpu = 0: Input should be greater than 0"),
    ("scaling.accelerator_type=H100", "scaling: accelerator_type = 'H100' needs use_gpu: true (it names the kind "
     "of GPU each worker gets)"),
])
def test_scaling_mistakes_are_one_line_naming_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "jobs" / "configs" / "quickstart.yaml", [override])
    assert err.value.problems == [message]


# -- KubeRay -------------------------------------------------------------------------------------

def _manifests() -> dict[str, dict[str, Any]]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _start_resources(group: dict[str, Any]) -> dict[str, float]:
    raw = group["rayStartParams"]["resources"]  # KubeRay wants the JSON quoted: '"{\"x\": 1}"'
    return json.loads(raw.strip('"').replace('\\"', '"'))


def test_kuberay_manifests_parse_and_autoscale_like_ray_cluster_yaml() -> None:
    kinds = _manifests()
    assert sorted(kinds) == ["RayCluster", "RayJob", "ServiceAccount"]
    spec = kinds["RayCluster"]["spec"]
    assert kinds["RayCluster"]["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == version("ray")
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "127.0.0.1", "num-cpus": "0"}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for g in groups.values():
        assert 0 == g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["template"]["spec"]["containers"][0]["image"] == CLUSTER["docker"]["image"]
    assert _start_resources(groups["gpu-train"]) == {"train_gpu": 8}
    assert groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert _start_resources(groups["cpu-data"]) == {"data_cpu": 30}
    # The same custom resources as ray_cluster.yaml's node types, so one run config serves both.
    cloud = {k for t in CLUSTER["available_node_types"].values() for k in _custom(t["resources"])}
    assert {k for g in groups.values() for k in _start_resources(g)} == cloud
    # The RayJob's cluster is the RayCluster, plus what SidecarMode needs of the head pod.
    job_spec = copy.deepcopy(kinds["RayJob"]["spec"]["rayClusterSpec"])
    assert job_spec["headGroupSpec"]["template"]["spec"].pop("restartPolicy") == "Never"
    assert job_spec == spec
    assert kinds["RayJob"]["spec"]["submissionMode"] == "SidecarMode"


def _image_workdir() -> str:
    return next(line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("WORKDIR "))


def test_rayjob_entrypoint_is_a_real_mmpt_run_of_a_valid_config() -> None:
    import typer

    from orchestrator.cli.main import app

    argv = shlex.split(_manifests()["RayJob"]["spec"]["entrypoint"])
    assert argv[:2] == ["mmpt", "run"]
    group = typer.main.get_command(app)
    command = group.get_command(typer.Context(group), argv[1])
    assert command is not None, f"mmpt has no command {argv[1]!r}"
    params = command.make_context(argv[1], argv[2:]).params  # raises on unknown options / missing args
    # The config path is inside the image, where the Dockerfile puts the repository.
    config = Path(params["config"])
    assert config.is_relative_to(_image_workdir())
    local = ROOT / config.relative_to(_image_workdir())
    assert local == EXAMPLE
    cfg = load_config(local, params["set_"])
    assert cfg.scaling.accelerator_type is None and cfg.scaling.num_workers == 16
    groups = {g["groupName"]: g for g in _manifests()["RayCluster"]["spec"]["workerGroupSpecs"]}
    assert _per_node(_start_resources(groups["gpu-train"]), _custom(train_scaling(cfg.scaling)["resources_per_worker"])) == 8
    assert set(data_remote_args(cfg.scaling)["resources"]) <= set(_start_resources(groups["cpu-data"]))


# -- Dockerfile ----------------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", text)
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def _installs() -> list[list[str]]:
    """The arguments of every `pip install` (or `uv pip install`) command of every RUN step."""
    return [shlex.split(cmd.split("pip install", 1)[1]) for kind, rest in _instructions() if kind == "RUN"
            for cmd in rest.split("&&") if "pip install" in cmd]


def _pins() -> dict[str, str]:
    args = dict(a.split("=", 1) for k, a in _instructions() if k == "ARG" and "=" in a)
    pins: dict[str, str] = {}
    for words in _installs():
        for word in words:
            if "==" in word:
                name, ver = word.split("==")
                pins[re.sub(r"\[.*\]", "", name).lower()] = re.sub(
                    r"\$\{(\w+)\}", lambda m: args[m.group(1)].strip('"'), ver)
    return pins


def test_dockerfile_is_a_pinned_cuda_image_of_the_tested_stack() -> None:
    steps = _instructions()
    bases = [rest.split()[0] for kind, rest in steps if kind == "FROM"]
    assert all(":" in b and not b.endswith(":latest") for b in bases), bases
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d\d\.\d\d", bases[-1]), bases[-1]
    pins = _pins()
    for name in ("ray", "torch", "deepspeed"):
        assert pins[name] == version(name).split("+")[0], (name, pins[name])
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower() for dep in required}
    assert names <= set(pins), f"dependencies without a pin in the Dockerfile: {sorted(names - set(pins))}"
    # Every other install step installs pinned packages or the project itself, without its deps.
    for words in _installs():
        packages = [w for w in words if not w.startswith(("-", "$"))]
        assert packages and all("==" in w or w == "/app" for w in packages), words
    assert ("ENV", "RAY_AUTH_MODE=token") in steps
    users = [rest for kind, rest in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    copied = {rest.split()[-2] for kind, rest in steps if kind == "COPY" and rest.endswith(("/models", "/jobs", "/orchestrator"))}
    assert copied == {"models", "jobs", "orchestrator"}
