"""The shipped YAML configs parse into valid run configurations."""

from pathlib import Path

import pytest

from dpcert.run import RunConfig, load_config_file

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*_sigma*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    cfg = RunConfig.from_mapping(load_config_file(path))
    assert cfg.instances == 1000 and cfg.sample_rate == 0.001 and cfg.steps == 1000
    assert cfg.model == "lenet5"


def test_there_are_paper_configs():
    assert len(CONFIGS) == 6


@pytest.mark.parametrize("name", ["compare_digits.yaml", "compare_mnist_reduced.yaml",
                                  "compare_fashion_reduced.yaml"])
def test_compare_config_is_valid(name):
    from dpcert.compare import CompareConfig

    path = Path(__file__).parent.parent / "configs" / name
    cfg = CompareConfig.from_mapping(load_config_file(path))
    assert cfg.methods == ("dp", "dpa", "fa", "bagging")
