from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).parents[1] / "ray_cluster.yaml"


def load():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_yaml_passes_rays_own_validation():
    config = prepare_config(load())
    validate_config(config)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1
    assert workers["max_workers"] > workers["min_workers"], "autoscaling must be able to grow the GPU pool"
    assert "GPU" not in config["available_node_types"][config["head_node_type"]]["resources"]
    assert any("arcflow" in cmd for cmd in config["setup_commands"])


def test_a_typo_fails_validation():
    config = load()
    config["available_node_types"]["gpu_worker"]["max_workerz"] = 4
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(config))
