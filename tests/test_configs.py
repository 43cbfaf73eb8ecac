"""The shipped YAML configs parse into valid run configurations."""

from pathlib import Path

import pytest

from dpcert.workflows.run import RunConfig, load_config_file

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*_sigma*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    """The paper's public-code mechanism, with LeNet-5 or with the best learner."""
    cfg = RunConfig.from_mapping(load_config_file(path))
    assert cfg.instances == 1000 and cfg.sample_rate == 0.001 and cfg.steps == 1000
    assert cfg.subset_size is None and cfg.data_dir == f"data/{cfg.dataset}"
    if path.stem.endswith("_best"):
        assert cfg.model == "linear" and cfg.features == "scatter"
        assert cfg.noise_multiplier == 3.0
    else:
        assert cfg.model == "lenet5"


def test_there_are_paper_configs():
    assert len([p for p in CONFIGS if not p.stem.endswith("_best")]) == 6
    assert {p.stem for p in CONFIGS if p.stem.endswith("_best")} == {
        "fashion-mnist_sigma3_best", "mnist_sigma3_best"}


@pytest.mark.parametrize("name", ["compare_digits.yaml", "compare_mnist_reduced.yaml",
                                  "compare_fashion_reduced.yaml"])
def test_compare_config_is_valid(name):
    from dpcert.workflows.compare import CompareConfig

    path = Path(__file__).parent.parent / "configs" / name
    cfg = CompareConfig.from_mapping(load_config_file(path))
    assert cfg.methods == ("dp", "dpa", "fa", "bagging")


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_best_learner_compare_config_names_its_run(dataset):
    """It reuses the DP run of the best-learner config (dp_run) and so cannot be parsed before
    that run exists; its baselines and options are checked here without it."""
    from dpcert.workflows.compare import BASELINES
    from dpcert.workflows.setting import parse_settings

    name = dataset.split("-")[0]
    data = load_config_file(Path(__file__).parent.parent / "configs" /
                            f"compare_{name}_best.yaml")
    assert data["dp_run"] == f"runs/{dataset}_sigma3_best"
    assert data["methods"] == ["dp", "dpa", "roe", "fa", "bagging"]
    for kind in data["methods"][1:]:
        assert kind in BASELINES and parse_settings(kind, data[kind])


@pytest.mark.parametrize("name", ["compare_mnist_tuned.yaml", "compare_fashion_tuned.yaml"])
def test_tuned_compare_configs_are_valid(name):
    """The head-to-heads of docs/results.md: they parse, tune on a validation split carved
    from the training set, and list DPA over kernel ridge regression at the k the docs
    report."""
    from dpcert.workflows.compare import CompareConfig

    cfg = CompareConfig.from_mapping(load_config_file(
        Path(__file__).parent.parent / "configs" / name))
    assert cfg.validation == 10000 and cfg.tune_radius == 600
    assert cfg.methods[0] == "dp" and cfg.dp_grid
    kernel = {bc.models for bc in cfg.settings["dpa"] if bc.learner == "kernel-ridge"}
    mnist = name.startswith("compare_mnist")
    expected = {600, 800, 1200, 2000, 3000} if mnist else {500, 1000, 2000}
    assert kernel == expected
