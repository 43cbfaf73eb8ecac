"""From a mechanism record to outcome guarantees for groups of r changed training examples.

:class:`GroupBounds` turns a :class:`~dpcert.MechanismRecord` and an
:class:`AccountingSpec` into outcome-bound tables (see :mod:`dpcert.certification.outcomes`) for r =
0, 1, ... They depend only on (record, spec), so they are computed once, on demand in increasing r,
cached on disk, and shared by every test point and every run.

Accountings (``spec.accounting``) and group modes (``spec.group``):

* ``pld``/``sound`` (default): exact privacy profile of the r-group SGM
  (:mod:`dpcert.certification.pld`).
* ``rdp``/``sound``: RDP of the r-group SGM (:mod:`dpcert.certification.rdp`) with Hölder outcome
  bounds.
* ``adp``/``sound``: the better of standard group privacy (r eps, r e^((r-1) eps) delta) on the
  exact single-example profile, and (eps, delta) conversions of the r-group RDP curve.
* ``rdp``/``paper``, ``adp``/``paper``: the published formulas (Theorem 8 with q_r; group delta
  r * delta and the public code's sub-dataset amplification). UNSOUND — reproduction only.

Mixed changes. A sound "pure" table covers r insertions or r deletions. A radius r must cover
every split into a insertions and b deletions with a + b <= r; :meth:`GroupBounds.any_change`
chains the pure bounds through the intermediate dataset (delete b, then insert a) and takes the
worst split. Standard ADP group privacy and the paper modes already cover any path.

Sub-dataset training (``record.subset_size = m`` of ``n``). With j of the changed examples in an
instance's subset, the instance sees j substitutions (j deletions + j insertions) relative to a
coupled clean subset; j is hypergeometric. Upper (lower) outcome bounds are concave (convex) in
p, so by Jensen the bound for the ensemble is the hypergeometric mixture of the per-j bounds
(insertions), or its inverse (deletions, where the coupling runs the other way). Populations are
taken at their smallest possible size over all splits up to ``spec.max_radius``, which makes j
stochastically largest and the bound valid for every split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from dpcert.certification import outcomes, pld, rdp
from dpcert.certification.mechanism import MechanismRecord
from dpcert.certification.outcomes import OutcomeBound
from dpcert.errors import UserError
from dpcert.store import atomic_save_npz

ACCOUNTINGS = ("pld", "rdp", "adp")
GROUPS = ("sound", "paper")
def _code_fingerprint() -> str:
    """Hash of the modules that produce tables: any change to them invalidates the cache
    (a hand-bumped version number was forgotten once and served looser, older tables)."""
    digest = hashlib.sha256()
    for module in (rdp, pld, outcomes):
        digest.update(Path(str(module.__file__)).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


CODE_FINGERPRINT = _code_fingerprint()
#: Total RDP epsilon beyond which an order is useless (its bound is below e^-60).
RDP_CAP = 60.0
#: eps grid on which privacy profiles are evaluated (ascending).
EPS_GRID = np.unique(np.concatenate([np.linspace(0.0, 1.0, 201), np.linspace(1.0, 5.0, 161),
                                     np.linspace(5.0, 40.0, 141)]))
#: The orders the public code scanned (1.01 .. 10.99); used by the paper RDP mode only.
PAPER_ORDERS = 1.0 + np.arange(1, 1000) / 100.0
_HYPERGEOM_TAIL = 1e-20


@dataclass(frozen=True)
class AccountingSpec:
    """How to turn the mechanism's privacy into outcome guarantees.

    Attributes:
        accounting: "pld" (default, tightest), "rdp" or "adp".
        group: "sound" (default) or "paper" (the published, unsound formulas).
        pld_interval: loss discretisation of the PLD accountant.
        paper_delta: the single-example delta of the paper's ADP mode.
        max_radius: largest radius searched; enters the sub-dataset accounting.
    """

    accounting: str = "pld"
    group: str = "sound"
    pld_interval: float = pld.DEFAULT_DISCRETIZATION
    paper_delta: float = 1e-5
    max_radius: int = 1000
    orders: tuple[float, ...] = field(default=tuple(rdp.DEFAULT_ORDERS.tolist()))

    def __post_init__(self) -> None:
        if self.accounting not in ACCOUNTINGS:
            raise UserError(f"accounting must be one of {ACCOUNTINGS}, got {self.accounting!r}")
        if self.group not in GROUPS:
            raise UserError(f"group must be one of {GROUPS}, got {self.group!r}")
        if self.accounting == "pld" and self.group == "paper":
            raise UserError("the paper has no PLD accounting; use --group sound with pld")
        if not (isinstance(self.max_radius, int) and self.max_radius >= 1):
            raise UserError(f"max radius must be a positive integer, got {self.max_radius!r}")
        if not 0.0 < self.paper_delta < 1.0:
            raise UserError(f"paper delta must lie in (0, 1), got {self.paper_delta}")


def default_cache_dir() -> Path:
    env = os.environ.get("DPCERT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpcert"


class GroupBounds:
    """Outcome-bound tables for r changed examples, r = 0, 1, ..., of one mechanism.

    Args:
        record: what the training ran.
        spec: which accounting and group mode.
        cache_dir: where tables persist across runs (None: in memory only).
    """

    def __init__(self, record: MechanismRecord, spec: AccountingSpec | None = None, *,
                 cache_dir: Path | None = None) -> None:
        self.record = record
        self.spec = spec or AccountingSpec()
        if record.uses_subsets and self.spec.group == "paper" and self.spec.accounting == "rdp":
            raise UserError("the paper's RDP sub-dataset amplification is not reproduced; "
                            "use --group sound (sound sub-dataset accounting) instead")
        self._cache = Path(cache_dir) / self.key if cache_dir is not None else None
        # Sequential modes keep pure(0..R) as rows of two growable stacks, so that the chain
        # over every split of r is one gather; independent modes keep only the probed tables.
        ident = outcomes.identity()
        self._lower = ident.lower[None, :].copy()
        self._upper = ident.upper[None, :].copy()
        self._count = 1
        self._probed: dict[int, OutcomeBound] = {0: ident}
        self._direct: dict[int, OutcomeBound | None] = {}
        self._inner: _SgmTables | None = None
        if record.uses_subsets and self.spec.group == "sound":
            self._inner = _SgmTables(record, self.spec, self._cache)

    @property
    def key(self) -> str:
        spec = asdict(self.spec)
        if not self.record.uses_subsets:
            del spec["max_radius"]  # it enters the tables only through sub-dataset accounting
        blob = json.dumps({"record": self.record.accounting_key(), "spec": spec,
                           "code": CODE_FINGERPRINT},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def covers_any_change(self) -> bool:
        """True when the pure tables already hold for any mix of insertions and deletions."""
        return self.spec.group == "paper"

    @property
    def built(self) -> int:
        """Largest r whose pure table is built (sequential modes; 0 when none is)."""
        return self._count - 1

    @property
    def sequential(self) -> bool:
        """True when the bound at r needs the pure tables of every r' <= r (the chain over
        splits of mixed changes); False when a table can be computed for any r on its own."""
        return not self.covers_any_change

    def pure(self, r: int) -> OutcomeBound:
        """Bound for r insertions or r deletions, non-decreasing in r by construction.

        Monotonicity is enforced by loosening each new table with the nearest table below it
        that exists (a bound for fewer changes, loosened, stays valid for r). In sequential
        modes that is every r' < r; in independent modes the tables actually probed, which
        coincides whenever the raw tables are monotone themselves (tested).
        """
        if self.sequential:
            while self._count <= r:
                s = self._count
                table = outcomes.looser(self._load_or_compute(s), self._row(s - 1))
                self._append(table)
            return self._row(r)
        if r not in self._probed:
            below = max(k for k in self._probed if k < r)
            self._probed[r] = outcomes.looser(self._load_or_compute(r), self._probed[below])
        return self._probed[r]

    def _row(self, r: int) -> OutcomeBound:
        return OutcomeBound(self._lower[r], self._upper[r])

    def _append(self, table: OutcomeBound) -> None:
        if self._count == len(self._lower):
            grow = max(16, self._count)
            pad = np.empty((grow, self._lower.shape[1]))
            self._lower = np.concatenate([self._lower, pad])
            self._upper = np.concatenate([self._upper, pad])
        self._lower[self._count] = table.lower
        self._upper[self._count] = table.upper
        self._count += 1

    def any_change(self, r: int, lower_idx: np.ndarray, upper_idx: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Lower bounds at grid indices ``lower_idx`` and upper bounds at ``upper_idx`` valid
        for every a insertions + b deletions with a + b <= r (worst split of the chain)."""
        lower_idx, upper_idx = np.asarray(lower_idx), np.asarray(upper_idx)
        if self.covers_any_change or r == 0:
            b = self.pure(r)
            return b.lower[lower_idx], b.upper[upper_idx]
        self.pure(r)
        low = _chain_worst_split(self._lower, r, lower_idx, np.minimum, outcomes.floor_index)
        up = _chain_worst_split(self._upper, r, upper_idx, np.maximum, outcomes.ceil_index)
        direct = self._direct_any_change(r)
        if direct is not None:
            low = np.maximum(low, direct.lower[lower_idx])
            up = np.minimum(up, direct.upper[upper_idx])
        return low, up

    # -- table construction ---------------------------------------------------------------

    def _load_or_compute(self, r: int) -> OutcomeBound:
        path = self._cache / f"r{r:06d}.npz" if self._cache is not None else None
        if path is not None and path.exists():
            try:
                with np.load(path) as z:
                    return OutcomeBound(z["lower"], z["upper"])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                path.unlink(missing_ok=True)  # a damaged cache entry is recomputed
        table = self._compute(r)
        if path is not None:
            atomic_save_npz(path, lower=table.lower, upper=table.upper)
        return table

    def _compute(self, r: int) -> OutcomeBound:
        if self._inner is not None:
            return self._inner.subset_pure(r)
        return _sgm_pure(self.record, self.spec, r)

    def _direct_any_change(self, r: int) -> OutcomeBound | None:
        if self.spec.accounting != "adp" or self._inner is not None:
            return None
        if r not in self._direct:
            self._direct[r] = _adp_group_privacy(self.record, self.spec, r)
        return self._direct[r]


#: Gather size (splits x points) per step of the chain, to bound its temporary memory.
_CHAIN_CHUNK = 1 << 22


def _chain_worst_split(stack: np.ndarray, r: int, idx: np.ndarray, worst, to_grid) -> np.ndarray:
    """worst over a = 0..r of stack[a][to_grid(stack[r - a][idx])]: the bound for a insertions
    after r - a deletions, at every grid index in ``idx`` (shape (M,)); ``stack`` holds the
    pure tables of one side (lower or upper) as rows 0..r."""
    out = np.empty(len(idx))
    per = max(1, _CHAIN_CHUNK // (r + 1))
    a = np.arange(r + 1)[:, None]
    for start in range(0, len(idx), per):
        cols = idx[start:start + per]
        inner = to_grid(stack[r - a, cols[None, :]])
        out[start:start + per] = worst.reduce(stack[a, inner], axis=0)
    return out


# -- the SGM itself (whole dataset, or an instance's subset) ---------------------------------


def _sgm_pure(record: MechanismRecord, spec: AccountingSpec, r: int) -> OutcomeBound:
    q, sigma, steps = record.sample_rate, record.noise_multiplier, record.steps
    if spec.group == "paper":
        if spec.accounting == "rdp":
            return outcomes.from_rdp(PAPER_ORDERS,
                                     rdp.paper_group_rdp(q, sigma, r, PAPER_ORDERS, steps=steps),
                                     complements=False)
        eps1, delta1 = _paper_single_adp(record, spec)
        return outcomes.from_profile(np.array([r * eps1]), np.array([min(1.0, r * delta1)]),
                                     complements=False)
    if spec.accounting == "pld":
        delta = pld.group_privacy_profile(q, sigma, r, steps, EPS_GRID, interval=spec.pld_interval)
        return outcomes.from_profile(EPS_GRID, delta)
    orders = np.asarray(spec.orders)
    eps_rdp = rdp.group_rdp(q, sigma, r, orders, steps=steps, cap=RDP_CAP)
    if spec.accounting == "rdp":
        return outcomes.from_rdp(orders, eps_rdp)
    deltas = np.logspace(-15, -0.5, 60)
    eps = rdp.rdp_to_adp_epsilon(eps_rdp, orders, deltas)
    return outcomes.tighter(outcomes.from_profile(eps, deltas), _adp_group_privacy(record, spec, r))


def _single_profile(record: MechanismRecord, spec: AccountingSpec) -> np.ndarray:
    return pld.group_privacy_profile(record.sample_rate, record.noise_multiplier, 1, record.steps,
                                     EPS_GRID, interval=spec.pld_interval)


_PROFILE_MEMO: dict[tuple, np.ndarray] = {}


def _adp_group_privacy(record: MechanismRecord, spec: AccountingSpec, r: int) -> OutcomeBound:
    """Standard group privacy on every (eps, delta(eps)) of the exact single-example profile:
    an (eps, delta)-DP mechanism is (r eps, r e^((r-1) eps) delta)-DP for groups of r, along
    any path of insertions and deletions."""
    key = (record.accounting_key(), spec.pld_interval)
    if key not in _PROFILE_MEMO:
        _PROFILE_MEMO[key] = _single_profile(record, spec)
    d1 = _PROFILE_MEMO[key]
    with np.errstate(divide="ignore", over="ignore"):
        dr = np.minimum(1.0, np.exp(math.log(r) + (r - 1) * EPS_GRID + np.log(d1)))
    return outcomes.from_profile(r * EPS_GRID, dr)


def _paper_single_adp(record: MechanismRecord, spec: AccountingSpec) -> tuple[float, float]:
    """The public code's single-example (eps, delta): RDP of the SGM converted with the classic
    eps = rdp(alpha) - log(delta)/(alpha-1) at delta = ``spec.paper_delta``; with sub-datasets,
    its amplification heuristic eps' = log(1 + m/n (e^eps - 1)), delta' = m/n delta."""
    orders = np.asarray(spec.orders)
    eps_rdp = rdp.group_rdp(record.sample_rate, record.noise_multiplier, 1, orders,
                            steps=record.steps)
    eps = float(np.min(eps_rdp - math.log(spec.paper_delta) / (orders - 1.0)))
    delta = spec.paper_delta
    if record.uses_subsets:
        assert record.subset_size is not None and record.dataset_size is not None
        mu = record.subset_size / record.dataset_size
        eps, delta = math.log1p(mu * math.expm1(eps)), mu * delta
    return eps, delta


class _SgmTables:
    """Sound sub-dataset accounting on top of the SGM tables of one instance's subset."""

    def __init__(self, record: MechanismRecord, spec: AccountingSpec, cache: Path | None
                 ) -> None:
        inner_record = MechanismRecord(
            sample_rate=record.sample_rate, noise_multiplier=record.noise_multiplier,
            steps=record.steps, clip_norm=record.clip_norm, dataset_size=record.subset_size)
        self.record = record
        self.spec = spec
        self.sgm = GroupBounds(inner_record, spec,
                               cache_dir=cache.parent if cache is not None else None)
        self._subst: list[OutcomeBound] = [outcomes.identity()]

    def substitutions(self, j: int) -> OutcomeBound:
        """j deletions then j insertions inside the subset."""
        while len(self._subst) <= j:
            s = len(self._subst)
            b = outcomes.chain(self.sgm.pure(s), self.sgm.pure(s))
            if self.spec.accounting == "adp":
                b = outcomes.tighter(b, _adp_group_privacy(self.sgm.record, self.spec, 2 * s))
            self._subst.append(b)
        return self._subst[j]

    def _mixture(self, population: int, r: int) -> OutcomeBound:
        m = int(self.record.subset_size or 0)
        js = np.arange(0, min(r, m) + 1)
        h = stats.hypergeom.pmf(js, population, r, m)
        keep = h > _HYPERGEOM_TAIL
        js, h = js[keep], h[keep]
        return outcomes.mixture(h, [self.substitutions(int(j)) for j in js])

    def subset_pure(self, r: int) -> OutcomeBound:
        n, m = int(self.record.dataset_size or 0), int(self.record.subset_size or 0)
        cap = self.spec.max_radius
        # Insertions land in a dataset of at least n - cap examples (earlier deletions).
        insert = self._mixture(max(n - cap, m) + r, r)
        # Deletions: the coupling bounds the clean p by the poisoned p'; invert it.
        delete = outcomes.reverse(self._mixture(n, r))
        return outcomes.looser(insert, delete)
