"""Train a run's instances and tally their votes, without certifying (certify elsewhere).

For a GPU machine lent for minutes: the training needs the device, the certificates only a CPU.

    PYTHONPATH=src python scripts/train_votes.py CONFIG RUN_DIR [key=value ...]

Overrides are run options (e.g. device=cuda batch_instances=auto instances=1000). Writes
RUN_DIR/votes.npy (and everything ``dpcert run`` writes before certifying); prints the
training time. ``dpcert run CONFIG --output RUN_DIR`` later reuses the trained instances.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from dpcert.workflows.run import RunConfig, aggregate, load_config_file, prepare_run_dir, train_all


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    values = load_config_file(Path(argv[0]))
    for item in argv[2:]:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    values.setdefault("workers", 1)
    cfg = RunConfig.from_mapping(values)
    run_dir = Path(argv[1])
    prepare_run_dir(cfg, run_dir)
    start = time.perf_counter()
    train_all(cfg, run_dir, progress=False)
    print(f"trained {cfg.instances} instances x {cfg.steps} steps on {cfg.device} in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    aggregate(cfg, run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
