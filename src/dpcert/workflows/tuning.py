"""The tuning protocol's choice: on a validation split carved from the training set, each
defence's setting with the best mean certified accuracy, the best one per radius, and the
test-set envelope of those choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Choice:
    """What the validation split chose for one defence: the setting with the best mean
    certified accuracy over radii 0..R, and the best setting at every radius (shape (R+1,))."""

    best: str
    per_radius: np.ndarray


def choose(val_curves: dict[str, np.ndarray]) -> Choice:
    """Choose among settings by their validation CA curves {name: CA at r = 0..R}; ties go
    to the setting listed first, and radii where every setting certifies nothing keep the
    best setting (validation says nothing there)."""
    names = list(val_curves)
    table = np.stack([val_curves[n] for n in names])
    best = int(np.argmax(table.mean(axis=1)))
    per_radius = np.where(table.max(axis=0) > 0, np.argmax(table, axis=0), best)
    return Choice(names[best], np.array(names, dtype=object)[per_radius])


def envelope(choice_per_radius: np.ndarray, test_curves: dict[str, np.ndarray]):
    """Test CA at every radius of the setting chosen (on validation) for that radius, as a
    function of an array of radii (radii beyond the tuned range keep the last choice; beyond
    a test curve's last radius, the certificates' cap, nothing is certified: 0)."""
    top = len(choice_per_radius) - 1

    def curve(radii):
        radii = np.asarray(radii, dtype=np.int64)
        picks = choice_per_radius[np.minimum(radii, top)]
        return np.array([test_curves[p][r] if r < len(test_curves[p]) else 0.0
                         for p, r in zip(picks, radii, strict=True)])

    return curve
