"""Does the stacked engine compute the same numbers on a device as on the CPU?

Run on a machine with a GPU (scripts/gpu_check.sh does): compares, between ``--device`` and
the CPU, Philox words on a million counters (must be bit-equal: integer arithmetic), normals
and Poisson batches, the stacked clipped gradient sums of LeNet-5, a small training run
(scores within 1e-4, votes equal), and that a partition model trained twice on the device is
the same model (LeNet-5 on images, the CNN on ScatterNet maps). Prints one JSON object; exit
status 1 if a check fails.

    PYTHONPATH=src python scripts/device_check.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dpcert.learning import philox, stacked
from dpcert.learning.models import lenet5
from dpcert.learning.reference import instance_generator, train_plain


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    dev = torch.device(parser.parse_args().device)
    cpu = torch.device("cpu")
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    gen = torch.Generator().manual_seed(0)
    words = [torch.randint(0, 2**32, (1_000_000,), generator=gen) for _ in range(6)]
    a = philox.philox4x32(*words)
    b = philox.philox4x32(*[w.to(dev) for w in words])
    out["fused_philox"] = dev.type == "cuda" and philox._fused_ok(dev)
    out["philox_words_equal"] = all(torch.equal(x, y.cpu()) for x, y in zip(a, b, strict=True))
    kc, kd = philox.instance_keys(3, [0, 5, 9], cpu), philox.instance_keys(3, [0, 5, 9], dev)
    za, zb = philox.normal(kc, 4, philox.NOISE, 61_706), philox.normal(kd, 4, philox.NOISE, 61_706)
    out["normal_max_abs_diff"] = float((za - zb.cpu()).abs().max())
    ia, ma = philox.poisson_positions(kc, 4, 60_000, 0.001)
    ib, mb = philox.poisson_positions(kd, 4, 60_000, 0.001)
    out["poisson_equal"] = bool(torch.equal(ia, ib.cpu()) and torch.equal(ma, mb.cpu()))
    x = torch.rand(2000, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (2000,), generator=gen)
    st_c = stacked.init_stacked(lenet5, 1, [0, 1, 2], cpu)
    st_d = stacked.init_stacked(lenet5, 1, [0, 1, 2], dev)
    ic, mc = philox.poisson_positions(kc, 0, 2000, 0.03)
    sc = stacked.clipped_gradient_sum(st_c, x, y, ic, mc, 1.0)
    sd = stacked.clipped_gradient_sum(st_d, x.to(dev), y.to(dev), ic.to(dev), mc.to(dev), 1.0)
    out["clipped_sum_max_abs_diff"] = max(float((sc[k] - sd[k].cpu()).abs().max()) for k in sc)
    cfg = stacked.DpSgd(0.03, 1.0, 40, 1.0, 0.1, declared_size=len(y))
    tc = stacked.train_stacked(cfg, lenet5, x, y, seed=2, instances=[0, 1])
    td = stacked.train_stacked(cfg, lenet5, x.to(dev), y.to(dev), seed=2, instances=[0, 1])
    pc = stacked.predict_stacked(tc, x[:500])
    pd = stacked.predict_stacked(td, x[:500].to(dev))
    out["train_scores_max_abs_diff"] = float(abs(pc - pd).max())
    out["train_votes_equal"] = bool((pc.argmax(2) == pd.argmax(2)).all())
    # partition defences need each model to be a fixed function of its examples: the same
    # part trained twice on the device must give the same weights, bit for bit
    feats = torch.rand(60, 81 * 7 * 7, generator=gen)
    for name, xs in (("lenet5", x[:60]), ("scatter_cnn", feats)):
        twice = [train_plain(name, xs.to(dev), y[:60].to(dev), 10, epochs=50, batch_size=60,
                             lr=0.003, optimizer="adam", gen=instance_generator(4, 7))
                 for _ in range(2)]
        out[f"baseline_{name}_repeatable"] = all(
            torch.equal(a, b) for a, b in zip(twice[0].parameters(), twice[1].parameters(),
                                              strict=True))
    ok = (out["philox_words_equal"] and out["poisson_equal"] and out["normal_max_abs_diff"] < 1e-5
          and out["clipped_sum_max_abs_diff"] < 1e-4 and out["train_scores_max_abs_diff"] < 1e-4
          and out["baseline_lenet5_repeatable"] and out["baseline_scatter_cnn_repeatable"])
    out["ok"] = bool(ok)
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
