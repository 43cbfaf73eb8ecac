"""Counter-based random numbers: known answers, exact distributions, key/counter separation."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy import stats

from dpcert.learning import philox


def _words(*vals: int) -> list[torch.Tensor]:
    return [torch.tensor([v], dtype=torch.int64) for v in vals]


@pytest.mark.parametrize(("counter", "key", "expected"), [
    # Random123 v1.14 tests/kat_vectors, philox4x32 with 10 rounds
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    out = philox.philox4x32(*_words(*counter), *_words(*key))
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize(("step", "purpose", "count", "start"), [
    (0, philox.SAMPLING, 1, 0), (7, philox.NOISE, 1001, 0), (2**32 + 5, philox.SUBSET, 17, 12345),
    (9, philox.AUGMENT, 3, 2**32 - 3),
])
def test_host_philox_gives_the_words_of_the_tensor_rounds(step, purpose, count, start):
    # randomgen's C Philox (the CPU path) against the rounds written here, word for word
    keys = philox.instance_keys(3, [0, 5, 17], "cpu")
    rounds = torch.stack(philox._blocks(keys, step, purpose, count, start), dim=2)
    for i, key in enumerate(zip(keys[0].flatten().tolist(), keys[1].flatten().tolist(),
                                strict=True)):
        host = philox._host_words(key, step, purpose, count, start)
        assert np.array_equal(host, rounds[i].numpy().astype(np.uint64))


def test_uniforms_do_not_depend_on_which_philox_computed_them(monkeypatch):
    keys = philox.instance_keys(4, [2, 9], "cpu")
    host = philox.uniform(keys, 11, philox.NOISE, 999, start=7)
    monkeypatch.setattr(philox, "randomgen", None)
    assert torch.equal(host, philox.uniform(keys, 11, philox.NOISE, 999, start=7))


@pytest.mark.parametrize("host", [True, False])
def test_block_indices_past_two_to_the_32_are_refused(monkeypatch, host):
    if not host:
        monkeypatch.setattr(philox, "randomgen", None)
    keys = philox.instance_keys(0, [0], "cpu")
    with pytest.raises(ValueError, match="outside"):
        philox.uniform(keys, 0, philox.NOISE, 4, start=2**32 - 3)


def test_streams_depend_on_seed_and_instance_only():
    a = philox.instance_keys(5, [0, 1, 2, 3], "cpu")
    b = philox.instance_keys(5, [3, 1], "cpu")
    za = philox.normal(a, 7, philox.NOISE, 1001)
    zb = philox.normal(b, 7, philox.NOISE, 1001)
    assert torch.equal(za[3], zb[0]) and torch.equal(za[1], zb[1])
    assert not torch.equal(za[0], za[1])
    assert not torch.equal(za[0], philox.normal(a, 8, philox.NOISE, 1001)[0])  # step
    assert not torch.equal(za[0, :10], philox.normal(a, 7, philox.SAMPLING, 10)[0])  # purpose
    assert not torch.equal(za[0], philox.normal(philox.instance_keys(6, [0], "cpu"), 7,
                                                 philox.NOISE, 1001)[0])  # seed
    # a prefix of a longer draw is the shorter draw
    assert torch.equal(philox.normal(a, 7, philox.NOISE, 10), za[:, :10])


def test_uniforms_are_uniform_and_normals_standard_normal():
    keys = philox.instance_keys(0, [0, 1], "cpu")
    u = philox.uniform(keys, 0, philox.SAMPLING, 50_000).flatten().numpy()
    assert 0.0 < u.min() and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    z = philox.normal(keys, 0, philox.NOISE, 100_001, dtype=torch.float64).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Box-Muller pairs are independent: no correlation between neighbours
    assert abs(np.corrcoef(z[:-1:2], z[1::2])[0, 1]) < 0.02
    # the two instances' streams are uncorrelated
    zz = philox.normal(keys, 0, philox.NOISE, 100_000).numpy()
    assert abs(np.corrcoef(zz[0], zz[1])[0, 1]) < 0.02


def test_poisson_positions_are_bernoulli_q_per_example_and_instance():
    n, q, steps = 150, 0.04, 3000
    keys = philox.instance_keys(1, [0, 1, 2], "cpu")
    counts = np.zeros((3, n))
    sizes = []
    for step in range(steps):
        index, mask = philox.poisson_positions(keys, step, n, q)
        for k in range(3):
            idx = index[k][mask[k]].numpy()
            assert np.all(np.diff(idx) > 0) and (idx.size == 0 or (idx[0] >= 0 and idx[-1] < n))
            assert not mask[k, idx.size:].any()  # the real examples are a prefix
            counts[k, idx] += 1
            sizes.append(idx.size)
    expected = steps * q
    for k in range(3):
        chi2 = float(np.sum((counts[k] - expected) ** 2 / (expected * (1 - q))))
        assert stats.chi2.sf(chi2, n) > 1e-4
    sizes = np.array(sizes)
    observed = np.bincount(sizes, minlength=n + 1)[:15]
    probs = stats.binom.pmf(np.arange(15), n, q)
    assert observed[0] > 0  # empty batches happen
    assert stats.chisquare(np.append(observed, len(sizes) - observed.sum()),
                           np.append(probs, 1 - probs.sum()) * len(sizes)).pvalue > 1e-4
    full, mask = philox.poisson_positions(keys, 0, 5, 1.0)
    assert mask.all() and torch.equal(full[1], torch.arange(5))


def test_poisson_positions_do_not_depend_on_the_chunk_of_gaps_drawn_at_once():
    keys = philox.instance_keys(2, list(range(20)), "cpu")
    index, mask = philox.poisson_positions(keys, 3, 400, 0.3)
    small, small_mask = philox.poisson_positions(keys, 3, 400, 0.3, chunk=4)  # ~30 rounds
    assert torch.equal(mask, small_mask) and torch.equal(index, small)
    alone, m1 = philox.poisson_positions(philox.instance_keys(2, [7], "cpu"), 3, 400, 0.3)
    assert torch.equal(alone[0][m1[0]], index[7][mask[7]])


_HOST_MAIN = r"""
#include <cstdint>
#include <cstdio>
static unsigned int __umulhi(unsigned int a, unsigned int b) {
  return (unsigned int)(((unsigned long long)a * b) >> 32);
}
%s
int main() {
  long long w[6];
  while (scanf("%%lld %%lld %%lld %%lld %%lld %%lld",
               &w[0], &w[1], &w[2], &w[3], &w[4], &w[5]) == 6) {
    int64_t o[4];
    dpcert_philox4x32_10<int64_t>(w[0], w[1], w[2], w[3], w[4], w[5], o[0], o[1], o[2], o[3]);
    printf("%%lld %%lld %%lld %%lld\n", (long long)o[0], (long long)o[1], (long long)o[2],
           (long long)o[3]);
  }
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_fused_cuda_kernel_source_computes_the_same_words(tmp_path):
    # The CUDA kernel (jiterator) can only run on a GPU; its source is plain C++ but for the
    # __umulhi intrinsic, so compiled for the host it must give the eager words and the KATs.
    src = tmp_path / "philox.cpp"
    src.write_text(_HOST_MAIN % philox._FUSED_SOURCE)
    subprocess.run(["g++", "-O1", "-o", str(tmp_path / "philox"), str(src)], check=True)
    gen = torch.Generator().manual_seed(1)
    words = [torch.randint(0, 2**32, (3000,), generator=gen) for _ in range(6)]
    words = [torch.cat([torch.tensor([2**32 - 1]), w]) for w in words]  # a KAT vector first
    lines = "\n".join(" ".join(str(int(w[i])) for w in words) for i in range(len(words[0])))
    out = subprocess.run([str(tmp_path / "philox")], input=lines, capture_output=True,
                         text=True, check=True).stdout.split()
    got = torch.tensor([int(v) for v in out]).view(-1, 4)
    want = torch.stack(philox._philox_eager(*words), dim=1)
    assert got.shape == want.shape and torch.equal(got, want)
    assert tuple(int(v) for v in got[0]) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


@pytest.mark.parametrize("fault", [None, "flipped bit", "compile error"])
def test_fused_kernel_serves_only_if_it_matches_the_eager_rounds(fault, monkeypatch):
    # the guard that keeps a miscompiled kernel from ever drawing numbers: a stand-in kernel
    # (the real one needs CUDA) that is exact, off by one bit, or fails to build
    def kernel(*words):
        if fault == "compile error":
            raise RuntimeError("nvrtc: error")
        out = list(philox._philox_eager(*words))
        if fault == "flipped bit":
            out[2] = out[2] ^ (out[2] == out[2].max()).long()
        return tuple(out)

    monkeypatch.setattr(philox, "_FUSED", kernel)
    monkeypatch.setattr(philox, "_FUSED_CHECKED", {})
    if fault is None:
        assert philox._fused_ok(torch.device("cpu"))
    else:
        with pytest.warns(RuntimeWarning, match="eager rounds instead"):
            assert not philox._fused_ok(torch.device("cpu"))
        assert not philox._fused_ok(torch.device("cpu"))  # decided once per device


def test_fused_kernel_is_off_the_cpu_and_the_env_switch_keeps_eager(monkeypatch):
    x = philox.instance_keys(1, [0, 1], "cpu")
    assert not philox._FUSED_CHECKED  # never consulted for CPU tensors
    philox.normal(x, 0, philox.NOISE, 10)
    assert not philox._FUSED_CHECKED
    monkeypatch.setenv("DPCERT_FUSED_RNG", "0")
    assert not philox._fused_ok(torch.device("cuda", 0))
