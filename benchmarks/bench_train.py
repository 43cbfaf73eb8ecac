"""DP-SGD throughput for LeNet-5 on MNIST-shaped data: dpcert vs Opacus vs plain training.

All three run in this one process on the same random 28x28 data with expected batch 128,
single instance, same torch thread count; samples/s is the median of REPEATS timed blocks of
STEPS steps (after a warm-up). Opacus uses ``make_private`` with Poisson sampling (its
per-sample hooks, default mode) and in its ghost-clipping mode. Prints absolute numbers,
ratios and the machine.

With ``--processes K`` every variant runs in K processes at once (one thread each, started
together at a barrier) and the K rates are added: the equal-cores comparison that matches how
dpcert trains on CPUs (one instance per core).

Run: python benchmarks/bench_train.py [--threads N | --processes K]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert import ghost  # noqa: E402
from dpcert.models import lenet5  # noqa: E402
from dpcert.train import clipped_gradient_sum, instance_generator, poisson_batch  # noqa: E402

N, BATCH, STEPS, REPEATS = 12_800, 128, 20, 7


def timed(step, steps=STEPS, repeats=REPEATS) -> float:
    """Median samples/s of `repeats` blocks of `steps` calls to step() -> samples done."""
    step()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        done = sum(step() for _ in range(steps))
        rates.append(done / (time.perf_counter() - t))
    return statistics.median(rates)


def plain(x, y):
    model = lenet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, N, (BATCH,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        return BATCH

    return timed(step)


def ours(x, y, method):
    model = lenet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = instance_generator(0, 0)
    q = BATCH / N

    def step():
        idx = poisson_batch(N, q, gen)
        if method == "ghost":
            summed = ghost.clipped_gradient_sum(model, x[idx], y[idx], 1.0)
        else:
            params = {k: v.detach() for k, v in model.named_parameters()}
            summed = clipped_gradient_sum(model, params, x[idx], y[idx], 1.0)
        for name, p in model.named_parameters():
            p.grad = (summed[name] + torch.randn(p.shape, generator=gen)) / BATCH
        opt.step()
        return len(idx)

    return timed(step)


def opacus_run(x, y, mode="hooks"):
    from opacus import PrivacyEngine

    model = lenet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    engine = PrivacyEngine()
    criterion = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "ghost":
            model, opt, criterion, loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, criterion=criterion,
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True,
                grad_sample_mode="ghost")
        else:
            model, opt, loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=True)
    it = iter(loader)

    def step():
        nonlocal it
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        opt.zero_grad()
        criterion(model(xb), yb).backward()
        opt.step()
        return len(yb)

    return timed(step)


VARIANTS = {"plain (non-DP)": lambda x, y: plain(x, y),
            "opacus make_private": lambda x, y: opacus_run(x, y),
            "opacus ghost clipping": lambda x, y: opacus_run(x, y, "ghost"),
            "dpcert vmap": lambda x, y: ours(x, y, "vmap"),
            "dpcert ghost (default)": lambda x, y: ours(x, y, "ghost")}


def _all_variants(threads: int, barrier=None) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y = torch.rand(N, 1, 28, 28), torch.randint(0, 10, (N,))
    out = {}
    for name, fn in VARIANTS.items():
        if barrier is not None:  # every process times the same variant at the same time
            barrier.wait()
        out[name] = fn(x, y)
    return out


def _worker(barrier, queue) -> None:
    queue.put(_all_variants(1, barrier))


def in_processes(k: int) -> dict[str, float]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(barrier, queue)) for _ in range(k)]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {name: sum(part[name] for part in parts) for name in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--processes", type=int, default=0,
                        help="run K single-thread processes at once and add their rates")
    args = parser.parse_args()
    if args.processes:
        results = in_processes(args.processes)
        layout = f"{args.processes} processes x 1 thread"
    else:
        results = _all_variants(args.threads)
        layout = f"{args.threads} threads"
    print(f"machine: {machine()}, torch {torch.__version__}, {layout}")
    print(f"LeNet-5, 28x28 inputs, expected batch {BATCH}, median of {REPEATS} x {STEPS} steps")
    for name, rate in results.items():
        print(f"  {name:<26} {rate:8.0f} samples/s")
    o = max(results["opacus make_private"], results["opacus ghost clipping"])
    d, p = results["dpcert ghost (default)"], results["plain (non-DP)"]
    print(f"  dpcert / best opacus = {d / o:.2f}x   dpcert / plain = {d / p:.2f}")


if __name__ == "__main__":
    main()
