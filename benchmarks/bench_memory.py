"""Peak memory per DP-SGD instance: K LeNet-5 instances stacked by ``dpcert.learning.stacked``.

Each measurement runs in a fresh subprocess on MNIST-shaped random data (60,000 examples,
q = 0.001 as in the paper, plus q = 0.01 for larger batches). On CPU (Linux): one warm-up
step first (so that library code and thread pools are resident), then the peak resident set
is reset (/proc/self/clear_refs) and its increase over the resident set before training is
reported; on CUDA, ``torch.cuda.max_memory_allocated`` over the allocation before training.
The dataset itself (188 MB) is allocated before the baseline and is shared by all instances
of a process. Prints MB per instance and the machine.

Run: python benchmarks/bench_memory.py [--device cuda] [--ks 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

STEPS = 20


def measure(k: int, q: float, device: str) -> float:
    """Peak MB of training k instances stacked (``dpcert.learning.stacked``) for STEPS steps."""
    import torch

    from dpcert.learning.models import lenet5
    from dpcert.learning.stacked import DpSgd, train_stacked

    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.rand(60_000, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (60_000,), device=dev)

    def train(steps: int) -> None:
        train_stacked(DpSgd(q, 1.0, steps, 1.0,
                            declared_size=len(y)), lenet5, x, y, seed=0, instances=list(range(k)))

    train(1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train(STEPS)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        base = _status_kb("VmRSS")
        train(STEPS)
        peak = _status_kb("VmHWM")
    return (peak - base) / 2**20


def _status_kb(key: str) -> int:
    """Bytes of a /proc/self/status memory line (reported in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement
        k, q = json.loads(args.one)
        print(json.dumps(measure(k, q, args.device)))
        return
    print(f"machine: {machine()}, device {args.device}, LeNet-5, {STEPS} steps, n = 60,000")
    for q in (0.001, 0.01):
        for k in (int(v) for v in args.ks.split(",")):
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--one",
                                  json.dumps([k, q])], capture_output=True, text=True,
                                 check=True)
            mb = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  q = {q:<6} K = {k:>3}  peak +{mb:8.1f} MB   "
                  f"{mb / k:7.1f} MB per instance")


if __name__ == "__main__":
    main()
