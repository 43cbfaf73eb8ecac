"""DP-SGD throughput for LeNet-5 on MNIST-shaped data: dpcert vs Opacus vs plain training.

All three run in this one process on the same random 28x28 data with expected batch 128,
single instance, same torch thread count; samples/s is the median of REPEATS timed blocks of
STEPS steps (after a warm-up). Opacus uses ``make_private`` with Poisson sampling (its
per-sample hooks, default mode) and in its ghost-clipping mode. Prints absolute numbers,
ratios and the machine.

With ``--processes K`` every variant runs in K processes at once (one thread each, started
together at a barrier) and the K rates are added: the equal-cores comparison that matches how
dpcert trains on CPUs (one instance per core).

With ``--device cpu|cuda`` it measures instead what the paper's experiments cost: P = 1000
LeNet-5 instances x T = 1000 steps at q = 0.001 on n = 60,000 MNIST-shaped examples. dpcert's
stacked engine (K instances per computation, ``--chunks``) is timed over a few steps after a
warm-up and extrapolated to P x T; in the same run, Opacus trains one instance at a time (the
paper's public code's way; ``--opacus-steps`` steps, extrapolated) and dpcert's previous
per-instance path (``train.train_instance``). Prints per-instance-step times, the extrapolated
totals, their ratios, peak GPU memory, a per-step breakdown (noise, sampling, clipping) and
the machine; ``--json`` also writes them to a file.

With ``--device cpu --processes K`` it compares, at equal cores, the stacked engine (K = 1)
with the previous per-instance path, each in K single-thread processes at once — how
``dpcert run`` trains on CPUs — in the steady state (both warmed up by ``--warm-steps``).

Run: python benchmarks/bench_train.py [--threads N | --processes K]
     python benchmarks/bench_train.py --device cuda [--chunks 250 1000] [--json out.json]
     python benchmarks/bench_train.py --device cpu --processes 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert.learning import ghost  # noqa: E402
from dpcert.learning.models import lenet5  # noqa: E402
from dpcert.learning.reference import clipped_gradient_sum, instance_generator, poisson_batch  # noqa: E402

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


def opacus_step(x, y, batch: int, mode: str = "hooks"):
    """One Opacus make_private training step of LeNet-5 (Poisson sampling at batch / n) on
    x's device, as a function returning the batch size."""
    from opacus import PrivacyEngine

    model = lenet5().to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
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

    return step


def opacus_run(x, y, mode="hooks"):
    return timed(opacus_step(x, y, BATCH, mode))


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


def _in_processes(k: int, target, *args) -> list[dict[str, float]]:
    """What ``target(barrier, queue, *args)`` puts in the queue, from k processes at once."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, queue, *args)) for _ in range(k)]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return parts


def in_processes(k: int) -> dict[str, float]:
    parts = _in_processes(k, _worker)
    return {name: sum(part[name] for part in parts) for name in VARIANTS}


# -- the paper-scale ensemble (--device) ---------------------------------------------------------

PAPER_N, PAPER_Q, PAPER_T = 60_000, 0.001, 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device, fn, reps: int = 10) -> float:
    """Seconds per call of fn (after one warm-up call)."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def stacked_rate(x, y, k: int, steps: int, warm: int = 3) -> dict:
    """Seconds per step of K stacked instances, and the peak device memory."""
    from dpcert.learning.stacked import DpSgd, train_stacked

    device = x.device
    cfg = DpSgd(PAPER_Q, 1.0, warm + steps, 1.0, 0.1, declared_size=len(y))
    marks = {}

    def progress(done: int) -> None:
        if done in (warm, warm + steps):
            _sync(device)
            marks[done] = time.perf_counter()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_stacked(cfg, lenet5, x, y, seed=0, instances=list(range(k)), progress=progress)
    per_step = (marks[warm + steps] - marks[warm]) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"instances": k, "seconds_per_step": per_step,
            "ms_per_instance_step": 1e3 * per_step / k, "peak_gib": peak}


def step_breakdown(x, y, k: int) -> dict:
    """Milliseconds per step of K instances for each part of a step."""
    from dpcert.learning import philox, stacked

    device = x.device
    st = stacked.init_stacked(lenet5, 0, list(range(k)), device)
    keys = philox.instance_keys(0, list(range(k)), device)
    size = sum(v[0].numel() for v in st.params.values())
    index, mask = philox.poisson_positions(keys, 0, PAPER_N, PAPER_Q)
    out = {"noise_ms": 1e3 * _clock(device, lambda: philox.normal(keys, 1, philox.NOISE, size)),
           "fused_philox": device.type == "cuda" and philox._fused_ok(device),
           "sampling_ms": 1e3 * _clock(
               device, lambda: philox.poisson_positions(keys, 1, PAPER_N, PAPER_Q)),
           "clipped_sum_ms": 1e3 * _clock(
               device, lambda: stacked.clipped_gradient_sum(st, x, y, index, mask, 1.0))}
    if out["fused_philox"]:  # the same noise by the eager rounds, for the ratio
        os.environ["DPCERT_FUSED_RNG"] = "0"
        try:
            out["noise_eager_ms"] = 1e3 * _clock(
                device, lambda: philox.normal(keys, 1, philox.NOISE, size))
        finally:
            del os.environ["DPCERT_FUSED_RNG"]
    return out


def profile_step(x, y, k: int) -> str:
    """torch.profiler's table of three clipped-sum steps of K instances (first layout)."""
    from torch.profiler import ProfilerActivity, profile

    from dpcert.learning import philox, stacked

    st = stacked.init_stacked(lenet5, 0, list(range(k)), x.device)
    keys = philox.instance_keys(0, list(range(k)), x.device)
    index, mask = philox.poisson_positions(keys, 0, PAPER_N, PAPER_Q)
    stacked.clipped_gradient_sum(st, x, y, index, mask, 1.0)
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            stacked.clipped_gradient_sum(st, x, y, index, mask, 1.0)
        _sync(x.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)


def opacus_sequential_rate(x, y, steps: int) -> float:
    """Seconds per step of one LeNet-5 trained by Opacus make_private (Poisson, q = 0.001)."""
    return _clock(x.device, opacus_step(x, y, int(PAPER_Q * PAPER_N)), reps=steps)


def previous_path_rate(x, y, steps: int) -> float:
    """Seconds per step of dpcert's per-instance path (train.train_instance)."""
    from dpcert.learning.reference import TrainConfig, train_instance

    cfg = TrainConfig(PAPER_Q, 1.0, steps, 1.0, 0.1, model="lenet5", declared_size=len(y))
    _sync(x.device)
    t = time.perf_counter()
    train_instance(cfg, x, y, 10, seed=0, instance=0)
    _sync(x.device)
    return (time.perf_counter() - t) / steps


def _paper_worker(barrier, queue, stacked_steps: int, previous_steps: int, warm: int) -> None:
    """One single-thread process of the equal-cores CPU comparison: the stacked engine with
    K = 1 and the previous per-instance path, each timed while every process runs it, after
    both have run ``warm`` steps (oneDNN builds its kernels for each new batch size on first
    sight; a real run of 1000 steps per instance sees every size many times)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(PAPER_N, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (PAPER_N,), generator=gen)
    barrier.wait()
    stacked_rate(x, y, 1, warm)
    previous_path_rate(x, y, warm)
    barrier.wait()
    stacked_s = stacked_rate(x, y, 1, stacked_steps)["seconds_per_step"]
    barrier.wait()
    previous_s = previous_path_rate(x, y, previous_steps)
    queue.put({"stacked_ms": 1e3 * stacked_s, "previous_ms": 1e3 * previous_s})


def equal_cores_main(args) -> None:
    """``--device cpu --processes K``: how dpcert runs trains on CPUs (one single-thread
    process per core, K = 1 each), the stacked engine against the previous path."""
    parts = _in_processes(args.processes, _paper_worker, args.stacked_steps,
                          args.previous_steps, args.warm_steps)
    stacked = sum(1 / p["stacked_ms"] for p in parts)  # instance-steps per ms, all processes
    previous = sum(1 / p["previous_ms"] for p in parts)
    print(f"machine: {machine()}, torch {torch.__version__}, {args.processes} processes x "
          f"1 thread, LeNet-5, n = {PAPER_N}, q = {PAPER_Q}")
    print("  stacked engine (K = 1):  " + ", ".join(f"{p['stacked_ms']:.2f}" for p in parts)
          + f" ms per instance-step -> {1 / stacked:.2f} ms per instance-step for the machine")
    print("  previous path:           " + ", ".join(f"{p['previous_ms']:.2f}" for p in parts)
          + f" ms per step -> {1 / previous:.2f} ms per instance-step for the machine")
    print(f"  stacked / previous throughput at equal cores: {stacked / previous:.2f}x")


def ensemble_main(args) -> None:
    import json

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(PAPER_N, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (PAPER_N,), generator=gen).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    total = args.instances * PAPER_T
    out = {"device": name, "torch": torch.__version__, "threads": args.threads,
           "instances": args.instances, "steps": PAPER_T, "stacked": []}
    print(f"device: {name}, torch {torch.__version__}, {args.threads} threads")
    print(f"LeNet-5, n = {PAPER_N}, q = {PAPER_Q}; extrapolated to P = {args.instances} x "
          f"T = {PAPER_T}")
    from dpcert.learning.stacked import DpSgd, instances_that_fit

    auto = instances_that_fit(DpSgd(PAPER_Q, 1.0, PAPER_T, 1.0, 0.1), lenet5, x, y)
    out["auto_instances"] = auto
    print(f"  --batch-instances auto picks K = {auto}")
    from dpcert.learning import stacked

    for impl in args.conv_impls:
        stacked.CONV_IMPL = impl.split("+")[0]
        torch.backends.cudnn.benchmark = impl.endswith("+benchmark")
        for k in args.chunks if impl == args.conv_impls[0] else args.chunks[:1]:
            try:
                r = stacked_rate(x, y, k, args.stacked_steps)
            except Exception as err:  # noqa: BLE001 - one layout failing (memory, a kernel)
                # must not cost the other measurements of a short GPU call
                print(f"  dpcert stacked K = {k:5d}, conv {impl:<18}: failed: "
                      f"{type(err).__name__}: {str(err)[:200]}")
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            r["conv"] = impl
            out["stacked"].append(r)
            if args.json:  # after every row: a time limit hit later keeps these figures
                Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.1f} GiB"
            print(f"  dpcert stacked K = {k:5d}, conv {impl:<18}: "
                  f"{r['ms_per_instance_step']:8.4f} ms per instance-step -> "
                  f"{-(-args.instances // k) * PAPER_T * r['seconds_per_step']:8.1f} s{peak}")
    stacked.CONV_IMPL = "auto"
    torch.backends.cudnn.benchmark = False
    if args.only_stacked or not out["stacked"]:
        return
    for r in out["stacked"]:
        r["extrapolated_seconds"] = -(-args.instances // r["instances"]) * PAPER_T \
            * r["seconds_per_step"]
    first = [r for r in out["stacked"] if r.get("conv") == args.conv_impls[0]]
    best = min(first or out["stacked"], key=lambda r: r["extrapolated_seconds"])
    out["breakdown"] = step_breakdown(x, y, best["instances"])
    parts = ", ".join(f"{name[:-3].replace('_', ' ')} {ms:.2f} ms"
                      for name, ms in out["breakdown"].items() if name.endswith("_ms"))
    fused = " (fused Philox kernel)" if out["breakdown"]["fused_philox"] else ""
    print(f"  step of K = {best['instances']}: {parts}{fused}")
    prev = previous_path_rate(x, y, args.previous_steps)
    out["previous_ms_per_step"] = 1e3 * prev
    print(f"  dpcert train_instance (previous path): {1e3 * prev:8.3f} ms per step -> "
          f"{total * prev:9.0f} s   ratio {total * prev / best['extrapolated_seconds']:.1f}x")
    try:
        op = opacus_sequential_rate(x, y, args.opacus_steps)
        out["opacus_ms_per_step"] = 1e3 * op
        out["ratio_vs_opacus"] = total * op / best["extrapolated_seconds"]
        print(f"  Opacus, one instance at a time:       {1e3 * op:8.3f} ms per step -> "
              f"{total * op:9.0f} s   ratio {out['ratio_vs_opacus']:.1f}x")
    except ImportError as err:
        print(f"  Opacus not measured: {err}")
    if args.profile:
        try:
            print(profile_step(x, y, args.chunks[0]))
        except Exception as err:  # noqa: BLE001 - a diagnostic only: report why it failed
            print(f"  profile failed: {type(err).__name__}: {str(err)[:200]}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--processes", type=int, default=0,
                        help="run K single-thread processes at once and add their rates")
    parser.add_argument("--device", help="paper-scale ensemble benchmark on cpu or cuda")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--chunks", type=int, nargs="+", default=None,
                        help="stacked instances per computation (default: 250 1000 on "
                             "cuda, 1 on cpu)")
    parser.add_argument("--stacked-steps", type=int, default=30)
    parser.add_argument("--opacus-steps", type=int, default=200)
    parser.add_argument("--previous-steps", type=int, default=20)
    parser.add_argument("--warm-steps", type=int, default=200,
                        help="--processes on cpu: steps each path runs before it is timed")
    parser.add_argument("--conv-impls", nargs="+", default=["auto"],
                        help="stacked.CONV_IMPL values to time (auto, grouped, patches; "
                             "'grouped+benchmark' turns on cudnn.benchmark); all chunk sizes "
                             "for the first, the first chunk size for the others")
    parser.add_argument("--only-stacked", action="store_true",
                        help="time the stacked engine only")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of a clipped-sum step")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.device == "cpu" and args.processes:
        equal_cores_main(args)
        return
    if args.device:
        if args.chunks is None:
            args.chunks = [250, 1000] if args.device == "cuda" else [1]
        ensemble_main(args)
        return
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
