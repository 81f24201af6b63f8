"""The cluster definitions users launch with: valid for the Ray autoscaler / KubeRay, and consistent."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import validate_config

ROOT = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_passes_the_autoscaler_schema():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(config)  # raises jsonschema.ValidationError on a bad field
    gpu_types = [name for name, node in config["available_node_types"].items() if node["resources"].get("GPU")]
    assert gpu_types, "the cluster needs GPU worker types"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0  # training never lands on the head
    assert sum(config["available_node_types"][name]["max_workers"] for name in gpu_types) >= config["max_workers"]
    assert any("ray==2.60.0" in cmd or "ray[default,train,tune,data]==2.60.0" in cmd for cmd in config["setup_commands"])


def test_ray_cluster_yaml_exposes_nothing_publicly_and_offers_spot_and_on_demand_gpus():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "mlflow server --host \"$(hostname -I" in head_start  # the private address: inside the VPC only
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in command for command in commands)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    gpu_nodes = {name: node for name, node in config["available_node_types"].items() if node["resources"].get("GPU")}
    spot = {name for name, node in gpu_nodes.items() if node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    assert spot and spot != set(gpu_nodes)  # both kinds
    for name, node in gpu_nodes.items():  # a custom resource says which kind a node is, for placing workers
        assert node["resources"].get("spot" if name in spot else "on_demand") == node["resources"]["GPU"], name


def test_kuberay_manifests_pin_the_same_ray_and_ask_for_gpus():
    for path in sorted((ROOT / "clusters").glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if document.get("apiVersion") != "ray.io/v1":
            continue
        spec = document["spec"].get("rayClusterSpec", document["spec"])
        assert spec["rayVersion"] == "2.60.0", path.name
        workers = spec["workerGroupSpecs"]
        limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, path.name
        if document["kind"] == "RayJob":
            assert document["spec"]["entrypoint"].startswith("python jobs/pretrain.py --config configs/")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme
