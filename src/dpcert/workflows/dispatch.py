"""Training the instances of a run: on which device, in which groups, by which backend.

The middle of the workflow layer: :func:`train_all` trains every instance whose unit file is
missing or damaged — in local processes (one per core on CPU, one driving the GPU) or as Ray
tasks — each group of instances as one stacked computation (:mod:`dpcert.learning.stacked`, the
linear model :mod:`dpcert.learning.linear`), and writes each unit as it finishes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError
from dpcert.store import remove_stale_temp_files
from dpcert.workflows.runconfig import RunConfig, load_run_data, read_unit, write_unit

#: A trained instance: its test scores (N, L) and its parameters (name -> float32 array).
Trained = tuple[np.ndarray, dict[str, np.ndarray]]


def train_group_models(cfg: RunConfig, instances: list[int], data,
                       on_step: Callable[[int], None] | None = None) -> list[Trained]:
    """Test scores and parameters of the given instances, trained as one stacked computation
    on the run's device (:mod:`dpcert.learning.stacked`; the linear model:
    :mod:`dpcert.learning.linear`).

    Pure: no files. ``data`` is a :class:`dpcert.learning.data.Dataset`; ``on_step(t)``
    reports progress."""
    import torch

    from dpcert.learning.inference import instance_params

    device = torch.device(cfg.device)
    x = torch.tensor(data.x_train, device=device)
    y = torch.tensor(data.y_train, device=device)
    x_test = torch.tensor(data.x_test, device=device)
    if cfg.model == "linear":
        from dpcert.learning.linear import predict_linear, train_linear

        lcfg = trainer_config(cfg, data)
        weight, bias = train_linear(lcfg, x, y, data.num_classes, seed=cfg.seed,
                                    instances=instances, progress=on_step)
        scores = predict_linear(weight, bias, x_test)
        params = instance_params({"weight": weight, "bias": bias})
    else:
        from dpcert.learning.stacked import predict_stacked, train_stacked

        dcfg, model_fn = _image_training(cfg, data)
        st = train_stacked(dcfg, model_fn, x, y, seed=cfg.seed, instances=instances,
                           progress=on_step)
        scores = predict_stacked(st, x_test)
        params = instance_params(st.params)
    return list(zip(scores, params, strict=True))


def train_group(cfg: RunConfig, instances: list[int], data,
                on_step: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Test scores (N, L) of the given instances (:func:`train_group_models` without the
    parameters)."""
    return [scores for scores, _ in train_group_models(cfg, instances, data, on_step)]


def write_trained(out: Path, trained: Trained, keep_model: bool) -> None:
    """One instance's files: its model first (when kept), then the unit that marks it done."""
    scores, params = trained
    if keep_model:
        from dpcert.store import atomic_save_tensors

        atomic_save_tensors(out.with_suffix(".safetensors"), params,
                            {"instance": out.stem.removeprefix("inst_")})
    write_unit(out, scores)


def run_record(cfg: RunConfig, data) -> MechanismRecord:
    """The mechanism record of the run ``cfg`` on ``data``: built here once from the run's
    configuration, saved as the run's ``mechanism.json``, and read by the engine that trains
    it (:func:`trainer_config`)."""
    return MechanismRecord.of(cfg, len(data.y_train))


def trainer_config(cfg: RunConfig, data):
    """What the engine that trains ``cfg``'s model runs: the linear engine's
    :class:`~dpcert.learning.linear.LinearDpSgd` or the stacked engine's
    :class:`~dpcert.learning.stacked.DpSgd`, its privacy settings read off the run's record
    (:func:`run_record`), so what is certified is what this trains."""
    record = run_record(cfg, data)
    if cfg.model == "linear":
        from dpcert.learning.linear import LinearDpSgd

        return LinearDpSgd.from_record(record, lr=cfg.lr, averaging=cfg.averaging,
                                       bias_feature=cfg.bias_feature,
                                       declared_size=data.declared_size)
    from dpcert.learning.stacked import DpSgd

    return DpSgd.from_record(record, lr=cfg.lr, optimizer=cfg.optimizer,
                             augment_shift=cfg.augment_shift,
                             augment_copies=cfg.augment_copies,
                             declared_size=data.declared_size)


def _image_training(cfg: RunConfig, data):
    """The stacked engine's DP-SGD configuration and model builder for a run of an image
    model."""
    from dpcert.learning.models import build_model

    in_channels = data.x_train.shape[1]
    return trainer_config(cfg, data), lambda: build_model(cfg.model, in_channels,
                                                          data.num_classes)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned training processes with one torch thread each: on CPUs one worker process per
    core beats intra-op threads (docs/benchmarks.md). Shared by run, compare, attack-check."""
    import multiprocessing as mp

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=_one_thread)


def _train_units(cfg_dict: dict, instances: list[int], outs: list[str], keep_models: bool,
                 on_step: Callable[[int], None] | None = None) -> list[int]:
    """Local backend: train a group of instances and write each one's files as it is ready."""
    cfg = RunConfig(**cfg_dict)
    data = load_run_data(cfg)
    for trained, out in zip(train_group_models(cfg, instances, data, on_step), outs,
                            strict=True):
        write_trained(Path(out), trained, keep_models)
    return instances


def _ray_group(cfg_dict: dict, instances: list[int], data) -> list[Trained]:
    """Ray task body: one worker thread (like a local worker process); scores and parameters
    returned."""
    _one_thread()
    return train_group_models(RunConfig(**cfg_dict), instances, data)


def ray_map(cfg: RunConfig, fn: Callable, jobs: list[tuple],
            on_result: Callable[[tuple, object], None], shared: object = None) -> None:
    """``fn(*job)`` for every job as a Ray task (one CPU each, ``gpu_fraction`` of a GPU on a
    CUDA run, retried up to 3 times if its worker dies), ``on_result(job, result)`` called in
    the driver as each returns — the one Ray path of every defence's training. ``shared``
    (e.g. the dataset), when given, goes into the object store once and is passed to every
    task as its last argument.

    The driver writes whatever the results hold, so workers need no shared filesystem, and a
    crashed driver loses only the tasks in flight (a rerun resumes). Without a cluster
    address, a private local cluster reachable on loopback only."""
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'dpcert[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, logging_level="WARNING")
            else:  # a private local cluster, reachable on loopback only
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                         logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot start or reach the Ray cluster: {err}") from None
    try:
        gpus = cfg.gpu_fraction if cfg.device == "cuda" else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=3)(fn)
        extra = () if shared is None else (ray.put(shared),)
        pending = {task.remote(*job, *extra): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            on_result(pending.pop(done[0]), ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()


def _train_ray(cfg: RunConfig, groups: list[list[int]], outs, bar, keep_models: bool
               ) -> None:
    """Ray backend of a DP run: one task per group, the dataset shipped once."""

    def written(job: tuple, trained: list[Trained]) -> None:
        group = job[1]
        for one, out in zip(trained, outs(group), strict=True):
            write_trained(Path(out), one, keep_models)
        bar.update(len(group))

    ray_map(cfg, _ray_group, [(asdict(cfg), g) for g in groups], written,
            shared=load_run_data(cfg))


def resolve_batch_instances(cfg: RunConfig, todo: int) -> int:
    """``batch_instances``, with ``auto`` resolved: the linear model 100 on CPU (measured,
    docs/benchmarks.md) and :func:`dpcert.learning.linear.instances_that_fit` on CUDA; image models
    :func:`dpcert.learning.stacked.instances_that_fit` on the run's device (1 on CPU, where one
    process per core is faster)."""
    if cfg.batch_instances != "auto":
        return cfg.batch_instances
    if cfg.device != "cuda":
        return min(todo, 100) if cfg.model == "linear" else 1
    import torch

    if cfg.model == "linear":
        from dpcert.learning.linear import instances_that_fit as linear_fit

        data = load_run_data(cfg)
        free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
        return min(todo, linear_fit(cfg.subset_size or len(data.y_train), data.x_train.shape[1],
                                    data.num_classes, cfg.sample_rate, free))

    from dpcert.learning.stacked import instances_that_fit

    data = load_run_data(cfg)
    device = torch.device(cfg.device)
    fit = instances_that_fit(*_image_training(cfg, data),
                             torch.tensor(data.x_train, device=device),
                             torch.tensor(data.y_train, device=device))
    return min(todo, fit)


def train_all(cfg: RunConfig, run_dir: Path, progress: bool = True) -> None:
    """Train every instance whose unit file (or, where the run keeps models, model file) is
    missing or damaged; others are kept."""
    from dpcert.workflows.ensemble import keeps_models, model_ok

    keep = keeps_models(run_dir)
    units = run_dir / "instances"
    units.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(units)
    from tqdm import tqdm

    todo = []
    # a finished run's thousands of units and models take a while to verify: show it
    for i in tqdm(range(cfg.instances), desc="checking instances", unit="inst", leave=False,
                  disable=not progress or not (units / "inst_000000.npz").exists()):
        path = units / f"inst_{i:06d}.npz"
        if read_unit(path) is None or (keep and not model_ok(run_dir, i)):
            path.unlink(missing_ok=True)
            todo.append(i)
    if not todo:
        return
    workers = cfg.workers or max(1, min(os.cpu_count() or 1, len(todo)))
    if cfg.device == "cuda":
        workers = 1  # one process drives the GPU; batch_instances fills it
    k = resolve_batch_instances(cfg, len(todo))

    bar = tqdm(total=cfg.instances, initial=cfg.instances - len(todo), desc="training instances",
               unit="inst", disable=not progress)
    cfg_dict = asdict(cfg)
    groups = [todo[i: i + k] for i in range(0, len(todo), k)]

    def outs(group: list[int]) -> list[str]:
        return [str(units / f"inst_{i:06d}.npz") for i in group]

    if cfg.backend == "ray":
        _train_ray(cfg, groups, outs, bar, keep)
    elif workers == 1:
        for group in groups:
            with tqdm(total=cfg.steps, desc=f"DP-SGD steps of {len(group)} instances",
                      unit="step", leave=False, disable=not progress) as steps:
                _train_units(cfg_dict, group, outs(group), keep, lambda _: steps.update())
            bar.update(len(group))
    else:
        with worker_pool(workers) as pool:
            futures = [pool.submit(_train_units, cfg_dict, g, outs(g), keep) for g in groups]
            for fut in as_completed(futures):
                bar.update(len(fut.result()))
    bar.close()


