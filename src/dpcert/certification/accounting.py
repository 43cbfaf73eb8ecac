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

import bisect
import hashlib
import json
import math
import multiprocessing
import os
import weakref
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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
        orders: Rényi orders of the RDP accountings.
        resolution: the sound modes keep a table at every radius up to ``resolution`` and
            at relative spacing 1/``resolution`` beyond; a radius between two tables is
            certified with the table above it (sound: a group bound holds for every smaller
            group), which puts radii beyond ``resolution`` at most about 1/``resolution``
            below those of a table at every radius. 0: a table at every radius.
    """

    accounting: str = "pld"
    group: str = "sound"
    pld_interval: float = pld.DEFAULT_DISCRETIZATION
    paper_delta: float = 1e-5
    max_radius: int = 1000
    orders: tuple[float, ...] = field(default=tuple(rdp.DEFAULT_ORDERS.tolist()))
    resolution: int = 256

    def __post_init__(self) -> None:
        if self.accounting not in ACCOUNTINGS:
            raise UserError(f"accounting must be one of {ACCOUNTINGS}, got {self.accounting!r}")
        if self.group not in GROUPS:
            raise UserError(f"group must be one of {GROUPS}, got {self.group!r}")
        if self.accounting == "pld" and self.group == "paper":
            raise UserError("the paper has no PLD accounting; use --group sound with pld")
        if not (isinstance(self.max_radius, int) and self.max_radius >= 1):
            raise UserError(f"max radius must be a positive integer, got {self.max_radius!r}")
        if not (isinstance(self.resolution, int) and self.resolution >= 0):
            raise UserError(f"resolution must be an integer >= 0, got {self.resolution!r}")
        if not 0.0 < self.paper_delta < 1.0:
            raise UserError(f"paper delta must lie in (0, 1), got {self.paper_delta}")


def default_cache_dir() -> Path:
    env = os.environ.get("DPCERT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpcert"


def next_table_radius(r: int, resolution: int) -> int:
    """Radius of the table after the one at r: every radius up to ``resolution``, then
    relative spacing 1/``resolution`` (``resolution`` 0: every radius)."""
    if resolution == 0 or r < resolution:
        return r + 1
    return r + -(-r // resolution)


def default_workers() -> int:
    """Processes that build group tables: $DPCERT_WORKERS, else the CPUs this process may use."""
    env = os.environ.get("DPCERT_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UserError(f"DPCERT_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _table_job(record: MechanismRecord, spec: AccountingSpec, r: int) -> OutcomeBound:
    return _sgm_pure(record, spec, r)


class GroupBounds:
    """Outcome-bound tables for r changed examples, r = 0, 1, ..., of one mechanism.

    Args:
        record: what the training ran.
        spec: which accounting and group mode.
        cache_dir: where tables persist across runs (None: in memory only).
        workers: processes that build tables in parallel (default :func:`default_workers`);
            1 builds them in this process. Results do not depend on it.
    """

    def __init__(self, record: MechanismRecord, spec: AccountingSpec | None = None, *,
                 cache_dir: Path | None = None, workers: int | None = None) -> None:
        self.record = record
        self.spec = spec or AccountingSpec()
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        self._close_pool: weakref.finalize | None = None
        if record.uses_subsets and self.spec.group == "paper" and self.spec.accounting == "rdp":
            raise UserError("the paper's RDP sub-dataset amplification is not reproduced; "
                            "use --group sound (sound sub-dataset accounting) instead")
        self._cache = Path(cache_dir) / self.key if cache_dir is not None else None
        # Sequential modes keep pure tables at the radii self._radii (0, 1, ..., then the
        # spacing of ``spec.resolution``) as rows of two growable stacks, so that the chain
        # over every split of r is one gather; independent modes keep only the probed tables.
        ident = outcomes.identity()
        self._lower = ident.lower[None, :].copy()
        self._upper = ident.upper[None, :].copy()
        self._radii: list[int] = [0]
        self._probed: dict[int, OutcomeBound] = {0: ident}
        self._direct: dict[int, OutcomeBound | None] = {}
        self._inner: _SgmTables | None = None
        if record.uses_subsets and self.spec.group == "sound":
            self._inner = _SgmTables(record, self.spec, self._cache)

    @property
    def key(self) -> str:
        spec = asdict(self.spec)
        if not self.record.uses_subsets:
            # Both enter the tables only through sub-dataset accounting (the resolution
            # chooses which radii get a table, not what a table at a radius holds).
            del spec["max_radius"], spec["resolution"]
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
        """Largest r covered by the pure tables built so far (sequential modes; 0 when none)."""
        return self._radii[-1]

    @property
    def sequential(self) -> bool:
        """True when the bound at r needs the pure tables of every r' <= r (the chain over
        splits of mixed changes); False when a table can be computed for any r on its own."""
        return not self.covers_any_change

    def table_radius(self, r: int) -> int:
        """Radius of the table that certifies r: the smallest table radius >= r."""
        t = self._radii[-1]
        if r <= t:
            return self._radii[bisect.bisect_left(self._radii, r)]
        while t < r:
            t = next_table_radius(t, self.spec.resolution)
        return t

    def pure(self, r: int) -> OutcomeBound:
        """Bound for r insertions or r deletions, non-decreasing in r by construction.

        Monotonicity is enforced by loosening each new table with the nearest table below it
        that exists (a bound for fewer changes, loosened, stays valid for r). In sequential
        modes that is the previous table radius; in independent modes the tables actually
        probed, which coincides whenever the raw tables are monotone themselves (tested).
        In sequential modes r is certified with the table at :meth:`table_radius` (r): a
        bound for a group of that size holds for every smaller group (the group's dominating
        pair covers members whose gradient contribution is anything up to the clip norm,
        zero included).
        """
        if self.sequential:
            self.build(r)
            return self._row(bisect.bisect_left(self._radii, r))
        if r not in self._probed:
            below = max(k for k in self._probed if k < r)
            self._probed[r] = outcomes.looser(self._load_or_compute(r), self._probed[below])
        return self._probed[r]

    def build(self, r: int, *, ahead: int = 0) -> None:
        """Build (or load) the pure tables up to the one that certifies r, in order; with
        ``ahead`` > 0 also that many further tables, computed in parallel with the others
        (a search that will need them soon saves a round of waiting on the slowest)."""
        if self._radii[-1] >= r:
            return
        todo = [next_table_radius(self._radii[-1], self.spec.resolution)]
        while todo[-1] < r:
            todo.append(next_table_radius(todo[-1], self.spec.resolution))
        for _ in range(ahead if self._parallel else 0):
            todo.append(next_table_radius(todo[-1], self.spec.resolution))
        for t, table in zip(todo, self._load_or_compute_many(todo), strict=True):
            self._append(t, outcomes.looser(table, self._row(len(self._radii) - 1)))

    @property
    def _parallel(self) -> bool:
        # Sub-dataset tables depend on the inner tables built so far: those stay serial.
        return (self.workers > 1 and self._inner is None and self.sequential
                and "fork" in multiprocessing.get_all_start_methods())

    def close(self) -> None:
        """Stop the table-building processes, if any were started (idempotent)."""
        if self._close_pool is not None:
            self._close_pool()
        self._pool = self._close_pool = None

    def _row(self, i: int) -> OutcomeBound:
        return OutcomeBound(self._lower[i], self._upper[i])

    def _append(self, radius: int, table: OutcomeBound) -> None:
        count = len(self._radii)
        if count == len(self._lower):
            grow = max(16, count)
            pad = np.empty((grow, self._lower.shape[1]))
            self._lower = np.concatenate([self._lower, pad])
            self._upper = np.concatenate([self._upper, pad])
        self._lower[count] = table.lower
        self._upper[count] = table.upper
        self._radii.append(radius)

    def any_change(self, r: int, lower_idx: np.ndarray, upper_idx: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Lower bounds at grid indices ``lower_idx`` and upper bounds at ``upper_idx`` valid
        for every a insertions + b deletions with a + b <= r (worst split of the chain)."""
        lower_idx, upper_idx = np.asarray(lower_idx), np.asarray(upper_idx)
        if self.covers_any_change or r == 0:
            b = self.pure(r)
            return b.lower[lower_idx], b.upper[upper_idx]
        self.build(r)
        outer, inner = self._split_rows(r)
        low = _chain_worst_split(self._lower, outer, inner, lower_idx, np.minimum,
                                 outcomes.floor_index)
        up = _chain_worst_split(self._upper, outer, inner, upper_idx, np.maximum,
                                outcomes.ceil_index)
        direct = self._direct_any_change(r)
        if direct is not None:
            low = np.maximum(low, direct.lower[lower_idx])
            up = np.minimum(up, direct.upper[upper_idx])
        return low, up

    def _split_rows(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (insertions a, deletions r - a) of every split a = 0..r, reduced to the ones
        not dominated by another: rows are non-decreasing in looseness and the chain is
        monotone in both, so a split whose two rows are both <= another's never decides."""
        radii = np.asarray(self._radii)
        a = np.arange(r + 1)
        pairs = np.unique(np.stack([np.searchsorted(radii, a), np.searchsorted(radii, r - a)]),
                          axis=1)
        order = np.lexsort((-pairs[1], -pairs[0]))  # outer row descending, then inner
        outer, inner = pairs[0, order], pairs[1, order]
        best_before = np.concatenate([[-1], np.maximum.accumulate(inner)[:-1]])
        keep = inner > best_before
        return outer[keep], inner[keep]

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

    def _load_or_compute_many(self, radii: list[int]) -> list[OutcomeBound]:
        """Tables at ``radii``: cached ones loaded, the rest computed, in parallel when
        several are missing (each is a pure function of record, spec and r)."""
        missing = [r for r in radii
                   if self._cache is None or not (self._cache / f"r{r:06d}.npz").exists()]
        if len(missing) < 2 or not self._parallel:
            return [self._load_or_compute(r) for r in radii]
        if self._pool is None:
            # fork: the children need nothing but this module, and unlike spawn/forkserver it
            # does not re-run the caller's script (a user's unguarded top-level code).
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("fork"))
            self._close_pool = weakref.finalize(self, self._pool.shutdown, wait=False,
                                                cancel_futures=True)
        futures = {r: self._pool.submit(_table_job, self.record, self.spec, r) for r in missing}
        out = []
        for r in radii:
            if r not in futures:
                out.append(self._load_or_compute(r))
                continue
            try:
                table = futures[r].result()
            except BrokenProcessPool:  # a worker died (e.g. out of memory): carry on here
                self.close()
                self.workers = 1
                table = self._compute(r)
            if self._cache is not None:
                atomic_save_npz(self._cache / f"r{r:06d}.npz", lower=table.lower,
                                upper=table.upper)
            out.append(table)
        return out

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


def _chain_worst_split(stack: np.ndarray, outer: np.ndarray, inner: np.ndarray, idx: np.ndarray,
                       worst, to_grid) -> np.ndarray:
    """worst over splits s of stack[outer[s]][to_grid(stack[inner[s]][idx])]: the bound for
    the insertions (row outer[s]) after the deletions (row inner[s]) at every grid index in
    ``idx`` (shape (M,)); ``stack`` holds the pure tables of one side (lower or upper)."""
    out = np.empty(len(idx))
    per = max(1, _CHAIN_CHUNK // len(outer))
    o, i = outer[:, None], inner[:, None]
    for start in range(0, len(idx), per):
        cols = idx[start:start + per]
        out[start:start + per] = worst.reduce(stack[o, to_grid(stack[i, cols[None, :]])], axis=0)
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
        delta = pld.group_privacy_profile(q, sigma, r, steps, EPS_GRID,
                                          interval=pld_interval(spec.pld_interval, r))
        return outcomes.from_profile(EPS_GRID, delta)
    orders = np.asarray(spec.orders)
    eps_rdp = rdp.group_rdp(q, sigma, r, orders, steps=steps, cap=RDP_CAP)
    if spec.accounting == "rdp":
        return outcomes.from_rdp(orders, eps_rdp)
    deltas = np.logspace(-15, -0.5, 60)
    eps = rdp.rdp_to_adp_epsilon(eps_rdp, orders, deltas)
    return outcomes.tighter(outcomes.from_profile(eps, deltas), _adp_group_privacy(record, spec, r))


#: Group size beyond which the PLD loss interval grows with r.
INTERVAL_SCALE_FROM = 128


def pld_interval(base: float, r: int) -> float:
    """Loss discretisation of the r-group PLD: ``base`` up to r = 32, then base * r / 32.

    The loss range of one step grows about linearly with r, so this keeps the number of loss
    buckets (and the cost of a table) about constant; the pessimistic discretisation is an
    upper bound at any interval. Measured: the same radii as ``base`` at every r on the
    paper's MNIST mechanisms (q = 0.001, T = 1000, sigma 1, 3, 6; radii up to 432), 3x less
    time; at r = 300-3000 the bounds move by about 1e-5, against the 1e-3 that one step of
    the table ladder (r/256) moves them.
    """
    return base * max(1.0, r / INTERVAL_SCALE_FROM)


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
