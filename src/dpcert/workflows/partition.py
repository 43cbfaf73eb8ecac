"""The models of a partition defence or Bagging: which examples each model trains on (a hash
of each example's own content; Bagging's bags drawn from the model's seed), training them in
worker processes or on Ray, their kept files in a baseline folder, and their certificates.

Each trained model's test scores are a checksummed unit file, written atomically and reused
on rerun, and its parameters are kept beside it (``model_NNNNNN.safetensors``; the folder's
``ensemble.json`` says which certificate they take), so ``dpcert.load_ensemble(folder)``
certifies new inputs with the defence's own certificate. A folder refuses other training
values.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np

import dpcert
from dpcert.certification import baselines
from dpcert.certification.aggregation import (
    baseline_certificate,
)
from dpcert.certification.certify import Certificates
from dpcert.errors import UserError
from dpcert.store import atomic_write_text, load_tensors
from dpcert.workflows import rundir, white_box
from dpcert.workflows.dispatch import Trained, ray_map, worker_pool, write_trained
from dpcert.workflows.ensemble import (
    CERTIFICATION_FILE,
    EnsembleInfo,
    check_declared_inputs,
    check_same_data,
    keeps_models,
    read_info,
    write_info,
)
from dpcert.workflows.runconfig import RunConfig, load_run_data, read_unit
from dpcert.workflows.setting import (
    FREE_LEARNERS,
    PROTOTYPES,
    BaselineConfig,
    trained_as,
)

#: Offset of the baselines' master seed, so that their streams differ from the DP instances'.
_SEED_OFFSET = 7919


def _digests(x: np.ndarray) -> list[bytes]:
    """sha256 of every example's own content (its bytes as the reader gave them)."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return [hashlib.sha256(row.tobytes()).digest() for row in flat]


def hash_partition(x: np.ndarray, parts: int) -> np.ndarray:
    """Part of every example from a hash of its own content (shape (n,), values 0..parts-1)."""
    return np.array([int.from_bytes(d[:8], "big") % parts for d in _digests(x)],
                    dtype=np.int64)


def training_indices(kind: str, bc: BaselineConfig, x_train: np.ndarray,
                     y_train: np.ndarray | None = None) -> list | None:
    """Training-example indices of every model (dpa, fa), or None (bagging draws in the worker).

    FA: example with bucket h trains models (h + s) mod kd, so model j sees the buckets
    (j - s) mod kd. Each model's examples are listed in the order of their content (their
    sha256, then their label for identical inputs; ``y_train`` omitted: the inputs alone),
    never of the dataset file: a model is a function of its part as a set, so reordering
    the training set changes no model, and a learner trained by gradient, which sees its
    examples in this order, cannot be moved by it."""
    if kind == "bagging":
        return None
    kd = bc.trained_models(kind)
    digests = _digests(x_train)
    buckets = np.array([int.from_bytes(d[:8], "big") % kd for d in digests], dtype=np.int64)
    labels = [0] * len(digests) if y_train is None else [int(v) for v in y_train]
    order = sorted(range(len(digests)), key=lambda i: (digests[i], labels[i]))
    rank = np.empty(len(digests), np.int64)
    rank[order] = np.arange(len(digests))
    shifts = (baselines.fa_shifts(kd, bc.spread) if trained_as(kind) == "fa"
              else np.zeros(1, np.int64))
    parts = [np.flatnonzero(np.isin(buckets, (j - shifts) % kd)) for j in range(kd)]
    return [idx[np.argsort(rank[idx], kind="stable")] for idx in parts]


def _train_units(run_cfg: dict, bc: dict, kind: str,
                 jobs: list[tuple[int, np.ndarray | None, str]], keep_model: bool = True
                 ) -> list[int]:
    """Train baseline models ``jobs`` = [(i, example indices or None, unit path)] and write
    their files (a local worker process)."""
    for (_, _, out), trained in zip(jobs, _fit_units(run_cfg, bc, kind, jobs), strict=True):
        write_trained(Path(out), trained, keep_model)
    return [i for i, _, _ in jobs]


def model_examples(cfg: RunConfig, setting: BaselineConfig, i: int, idx: np.ndarray | None,
                   n_train: int):
    """(training-example indices, generator) of baseline model ``i``: its part ``idx``, or
    (bagging, ``idx`` None) its bag of ``setting.subsample`` draws from ``n_train`` examples,
    drawn from the model's generator, which then drives its training."""
    import torch

    from dpcert.learning.reference import instance_generator

    gen = instance_generator(cfg.seed + _SEED_OFFSET, i)
    if idx is None:
        idx = torch.randint(0, n_train, (setting.subsample,), generator=gen,
                            device=gen.device).numpy()
    return idx, gen


def _fit_units(run_cfg: dict, bc: dict, kind: str,
               jobs: list[tuple[int, np.ndarray | None, str]], data=None) -> list[Trained]:
    """(test scores, parameters) of baseline models ``jobs`` = [(i, example indices or None,
    unit path)]; pure, no files (a local worker or a Ray task). The learners fitted in closed
    form score all their models in one stacked call (the test features are read once, not
    once per model); each model is kept with exactly its own examples' rows, so that its
    file is a function of its part alone (the stacked call pads them, which changes no
    score: :func:`dpcert.learning.inference.stack_params`). ``data``: the dataset to train
    and score on [default: the run's] (``dpcert attack-check`` passes a poisoned one)."""
    import torch

    from dpcert.learning.inference import score_instances, stack_params

    cfg, setting = RunConfig(**run_cfg), BaselineConfig(**bc)
    data = load_run_data(cfg) if data is None else data
    parts, gens = [], []
    for i, idx, _ in jobs:
        idx, gen = model_examples(cfg, setting, i, idx, len(data.y_train))
        parts.append(idx)
        gens.append(gen)
    if setting.learner not in FREE_LEARNERS:
        return [_train_one(cfg, setting, data, idx, gen)
                for idx, gen in zip(parts, gens, strict=True)]
    x_train, x_test = vectors(data.x_train), vectors(data.x_test)
    params = [_fit_free(setting, x_train, data.y_train, data.num_classes, idx) for idx in parts]
    family = learner_model(setting, "linear")
    stacked = {k: torch.from_numpy(v) for k, v in stack_params(params).items()}
    # scored by the same routine that scores the kept models later (same rounding)
    scores = score_instances(family, stacked, torch.from_numpy(x_test),
                             in_channels=x_train.shape[1], num_classes=data.num_classes)
    for j, idx in enumerate(parts):
        if len(idx) == 0 and family == "linear":  # an empty part votes for label 0
            scores[j] = 0.0
            scores[j, :, 0] = 1.0
    return [(scores[j], params[j]) for j in range(len(parts))]


def _fit_units_ray(run_cfg: dict, bc: dict, kind: str,
                   jobs: list[tuple[int, np.ndarray | None, str]]) -> list[Trained]:
    """Ray task body: one worker thread, as a local worker process has."""
    import torch

    torch.set_num_threads(1)
    return _fit_units(run_cfg, bc, kind, jobs)


def vectors(x: np.ndarray) -> np.ndarray:
    """Inputs as the vectors (n, D) the closed-form learners take: feature vectors as they
    are, images flattened (each on its own: a function of the example alone)."""
    return x if x.ndim == 2 else np.ascontiguousarray(x.reshape(len(x), -1))


def _fit_free(setting: BaselineConfig, x: np.ndarray, y: np.ndarray, num_classes: int,
              idx: np.ndarray) -> dict[str, np.ndarray]:
    """Parameters of a learner fitted in closed form on the vectors ``x[idx]``: the nearest
    example, a class mean, or kernel ridge regression."""
    from dpcert.learning.inference import KERNEL, NEAREST, constant_params
    from dpcert.learning.reference import (
        kernel_ridge_params,
        nearest_neighbour_params,
        prototype_params,
    )

    # an empty part's nearest-neighbour or kernel-ridge model has no examples: it answers 0
    if setting.learner == NEAREST:
        return nearest_neighbour_params(x[idx], y[idx], len(idx))
    if setting.learner == KERNEL:
        return kernel_ridge_params(x[idx], y[idx], num_classes, len(idx), gamma=setting.gamma,
                                   ridge=setting.ridge)
    if len(idx) == 0:
        return constant_params("linear", x.shape[1], num_classes, label=0)
    return prototype_params(x[idx], y[idx], num_classes, metric=PROTOTYPES[setting.learner])


def learner_model(setting: BaselineConfig, run_model: str) -> str:
    """The model family a setting's learner trains (its kept models' family)."""
    return {"scatter-cnn": "scatter_cnn", "nearest-neighbour": "nearest-neighbour",
            "kernel-ridge": "kernel-ridge", "prototype": "linear",
            "prototype-cosine": "linear"}.get(setting.learner, run_model)


def _training_examples(cfg: RunConfig, setting: BaselineConfig, data, idx: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) a gradient-trained model learns from: its examples, or every
    translation of their images (then the run's feature map) with ``augment_shift``."""
    s = setting.augment_shift
    if not s:
        return data.x_train[idx], data.y_train[idx]
    from dpcert.learning.features import compute
    from dpcert.learning.reference import translations
    from dpcert.workflows.runconfig import load_run_images

    moved = translations(load_run_images(cfg).x_train[idx], s)
    x = compute(moved, cfg.features) if cfg.features else moved
    return x, np.tile(data.y_train[idx], (2 * s + 1) ** 2)


def _train_one(cfg: RunConfig, setting: BaselineConfig, data, idx: np.ndarray, gen):
    """(scores on the evaluation set, parameters) of a baseline model trained by gradient on
    examples ``idx``, all randomness from ``gen``."""
    import torch

    from dpcert.learning.inference import constant_params, module_params
    from dpcert.learning.reference import predict_scores, repeatable_kernels, train_plain

    model_name = learner_model(setting, cfg.model)
    if len(idx) == 0:  # an empty part predicts nothing: it votes for label 0
        scores = np.zeros((len(data.y_test), data.num_classes), np.float32)
        scores[:, 0] = 1.0
        return scores, constant_params(model_name, data.x_train.shape[1], data.num_classes,
                                       label=0)
    device = torch.device(cfg.device)
    x_np, y_np = _training_examples(cfg, setting, data, idx)
    x = torch.tensor(x_np, device=device)
    y = torch.tensor(y_np, device=device)
    full = setting.learner != "minibatch"
    model = train_plain(model_name, x, y, data.num_classes,
                        epochs=setting.steps if full else setting.epochs,
                        batch_size=len(y) if full else setting.batch_size,
                        lr=setting.lr, optimizer=setting.optimizer, gen=gen,
                        weight_decay=setting.weight_decay)
    with repeatable_kernels():  # its votes, like its weights, a function of its part
        scores = predict_scores(model, torch.tensor(data.x_test, device=device))
    return scores, module_params(model_name, model)


def _guard_folder(folder: Path, identity: dict) -> None:
    """Refuse a folder trained with other settings; record ours in a fresh one."""
    path = folder / rundir.SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is damaged; remove {folder} to retrain") from None
        if old != identity:
            changed = sorted(k for k in identity if old.get(k) != identity[k])
            raise UserError(f"{folder} holds models trained with other settings ({changed}); "
                            "remove it or use another --output directory")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def train_models(kind: str, bc: BaselineConfig, run_cfg: RunConfig, x_train: np.ndarray,
                 folder: Path, progress: bool, *, defence: str | None = None) -> np.ndarray:
    """Scores (M, N, L) of a baseline's models, training (in parallel) those not yet on disk.
    ``defence``: the certificate the folder's kept ensemble takes by default (the defence
    whose models these are, unless a run directory of a run-off says otherwise)."""
    from tqdm import tqdm

    # ROE aggregates DPA's (or FA's) models: same training, same folder, same identity.
    if bc.learner == "scatter-cnn" and run_cfg.features != "scatter":
        raise UserError("the scatter-cnn learner trains on ScatterNet maps: model: linear "
                        "with features: scatter")
    if bc.augment_shift and run_cfg.dataset == "npz" and run_cfg.features is None:
        raise UserError("augment_shift translates images; an npz of feature vectors has none")
    identity = {"kind": trained_as(kind), **bc.identity(),
                **{k: getattr(run_cfg, k) for k in ("dataset", "model", "seed")},
                **({"validation": run_cfg.validation} if run_cfg.validation else {})}
    # A new folder keeps its models; one trained before models were kept resumes as it was.
    keep = not (folder / rundir.SETTINGS).exists() or keeps_models(folder)
    if not keep:  # models of dpcert 0.1: no record of how their inputs were read
        check_declared_inputs(run_cfg.dataset, load_run_data(run_cfg).num_classes, False)
    _guard_folder(folder, identity)
    m = bc.trained_models(kind)
    if keep:
        info = baseline_info(kind, bc, run_cfg, m, defence=defence)
        if keeps_models(folder):
            # refuses models trained before the inputs were declared
            read_info(folder, check_settings=False)
            check_same_data(folder, info)
        # the certification settings, a second record of them beside the description
        atomic_write_text(folder / CERTIFICATION_FILE,
                          json.dumps({"eta": run_cfg.eta, "max_radius": run_cfg.max_radius},
                                     sort_keys=True) + "\n")
        write_info(folder, info)
    paths = [folder / f"model_{i:06d}.npz" for i in range(m)]
    found = _finished_models(paths, keep, bc.name(kind), progress)
    todo = [i for i in range(m) if i not in found]
    if todo:
        indices = training_indices(kind, bc, x_train, load_run_data(run_cfg).y_train)
        from dpcert.learning.inference import ROW_MODELS_PER_CALL

        # learners without training score an aligned block of models per call (a block with
        # any model missing is fitted again whole: the company a model is scored in sets
        # its rounding); the others one model each
        per = ROW_MODELS_PER_CALL if bc.learner in FREE_LEARNERS else 1
        blocks = sorted({i // per for i in todo})
        redo = [i for b in blocks for i in range(b * per, min(m, (b + 1) * per))]
        for i in redo:
            found.pop(i, None)
        workers = run_cfg.workers or max(1, min(os.cpu_count() or 1, len(redo)))
        if run_cfg.device == "cuda":
            workers = 1  # one process drives the GPU
        bar = tqdm(total=m, initial=m - len(redo), desc=f"training {bc.name(kind)}",
                   unit="model", disable=not progress)
        units = [(i, None if indices is None else indices[i], str(paths[i])) for i in redo]
        jobs = [(asdict(run_cfg), asdict(bc), kind, units[j:j + per], keep)
                for j in range(0, len(units), per)]
        if run_cfg.backend == "ray":
            def written(job: tuple, trained: list[Trained]) -> None:
                for (_, _, out), one in zip(job[3], trained, strict=True):
                    write_trained(Path(out), one, keep)
                bar.update(len(trained))

            ray_map(run_cfg, _fit_units_ray, [job[:4] for job in jobs], written)
        elif workers == 1:
            for job in jobs:
                bar.update(len(_train_units(*job)))
        else:
            with worker_pool(workers) as pool:
                for fut in as_completed([pool.submit(_train_units, *j) for j in jobs]):
                    bar.update(len(fut.result()))
        bar.close()
    return _gather_scores(paths, found, folder)


def _finished_models(paths: list[Path], keep: bool, name: str, progress: bool
                     ) -> dict[int, np.ndarray]:
    """Scores of the models already on disk whose files pass their checksums (and whose kept
    parameters do, when the folder keeps them), by model index; read once per invocation."""
    from tqdm import tqdm

    found = {}
    # thousands of kept models take minutes to verify: show it
    for i, path in enumerate(tqdm(paths, desc=f"checking {name}", unit="model", leave=False,
                                  disable=not progress or not paths[0].exists())):
        scores = read_unit(path)
        if scores is not None and (
                not keep or load_tensors(path.with_suffix(".safetensors")) is not None):
            found[i] = scores
    return found


def _gather_scores(paths: list[Path], found: dict[int, np.ndarray], folder: Path
                   ) -> np.ndarray:
    """Scores (M, N, L) of every model: those in ``found`` (consumed) and the rest read
    from disk. Filled into one array: a list then np.stack would hold them twice (FA's k d
    models on 10,000 points are GBs)."""
    out = None
    for i, path in enumerate(paths):
        scores = found.pop(i) if i in found else read_unit(path)
        if scores is None:
            raise UserError(f"a model file in {folder} is damaged; rerun to retrain it")
        if out is None:
            out = np.empty((len(paths), *scores.shape), scores.dtype)
        out[i] = scores
    return out


def baseline_info(kind: str, bc: BaselineConfig, run_cfg: RunConfig, models: int, *,
                  defence: str | None = None) -> EnsembleInfo:
    """The description of a baseline setting's kept models (``ensemble.json`` in its folder):
    which certificate they take and everything it needs."""
    from dpcert.learning.data import part_fingerprints
    from dpcert.workflows.run import input_spec

    data = load_run_data(run_cfg)
    model = learner_model(bc, run_cfg.model)
    indices = training_indices(kind, bc, data.x_train, data.y_train)  # None: Bagging's bags
    return EnsembleInfo(dataset=run_cfg.dataset, model=model,
                        num_classes=data.num_classes, instances=models,
                        input=input_spec(run_cfg, data), mechanism=None, eta=run_cfg.eta,
                        max_radius=run_cfg.max_radius, training={**asdict(bc)},
                        defence=defence or trained_as(kind),
                        defence_params={"spread": bc.spread, "subsample": bc.subsample,
                                        "train_size": len(data.y_train)},
                        data_sha256=data.fingerprint(), dpcert_version=dpcert.__version__,
                        part_sha256=None if indices is None else
                        part_fingerprints(data.x_train, data.y_train, indices))


def certify_baseline(kind: str, bc: BaselineConfig, scores: np.ndarray, n_train: int,
                     run_cfg: RunConfig, threat: str = "poisoning") -> Certificates:
    return baseline_certificate(kind, scores, spread=bc.spread, train_size=n_train,
                                subsample=bc.subsample, eta=run_cfg.eta,
                                max_radius=run_cfg.max_radius, threat=threat)


def certify_setting(kind: str, bc: BaselineConfig, scores: np.ndarray, data, run_cfg: RunConfig,
                    *, threat: str = "poisoning", progress: bool = False) -> Certificates:
    """A baseline setting's certificates against ``threat`` from its models' scores (M, N, L)
    on ``data``'s evaluation set: against label flips, DPA over kernel ridge prices each part
    by its own labels (:mod:`dpcert.workflows.white_box`), the rest count votes."""
    if threat == "label-flip" and white_box.applies(kind, learner_model(bc, run_cfg.model)):
        parts = white_box.parts_from_training(vectors(data.x_train), data.y_train,
                                              training_indices(kind, bc, data.x_train,
                                                               data.y_train),
                                              gamma=bc.gamma, ridge=bc.ridge)
        return white_box.certificate(parts, vectors(data.x_test), scores, gamma=bc.gamma,
                                     ridge=bc.ridge, max_radius=run_cfg.max_radius,
                                     progress=progress)
    return certify_baseline(kind, bc, scores, len(data.y_train), run_cfg, threat=threat)
