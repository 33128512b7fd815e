"""bitsandbytes 4-bit (NF4 / FP4) in bitsandbytes' own serialization. Names ``bnb_nf4`` / ``bnb_fp4``.

These layers are what bitsandbytes' ``Params4bit``, diffusers, Forge and the original ComfyUI NF4
loader read; the layout is bitsandbytes' (``QuantState.as_dict(packed=True)`` under ``weight.``), so
``metadata()`` is None: no ``.comfy_quant`` tensor is written for such a layer.

Spec (n = M·N elements of the logical weight, flattened row-major; bs = blocksize)
---------------------------------------------------------------------------------
Keys relative to the layer (``<layer>.<suffix>``), for quant type ``t`` in {nf4, fp4}:
- ``weight``: uint8 ``[ceil(n/2), 1]``; element ``2k`` in the HIGH nibble of byte ``k``, element
  ``2k+1`` in the low nibble; an odd ``n`` leaves the last low nibble as the code of 0.
- ``weight.absmax``: float32 ``[ceil(n/bs)]``, the absolute maximum of each block of ``bs``
  consecutive flattened elements (the last block may be shorter). When nested: uint8 codes instead.
- ``weight.quant_map``: float32 ``[16]``, the code book (NF4: the QLoRA normal-quantile table; FP4:
  bitsandbytes' E2M1-like table ``[0, .0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12``). Readers, like
  bitsandbytes, decode with the built-in table of the quant type.
- nested (``double_quant=True``): ``weight.nested_absmax`` float32 ``[ceil(ceil(n/bs)/256)]``,
  ``weight.nested_quant_map`` float32 ``[256]`` (bitsandbytes' signed "dynamic" 8-bit map).
- ``weight.quant_state.bitsandbytes__<t>``: uint8 UTF-8 JSON ``{"quant_type", "blocksize", "dtype",
  "shape"}`` (+ ``"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset"`` when nested),
  written as ``json.dumps`` does. Readers parse it with ``json.loads``, which ignores trailing
  whitespace: when the exact length is not known before the data exists (the nested offset's decimal
  form, or an unspecified ``dtype``) the JSON is right-padded with spaces to a fixed length so that
  ``output_specs`` can announce it.

Encoding (bitsandbytes' reference CPU path, matched bit for bit):
- ``absmax`` per block in float32; the LAST partial block stores ``max(absmax, 1e-38)``, full blocks
  store the raw value (a bitsandbytes quirk, kept).
- Full blocks: ``x = clamp(w * (1 / max(absmax, 1e-38)), -1, 1)`` (reciprocal, then multiply); the
  partial last block: ``x = clamp(w / absmax, -1, 1)`` (a division).
- Code = nearest code-book entry by the midpoints of the sorted code book; a value exactly on a
  midpoint takes the LOWER entry. FP4's two zeros sort as ``+0`` (code 0) before ``-0`` (code 8),
  so ``x <= 0`` near zero gets code 0 and small ``x > 0`` gets code 8 (both decode to 0).
- Nested absmax (bitsandbytes' ``compress_statistics``): ``offset = mean(absmax)``; ``a = absmax -
  offset`` is quantized with the dynamic map in blocks of 256: ``nested_absmax = max|a|`` per block,
  ``y = a * (1 / nested_absmax)``, and the code is looked up the way bitsandbytes' CPU kernel does it:
  a 65536-entry table over [-1, 1] (entry ``i`` holds the nearest code of ``-1 + 2i/65535``), indexed
  by ``trunc((y + 1) * 0.5 * 65535 + 0.5)``. (That table is coarser than true nearest-neighbour for
  the densely spaced tiny map values; reproducing it is what makes the bytes identical.) A block with
  ``nested_absmax == 0`` gets code 0.
- Decoding: ``w = table[code] * absmax_eff[block]`` with ``absmax_eff = absmax`` or, nested,
  ``nested_quant_map[code] * nested_absmax[block256] + offset`` (two float32 roundings).

Rounding decomposition: ``S`` = ``absmax_eff`` of the element's block; the grid is the code book with
the tie rule above. With nested absmax, ``S`` can be NEGATIVE for a block whose absmax is far below
the mean (the 8-bit code of ``absmax - offset`` overshoots); bitsandbytes decodes such a block with
its sign flipped, and so must every reader. Callers must divide by ``S`` itself where ``S != 0``. ``quantize(w)`` without params follows bitsandbytes exactly, which for nested
absmax picks codes relative to the TRUE absmax while the file stores the nested approximation.
``quantize(w, params)`` picks codes relative to ``params["absmax"]`` (the stored, nested-dequantized
value), which is what ``round_to_grid`` assumes; so for ``double_quant`` the two may differ in a few
codes (non-nested they are identical). Like bitsandbytes, ``quantize`` scales by a reciprocal, so the
exact identity is ``round_to_grid(w * (1 / S)) * S == dequantize(quantize(w, params))``; with
``w / S`` an element can differ where the two land on either side of a midpoint (seen a few times in
millions of bf16 elements). Conversions on CPU and CUDA write the same bytes (the nested statistics
are computed on the CPU).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from ._blocks import amax_of_blocks, chunk_elems, require_finite
from .base import Codec, FormatError, NonFiniteError, TensorSpec, ceil_div, check_shape, require
from .spec import FormatSpec, Variant

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps the divisor (and the stored tail absmax) to this
_OFFSET_RESERVE = 24  # longest repr() of a float32 value as a Python float is 22 characters
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

NF4_TABLE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
FP4_TABLE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0
# Codes in ascending order of value; the +0 / -0 order decides which zero code small values get.
_SORTED_CODES = {"nf4": list(range(16)), "fp4": [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]}
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (7 exponent levels), float32 [256], ascending."""
    vals = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        vals += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()
    return torch.tensor(sorted(vals), dtype=torch.float32)


_cache: dict = {}


def _grid(quant_type: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values in ascending order, the 15 midpoints between them, the code of each slot)."""
    key = ("grid", quant_type, str(device))
    if key not in _cache:
        order = torch.tensor(_SORTED_CODES[quant_type])
        vals = TABLES[quant_type][order]
        mids = (vals[:-1] + vals[1:]) / 2
        _cache[key] = (vals.to(device), mids.to(device), order.to(torch.uint8).to(device))
    return _cache[key]


def _nested_lut(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dynamic map, 65536-entry code table of bitsandbytes' CPU blockwise quantizer)."""
    key = ("nested", str(device))
    if key not in _cache:
        code = dynamic_map()
        mid = 0.5 * (code[:-1] + code[1:])
        val = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
        lut = torch.searchsorted(mid, val, side="left").to(torch.uint8)
        _cache[key] = (code.to(device), lut.to(device))
    return _cache[key]


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise FormatError(f"bitsandbytes 4-bit blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


def dtype_name(dtype) -> str:
    """'bfloat16' / 'float16' / 'float32' from a torch dtype or such a string."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise FormatError(f"bitsandbytes 4-bit dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    return name


def _numel(shape) -> int:
    m, n = check_shape(shape)
    return m * n


def quant_state_json(quant_type: str, blocksize: int, dtype: str, shape, nested_offset: float | None, pad_to: int | None) -> bytes:
    d = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": [int(s) for s in shape]}
    if nested_offset is not None:
        d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": nested_offset})
    raw = json.dumps(d).encode("utf-8")
    if pad_to is not None:
        if len(raw) > pad_to:
            raise AssertionError(f"quant state JSON longer than reserved ({len(raw)} > {pad_to})")
        raw += b" " * (pad_to - len(raw))
    return raw


def _json_len(quant_type, blocksize, dtype, shape, nested, pad) -> tuple[int, int | None]:
    """(length, pad_to) of the quant-state JSON: exact when known from the options alone."""
    if not nested and not pad:
        n = len(quant_state_json(quant_type, blocksize, dtype, shape, None, None))
        return n, None
    base = len(quant_state_json(quant_type, blocksize, "bfloat16" if pad else dtype, shape, 0.0 if nested else None, None))
    n = base + (_OFFSET_RESERVE - len("0.0") if nested else 0)
    return n, n


def nested_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Double-quantize a float32 absmax vector the way bitsandbytes' CPU path does.

    Runs on the CPU whatever ``absmax``'s device (it is small: one value per block): the float32 mean
    is a reduction whose rounding depends on the device, and the CPU one is bitsandbytes' reference,
    so the bytes written do not depend on the GPU used for converting. Results go back to the device.
    """
    device = absmax.device
    absmax = absmax.detach().to("cpu", torch.float32)
    code, lut = _nested_lut(absmax.device)
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        raise NonFiniteError(f"absmax mean is {offset.item()}; cannot double-quantize")
    a = absmax - offset
    nb = a.numel()
    nnb = ceil_div(nb, NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(a, (0, nnb * NESTED_BLOCKSIZE - nb)).reshape(nnb, NESTED_BLOCKSIZE)
    nabs = padded.abs().amax(dim=1)
    inv = 1.0 / torch.where(nabs > 0, nabs, torch.ones_like(nabs))
    y = (padded * inv[:, None]).clamp(-1.0, 1.0)
    idx = ((y + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # float -> int truncates, like the C cast
    codes = torch.where(nabs[:, None] > 0, lut[idx], torch.zeros_like(lut[idx])).reshape(-1)[:nb]
    return {"codes": codes.to(device), "nested_absmax": nabs.to(device), "offset": offset.to(device)}


def nested_dequantize(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset, nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    nb = codes.numel()
    scale = nested_absmax.to(torch.float32).repeat_interleave(nested_blocksize)[:nb]
    return nested_map.to(torch.float32)[codes.reshape(-1).long()] * scale + torch.as_tensor(offset, dtype=torch.float32, device=codes.device)


def read_quant_state(layer: str, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Find and parse ``weight.quant_state.bitsandbytes__*``; FormatError naming the layer otherwise."""
    keys = [k for k in tensors if k.startswith("weight.quant_state.")]
    if len(keys) != 1:
        found = ", ".join(keys) or "none"
        raise FormatError(f"{layer}: expected exactly one '{layer}.weight.quant_state.bitsandbytes__nf4|fp4' tensor, found {found}")
    key = keys[0]
    qt = key.rsplit("__", 1)[-1] if "bitsandbytes__" in key else ""
    if qt not in TABLES:
        raise FormatError(f"{layer}: unknown bitsandbytes quant state key '{layer}.{key}'")
    t = tensors[key]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise FormatError(f"{layer}.{key}: expected a 1-D uint8 JSON tensor, found {t.dtype} {tuple(t.shape)}")
    from ..schema import check_quant_state, loads

    where = f"{layer}.{key}"
    d = check_quant_state(loads(bytes(t.cpu().tolist()), where, what="quant state JSON"), where, qt)
    d["nested"] = "weight.nested_absmax" in tensors
    if d["nested"]:
        for field in ("nested_blocksize", "nested_offset"):
            if field not in d:
                raise FormatError(f"{layer}.{key}: nested quant state lacks '{field}'")
        if d.get("nested_dtype", "float32") != "float32":
            raise FormatError(f"{layer}.{key}: nested_dtype {d.get('nested_dtype')!r} not supported (float32 only)")
    return d


class _BnbCodec(Codec):
    quant_type = ""

    # ---- options ------------------------------------------------------------------------------
    @staticmethod
    def _opts(blocksize=64, double_quant=False, dtype=None, **_ignored):
        return check_blocksize(blocksize), bool(double_quant), dtype

    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        bs, nested, dtype = self._opts(**opts)
        n = _numel(shape)
        nb = ceil_div(n, bs)
        jlen, _ = _json_len(self.quant_type, bs, dtype_name(dtype) if dtype is not None else "bfloat16", shape, nested, dtype is None)
        specs = {
            "weight": TensorSpec(torch.uint8, (ceil_div(n, 2), 1)),
            "weight.absmax": TensorSpec(torch.uint8 if nested else torch.float32, (nb,)),
            "weight.quant_map": TensorSpec(torch.float32, (16,)),
        }
        if nested:
            specs["weight.nested_absmax"] = TensorSpec(torch.float32, (ceil_div(nb, NESTED_BLOCKSIZE),))
            specs["weight.nested_quant_map"] = TensorSpec(torch.float32, (256,))
        specs[f"weight.quant_state.bitsandbytes__{self.quant_type}"] = TensorSpec(torch.uint8, (jlen,))
        return specs

    # ---- scale decomposition ------------------------------------------------------------------
    @staticmethod
    def _flat(w: torch.Tensor, name: str) -> torch.Tensor:
        """The flattened weight in its own dtype (no float32 copy; finiteness is checked on absmax)."""
        if w.dim() != 2:
            raise FormatError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise FormatError(f"{name}: expected a floating-point weight, got {w.dtype}")
        return w.detach().reshape(-1)

    def block_amax(self, w: torch.Tensor, name: str = "weight", **opts) -> torch.Tensor:
        """float32 ``[ceil(n/bs)]`` absmax over the flattened weight, as bitsandbytes stores it."""
        bs, _, _ = self._opts(**opts)
        flat = self._flat(w, name)
        n = flat.numel()
        nfull = n // bs
        amax = torch.empty(ceil_div(n, bs), dtype=torch.float32, device=flat.device)
        step = max(1, chunk_elems(flat.device) // bs)
        for b0 in range(0, nfull, step):
            b1 = min(nfull, b0 + step)
            amax[b0:b1] = amax_of_blocks(flat[b0 * bs : b1 * bs].to(torch.float32).view(-1, bs))
        if nfull * bs < n:
            amax[-1] = flat[nfull * bs :].to(torch.float32).abs().amax().clamp(min=_ABSMAX_FLOOR)
        require_finite(amax, w, name)
        return amax

    def scale_params(self, w: torch.Tensor, amax: torch.Tensor | None = None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        """``{"absmax": f32 [nb]}`` (the decoded absmax), plus the stored nested parts when nested."""
        bs, nested, _ = self._opts(**opts)
        if amax is None:
            amax = self.block_amax(w, name=name, blocksize=bs)
        else:
            nb = ceil_div(w.numel(), bs)
            if tuple(amax.shape) != (nb,):
                raise FormatError(f"{name}: amax has shape {tuple(amax.shape)}, expected ({nb},)")
            amax = amax.detach().to(device=w.device, dtype=torch.float32)
        if not nested:
            return {"absmax": amax}
        q = nested_quantize(amax)
        code, _ = _nested_lut(amax.device)
        eff = nested_dequantize(q["codes"], q["nested_absmax"], code, q["offset"])
        return {"absmax": eff, "absmax_codes": q["codes"], "nested_absmax": q["nested_absmax"], "nested_offset": q["offset"]}

    def element_scale(self, params: Mapping[str, torch.Tensor], shape, **opts) -> torch.Tensor:
        bs, _, _ = self._opts(**opts)
        n = _numel(shape)
        return params["absmax"].to(torch.float32).repeat_interleave(bs)[:n].reshape(tuple(shape))

    def round_to_grid(self, x: torch.Tensor, **opts) -> torch.Tensor:
        vals, mids, _ = _grid(self.quant_type, x.device)
        x = torch.nan_to_num(x.to(torch.float32), nan=0.0).clamp(-1.0, 1.0)
        return vals[torch.searchsorted(mids, x.contiguous(), side="left")]

    # ---- encode / decode ----------------------------------------------------------------------
    def _pack(self, flat: torch.Tensor, absmax: torch.Tensor, bs: int) -> torch.Tensor:
        """Codes of the flattened weight relative to ``absmax``, packed high nibble first ``[ceil(n/2), 1]``."""
        n = flat.numel()
        nfull = n // bs
        full = nfull * bs
        # bitsandbytes clamps the divisor to 1e-38. A nested (double-quantized) absmax can decode to a
        # NEGATIVE value for a block far below the mean absmax (its files then flip that block's sign
        # on decode); scaling by that value keeps round_to_grid(w * (1/S)) * S == dequantize there too.
        div = torch.where(absmax >= 0, absmax.clamp(min=_ABSMAX_FLOOR), absmax)
        recip = 1.0 / div[:nfull]  # bitsandbytes: reciprocal-multiply for full blocks ...
        _, mids, slot_code = _grid(self.quant_type, flat.device)
        packed = torch.empty(ceil_div(n, 2), dtype=torch.uint8, device=flat.device)
        step = max(1, chunk_elems(flat.device) // bs)
        for b0 in range(0, nfull, step):
            b1 = min(nfull, b0 + step)
            x = (flat[b0 * bs : b1 * bs].to(torch.float32).view(-1, bs) * recip[b0:b1].unsqueeze(1)).clamp_(-1.0, 1.0)
            codes = slot_code[torch.searchsorted(mids, x.view(-1), side="left")]
            packed[b0 * bs // 2 : b1 * bs // 2] = (codes[0::2] << 4) | codes[1::2]
        if full < n:  # ... and a division for the partial last block
            x = (flat[full:].to(torch.float32) / div[-1]).clamp_(-1.0, 1.0)
            if (n - full) % 2:
                x = torch.nn.functional.pad(x, (0, 1))
            codes = slot_code[torch.searchsorted(mids, x, side="left")]
            packed[full // 2 :] = (codes[0::2] << 4) | codes[1::2]
        return packed.view(-1, 1)

    def quantize(self, w: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        bs, nested, dtype = self._opts(**opts)
        flat = self._flat(w, name)
        dname = dtype_name(dtype if dtype is not None else w.dtype)
        n = flat.numel()
        nb = ceil_div(n, bs)
        if params is None:
            true_amax = self.block_amax(w, name=name, blocksize=bs)
            params = self.scale_params(w, amax=true_amax, name=name, blocksize=bs, double_quant=nested)
            code_amax = true_amax  # bitsandbytes picks codes relative to the unquantized absmax
        else:
            if "absmax" not in params or tuple(params["absmax"].shape) != (nb,):
                raise FormatError(f"{name}: scale params need 'absmax' of shape ({nb},)")
            self.block_amax(w, name=name, blocksize=bs)  # NaN/Inf check (one read of w)
            if nested and "absmax_codes" not in params:
                params = self.scale_params(w, amax=params["absmax"], name=name, blocksize=bs, double_quant=True)
            code_amax = params["absmax"].to(device=flat.device, dtype=torch.float32)
        out = {"weight": self._pack(flat, code_amax, bs)}
        _, pad_to = _json_len(self.quant_type, bs, dname, w.shape, nested, dtype is None)
        if nested:
            dyn, _ = _nested_lut(flat.device)
            out["weight.absmax"] = params["absmax_codes"].to(device=flat.device, dtype=torch.uint8)
            out["weight.quant_map"] = TABLES[self.quant_type].to(flat.device, copy=True)  # never shared: safetensors refuses aliased tensors
            out["weight.nested_absmax"] = params["nested_absmax"].to(device=flat.device, dtype=torch.float32)
            out["weight.nested_quant_map"] = dyn.clone()
            offset = float(params["nested_offset"].item())
        else:
            out["weight.absmax"] = params["absmax"].to(device=flat.device, dtype=torch.float32)
            out["weight.quant_map"] = TABLES[self.quant_type].to(flat.device, copy=True)  # never shared: safetensors refuses aliased tensors
            offset = None
        js = quant_state_json(self.quant_type, bs, dname, w.shape, offset, pad_to)
        out[f"weight.quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(bytearray(js), dtype=torch.uint8).to(flat.device)
        return out

    def effective_absmax(self, tensors: Mapping[str, torch.Tensor], qs: dict) -> torch.Tensor:
        if not qs["nested"]:
            return tensors["weight.absmax"].to(torch.float32)
        offset = torch.tensor(float(qs["nested_offset"]), dtype=torch.float32)
        return nested_dequantize(tensors["weight.absmax"], tensors["weight.nested_absmax"], tensors["weight.nested_quant_map"], offset, qs["nested_blocksize"])

    def stored_scale_params(self, tensors: Mapping[str, torch.Tensor], shape, layer: str = "layer") -> dict[str, torch.Tensor]:
        """The ``scale_params`` that reproduce a stored layer's absmax (nested parts included).

        Quantizing with them (and the layer's ``quant_state_options``) changes only ``weight``."""
        qs = self._validate(layer, tensors, shape)
        params = {"absmax": self.effective_absmax(tensors, qs)}
        if qs["nested"]:
            if qs["nested_blocksize"] != NESTED_BLOCKSIZE:
                raise FormatError(f"{layer}: nested_blocksize {qs['nested_blocksize']} cannot be rewritten (bitsandbytes uses {NESTED_BLOCKSIZE})")
            params.update({
                "absmax_codes": tensors["weight.absmax"],
                "nested_absmax": tensors["weight.nested_absmax"],
                "nested_offset": torch.tensor(float(qs["nested_offset"]), dtype=torch.float32),
            })
        return params

    def quant_state_options(self, tensors: Mapping[str, torch.Tensor], layer: str = "layer") -> dict:
        """``{"blocksize", "double_quant", "dtype"}`` of a stored layer, as ``quantize`` takes them."""
        qs = read_quant_state(layer, tensors)
        return {"blocksize": qs["blocksize"], "double_quant": qs["nested"], "dtype": qs["dtype"]}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape, dtype: torch.dtype = torch.float32, layer: str = "layer", **opts) -> torch.Tensor:
        qs = self._validate(layer, tensors, shape)
        n = _numel(shape)
        bs = qs["blocksize"]
        packed = tensors["weight"].reshape(-1)
        table = TABLES[self.quant_type].to(packed.device)
        absmax = self.effective_absmax(tensors, qs).to(packed.device)
        out = torch.empty(n, dtype=torch.float32, device=packed.device)

        def values(p: torch.Tensor) -> torch.Tensor:
            return table[torch.stack([p >> 4, p & 0x0F], dim=1).view(-1).to(torch.int32)]

        nfull = n // bs
        step = max(1, chunk_elems(packed.device) // bs)
        for b0 in range(0, nfull, step):
            b1 = min(nfull, b0 + step)
            v = values(packed[b0 * bs // 2 : b1 * bs // 2]).view(-1, bs)
            out[b0 * bs : b1 * bs] = v.mul_(absmax[b0:b1].unsqueeze(1)).view(-1)
        if nfull * bs < n:
            out[nfull * bs :] = values(packed[nfull * bs // 2 :])[: n - nfull * bs] * absmax[-1]
        return out.view(tuple(shape)).to(dtype)

    def _validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape) -> dict:
        try:
            n = _numel(shape)
        except FormatError as e:
            raise FormatError(f"{layer}: {e}") from None
        qs = read_quant_state(layer, tensors)
        if qs["quant_type"] != self.quant_type:
            raise FormatError(f"{layer}: layer is bitsandbytes {qs['quant_type']}, not {self.quant_type}")
        stated = qs["shape"]
        if not isinstance(stated, list) or [int(s) for s in stated] != [int(s) for s in shape]:
            raise FormatError(f"{layer}: quant state shape {stated} does not match the logical shape {tuple(shape)}")
        w = require(layer, tensors, "weight", torch.uint8)
        if w.numel() != ceil_div(n, 2) or (w.dim() == 2 and 1 not in w.shape) or w.dim() > 2:
            raise FormatError(f"{layer}.weight: packed 4-bit weight has shape {tuple(w.shape)}, expected ({ceil_div(n, 2)}, 1) for {tuple(shape)}")
        nb = ceil_div(n, qs["blocksize"])
        require(layer, tensors, "weight.quant_map", torch.float32, (16,))
        if qs["nested"]:
            require(layer, tensors, "weight.absmax", torch.uint8, (nb,))
            require(layer, tensors, "weight.nested_absmax", torch.float32, (ceil_div(nb, qs["nested_blocksize"]),))
            require(layer, tensors, "weight.nested_quant_map", torch.float32, (256,))
        else:
            require(layer, tensors, "weight.absmax", torch.float32, (nb,))
            if "weight.nested_quant_map" in tensors:
                raise FormatError(f"{layer}: has weight.nested_quant_map but no weight.nested_absmax")
        return qs

    def validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape, **opts) -> None:
        self._validate(layer, tensors, shape)

    def metadata(self, **opts) -> None:
        return None


_BNB_COMMON = dict(family="bnb4bit", storage="flat", four_bit=True, writes_comfy_quant=False, custom=False,
                   clipping=True, kernels={"triton_cuda": "dq4", "cuda": "bnb"})


class BnbNF4(_BnbCodec):
    spec = FormatSpec(
        name="bnb_nf4", label="NF4", color="#4f8fdc",
        summary="bitsandbytes 4-bit NormalFloat: about 30% of bf16's size, the usual 4-bit choice; "
                "bitsandbytes CUDA kernels on any NVIDIA GPU; readable by diffusers and Forge",
        variants=(Variant("nf4", "NF4 (bitsandbytes 4-bit)", {"blocksize": 64, "double_quant": False}),),
        aliases=("nf4", "bnb", "bitsandbytes", "4-bit", "4bit", "qlora"),
        name_word="nf4",  # the word people search for; the family "bnb4bit" is the CLI's
        advice=(("nvfp4", {}), ("bnb_nf4", {"blocksize": 32})),
        # double quantization stores the block absmax in 8 bits: NF4 b64 costs 4.14 instead of 4.5
        # bits/weight for the same error (MiniLM: 1.002x), so a budget at NF4's size has room to upgrade
        budget_steps=({"blocksize": 64, "double_quant": False}, {"blocksize": 32, "double_quant": True},
                      {"blocksize": 64, "double_quant": True}, {"blocksize": 128, "double_quant": True},
                      {"blocksize": 256, "double_quant": True}), **_BNB_COMMON)
    quant_type = "nf4"


class BnbFP4(_BnbCodec):
    spec = FormatSpec(
        name="bnb_fp4", label="FP4 (bnb)", color="#2f5f9c",
        summary="bitsandbytes 4-bit float: same size as NF4, usually a little less accurate",
        variants=(Variant("fp4", "FP4 (bitsandbytes 4-bit)", {"blocksize": 64, "double_quant": False}),),
        aliases=("fp4", "bnb", "bitsandbytes", "4-bit", "4bit"),
        name_word="fp4",  # (found through "nvfp4" in the names)
        advice=(("bnb_nf4", {}), ("nvfp4", {})), **_BNB_COMMON)
    quant_type = "fp4"


BNB_FORMATS = {c.quant_type: c.spec.name for c in (BnbNF4, BnbFP4)}  # quant_type -> format name


def detect_bnb_format(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """``"bnb_nf4"`` / ``"bnb_fp4"`` when a layer's tensors (suffix keys) carry a bitsandbytes quant state."""
    for k in tensors:
        if k.startswith("weight.quant_state.bitsandbytes__"):
            qt = k.rsplit("__", 1)[-1]
            if qt in BNB_FORMATS:
                return BNB_FORMATS[qt]
    return None
