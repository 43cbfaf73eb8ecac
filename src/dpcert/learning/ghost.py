"""Per-example clipped gradient sums from one forward and one backward pass (no vmap).

For a model built from ``nn.Linear`` and ``nn.Conv2d`` layers (plus parameter-free layers),
the per-example gradient of a layer is a product of its input activation a_i and the gradient
g_i of the loss with respect to its output:

* Linear (input (B, d_in)):  dW_i = g_i a_i^T, so ||dW_i||^2 = ||g_i||^2 ||a_i||^2, db_i = g_i;
* Conv2d: dW_i[o, c, u, v] = sum_{h,w} g_i[o, h, w] a_i[c, h s + u, w s + v] over the padded
  input, computed for all examples by one grouped convolution (large outputs) or by
  contracting an ``as_strided`` patch view (small outputs), whichever is faster on CPU.

The squared norms add over layers, give the clipping factors c_i = min(1, C / ||grad_i||), and
the clipped sum is one weighted contraction per layer: sum_i c_i g_i a_i^T = (c g)^T a. This is
the "ghost"/book-keeping technique (Goodfellow 2015; Li et al. 2022; Bu et al. 2023) written for
the few layer types our DP models use; :func:`supports` says whether a model qualifies, and the
training falls back to ``torch.func.vmap`` otherwise. Tested equal to the vmap result.
"""

from __future__ import annotations

import torch
from torch import nn

_PARAM_FREE = (nn.ReLU, nn.Tanh, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def supports(model: nn.Module) -> bool:
    """True for an nn.Sequential of Linear / plain Conv2d and parameter-free layers."""
    if not isinstance(model, nn.Sequential):
        return False
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros" \
                    or isinstance(layer.padding, str):
                return False
        elif not isinstance(layer, (nn.Linear, *_PARAM_FREE)):
            return False
    return True


#: Output sizes (ho * wo) from which the grouped convolution beats the patch contraction on
#: CPU (benchmarks/bench_conv_grads.py: 1.5-2.2x faster at 10x10 and above, 1.3-5x slower at
#: 8x8 and below with many channels). A fixed rule, not timing, picks the method, so a run is
#: reproducible bit for bit.
GROUPED_MIN_OUTPUT = 100


def _conv_weight_grads(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients (B, O, C, kh, kw) of a Conv2d from input and output grads.

    dW_i[o, c, u, v] = sum_{h,w} g_i[o, h, w] a_i[c, h s + u, w s + v]."""
    if g.shape[2] * g.shape[3] >= GROUPED_MIN_OUTPUT:
        return conv_weight_grads_grouped(layer, a, g)
    return conv_weight_grads_patches(layer, a, g)


def conv_weight_grads_grouped(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor
                              ) -> torch.Tensor:
    """dW_i as a convolution of the padded input with the output gradient as kernel (dilated
    by the stride): with the batch as channels and one group per example, one grouped conv2d
    computes every example's gradient. Avoids gathering patches into contiguous memory (41% of
    a LeNet-5 step with the patch contraction)."""
    ph, pw = layer.padding
    kh, kw = layer.kernel_size
    ap = nn.functional.pad(a, (pw, pw, ph, ph))
    b, c = ap.shape[:2]
    o, ho, wo = g.shape[1:]
    out = nn.functional.conv2d(ap.transpose(0, 1), g.reshape(b * o, 1, ho, wo), groups=b,
                               dilation=layer.stride)  # (C, B*O, >= kh, >= kw)
    out = out[:, :, :kh, :kw]  # strides that do not divide the input leave extra rows
    return out.reshape(c, b, o, kh, kw).permute(1, 2, 0, 3, 4)


def conv_weight_grads_patches(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor
                              ) -> torch.Tensor:
    """dW_i by contracting an ``as_strided`` view of the padded input's patches with g_i
    (no unfold copy; einsum gathers the view once)."""
    ph, pw = layer.padding
    sh, sw = layer.stride
    kh, kw = layer.kernel_size
    ap = nn.functional.pad(a, (pw, pw, ph, ph))
    b, c = ap.shape[:2]
    ho, wo = g.shape[2], g.shape[3]
    s = ap.stride()
    patches = ap.as_strided((b, c, ho, wo, kh, kw), (s[0], s[1], s[2] * sh, s[3] * sw, s[2], s[3]))
    return torch.einsum("bchwuv,bohw->bocuv", patches, g)


def clipped_gradient_sum(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                         clip: float) -> dict[str, torch.Tensor]:
    """sum_i min(1, C / ||grad_i||) grad_i, keyed like ``model.named_parameters()``."""
    params = dict(model.named_parameters())
    if len(y) == 0:
        return {k: torch.zeros_like(v) for k, v in params.items()}
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    layers: list[tuple[str, nn.Module]] = []
    h = x
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            inputs.append(h.detach())
            h = layer(h)
            outputs.append(h)
            layers.append((name, layer))
        else:
            h = layer(h)
    loss = nn.functional.cross_entropy(h, y, reduction="sum")
    grads = torch.autograd.grad(loss, outputs)
    sq = torch.zeros(len(y), dtype=x.dtype, device=x.device)
    per_layer = []
    for (name, layer), a, g in zip(layers, inputs, grads, strict=True):
        if isinstance(layer, nn.Linear):
            sq = sq + g.pow(2).sum(1) * a.pow(2).sum(1)
            gb = g
            per_layer.append((name, layer, a, g, None, gb))
        else:
            gw = _conv_weight_grads(layer, a, g)
            gb = g.sum(dim=(2, 3))
            sq = sq + gw.pow(2).flatten(1).sum(1)
            per_layer.append((name, layer, a, g, gw, gb))
        if layer.bias is not None:
            sq = sq + gb.pow(2).sum(1)
    factor = torch.clamp(clip / (sq.sqrt() + 1e-12), max=1.0)
    out: dict[str, torch.Tensor] = {}
    for name, layer, a, g, gw, gb in per_layer:
        if gw is None:
            out[f"{name}.weight"] = (g * factor[:, None]).T @ a
        else:
            out[f"{name}.weight"] = torch.einsum("b,bocuv->ocuv", factor, gw)
        if layer.bias is not None:
            out[f"{name}.bias"] = factor @ gb
    return {k: out[k].detach() for k in params}
