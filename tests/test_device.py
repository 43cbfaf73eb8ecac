"""Every tensor of training lives where it is put on purpose: a CPU stand-in for GPU runs.

On a GPU run, a tensor created without ``device=`` lands on the host and either crashes the
step (weights on the CPU, data on the GPU) or silently moves the work to the CPU — both were
measured on an H200 before the engine existed. CI has no GPU, so these tests make the default
device "meta" (no data; mixing it with a CPU tensor raises) and train on the CPU: any tensor
the code creates without naming its device becomes a meta tensor and fails the run, exactly
where it would have landed on the wrong device on a GPU machine. Some CPU kernels accept a
meta operand without complaint, so a dispatch mode also stops every operation whose result is
a meta tensor, at the line that made it.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpcert.learning import linear, stacked
from dpcert.learning.data import Dataset
from dpcert.learning.models import build_model
from dpcert.workflows.dispatch import train_group
from dpcert.workflows.runconfig import RunConfig


class _NoMetaResults(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves(out)):
            raise RuntimeError(f"{func} made a tensor on the default (meta) device")
        return out


@pytest.fixture
def meta_default():
    torch.set_default_device("meta")
    try:
        with _NoMetaResults():
            yield
    finally:
        torch.set_default_device(None)


def _images(side: int, n: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, side, side, generator=gen, device="cpu")
    return x, torch.randint(0, 10, (n,), generator=gen, device="cpu")


def _careless_step(x: torch.Tensor) -> torch.Tensor:
    return x @ torch.eye(x.shape[1])  # no device=: lands on the default device


def test_the_guard_catches_a_tensor_created_without_its_device(meta_default):
    x = torch.ones(3, 4, device="cpu")
    with pytest.raises(RuntimeError, match="meta"):
        _careless_step(x)


def _gn_model() -> nn.Module:  # takes the nested-vmap path
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10))


STACKED_CASES = {
    "digits_cnn": (lambda: build_model("digits_cnn", 1, 10), 8, {}),
    "lenet5_adam_subset": (lambda: build_model("lenet5", 1, 10), 28,
                           dict(optimizer="adam", subset_size=100)),
    "digits_cnn_augmented": (lambda: build_model("digits_cnn", 1, 10), 8,
                             dict(augment_shift=1, augment_copies=2)),
    "groupnorm_vmap": (_gn_model, 8, {}),
}


def _stacked_scores(case: str) -> np.ndarray:
    model_fn, side, extra = STACKED_CASES[case]
    x, y = _images(side)
    cfg = stacked.DpSgd(**{**dict(sample_rate=0.05, noise_multiplier=1.0, steps=3,
                                  clip_norm=1.0, lr=0.1), **extra}, declared_size=len(y))
    st = stacked.train_stacked(cfg, model_fn, x, y, seed=4, instances=[0, 3])
    return stacked.predict_stacked(st, x[:12])


@pytest.mark.parametrize("case", list(STACKED_CASES))
def test_stacked_engine_keeps_every_tensor_on_the_run_device(case, meta_default):
    scores = _stacked_scores(case)
    torch.set_default_device(None)
    # and the caller's default device does not change the instances (initial weights are
    # drawn by the host generator whatever the default device)
    np.testing.assert_array_equal(scores, _stacked_scores(case))


@pytest.mark.parametrize(("subset", "averaging"), [(None, None), (100, "tail")])
def test_linear_engine_keeps_every_tensor_on_the_run_device(subset, averaging, meta_default):
    x, y = _images(8)
    cfg = linear.LinearDpSgd(0.05, 1.0, 3, 1.0, 0.1, subset, averaging, declared_size=len(y))
    w, b = linear.train_linear(cfg, x.flatten(1), y, 10, seed=1, instances=[0, 2])
    scores = linear.predict_linear(w, b, x[:12].flatten(1))
    assert np.isfinite(np.asarray(scores)).all()


@pytest.mark.parametrize("model", ["digits_cnn", "linear"])
def test_a_run_trains_on_its_device(model, meta_default):
    """The workflow's entry (also what attack-check retrains with), numpy in, numpy out."""
    x, y = _images(8, n=200)
    if model == "linear":
        x = x.flatten(1)
    data = Dataset("digits", x[:160].numpy(), y[:160].numpy(), x[160:].numpy(), y[160:].numpy(),
                   num_classes=10, declared_size=160)
    cfg = RunConfig(model=model, instances=2, steps=3, sample_rate=0.05,
                    **(dict(features="scatter", optimizer="sgd") if model == "linear" else {}))
    scores = train_group(cfg, [0, 1], data)
    assert len(scores) == 2 and scores[0].shape == (40, 10)


def test_library_entry_point_keeps_every_tensor_on_the_run_device(meta_default):
    x, y = _images(8, n=120)
    scores, _ = stacked.train_ensemble(
        lambda: build_model("digits_cnn", 1, 10), x.numpy(), y.numpy(), x[:5].numpy(),
        instances=2, sample_rate=0.05, noise_multiplier=1.0, steps=2, clip_norm=1.0,
        declared_size=len(y))
    assert scores.shape == (2, 5, 10)


def test_reference_and_baseline_training_keep_their_tensors_placed(meta_default):
    from dpcert.learning.reference import (
        TrainConfig,
        instance_generator,
        predict_scores,
        train_instance,
        train_plain,
    )

    x, y = _images(8, n=120)
    cfg = TrainConfig(0.05, 1.0, 2, 1.0, 0.1, model="digits_cnn", subset_size=100,
                      declared_size=len(y))
    train_instance(cfg, x, y, 10, seed=0, instance=1)
    model = train_plain("digits_cnn", x, y, 10, epochs=1, batch_size=32, lr=0.1,
                        optimizer="sgd", gen=instance_generator(0, 0))
    assert predict_scores(model, x[:7]).shape == (7, 10)


def test_compare_trains_a_baseline_model_on_its_device(tmp_path, meta_default):
    from dpcert.workflows.partition import _train_units
    from dpcert.workflows.runconfig import read_unit
    from dpcert.workflows.setting import BaselineConfig

    run_cfg = RunConfig(model="digits_cnn")
    bc = BaselineConfig(epochs=1)
    out = tmp_path / "model.npz"
    assert _train_units(asdict(run_cfg), asdict(bc), "bagging", [(0, None, str(out))]) == [0]
    assert read_unit(out) is not None


def test_training_leaves_the_callers_random_state_alone():
    from dpcert.learning.reference import instance_generator, train_plain

    torch.manual_seed(123)
    before = torch.get_rng_state()
    x, y = _images(8, n=60)
    stacked.train_stacked(stacked.DpSgd(0.05, 1.0, 2, 1.0, 0.1, declared_size=len(y)),
                          lambda: build_model("digits_cnn", 1, 10), x, y, seed=0, instances=[0])
    train_plain("digits_cnn", x, y, 10, epochs=1, batch_size=32, lr=0.1, optimizer="sgd",
                gen=instance_generator(0, 0))
    stacked.train_ensemble(lambda: build_model("digits_cnn", 1, 10), x.numpy(), y.numpy(),
                           x[:3].numpy(), instances=1, sample_rate=0.05, noise_multiplier=1.0,
                           steps=1, clip_norm=1.0, declared_size=len(y))
    assert torch.equal(torch.get_rng_state(), before)


def test_partition_models_train_under_deterministic_cudnn_and_restore_the_settings(
        monkeypatch):
    """A baseline model must be a fixed function of its examples: its training steps run with
    cuDNN's deterministic algorithms and no benchmarking, whatever the caller had set, and the
    caller's settings come back afterwards (also when training fails)."""
    import dpcert.learning.reference as reference

    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
            return super().forward(x)

    monkeypatch.setattr(reference, "_seeded_model", lambda name, d, n_labels, gen:
                        Probe(d, n_labels))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    reference.train_plain("linear", x, y, 3, epochs=2, batch_size=16, lr=0.1, optimizer="sgd",
                          gen=reference.instance_generator(0, 0))
    assert seen and set(seen) == {(True, False)}
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    with pytest.raises((IndexError, RuntimeError)):  # a label out of range
        reference.train_plain("linear", x, y + 5, 3, epochs=1, batch_size=16, lr=0.1,
                              optimizer="sgd", gen=reference.instance_generator(0, 0))
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)


class _CountingMemory:
    """Stands in for the CUDA allocator: between start() and peak() it adds up the bytes of
    every tensor an operation returns — more than the true peak, and growing with it."""

    def __init__(self, free: int) -> None:
        self._free, self.made, self._mode = free, 0, None

    def start(self) -> int:
        outer = self

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.made += sum(t.numel() * t.element_size() for t in tree_leaves(out)
                                  if isinstance(t, torch.Tensor))
                return out

        self._mode = Count()
        self._mode.__enter__()
        return 0

    def peak(self) -> int:
        self._mode.__exit__(None, None, None)
        return self.made

    def free(self) -> int:
        return self._free


@pytest.mark.parametrize("case", list(STACKED_CASES))
def test_the_gpu_memory_probe_runs_on_every_model_family(case, meta_default):
    """``--batch-instances auto`` on CUDA runs one probe step: that branch, never taken on a
    CPU, runs here against a counting allocator (on the run's device, under the guard)."""
    model_fn, side, extra = STACKED_CASES[case]
    x, y = _images(side, n=2000)
    cfg = stacked.DpSgd(**{**dict(sample_rate=0.01, noise_multiplier=1.0, steps=3,
                                  clip_norm=1.0, lr=0.1), **extra})
    memory = _CountingMemory(free=2**30)
    k = stacked.instances_that_fit(cfg, model_fn, x, y, memory=memory)
    per = memory.made / 8  # at least the probe's bytes per instance (probe = 8)
    assert memory.made > 0 and 1 <= k <= 1000
    assert k * per <= 0.5 * 2**30 < (k + 1) * (per + 3 * 4 * sum(
        p.numel() for p in _on_cpu(model_fn).parameters()))


def _on_cpu(model_fn):
    with torch.device("cpu"):
        return model_fn()


def test_the_gpu_memory_probe_gives_fewer_instances_for_bigger_batches_and_less_memory():
    model_fn, side, _ = STACKED_CASES["digits_cnn"]
    x, y = _images(side, n=4000)

    def fit(q: float, free: int) -> int:
        cfg = stacked.DpSgd(sample_rate=q, noise_multiplier=1.0, steps=1, clip_norm=1.0, lr=0.1)
        return stacked.instances_that_fit(cfg, model_fn, x, y, memory=_CountingMemory(free))

    assert fit(0.05, 2**30) < fit(0.005, 2**30)
    assert fit(0.005, 2**28) < fit(0.005, 2**30)
    assert fit(0.005, 10**15) == 1000  # capped
    assert fit(0.005, 1) == 1  # never zero
    assert stacked.instances_that_fit(  # no allocator given and not CUDA: one per process
        stacked.DpSgd(0.005, 1.0, 1, 1.0, 0.1), model_fn, x, y) == 1


def test_auto_batch_for_the_linear_model_on_cuda_reads_the_free_memory(monkeypatch):
    from dpcert.workflows.dispatch import resolve_batch_instances
    from dpcert.workflows.runconfig import load_run_data

    cfg = RunConfig(dataset="digits", model="linear", features="scatter", optimizer="sgd",
                    batch_instances="auto", device="cuda", sample_rate=0.01)
    asked = []

    def mem_get_info(device):
        asked.append(torch.device(device))
        return 2**26, 2**34

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    data = load_run_data(cfg)
    want = linear.instances_that_fit(len(data.y_train), data.x_train.shape[1],
                                     data.num_classes, 0.01, 2**26)
    assert 1 < want < 300  # 64 MiB: the answer is set by the memory, not by a cap
    assert resolve_batch_instances(cfg, 1000) == want
    assert resolve_batch_instances(cfg, 2) == 2
    assert asked[0].type == "cuda"
