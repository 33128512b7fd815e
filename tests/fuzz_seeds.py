"""The fuzzer's seeds (``fuzz_helpers.py``): small valid files of every registered format, and the
safetensors packing the mutations re-use (``pack``/``unpack`` build a file from raw entries, so a
mutated header keeps correct offsets). ``tests/test_validation.py`` and the e2e route tests use them too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Module shapes of the seed layers (what the loader's Linear would have).
LAYERS = {"blk.0.attn": (64, 64), "blk.1.mlp": (48, 96)}


def _st_dtype(dt):
    from hybridquant.converter.safetensors_io import st_dtype

    return st_dtype(dt)


def pack(entries: dict, metadata: dict | None) -> bytes:
    """A safetensors file from ``{name: (dtype string, shape, raw bytes)}`` (offsets computed here)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    pos = 0
    blobs = []
    for name, (dt, shape, raw) in entries.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    return struct.pack("<Q", len(hj)) + hj + b"".join(blobs)


def unpack(blob: bytes) -> tuple[dict, dict | None]:
    """The reverse of ``pack`` for a valid file (entries in file order)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    md = header.pop("__metadata__", None)
    base = 8 + n
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {k: (v["dtype"], list(v["shape"]), blob[base + v["data_offsets"][0]:base + v["data_offsets"][1]])
            for k, v in items}, md


def _entry(t):
    import torch

    t = t.detach().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return (_st_dtype(t.dtype), list(t.shape), raw)


def seed_files(out_dir: Path) -> list[Path]:
    """Small valid files of every format (+ legacy scaled FP8, header-only); returns their paths."""
    import torch

    from hybridquant.converter import metadata as qmeta
    from hybridquant.converter.formats import get_codec, get_spec, registry

    g = torch.Generator().manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    variants = []
    for fmt in registry.format_names():
        spec = get_spec(fmt)
        opts_list = [dict(v.opts) for v in spec.variants] or [{}]
        if spec.family == "bnb4bit":
            opts_list.append({"blocksize": 64, "double_quant": True})
        if "convrot" in spec.aliases:  # ConvRot groups must divide in_features: small groups for small layers
            opts_list = [{**o, "convrot_groupsize": 16} for o in opts_list]
        variants += [(fmt, o) for o in opts_list]
    for i, (fmt, opts) in enumerate(variants):
        codec = get_codec(fmt)
        entries, header_layers = {}, {}
        for layer, shape in LAYERS.items():
            w = torch.randn(*shape, generator=g).to(torch.bfloat16)
            if "convrot" in codec.spec.aliases and codec.heuristic_reason(shape, opts):
                entries[f"{layer}.weight"] = _entry(w)  # shape the ConvRot kernels refuse: kept plain
                continue
            q = codec.quantize(w, name=layer, **opts)
            for suffix, t in q.items():
                entries[f"{layer}.{suffix}"] = _entry(t)
            entries[f"{layer}.bias"] = _entry(torch.zeros(shape[0], dtype=torch.bfloat16))
            md = codec.metadata(name=layer, **opts)
            if md is not None:
                md = dict(md)
                if codec.spec.storage != "exact":
                    md["orig_shape"] = list(shape)
                md["orig_dtype"] = "bfloat16"
                header_layers[layer] = md
                entries[f"{layer}.comfy_quant"] = _entry(qmeta.encode_comfy_quant(md))
        entries["final.weight"] = _entry(torch.randn(16, 64, generator=g).to(torch.bfloat16))
        entries["norm.weight"] = _entry(torch.ones(64, dtype=torch.bfloat16))
        meta = qmeta.build_header(header_layers, {"modelspec.title": "fuzz seed"})
        p = out_dir / f"seed{i:02d}_{fmt}.safetensors"
        p.write_bytes(pack(entries, meta))
        paths.append(p)
        if fmt == "float8_e4m3fn":  # the same layers described by the header only
            ho = {k: v for k, v in entries.items() if not k.endswith(".comfy_quant")}
            p = out_dir / "seed_header_only.safetensors"
            p.write_bytes(pack(ho, meta))
            paths.append(p)
    # Legacy scaled FP8 (older ComfyUI / other converters): marker + .scale_weight / .scale_input.
    entries = {}
    for layer, shape in LAYERS.items():
        w = torch.randn(*shape, generator=g)
        s = w.abs().amax() / 448
        entries[f"{layer}.weight"] = _entry((w / s).to(torch.float8_e4m3fn))
        entries[f"{layer}.scale_weight"] = _entry(s.reshape(1).float())
        entries[f"{layer}.scale_input"] = _entry(torch.ones(()))
    entries["scaled_fp8"] = _entry(torch.zeros(2, dtype=torch.float8_e4m3fn))
    p = out_dir / "seed_legacy_scaled_fp8.safetensors"
    p.write_bytes(pack(entries, {}))
    paths.append(p)
    return paths
