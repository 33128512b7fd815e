"""Grouped W4A8 (comfy-kitchen ``AsymW4A8Int8Layout``): rotated 4-bit codes. Name ``asym_w4a8_int8``.

Current ComfyUI (0.33, ``QUANT_ALGOS``) loads it natively and runs it as an INT8 GEMM: the 4-bit
codes decode to int8 levels, activations are rotated and quantized to int8 per call (W4A8). The
4-bit layout is the same in comfy-kitchen 0.2.31 (0.33's pin) and 0.2.40; 0.2.40 adds a 6-bit
variant (rows of 3N/4 bytes) that 0.2.31 cannot load, so this codec writes 4-bit only. The
asymmetric variant (a ``correction`` tensor) is not loaded by 0.33's ``comfy/ops.py``: not written.

Spec (M = out_features, N = in_features; ``gs = group_size`` (default 16: divides 16 or is a
multiple of it, >= 4), ``g = convrot_groupsize`` (default 256); N a multiple of 16, gs and g)
------------------------------------------------------------------------------------------------
- ``R``: ConvRot-rotated weight (``_convrot.py``) in float32 groups ``[M, N/gs, gs]``.
- codebook (default): a 16-level table ``C`` (``weight_codebook`` float32 [16]): the fixed Lloyd-Max
  Gaussian table, unless the excess kurtosis of the group-normalized ``R`` (a deterministic sample)
  exceeds -0.1, then a 25-step k-means fit. Group scale: start ``a = max(amax, 1e-8)``, codes =
  nearest level of ``R/a``, then two least-squares refinements ``a = <R,C[q]>/<C[q],C[q]>``.
  uniform (``codebook: false``): ``a = max(amax/7, 1e-8)``, codes ``clamp(round(R/a), -8, 7) + 8``.
- ``weight_s_channel`` float32 [M]: ``max(amax over the row of |level * a|, 1e-8) / 127``;
  ``weight_s_rel`` float8_e4m3fn [M, N/gs]: ``a / s_channel``.
- codebook codes are then re-chosen against the int8 grid each group decodes to:
  ``L = clamp(round(C * s_rel), -127, 127)``, code = nearest ``L`` to ``R / s_channel``.
- ``weight``: int8 [M, N/2], unsigned nibbles, the EVEN column in the LOW nibble.
- decode: ``W = (clamp(round(v * s_rel), -127, 127) * s_channel) · H_g`` with ``v = C[code]``
  (or ``code - 8``).
- ``.comfy_quant``: ``{"format", "group_size", "convrot_groupsize"}`` (+ ``orig_shape``).

This pack's ops run it weight-only (``x @ dequant(W).T``), not the core's int8 activation path.
"""

from __future__ import annotations

import torch

from . import _convrot as cr
from ._blocks import check_shape, check_weight, require_finite
from .base import Codec, FormatError, TensorSpec, require
from .spec import FormatSpec, Variant

LLOYD_MAX_16 = (
    -0.980602, -0.794529, -0.638165, -0.500986, -0.377321, -0.263187, -0.155210, -0.050720,
    0.052541, 0.156985, 0.265284, 0.379533, 0.502636, 0.638953, 0.794876, 0.980671,
)
KURTOSIS_GATE = -0.1
KURTOSIS_SAMPLE = 1 << 19
FIT_SAMPLE = 300000
FIT_STEPS = 25
ALS_STEPS = 2
ROW_BUDGET = 1 << 22  # elements per row chunk; codes do not depend on it (rows are independent)
CODEBOOK_SAMPLE = 1 << 22


def _opts(opts) -> tuple[int, int, bool]:
    # other keys (orig_shape, name ...) belong to the file / the caller, as for every codec
    gs = opts.get("group_size", 16)
    if isinstance(gs, bool) or not isinstance(gs, int) or gs < 4 or (16 % gs and gs % 16):
        raise FormatError(f"asym_w4a8_int8: group_size must be >= 4 and divide 16 or be a multiple of 16, got {gs!r}")
    cb = opts.get("codebook", True)
    if not isinstance(cb, bool):
        raise FormatError(f"asym_w4a8_int8: codebook must be true or false, got {cb!r}")
    return gs, cr.check_groupsize(opts.get("convrot_groupsize", 256)), cb


def _check_n(shape, gs, g) -> tuple[int, int]:
    m, n = check_shape(shape)
    if n % 16 or n % gs or n % g:
        raise FormatError(f"asym_w4a8_int8: in_features {n} must be a multiple of 16, group_size {gs} "
                          f"and convrot_groupsize {g}")
    return m, n


def _sample(x: torch.Tensor, k: int) -> torch.Tensor:
    gen = torch.Generator(device=x.device).manual_seed(0)
    return x[torch.randint(0, x.numel(), (k,), device=x.device, generator=gen)]


def _fit(normalized: torch.Tensor) -> torch.Tensor:
    """k-means (Lloyd-Max) with quantile start, on a seeded sample: heavy-tailed layers only."""
    x = normalized.flatten()
    x = (_sample(x, FIT_SAMPLE) if x.numel() > FIT_SAMPLE else x).float()
    c = torch.quantile(x, torch.linspace(0, 1, 16, device=x.device))
    for _ in range(FIT_STEPS):
        nearest = (x.unsqueeze(-1) - c).abs().argmin(-1)
        nxt = c.clone()
        for i in range(16):
            hit = nearest == i
            if hit.any():
                nxt[i] = x[hit].mean()
        c = nxt
    return c.contiguous()


def _choose_codebook(w: torch.Tensor, gs: int, g: int) -> torch.Tensor:
    m, n = w.shape
    rows = max(1, CODEBOOK_SAMPLE // n)
    sample = w.index_select(0, torch.linspace(0, m - 1, rows, device=w.device).long()) if m > rows else w
    grouped = cr.rotate(sample.contiguous(), g).float().view(sample.shape[0], n // gs, gs)
    normalized = grouped / grouped.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
    x = normalized.flatten()
    x = (_sample(x, KURTOSIS_SAMPLE) if x.numel() > KURTOSIS_SAMPLE else x).float()
    kurt = ((x - x.mean()) / (x.std() + 1e-9)).pow(4).mean() - 3.0
    if kurt.item() <= KURTOSIS_GATE:
        return torch.tensor(LLOYD_MAX_16, device=w.device, dtype=torch.float32)
    return _fit(normalized)


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``table`` (last dim of both: per-row tables when 2-D);
    a tie goes to the lower index."""
    last = table.shape[-1] - 1
    pos = torch.searchsorted(table, x.contiguous())
    lo, hi = (pos - 1).clamp(0, last), pos.clamp(0, last)
    if table.dim() == 1:
        dlo, dhi = (x - table[lo]).abs_(), (x - table[hi]).abs_()
    else:
        dlo, dhi = x.sub(torch.gather(table, 1, lo)).abs_(), x.sub(torch.gather(table, 1, hi)).abs_()
    return torch.where(dhi < dlo, hi, lo).to(torch.int32)


def _quantize_rows(r: torch.Tensor, gs: int, cb: torch.Tensor | None):
    m, n = r.shape
    groups = n // gs
    gw = r.float().view(m, groups, gs)
    if cb is not None:
        a = gw.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
        q = _nearest(gw / a, cb)
        for _ in range(ALS_STEPS):
            v = cb[q]
            a = ((gw * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True).clamp(min=1e-8)).clamp(min=1e-8)
            q = _nearest(gw / a, cb)
        levels_w = cb[q] * a
    else:
        a = (gw.abs().amax(dim=-1, keepdim=True) / 7.0).clamp(min=1e-8)
        signed = (gw / a).round().clamp(-8, 7).to(torch.int32)
        q = signed + 8
        levels_w = signed * a
    s_ch = (levels_w.abs().amax(dim=(1, 2)) / 127.0).clamp(min=1e-8)
    s_rel = (a.squeeze(-1) / s_ch.unsqueeze(1)).float().contiguous().to(torch.float8_e4m3fn)
    if cb is not None:
        grid = (cb.view(1, 1, 16) * s_rel.float().unsqueeze(-1)).round_().clamp_(-127, 127)
        target = (gw / s_ch.view(-1, 1, 1)).reshape(m * groups, gs)
        q = _nearest(target, grid.reshape(m * groups, 16).contiguous())
    return cr.pack_low_first(q.reshape(m, n)).contiguous(), s_rel, s_ch.float().contiguous()


class AsymW4A8Int8(Codec):
    spec = FormatSpec(
        name="asym_w4a8_int8", label="W4A8 INT8", family="asym_w4a8_int8", color="#7a5cc9",
        summary="Hadamard-rotated 4-bit codes with a 16-level codebook and FP8 scales per 16 weights "
                "(current ComfyUI's native W4A8: INT8 GEMM there, dequantized by this pack's ops)",
        variants=(Variant("", "W4A8 (4-bit codebook, scale per 16 weights)"),
                  Variant("uniform", "W4A8 (4-bit uniform, scale per 16 weights)", {"codebook": False})),
        storage="padded", four_bit=True, custom=False, aliases=("w4a8", "convrot", "int4", "4-bit", "4bit"))

    def logical_shape(self, stored, meta=None):
        return (int(stored[0]), 2 * int(stored[1])) if len(stored) == 2 else None

    def shape_reason(self, shape, opts):
        try:
            _check_n(shape, *_opts(opts)[:2])
        except FormatError as e:
            return str(e)
        return None

    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        gs, g, cb = _opts(opts)
        m, n = _check_n(shape, gs, g)
        out = {"weight": TensorSpec(torch.int8, (m, n // 2)),
               "weight_s_rel": TensorSpec(torch.float8_e4m3fn, (m, n // gs)),
               "weight_s_channel": TensorSpec(torch.float32, (m,))}
        if cb:
            out["weight_codebook"] = TensorSpec(torch.float32, (16,))
        return out

    def quantize(self, w: torch.Tensor, params=None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        if params is not None:
            raise FormatError(f"{name}: asym_w4a8_int8 has no fixed-scale requantization (LoRA is applied on the fly)")
        gs, g, use_cb = _opts(opts)
        w = check_weight(w, name)
        m, n = _check_n(w.shape, gs, g)
        require_finite(w.abs().amax(dim=-1).float(), w, name)
        cb = _choose_codebook(w, gs, g) if use_cb else None
        step = max(1, ROW_BUDGET // n)
        parts = [_quantize_rows(cr.rotate(w[r0:r0 + step].contiguous(), g), gs, cb) for r0 in range(0, m, step)]
        out = {"weight": torch.cat([p[0] for p in parts]), "weight_s_rel": torch.cat([p[1] for p in parts]),
               "weight_s_channel": torch.cat([p[2] for p in parts])}
        if cb is not None:
            out["weight_codebook"] = cb
        return out

    def dequantize(self, tensors, shape, dtype: torch.dtype = torch.float32, layer: str = "layer", **opts) -> torch.Tensor:
        opts = {**opts, "codebook": "weight_codebook" in tensors}
        self.validate(layer, tensors, shape, **opts)
        gs, g, _ = _opts(opts)
        m, n = check_shape(shape)
        u = cr.unpack_low_first(tensors["weight"])
        cb = tensors.get("weight_codebook")
        v = cb.to(device=u.device, dtype=torch.float32)[u] if cb is not None else u.float() - 8.0
        s_rel = tensors["weight_s_rel"].to(u.device).float()
        i8 = (v.view(m, n // gs, gs) * s_rel.unsqueeze(-1)).round().clamp_(-127, 127)
        r = (i8 * tensors["weight_s_channel"].to(device=u.device, dtype=torch.float32).view(m, 1, 1)).view(m, n)
        return cr.rotate(r, g).to(dtype)

    def validate(self, layer, tensors, shape, **opts) -> None:
        opts = {**opts, "codebook": "weight_codebook" in tensors}
        try:
            specs = self.output_specs(shape, **opts)
        except FormatError as e:
            raise FormatError(f"{layer}: {e}") from None
        for suffix, s in specs.items():
            require(layer, tensors, suffix, s.dtype, s.shape)

    def metadata(self, **opts) -> dict:
        gs, g, _ = _opts(opts)
        return {"format": self.name, "group_size": gs, "convrot_groupsize": g}
