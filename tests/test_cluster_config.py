"""cluster.yaml: valid for Ray's own launcher schema, and never opens the dashboard / job server."""

from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_against_rays_schema(config):
    validate_config(prepare_config(config))


def test_schema_check_is_real(config):
    config["available_node_types"]["head"]["resources"] = {"CPU": "none"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_image_matches_installed_ray(config):
    images = [config["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t
    ]
    version = ray.__version__
    assert all(img.startswith(f"rayproject/ray:{version}-") for img in images), images
    assert not any("ray-ml" in img for img in images)


def test_dashboard_and_job_server_are_not_public(config):
    ingress = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ingress] == [(22, 22)]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head
    assert all(
        "RAY_AUTH_MODE=token" in cmd for cmd in config["worker_start_ray_commands"] if "ray start" in cmd
    )


def test_node_types_cover_decode_and_gpus(config):
    types = config["available_node_types"]
    decode = [t for t in types.values() if t.get("labels", {}).get("timerefine.io/role") == "decode"]
    assert decode and all("gpu" not in t["node_config"]["InstanceType"] for t in decode)
    gpu_types = {
        t["node_config"]["InstanceType"].split(".")[0] for n, t in types.items() if n.startswith("gpu")
    }
    assert {"g5", "p4d"} <= gpu_types
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert all(
        0 <= t.get("min_workers", 0) <= t.get("max_workers", 0) for n, t in types.items() if n != "head"
    )


def test_every_node_keeps_its_idle_workers_as_a_local_job_does(config):
    # The same setting pipelines/compute.py gives a local Ray: without it each node restarts workers
    # between decode and write tasks.
    from pipelines.compute import IDLE_WORKERS_PER_CPU

    starts = [
        cmd
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for cmd in config[key]
        if "ray start" in cmd
    ]
    assert len(starts) == 2
    assert all(f"RAY_num_workers_soft_limit=$(({IDLE_WORKERS_PER_CPU} * $(nproc)))" in cmd for cmd in starts)
