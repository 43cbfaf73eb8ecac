"""Counter-based random numbers for many DP-SGD instances at once, on any device.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the
generator behind cuRAND's and JAX's defaults) maps a 128-bit counter and a 64-bit key to 128
random bits. Every number an instance draws is addressed by (key, counter): the key comes from
(seed, instance) and the counter from (step, purpose, index). So an instance's sampling and
noise never depend on which other instances share its batch, the chunk size, the device, the
worker, or a resume — and the numbers of K instances come from one vectorised computation, not
one generator call per instance.

Written by hand because torch offers no Philox with a chosen counter on its devices (its
generators take one seed per call) and numpy's ``Philox`` is the 4x64 variant. Words are held in
int64 tensors; 32x32-bit products are computed modulo 2^64 in two's complement and split into
high and low words, which is exact. Tested bit for bit against the Random123 known-answer
vectors. On the CPU the same words come from randomgen's ``Philox(number=4, width=32)`` (C, by
the author of numpy's bit generators) when it is installed: the words of a LeNet-5 step's 62k
normals in ~0.3 ms instead of ~1.0; tested equal to the rounds here, word for word.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from dpcert.errors import UserError

try:
    import randomgen
except ImportError:  # the tensor rounds give the same words, only slower
    randomgen = None

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK = 0xFFFFFFFF
#: counter word 3: what a number is for, so the streams of one instance never overlap
SAMPLING, NOISE, SUBSET, AUGMENT = 1, 2, 3, 4


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               k0: torch.Tensor, k1: torch.Tensor, rounds: int = 10
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 of counter words (c0..c3) under key words (k0, k1).

    All inputs are int64 tensors holding values in [0, 2^32) that broadcast together; returns
    the four output words, same convention. On a CUDA device the ten rounds run as one fused
    kernel (:func:`_fused_ok`) when it compiled and matched the eager rounds bit for bit."""
    if rounds == 10 and c0.device.type == "cuda" and _fused_ok(c0.device):
        return _FUSED(c0, c1, c2, c3, k0, k1)
    return _philox_eager(c0, c1, c2, c3, k0, k1, rounds)


def _philox_eager(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = c0 * _M0  # < 2^64: wraps in int64, but its low 64 bits are exact
        p1 = c2 * _M1
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK) ^ c1 ^ k0, p1 & _MASK, \
            ((p0 >> 32) & _MASK) ^ c3 ^ k1, p0 & _MASK
    return c0, c1, c2, c3


# The same ten rounds as one elementwise CUDA kernel (torch's jiterator compiles it with NVRTC
# at first use). Eager int64 arithmetic launches ~130 kernels per call, each streaming the whole
# (K, blocks) state through memory: 21 us per instance-step of noise on an H200, a quarter of
# the 90 s target for P x T. Written by hand because torch exposes no Philox with a chosen
# counter (its own is keyed by a seed and an offset), and torch.compile of the eager version
# failed under Triton (docs/benchmarks.md).
_FUSED_SOURCE = """
template <typename T> void dpcert_philox4x32_10(T c0, T c1, T c2, T c3, T k0, T k1,
                                                T& o0, T& o1, T& o2, T& o3) {
  unsigned int x0 = c0, x1 = c1, x2 = c2, x3 = c3, y0 = k0, y1 = k1;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) { y0 += 0x9E3779B9u; y1 += 0xBB67AE85u; }
    unsigned int h0 = __umulhi(0xD2511F53u, x0), l0 = 0xD2511F53u * x0;
    unsigned int h1 = __umulhi(0xCD9E8D57u, x2), l1 = 0xCD9E8D57u * x2;
    x0 = h1 ^ x1 ^ y0;
    x1 = l1;
    x2 = h0 ^ x3 ^ y1;
    x3 = l0;
  }
  o0 = x0; o1 = x1; o2 = x2; o3 = x3;
}
"""
_FUSED = None
#: per device: did the fused kernel compile and agree with the eager rounds?
_FUSED_CHECKED: dict[str, bool] = {}


def _fused_ok(device: torch.device) -> bool:
    """Whether the fused kernel serves ``device``: compiled, and bit-equal to the eager rounds
    (computed on the host) on 4096 random counters and keys, checked once per process and
    device. Off with the environment variable DPCERT_FUSED_RNG=0; any failure falls back to the
    eager rounds with a warning, so the numbers never depend on which ran."""
    global _FUSED
    if os.environ.get("DPCERT_FUSED_RNG", "1") == "0":
        return False
    key = str(device)
    if key not in _FUSED_CHECKED:
        try:
            if _FUSED is None:
                from torch.cuda import jiterator

                _FUSED = jiterator._create_multi_output_jit_fn(_FUSED_SOURCE, num_outputs=4)
            gen = torch.Generator().manual_seed(12345)
            words = [torch.randint(0, 2**32, (4096,), generator=gen, device="cpu")
                     for _ in range(6)]
            want = _philox_eager(*words)
            got = _FUSED(*[w.to(device) for w in words])
            ok = all(torch.equal(a, b.cpu()) for a, b in zip(want, got, strict=True))
            reason = "its words differ from the eager rounds"
        except Exception as err:  # noqa: BLE001 - any failure: the exact eager path serves
            ok, reason = False, f"{type(err).__name__}: {str(err)[:200]}"
        if not ok:
            warnings.warn(f"fused Philox kernel not used ({reason}); eager rounds instead",
                          RuntimeWarning, stacklevel=3)
        _FUSED_CHECKED[key] = ok
    return _FUSED_CHECKED[key]


def instance_keys(seed: int, instances: list[int] | np.ndarray, device: torch.device | str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The key words (K, 1) of each instance: 64 bits of SeedSequence([seed, instance])."""
    state = np.stack([np.random.SeedSequence([seed, int(i)]).generate_state(2, dtype=np.uint32)
                      for i in instances]).astype(np.int64)
    keys = torch.from_numpy(state).to(device)
    return keys[:, :1], keys[:, 1:]


def _check_blocks(start: int, count: int) -> None:
    # Counter word 0 indexes the blocks; word 1 stays 0 (no carry into it), so at most 2^32.
    if start < 0 or count < 0 or start + count > 2**32:
        raise ValueError(f"Philox blocks {start} .. {start + count - 1} outside [0, 2^32)")


def _blocks(keys: tuple[torch.Tensor, torch.Tensor], step: int, purpose: int, count: int,
            start: int = 0) -> tuple[torch.Tensor, ...]:
    """Output words of blocks start .. start+count-1 for every instance: (K, count) each."""
    _check_blocks(start, count)
    k0, k1 = keys
    c0 = torch.arange(start, start + count, device=k0.device, dtype=torch.int64)[None, :]
    zero = torch.zeros((), device=k0.device, dtype=torch.int64)
    return philox4x32(c0, zero, zero + (step & _MASK), zero + purpose, k0, k1)


def _unit(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """float64 in the open interval (0, 1) from 53 of the 64 bits (hi, lo): (m + 1/2) / 2^53."""
    m = (hi << 21) | (lo >> 11)
    return (m.to(torch.float64) + 0.5) * 2.0**-53


def _host_words(key: tuple[int, int], step: int, purpose: int, count: int, start: int = 0
                ) -> np.ndarray:
    """The words of :func:`_blocks` for one instance's key (k0, k1), from randomgen's C
    Philox4x32-10: (count, 4) uint64.

    Its state is the 128-bit counter (word 0 lowest) and the 64-bit key (k0 lowest); it adds 1
    to the counter before each block, hence the ``- 1``."""
    _check_blocks(start, count)
    first = start + ((step & _MASK) << 64) + (purpose << 96) - 1
    gen = randomgen.Philox(counter=first, key=key[0] | (key[1] << 32), number=4, width=32)
    return gen.random_raw(4 * count).reshape(count, 4)


def _host_uniform(keys: tuple[torch.Tensor, torch.Tensor], step: int, purpose: int, count: int,
                  start: int = 0) -> torch.Tensor:
    """:func:`uniform` on the host from :func:`_host_words`, one instance at a time (written
    for few passes over memory: at 62k normals per step the copies cost more than the
    rounds)."""
    pairs = zip(keys[0].flatten().tolist(), keys[1].flatten().tolist(), strict=True)
    out = np.empty((keys[0].shape[0], count, 2))
    for row, key in zip(out, pairs, strict=True):
        w = _host_words(key, step, purpose, count, start).reshape(count, 2, 2)
        m = w[..., 0] << np.uint64(21)
        m |= w[..., 1] >> np.uint64(11)
        np.add(m, 0.5, out=row)
    out *= 2.0**-53
    return torch.from_numpy(out.reshape(len(out), 2 * count))


def uniform(keys: tuple[torch.Tensor, torch.Tensor], step: int, purpose: int, count: int,
            start: int = 0) -> torch.Tensor:
    """(K, 2 * count) float64 uniforms on (0, 1): two per Philox block, index 2j and 2j + 1
    from block start + j."""
    if randomgen is not None and keys[0].device.type == "cpu":
        return _host_uniform(keys, step, purpose, count, start)
    w0, w1, w2, w3 = _blocks(keys, step, purpose, count, start)
    return torch.stack([_unit(w0, w1), _unit(w2, w3)], dim=2).flatten(1)


def normal(keys: tuple[torch.Tensor, torch.Tensor], step: int, purpose: int, count: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(K, count) standard normals by the Box-Muller transform of 53-bit uniforms.

    Computed in float64 (the radius sqrt(-2 ln u) reaches 8.6 standard deviations, against 5.7
    for float32 uniforms), then rounded to ``dtype``."""
    pairs = (count + 1) // 2
    u = uniform(keys, step, purpose, pairs).view(-1, pairs, 2)
    radius = u[..., 0].log().mul_(-2.0).sqrt_()
    angle = u[..., 1] * (2.0 * math.pi)
    z = torch.empty(u.shape[0], pairs, 2, dtype=dtype, device=u.device)
    torch.mul(radius, angle.cos(), out=z[..., 0])  # float64 products, rounded once to dtype
    torch.mul(radius, angle.sin_(), out=z[..., 1])
    return z.flatten(1)[:, :count]


def batch_ceiling(n: int, q: float) -> int:
    """The expected Poisson batch q n plus six standard deviations (and 16): how many gaps to
    draw at a time, and the batch width that memory estimates assume."""
    return int(n * q + 6 * math.sqrt(n * q) + 16)


def expected_batch(sample_rate: float, *, subset_size: int | None,
                   declared_size: int | None) -> float:
    """The divisor of a DP-SGD step's noisy gradient sum: q times the *declared* number of
    examples an instance trains on — its subset size m, else the training set's declared size.

    Never the number of examples actually present: an attacker who inserts one example would
    otherwise rescale every step of every instance, a change that no accounting of the one
    example's gradient covers. (Dividing by the realised batch size would leak it the same
    way.) Raises a one-line :class:`UserError` when neither size is declared."""
    size = subset_size if subset_size is not None else declared_size
    if size is None:
        raise UserError("DP-SGD divides each noisy gradient sum by q times the declared "
                        "number of training examples, and none is declared: give "
                        "--train-size N (train_size: in a config, or an .npz entry; "
                        "declared_size= in the Python API) — it is never counted from the "
                        "training data")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
        raise UserError(f"the declared number of training examples must be a positive "
                        f"integer, got {size!r}")
    return sample_rate * size


def poisson_positions(keys: tuple[torch.Tensor, torch.Tensor], step: int, n: int, q: float,
                      chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson sampling of [0, n) at rate q for every instance: (index (K, W), mask (K, W)).

    The gaps between included positions of a Bernoulli(q) sequence are i.i.d. Geometric(q),
    drawn as 1 + floor(ln u / ln(1 - q)); their cumulative sums below n are exactly the
    included positions (a prefix of each row). W is the largest batch (at least 1); padding
    holds index 0 with mask False. Gaps are drawn ``chunk`` at a time (default: the expected
    batch plus six standard deviations) until every row passes n; the positions do not depend
    on the chunk (each round reads the next uniforms of the same sequence)."""
    k = keys[0].shape[0]
    device = keys[0].device
    if q >= 1.0:
        index = torch.arange(n, device=device).expand(k, n)
        return index, torch.ones(k, n, dtype=torch.bool, device=device)
    if chunk is None:
        chunk = batch_ceiling(n, q)
    log1mq = math.log1p(-q)
    pos = torch.empty(k, 0, dtype=torch.int64, device=device)
    last = torch.full((k,), -1, dtype=torch.int64, device=device)
    drawn = 0
    while True:
        u = uniform(keys, step, SAMPLING, (chunk + 1) // 2, start=drawn // 2)
        drawn += 2 * ((chunk + 1) // 2)
        gaps = 1 + torch.floor(torch.log(u) / log1mq).clamp(max=n + 1).to(torch.int64)
        more = last[:, None] + torch.cumsum(gaps, dim=1)
        pos = torch.cat([pos, more], dim=1)
        last = more[:, -1]
        if bool((last >= n).all()):
            break
    valid = pos < n
    width = max(1, int(valid.sum(1).max()))
    valid = valid[:, :width]
    return torch.where(valid, pos[:, :width], 0), valid
