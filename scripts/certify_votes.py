"""Certify the votes a GPU check brought back (``votes.npz`` of scripts/gpu_check.sh).

Each array NAME holds a run's votes, NAME.mechanism the mechanism record of what ran (the
run's mechanism.json); the test labels come from the dataset of configs/NAME.yaml under
data/. The default certificate (PLD, sound) is written as OUT/NAME/certificates.csv, the form
scripts/ca_table.py reads:

    python scripts/certify_votes.py votes.npz runs/gpu && python scripts/ca_table.py runs/gpu/*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dpcert.certification.certify import certificates_csv, certify
from dpcert.certification.mechanism import MechanismRecord
from dpcert.store import atomic_write_text
from dpcert.workflows.runconfig import RunConfig, load_config_file, load_run_data


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__)
    votes_file, out = Path(argv[0]), Path(argv[1])
    with np.load(votes_file) as arrays:
        for name in (f for f in arrays.files if not f.endswith(".mechanism")):
            cfg = RunConfig.from_mapping(load_config_file(Path("configs") / f"{name}.yaml"))
            record = MechanismRecord.from_dict(json.loads(str(arrays[f"{name}.mechanism"])))
            data = load_run_data(cfg)
            votes = arrays[name]
            if votes.shape != (len(data.y_test), data.num_classes):
                sys.exit(f"{name}: votes {votes.shape} do not fit the test set "
                         f"({len(data.y_test)}, {data.num_classes})")
            cert = certify(votes, record, eta=cfg.eta, max_radius=cfg.max_radius)
            (out / name).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / name / "certificates.csv",
                              certificates_csv(cert, data.y_test))
            print(f"{name}: P = {int(votes.sum(1).max())}, T = {record.steps}, accuracy "
                  f"{np.mean(votes.argmax(1) == data.y_test):.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
