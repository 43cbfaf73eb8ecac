"""Fixed, data-independent feature maps computed once per dataset and cached on disk.

``scatter``: the 2-D scattering transform (Mallat 2012; ScatterNet as used for DP learning by
Tramèr & Boneh, "Differentially Private Learning Needs Better Features (or Much More Data)",
ICLR 2021) with J = 2 scales and L = 8 angles — fixed Morlet wavelets, nothing fitted to data —
giving 81 channels per input channel on a grid a quarter of the image size (81 x 7 x 7 = 3969
numbers for 28 x 28 grey images). Each example is then normalised on its own: its channels in
groups of 9 consecutive ones are standardised within the group (zero mean, unit variance over
the group's channels and positions: GroupNorm applied to one example, no learned affine), and
the whole vector is scaled to unit L2 norm. Without the group step the order-0 channel (a
blurred image) dominates the norm and DP-SGD learns the wavelet channels slowly (validation
accuracy 0.72 vs 0.79, docs/results.md); the unit norm bounds the linear model's per-example
gradient.

Why nothing here may look at the training set as a whole: a certificate covers the training
algorithm applied to the (possibly poisoned) data set. A normalisation by a training-set
statistic (a mean, a standard deviation) is part of that algorithm, and the DP-SGD mechanism
record would not describe it: one poisoned example moves the statistic for every instance.
Per-example operations and fixed constants are post-processing of each example alone, so the
features of the clean examples are the same whatever the attacker inserts, and each poisoned
example is still one example of the mechanism.

The transform comes from kymatio (the field's implementation). kymatio 0.3.0 imports its 3-D
part at package import, and that part calls ``scipy.special.sph_harm``, which current scipy
removed in favour of ``sph_harm_y`` (same function, other argument order). The 2-D transform
never calls it; :func:`_import_kymatio` supplies the old name from the new function so the
package imports.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from dpcert.errors import UserError, missing_extra

FEATURES = ("scatter",)
#: Bump when the transform changes, so cached features are recomputed.
_VERSION = "scatter-j2-l8-gn9-l2-v1"
#: Consecutive scattering channels standardised together.
GROUP = 9
#: Up to this many images, the wavelets of a scale are batched (:func:`_scatter_by_groups`).
_FEW = 16


def _import_kymatio():
    import scipy.special

    if not hasattr(scipy.special, "sph_harm"):
        def sph_harm(m, n, azimuth, polar):  # the removed signature, in terms of the new one
            return scipy.special.sph_harm_y(n, m, polar, azimuth)

        scipy.special.sph_harm = sph_harm
    try:
        from kymatio.torch import Scattering2D
    except ImportError:
        raise missing_extra("features 'scatter'", "kymatio", "features") from None
    return Scattering2D


def scatter_features(x: np.ndarray, *, batch: int = 2000, progress: bool = False) -> np.ndarray:
    """ScatterNet features of images x (n, C, H, W) in [0, 1] -> float32 (n, D), unit L2 rows.

    D = C * 81 * (H/4) * (W/4) (3969 for 28 x 28 grey images)."""
    import torch
    from tqdm import tqdm

    if x.ndim != 4 or x.shape[2] < 8 or x.shape[3] < 8:
        raise UserError(f"scatter features need images (n, C, H, W) of at least 8x8, got "
                        f"shape {x.shape}")
    scattering = _scattering(tuple(x.shape[2:]))
    # Batched over wavelets for a few images (a server's requests: 8x faster on one image);
    # kymatio's own loop for many, where its per-filter calls are amortised and the grouped
    # intermediates (images x 64 wavelets x padded maps) only cost memory bandwidth.
    few = len(x) <= _FEW
    transform_ = functools.partial(_scatter_by_groups, scattering) if few else scattering
    out = []
    for i in tqdm(range(0, len(x), batch), desc="scatter features", unit="batch",
                  disable=not progress, leave=False):
        with torch.no_grad():
            s = transform_(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))
            out.append(normalise(s.reshape(s.shape[0], -1, *s.shape[-2:])).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _scatter_by_groups(sc, x):
    """kymatio's 2-D scattering of x (..., H, W), computed with kymatio's own padding, filters
    and backend operations, but for all wavelets of a scale at once.

    kymatio 0.3 loops over the 16 first-order and 64 second-order wavelets in Python, one
    small FFT at a time (about 150 tensor calls per image, 45 ms for one 28 x 28 image on a
    2-core CPU: most of the time a server spends on a request). This runs the same
    operations, in the same order for every coefficient, batched over the wavelets of each
    scale (about 20 calls). Its output equals kymatio's (tested to 1e-6) and has its layout
    (..., 1 + J L + L^2 J (J - 1) / 2, H / 2^J, W / 2^J), coefficients in kymatio's order."""
    import torch

    b = sc.backend
    phi, psi = sc.load_filters()
    big_j = sc.J
    batch_shape = x.shape[:-2]
    x = x.reshape((-1,) + tuple(x.shape[-2:]))
    u0 = b.rfft(sc.pad(x))
    out = [sc.unpad(b.irfft(b.subsample_fourier(b.cdgmm(u0, phi["levels"][0]), k=2 ** big_j)))
           .unsqueeze(1)]
    groups = {}
    for n, f in enumerate(psi):
        groups.setdefault(f["j"], []).append(n)
    if list(sum(groups.values(), [])) != list(range(len(psi))):
        raise RuntimeError("kymatio's wavelets are not ordered by scale")  # its layout changed
    u1 = {}
    for j1, ns in groups.items():
        a = u0.unsqueeze(1) * torch.stack([psi[n]["levels"][0] for n in ns])
        if j1 > 0:
            a = b.subsample_fourier(a.contiguous(), k=2 ** j1)
        u1[j1] = b.rfft(b.modulus(b.ifft(a.contiguous())))
        s1 = b.subsample_fourier((u1[j1] * phi["levels"][j1]).contiguous(), k=2 ** (big_j - j1))
        out.append(sc.unpad(b.irfft(s1)))
    if sc.max_order >= 2:
        for j1 in groups:
            per_j2 = []
            for j2, ns2 in groups.items():
                if j2 <= j1:
                    continue
                a = u1[j1].unsqueeze(2) * torch.stack([psi[n]["levels"][j1] for n in ns2])
                a = b.subsample_fourier(a.contiguous(), k=2 ** (j2 - j1))
                u2 = b.rfft(b.modulus(b.ifft(a)))
                s2 = b.subsample_fourier((u2 * phi["levels"][j2]).contiguous(),
                                         k=2 ** (big_j - j2))
                per_j2.append(sc.unpad(b.irfft(s2)))
            if per_j2:
                s2 = torch.cat(per_j2, dim=2)  # (B, n1, n2, h, w): n1-major, as kymatio
                out.append(s2.reshape(s2.shape[0], -1, *s2.shape[-2:]))
    s = torch.cat(out, dim=1)
    return s.reshape(batch_shape + tuple(s.shape[-3:]))


@functools.lru_cache(maxsize=4)
def _scattering(shape: tuple[int, int]):
    """The transform for images of ``shape``, built once per process: building its filter bank
    costs far more than transforming one image (a server answers single images)."""
    return _import_kymatio()(J=2, shape=shape, L=8)


def compute(x: np.ndarray, kind: str, *, progress: bool = False) -> np.ndarray:
    """Features ``kind`` of images x (n, C, H, W), computed now (no cache): new inputs."""
    if kind not in FEATURES:
        raise UserError(f"features must be one of {FEATURES}, got {kind!r}")
    return scatter_features(x, progress=progress)


def normalise(s):
    """Per-example normalisation of scattering maps s (b, K, h, w), K a multiple of GROUP:
    groups of GROUP channels standardised, then unit L2 norm; returns float32 (b, K h w)."""
    b = s.shape[0]
    g = s.reshape(b, s.shape[1] // GROUP, -1)
    g = (g - g.mean(2, keepdim=True)) / (g.std(2, keepdim=True) + 1e-6)
    f = g.reshape(b, -1)
    return (f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()


def _cache_path(x: np.ndarray, kind: str) -> Path:
    digest = hashlib.sha256()
    digest.update(f"{_VERSION}|{kind}|{x.shape}|{x.dtype}".encode())
    digest.update(np.ascontiguousarray(x).view(np.uint8).ravel().data)
    from dpcert.certification.accounting import default_cache_dir

    root = Path(os.environ.get("DPCERT_FEATURE_CACHE", default_cache_dir() / "features"))
    return root / f"{kind}-{digest.hexdigest()[:24]}.npy"


def transform(x: np.ndarray, kind: str, *, progress: bool = False) -> np.ndarray:
    """Features ``kind`` of images x, read from the cache (keyed by the images' content and the
    transform version) or computed and cached atomically."""
    if kind not in FEATURES:
        raise UserError(f"features must be one of {FEATURES}, got {kind!r}")
    path = _cache_path(x, kind)
    if path.exists():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape[0] == len(x) and cached.dtype == np.float32:
                return cached
        except (OSError, ValueError):
            pass
        path.unlink(missing_ok=True)
    feats = scatter_features(x, progress=progress)
    from dpcert.store import atomic_save_npy

    atomic_save_npy(path, feats)
    return feats
