"""ComfyUI's merged weight per adapter type, as a test-only reference (torch, float32).

Written for these tests from the facts of ComfyUI's code (comfyanonymous/ComfyUI, read in
2026-12), not copied from it: ``calculate_weight`` of each adapter in comfy/weight_adapter/
(lora.py ``LoRAAdapter``, loha.py ``LoHaAdapter``, lokr.py ``LoKrAdapter``, glora.py
``GLoRAAdapter``, oft.py ``OFTAdapter``, boft.py ``BOFTAdapter``) and ``weight_decompose`` in
comfy/weight_adapter/base.py. ComfyUI patches a copy of the weight in
``lora_compute_dtype(device)`` (comfy/model_patcher.py, before comfy/lora.py
``calculate_weight``): float32 on the CPU (float16 on fp16-capable GPUs, not modelled here),
casts every adapter tensor to the intermediate dtype (float32) and applies ``function``
(identity here).

The facts each function follows:
- alpha: the file's value (None without an ``.alpha``: scale 1); LoRA, LoHa, GLoRA divide it by
  the rank (``lora_down`` / ``hada_w1_b`` / ``a2`` rows), LoKr by the decomposed factor's rank
  only (1 with both factors whole); an alpha of 0 scales to 0.
- Without ``dora_scale``: ``W += (strength * alpha) * dW``.
- ``weight_decompose``: ``W1 = W + alpha * dW``; output side when ``dora_scale.shape[0] ==
  W.shape[0]``, the norm of each row of the *base* ``W`` (not ``W1``: open ComfyUI PR #15458);
  input side, the norm of each input column of ``W1``; ``+ finfo(float32).eps``; ``W1 *
  dora_scale / norm``; strength ``s != 1``: ``W + s * (W1' - W)``.
- OFT: ``alpha`` is the constraint, compared with ``||Q||`` itself (LyCORIS multiplies it by
  the output rows); the Cayley inverse in float32; the diff ``(s R - s I)^T W`` added times
  ``s`` again; ``rescale`` loaded and not applied.
- BOFT: the butterfly stages with each ``R`` interpolated to ``s R + (1 - s) I``, ``rescale``
  applied, the diff added times ``s`` again.
- GLoRA: the new layout ``W a1 a2 + b1 b2`` or the old ``b2 b1 + W a2 a1``, told apart by shape
  (both fit a square weight: old when ``a2`` has as many rows as the weight); no ``bm``.
"""

from __future__ import annotations

import torch

F32 = torch.float32


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x).to(F32)


def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, *, fixed=False):
    """comfy/weight_adapter/base.py ``weight_decompose``; ``fixed``: the output-side norm of
    ``W + dW`` (open ComfyUI PR #15458, what LyCORIS trains with) instead of ``W``'s."""
    dora_scale = _t(dora_scale)
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        normed = weight_calc if fixed else weight
        norm = normed.reshape(normed.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(normed.shape[0], *[1] * (normed.dim() - 1))
    else:
        norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1)
        norm = norm.norm(dim=1, keepdim=True)
        norm = norm.reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm).to(weight.dtype)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def _finish(weight, lora_diff, alpha, strength, dora_scale, fixed):
    if dora_scale is not None:
        return weight_decompose(dora_scale, weight, lora_diff, alpha, strength, fixed=fixed)
    return weight + (strength * alpha) * lora_diff


def lora(w, up, down, alpha, strength=1.0, mid=None, dora_scale=None, fixed=False):
    """comfy/weight_adapter/lora.py ``LoRAAdapter.calculate_weight`` (``lora_mid`` folded into
    ``lora_down`` by one matmul, as ComfyUI does)."""
    weight = _t(w).clone()
    up, down = _t(up), _t(down)
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    if mid is not None:
        mid = _t(mid)
        shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
        down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
        down = down.reshape(shape).transpose(0, 1)
    diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
    return _finish(weight, diff, scale, strength, dora_scale, fixed)


def loha(w, t, alpha, strength=1.0, dora_scale=None, fixed=False):
    """comfy/weight_adapter/loha.py ``LoHaAdapter.calculate_weight``; ``t``: role -> tensor."""
    weight = _t(w).clone()
    t = {k: _t(v) for k, v in t.items()}
    scale = 1.0 if alpha is None else alpha / t["hada_w1_b"].shape[0]
    if "hada_t1" in t:
        halves = [
            torch.einsum(
                "i j k l, j r, i p -> p r k l",
                t[f"hada_t{i}"],
                t[f"hada_w{i}_b"],
                t[f"hada_w{i}_a"],
            )
            for i in (1, 2)
        ]
    else:
        halves = [torch.mm(t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]) for i in (1, 2)]
    diff = (halves[0] * halves[1]).reshape(weight.shape)
    return _finish(weight, diff, scale, strength, dora_scale, fixed)


def lokr(w, t, alpha, strength=1.0, dora_scale=None, fixed=False):
    """comfy/weight_adapter/lokr.py ``LoKrAdapter.calculate_weight``."""
    weight = _t(w).clone()
    t = {k: _t(v) for k, v in t.items()}
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim = t["lokr_w1_b"].shape[0]
        w1 = torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum(
                "i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]
            )
        else:
            w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # ComfyUI passes the Tucker einsum's (non-contiguous) result as it is: torch 2.13's CPU
    # kron then raises, ComfyUI logs "ERROR lokr ..." and leaves the weight unchanged
    w2 = w2.contiguous()
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    diff = torch.kron(w1, w2).reshape(weight.shape)
    return _finish(weight, diff, scale, strength, dora_scale, fixed)


def glora(w, a1, a2, b1, b2, alpha, strength=1.0, dora_scale=None, fixed=False):
    """comfy/weight_adapter/glora.py ``GLoRAAdapter.calculate_weight``."""
    weight = _t(w).clone()
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    rank = a1.shape[0] if old else None
    new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
    square = weight.shape[0] == weight.shape[1]
    if new and not (old and a2.shape[0] == weight.shape[0] and square):
        old = False
        rank = a2.shape[0]
    a1, a2, b1, b2 = (_t(x).flatten(1) for x in (a1, a2, b1, b2))
    scale = 1.0 if alpha is None else alpha / rank
    if old:
        diff = (torch.mm(b2, b1) + torch.mm(torch.mm(weight.flatten(1), a2), a1)).reshape(
            weight.shape
        )
    else:
        if weight.dim() > 2:
            wa = torch.einsum("o i ..., i j -> o j ...", weight, a1)
            diff = torch.einsum("o i ..., i j -> o j ...", wa, a2).reshape(weight.shape)
        else:
            diff = torch.mm(torch.mm(weight, a1), a2).reshape(weight.shape)
        diff = diff + torch.mm(b1, b2).reshape(weight.shape)
    return _finish(weight, diff, scale, strength, dora_scale, fixed)


def _cayley(blocks, alpha):
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if alpha is not None and alpha > 0:
        norm = torch.norm(q) + 1e-8
        if norm > alpha:
            q = q * alpha / norm
    return (eye + q) @ (eye - q).float().inverse(), eye


def oft(w, blocks, alpha, strength=1.0, rescale=None):
    """comfy/weight_adapter/oft.py ``OFTAdapter.calculate_weight`` (``rescale`` unused there)."""
    weight = _t(w).clone()
    blocks = _t(blocks)
    n, b, _ = blocks.shape
    r, eye = _cayley(blocks, alpha)
    _, *shape = weight.shape
    diff = torch.einsum(
        "k n m, k n ... -> k m ...", r * strength - strength * eye, weight.view(n, b, *shape)
    ).view(-1, *shape)
    return weight + strength * diff


def boft(w, blocks, alpha, strength=1.0, rescale=None):
    """comfy/weight_adapter/boft.py ``BOFTAdapter.calculate_weight``."""
    weight = _t(w).clone()
    blocks = _t(blocks)
    stages, _, b, _ = blocks.shape
    r, eye = _cayley(blocks, alpha)
    x = weight
    for i in range(stages):
        bi = r[i]
        k = 2**i * (b // 2)
        if strength != 1:
            bi = bi * strength + (1 - strength) * eye
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("b i j, b j ... -> b i ...", bi, x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if rescale is not None:
        x = x * _t(rescale)
    return weight + strength * (x - weight)
