"""Structure checks for infra/: the image and the cluster definitions agree with each other and the package.

Nothing here builds the image or reaches Kubernetes or AWS (infra/README.md lists what goes
unexercised); Ray's own KubeRay conversion and cluster-config validation stand in for them.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
LAUNCHER = INFRA / "aws" / "cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"

# Where the Dockerfile puts the repository's jobs/ directory.
IMAGE_JOBS_DIR = "/app/jobs/"
GPU_RESOURCE = "nvidia.com/gpu"
AWS_CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path} does not hold one YAML mapping"
    return document


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return load_yaml(RAYCLUSTER)


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(RAYJOB)


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return load_yaml(LAUNCHER)


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# --- Dockerfile parsing --------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, with comments dropped and continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        keyword, _, arguments = line.strip().partition(" ")
        if keyword:
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def global_build_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """ARG defaults declared before the first FROM: the only ones a FROM line can use."""
    build_args = {}
    for keyword, arguments in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in arguments:
            name, _, default = arguments.partition("=")
            build_args[name.strip()] = default.strip().strip("\"'")
    return build_args


def substitute(value: str, build_args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: build_args.get(match.group(1), match.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def base_image(instructions: list[tuple[str, str]]) -> str:
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert len(froms) == 1, f"expected one build stage, found FROM lines {froms}"
    return substitute(froms[0].split()[0], global_build_args(instructions))


def pip_install_commands(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """Every `pip install` command in the RUN lines, as argument lists after `install`."""
    commands = []
    for keyword, arguments in instructions:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", arguments):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if words[i] == "pip" and words[i + 1] == "install":
                    commands.append(words[i + 2 :])
    return commands


def test_dockerfile_parser_joins_continuations_and_drops_comments():
    text = "# c\nARG V=1\nFROM img:${V}-gpu\n# c\nRUN a \\\n    && pip install -c x /app\n"
    instructions = dockerfile_instructions(text)
    assert instructions == [("ARG", "V=1"), ("FROM", "img:${V}-gpu"), ("RUN", "a      && pip install -c x /app")]
    assert base_image(instructions) == "img:1-gpu"
    assert pip_install_commands(instructions) == [["-c", "x", "/app"]]


# --- every file ----------------------------------------------------------------------------


def test_every_infra_yaml_parses():
    found = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {RAYCLUSTER, RAYJOB, LAUNCHER} <= set(found)
    for path in found:
        load_yaml(path)


# --- KubeRay -------------------------------------------------------------------------------


def cluster_specs(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"RayCluster": raycluster["spec"], "RayJob": rayjob["spec"]["rayClusterSpec"]}


def group_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize(("path", "kind"), [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")])
def test_kuberay_object_identity(path, kind):
    document = load_yaml(path)
    assert document["apiVersion"] == "ray.io/v1"
    assert document["kind"] == kind
    assert document["metadata"]["name"]


def test_rayjob_runs_the_same_cluster_as_raycluster(raycluster, rayjob):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_kuberay_head_is_cpu_only_with_dashboard(raycluster, rayjob, owner):
    head = cluster_specs(raycluster, rayjob)[owner]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    container = head["template"]["spec"]["containers"][0]
    assert container["image"]
    assert 8265 in {port["containerPort"] for port in container["ports"]}
    for section in ("requests", "limits"):
        assert GPU_RESOURCE not in container["resources"][section]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_kuberay_gpu_workers_autoscale(raycluster, rayjob, owner):
    spec = cluster_specs(raycluster, rayjob)[owner]
    assert spec["enableInTreeAutoscaling"] is True
    workers = spec["workerGroupSpecs"]
    assert workers, "no worker group"
    for group in workers:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
    gpu_groups = [
        group
        for group in workers
        if int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU_RESOURCE, 0)) >= 1
    ]
    assert gpu_groups, f"no worker group has a {GPU_RESOURCE} limit"
    assert max(group["maxReplicas"] for group in gpu_groups) >= 1


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_kuberay_containers_have_resources_and_s3_settings_from_a_secret(raycluster, rayjob, owner):
    for container in group_containers(cluster_specs(raycluster, rayjob)[owner]):
        assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
        secret_refs = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
        assert secret_refs, f"{container['name']} takes no settings from a Secret"


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_ray_autoscaler_reads_the_cluster_as_intended(raycluster, rayjob, launcher, owner):
    """Ray's KubeRay autoscaler turns the spec into node types; its scaling decisions rest on them."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _HEAD_GROUP_NAME,
        _derive_autoscaling_config_from_ray_cr,
    )

    spec = cluster_specs(raycluster, rayjob)[owner]
    config = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "batchgen", "namespace": "default"}, "spec": spec}
    )
    node_types = config["available_node_types"]
    assert node_types[_HEAD_GROUP_NAME]["resources"]["GPU"] == 0
    for group in spec["workerGroupSpecs"]:
        node_type = node_types[group["groupName"]]
        assert node_type["resources"].get("GPU", 0) >= 1
        assert node_type["max_workers"] == group["maxReplicas"]
    assert config["max_workers"] >= 1
    assert config["idle_timeout_minutes"] == launcher["idle_timeout_minutes"], "KubeRay and EC2 idle timeouts differ"


def test_rayjob_tears_its_cluster_down(rayjob):
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] >= 0


def test_rayjob_entrypoint_runs_a_job_spec_from_the_repository(rayjob, pyproject, dockerfile):
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint.startswith("batchgen ")
    argv = shlex.split(entrypoint)
    assert argv[0] in pyproject["project"]["scripts"]
    assert argv[1] == "run"
    spec_in_image = argv[2]
    assert spec_in_image.startswith(IMAGE_JOBS_DIR), spec_in_image
    copies = [arguments.split()[-2:] for keyword, arguments in dockerfile if keyword == "COPY"]
    assert ["jobs/", IMAGE_JOBS_DIR] in copies, "the image does not put jobs/ where the RayJob looks"
    spec_in_repo = REPO / "jobs" / spec_in_image.removeprefix(IMAGE_JOBS_DIR)
    assert spec_in_repo.is_file(), f"the RayJob runs {spec_in_image} but {spec_in_repo} does not exist"


# --- AWS cluster launcher ------------------------------------------------------------------


def gpu_worker_types(launcher: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in launcher["available_node_types"].items()
        if name != launcher["head_node_type"] and node_type["resources"].get("GPU", 0) >= 1
    }


def test_launcher_shape(launcher):
    assert launcher["cluster_name"]
    assert launcher["provider"]["type"] == "aws"
    assert launcher["provider"]["region"]
    assert launcher["head_node_type"] in launcher["available_node_types"]
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    gpu_workers = gpu_worker_types(launcher)
    assert gpu_workers, "no worker node type with resources.GPU >= 1"
    for node_type in gpu_workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert launcher["max_workers"] >= max(node_type["max_workers"] for node_type in gpu_workers.values()) >= 1


def test_launcher_nodes_get_s3_access_from_instance_profiles(launcher):
    for name, node_type in launcher["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name} has no IamInstanceProfile"


def test_launcher_docker_gives_gpus_to_workers_only(launcher):
    docker = launcher["docker"]
    head_options = docker.get("run_options", []) + docker.get("head_run_options", [])
    worker_options = docker.get("run_options", []) + docker.get("worker_run_options", [])
    assert "--gpus all" in worker_options
    assert "--gpus all" not in head_options, "the head is a CPU instance; --gpus all stops its container"


def test_launcher_clears_the_image_entrypoint(launcher, dockerfile):
    """The launcher runs `docker run ... IMAGE bash`: the image's ENTRYPOINT would swallow `bash`."""
    assert any(keyword == "ENTRYPOINT" for keyword, _ in dockerfile)
    options = shlex.split(" ".join(launcher["docker"]["run_options"]))
    assert "--entrypoint" in options and options[options.index("--entrypoint") + 1] == ""


def test_launcher_config_passes_rays_own_validation(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


# --- the image and its versions ------------------------------------------------------------


def test_image_is_identical_everywhere_and_tagged_with_the_package_version(raycluster, rayjob, launcher, pyproject):
    images = {
        container["image"]
        for spec in cluster_specs(raycluster, rayjob).values()
        for container in group_containers(spec)
    }
    docker = launcher["docker"]
    images |= {docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
    assert len(images) == 1, f"different images in infra/: {sorted(images)}"
    (image,) = images
    assert image.rsplit(":", 1)[1] == pyproject["project"]["version"]


def test_ray_version_is_the_same_in_specs_image_and_tests(raycluster, rayjob, dockerfile):
    installed = ray.__version__
    for owner, spec in cluster_specs(raycluster, rayjob).items():
        assert spec["rayVersion"] == installed, f"{owner} rayVersion {spec['rayVersion']} != ray {installed}"
    build_args = global_build_args(dockerfile)
    assert build_args["RAY_VERSION"] == installed
    assert base_image(dockerfile).startswith(f"rayproject/ray:{installed}-")
    install_runs = [
        substitute(arguments, build_args)
        for keyword, arguments in dockerfile
        if keyword == "RUN" and "pip install" in arguments
    ]
    assert any(f"ray=={installed}" in run and " -c " in run for run in install_runs), (
        "`pip install` does not pin Ray: it may replace the base image's Ray"
    )


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_base_is_a_cuda_image_with_a_supported_python(dockerfile, pyproject):
    image = base_image(dockerfile)
    assert re.search(r"cuda|gpu", image), f"base image {image} is not a CUDA/GPU image"
    python = re.search(r"py3(\d+)", image)
    assert python, f"base image {image} does not name its Python"
    assert f"3.{python.group(1)}" in SpecifierSet(pyproject["project"]["requires-python"])


def test_dockerfile_installs_the_copied_project(dockerfile):
    copied = {}
    for keyword, arguments in dockerfile:
        if keyword == "COPY":
            *sources, destination = [word for word in arguments.split() if not word.startswith("--")]
            for source in sources:
                copied[source] = destination
    for needed in ("pyproject.toml", "README.md", "batchgen/", "jobs/"):
        assert copied.get(needed, "").startswith("/app/"), f"{needed} is not copied under /app/"
    installs = pip_install_commands(dockerfile)
    assert installs, "no `pip install` in any RUN line"
    targets = [word for words in installs for word in words if not word.startswith("-")]
    assert any(target.rstrip("/").split("[")[0] == "/app" for target in targets), installs
    assert "batchgen" not in targets, "installs batchgen from the registry, not the copied project"
    assert not any("cpu.txt" in word for words in installs for word in words), "GPU image uses the CPU pin"


def test_dockerfile_entrypoint_is_the_console_script(dockerfile, pyproject):
    entrypoints = [arguments for keyword, arguments in dockerfile if keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["batchgen"]
    assert pyproject["project"]["scripts"]["batchgen"] == "batchgen.cli:main"


def image_env(dockerfile: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, arguments in dockerfile:
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(arguments) if "=" in word)
    return env


def test_dockerfile_sets_the_worker_env(dockerfile):
    from batchgen.pipeline import WORKER_ENV

    env = image_env(dockerfile)
    assert env == {**env, **WORKER_ENV}, f"the image's ENV {env} differs from batchgen.pipeline.WORKER_ENV"


def test_every_node_keeps_a_worker_per_light_task(dockerfile, raycluster, launcher):
    """The image's raylet setting covers what batchgen gives a Ray it starts itself, on every node in infra/."""
    from batchgen.pipeline import node_config

    def kubernetes_cpus(quantity: str) -> float:
        return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)

    cpus = [node["resources"]["CPU"] for node in launcher["available_node_types"].values()]
    cpus += [kubernetes_cpus(str(c["resources"]["limits"]["cpu"])) for c in group_containers(raycluster["spec"])]
    assert len(cpus) >= 4, cpus
    limit = int(image_env(dockerfile)["RAY_num_workers_soft_limit"])
    for n in cpus:
        assert limit >= node_config(math.ceil(n))["num_workers_soft_limit"], f"a {n}-CPU node needs more than {limit}"


def test_dockerfile_runs_as_non_root(dockerfile):
    users = [arguments for keyword, arguments in dockerfile if keyword == "USER"]
    assert users, "no USER: the image would run as its base image's user, unchecked"
    assert users[-1].split(":")[0] not in {"root", "0"}


# --- secrets -------------------------------------------------------------------------------

ACCESS_KEY_ID = re.compile(r"AKIA[0-9A-Z]{16}")
SECRET_ASSIGNMENT = re.compile(r"aws_secret_access_key\s*[:=]\s*[\"']?([^\s\"']+)", re.IGNORECASE)


def secret_like(text: str) -> list[str]:
    """Key-shaped strings: access key ids, and secret keys assigned a literal, not a $reference."""
    found = ACCESS_KEY_ID.findall(text)
    found += [value for value in SECRET_ASSIGNMENT.findall(text) if not value.startswith(("$", "<"))]
    return found


def test_secret_scan_tells_literals_from_references():
    fake_id = "AKIA" + "Q" * 16
    assert secret_like(f"id: {fake_id}") == [fake_id]
    assert secret_like("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG") == ["wJalrXUtnFEMI/K7MDENG"]
    assert secret_like('AWS_SECRET_ACCESS_KEY: "hunter2"') == ["hunter2"]
    assert secret_like('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"') == []
    assert secret_like("aws_secret_access_key=<your key>") == []


def test_no_secret_in_infra():
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        assert secret_like(path.read_text()) == [], f"{path} contains what looks like an AWS secret"


def env_entries(node: Any):
    if isinstance(node, dict):
        if "name" in node and ("value" in node or "valueFrom" in node):
            yield node
        for child in node.values():
            yield from env_entries(child)
    elif isinstance(node, list):
        for child in node:
            yield from env_entries(child)


def test_no_literal_aws_credentials_in_manifests():
    for path in (RAYCLUSTER, RAYJOB, LAUNCHER):
        for entry in env_entries(load_yaml(path)):
            if entry["name"] in AWS_CREDENTIAL_VARS:
                assert "value" not in entry, f"{path}: {entry['name']} has a literal value; use secretKeyRef"
