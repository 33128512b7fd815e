"""A seeded mutation fuzzer over every reader of the pack (no Hypothesis: stdlib ``random`` only).

Seeds: small VALID files of every registered format (quantized by the real codecs, the bitsandbytes
layers also double-quantized), a legacy scaled-FP8 file and a header-only file. Each case takes one
seed and applies one to three mutations of one of five kinds:

- ``header``: the safetensors header JSON (an entry's dtype/shape/data_offsets, a deleted or
  duplicated entry, ``__metadata__``, deep nesting, a wrong length field, flipped bytes, truncation,
  trailing bytes);
- ``quant_header``: the ``_quantization_metadata`` JSON (any node replaced, deleted or added; layers
  renamed to ghosts; garbage);
- ``comfy_quant``: a ``.comfy_quant`` tensor's JSON;
- ``quant_state``: a bitsandbytes quant-state tensor's JSON;
- ``tensors``: the tensors themselves (dropped, renamed, reshaped, re-typed, truncated, added).

The JSON-level kinds re-pack the file with correct offsets, so the mutation reaches the metadata
readers instead of being stopped by the container checks. Every case runs every reader: ``read_header``,
``metadata.discover_layers`` (header sizes given, metadata tensors only), the file summary of the web
panel and the Info node (``nodes.fileinfo.file_summary``), ``ops.prepare_state_dict`` and, per layer,
the load path of the ops (``ops.quant_data.read_layer`` + the codec's ``dequantize`` at the module's
shape). A case passes when every reader either works or raises the pack's own error types
(``ConverterError``, ``FormatError``); a case fails on any other exception (an "uncaught"), on taking
longer than ``CASE_TIMEOUT`` seconds (a "hang", via ``SIGALRM``), or on an admitted size beyond what
the file can back (a header tensor larger than the file, a logical layer shape of more than 2 elements
per file byte). Allocations: the process runs with an address-space limit (``RLIMIT_AS``) of its
size after setup plus ``ALLOC_SLACK`` bytes, so an attempt to allocate by a lying size fails loudly
(``RuntimeError``/``MemoryError``: counted as uncaught) instead of being swapped in.

Run: ``python tests/fuzz_helpers.py --cases 10000 --seed 1`` (or ``--seconds 600``); prints one JSON
line of figures. ``tests/test_fuzz.py`` runs a bounded number in CI (``HYBRIDQUANT_FUZZ_CASES``,
``HYBRIDQUANT_FUZZ_SECONDS`` for more).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT = 10.0
ALLOC_SLACK = 512 << 20

# Module shapes of the seed layers (what the loader's Linear would have).
LAYERS = {"blk.0.attn": (64, 64), "blk.1.mlp": (48, 96)}


# ---- seeds ---------------------------------------------------------------------------------------

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


# ---- mutations -----------------------------------------------------------------------------------

def _deep(rng, depth=None):
    depth = depth or rng.choice([65, 200, 2000, 100000])
    kind = rng.choice(["[", "{"])
    if kind == "[":
        return "DEEP[" + str(depth)
    return "DEEP{" + str(depth)


HOSTILE = [None, True, False, 0, -1, 1, 2, 3, 7, 16, 31, 32, 63, 64, 65, 127, 128, 255, 256, 4096, 65537, 2**31,
           2**32 + 1, 2**40, 2**53 + 1, 2**62, 2**64, -2**63, 1.5, 64.0, -0.0, 1e308, 1e-320, "NaN", "Infinity",
           "", "x", "64", "float8_e4m3fn", "nvfp4", "mxfp8", "bnb_nf4", "bfloat16", "float32", "nf4", "fp4",
           "F32", "U8", "BF16", "F8_E4M3", [], {}, [1], [0], [64], [64, 64], [48, 96], [96, 48], [1, 1],
           [2**62, 2**62], [2**31, 2**31], [True, 64], ["64", 64], [64.0, 64], [-1, 64], [64, 64, 1],
           {"a": 1}, {"format": "float8_e4m3fn"}]


def _hostile(rng, old=None):
    """A replacement value: often a near miss of ``old`` (off by one, doubled, retyped), else the pool."""
    r = rng.random()
    if isinstance(old, bool):
        pass
    elif isinstance(old, int) and r < 0.4:
        return rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old * 2**32, float(old), str(old), [old],
                           old + 2**62, 0])
    elif isinstance(old, float) and r < 0.4:
        return rng.choice([old * 2, -old, 0.0, 1e39, "NaN", int(old) if abs(old) < 1e18 else 0, str(old)])
    elif isinstance(old, str) and r < 0.3:
        return rng.choice([old + "x", old[:-1], old.upper(), 5, [old], None, ""])
    elif isinstance(old, list) and old and r < 0.4:
        j = rng.randrange(len(old))
        new = list(old)
        op = rng.randrange(4)
        if op == 0:
            new[j] = _hostile(rng, old[j])
        elif op == 1:
            del new[j]
        elif op == 2:
            new.insert(j, rng.choice(old))
        else:
            new = new[::-1]
        return new
    if r > 0.95:
        return _deep(rng)
    return rng.choice(HOSTILE)


def _nodes(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def mutate_json(rng, doc):
    """One structural mutation of a parsed JSON document (returns the new document)."""
    doc = json.loads(json.dumps(doc))
    nodes = list(_nodes(doc))
    path, node = rng.choice(nodes)
    op = rng.random()
    if not path:
        return _hostile(rng, doc) if op < 0.2 else doc if not isinstance(doc, dict) else _mutate_dict(rng, doc)
    if isinstance(node, dict) and op < 0.5:
        _set(doc, path, _mutate_dict(rng, node))
    else:
        _set(doc, path, _hostile(rng, node))
    return doc


def _mutate_dict(rng, d):
    d = dict(d)
    op = rng.randrange(4)
    keys = list(d)
    if op == 0 and keys:
        del d[rng.choice(keys)]
    elif op == 1:
        d[rng.choice(["format", "group_size", "orig_shape", "per_row", "blocksize", "shape", "nested_blocksize",
                      "nested_offset", "dtype", "quant_type", "layers", "ghost.layer", "x"])] = _hostile(rng)
    elif op == 2 and keys:
        k = rng.choice(keys)
        d[k + rng.choice(["", ".ghost", "x"]) if rng.random() < 0.5 else "ghost." + k] = d.pop(k)
    elif keys:
        k = rng.choice(keys)
        d[k] = _hostile(rng, d[k])
    return d


def dumps(doc) -> str:
    """JSON text of a mutated document; ``"DEEP[n"`` markers become n nested brackets, ``"NaN"`` the
    bare literal (both are what a hostile writer can put in a file)."""
    s = json.dumps(doc)
    while '"DEEP' in s:
        i = s.index('"DEEP')
        j = s.index('"', i + 1)
        kind, n = s[i + 5], int(s[i + 6:j])
        close = "]" if kind == "[" else "}"
        inner = "[" * n + "]" * n if kind == "[" else '{"a":' * n + "1" + "}" * n
        s = s[:i] + inner + s[j + 1:]
        del close
    return s.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")


def _try_json(text):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return {}


def _json_tensors(entries, suffix_test):
    return [k for k in entries if suffix_test(k)]


def mutate_file(rng, blob: bytes) -> tuple[bytes, str]:
    """1 to 3 mutations of one kind; returns (new file bytes, kind)."""
    kinds = ["header", "quant_header", "comfy_quant", "quant_state", "tensors"]
    kind = rng.choice(kinds)
    entries, md = unpack(blob)
    if kind == "comfy_quant" and not _json_tensors(entries, lambda k: k.endswith(".comfy_quant")):
        kind = "quant_header" if md and "_quantization_metadata" in md else "tensors"
    if kind == "quant_state" and not _json_tensors(entries, lambda k: ".quant_state." in k):
        kind = "tensors"
    if kind == "quant_header" and not (md and "_quantization_metadata" in md):
        kind = "header"
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if kind == "header":
            return _mutate_header(rng, blob), kind
        if kind == "quant_header":
            if rng.random() < 0.1:
                md["_quantization_metadata"] = rng.choice(["", "{", "[]", "null", "1" * 5000, dumps(_deep(rng)),
                                                           '{"layers": {"a": {}, "a": {}}}'])
            else:
                doc = _try_json(md["_quantization_metadata"])
                md["_quantization_metadata"] = dumps(mutate_json(rng, doc))
        elif kind in ("comfy_quant", "quant_state"):
            test = (lambda k: k.endswith(".comfy_quant")) if kind == "comfy_quant" else (lambda k: ".quant_state." in k)
            name = rng.choice(_json_tensors(entries, test))
            dt, shape, raw = entries[name]
            if rng.random() < 0.1:
                new = rng.choice([b"", b"\xff\xfe", b"{", b"[]", b"1" * 5000, dumps(_deep(rng)).encode(),
                                  raw + b"x", raw[:-1], b'{"format": "mxfp8", "format": "nvfp4"}'])
            else:
                new = dumps(mutate_json(rng, _try_json(raw))).encode()
            entries[name] = (dt, [len(new)], new)
        else:
            _mutate_tensors(rng, entries)
    return pack(entries, md), kind


_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


def _mutate_tensors(rng, entries):
    names = list(entries)
    name = rng.choice(names)
    dt, shape, raw = entries[name]
    op = rng.randrange(7)
    if op == 0:
        del entries[name]  # e.g. a quant state or .comfy_quant without its weight, or the reverse
    elif op == 1:
        entries[rng.choice(["ghost", "blk.9", "blk.0.attn.x"]) + name[name.find("."):]] = entries.pop(name)
    elif op == 2 and len(shape) >= 1:  # same bytes, other shape
        n = len(raw) // _SIZES.get(dt, 1)
        shape = rng.choice([[n], [1, n], [n, 1], [2, n // 2] if n % 2 == 0 else [n], []if n == 1 else [n]])
        entries[name] = (dt, shape, raw)
    elif op == 3:  # other dtype of any size: reinterpret the bytes (a whole number of elements)
        new_dt = rng.choice(list(_SIZES))
        sz = _SIZES[new_dt]
        raw = raw[: len(raw) // sz * sz]
        entries[name] = (new_dt, [len(raw) // sz], raw)
    elif op == 4:  # fewer / more elements
        sz = _SIZES.get(dt, 1)
        cut = rng.choice([sz, len(raw) // 2 // sz * sz, -sz * 16])
        raw = raw[:-cut] if cut > 0 else raw + b"\0" * -cut
        entries[name] = (dt, [len(raw) // sz], raw)
    elif op == 5:  # a stray tensor in a layer
        layer = name.split(".weight")[0]
        entries[layer + rng.choice([".weight_scale", ".weight.absmax", ".input_scale", ".weight_scale_2",
                                    ".scale_weight", ".weight.nested_absmax", ".comfy_quant"])] = ("F32", [1], b"\0\0\x80?")
    else:  # NaN / Inf / garbage values inside a scale
        if raw:
            i = rng.randrange(len(raw))
            raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
            if dt == "F32" and len(raw) >= 4:
                raw = rng.choice([b"\0\0\xc0\x7f", b"\0\0\x80\x7f", b"\0\0\0\0"]) + raw[4:]
            entries[name] = (dt, shape, raw)


def _mutate_header(rng, blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    op = rng.randrange(12)
    names = [k for k in header if k != "__metadata__"]
    if op <= 4 and names:
        name = rng.choice(names)
        e = header[name]
        field = rng.choice(["dtype", "shape", "data_offsets", None])
        if field is None:
            if rng.random() < 0.5:
                del header[name]
            else:
                header[name] = _hostile(rng, e) if rng.random() < 0.5 else _mutate_dict(rng, e)
        elif field == "data_offsets" and rng.random() < 0.5:
            other = header[rng.choice(names)]["data_offsets"]
            e["data_offsets"] = rng.choice([list(other), [e["data_offsets"][0], other[1]], e["data_offsets"][::-1],
                                            [e["data_offsets"][0] + 1, e["data_offsets"][1] + 1]])
        else:
            e[field] = _hostile(rng, e[field])
        text = dumps(header)
    elif op == 5 and names:  # a duplicated name (the stdlib parser would keep the last one)
        name = rng.choice(names)
        text = json.dumps(header)
        dup = json.dumps({name: header[rng.choice(names)]})[1:-1]
        text = text[:-1] + ", " + dup + "}"
    elif op == 6:
        header["__metadata__"] = _hostile(rng, header.get("__metadata__")) if rng.random() < 0.5 else \
            _mutate_dict(rng, header.get("__metadata__") or {})
        text = dumps(header)
    elif op == 7:
        header[rng.choice(names) if names and rng.random() < 0.5 else "deep"] = _deep(rng)
        text = dumps(header)
    else:
        text = json.dumps(header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    length = len(raw)
    if op == 8:
        length = rng.choice([0, 1, len(raw) - 1, len(raw) + 8, 2**63, 100 * 1024 * 1024 + 1, len(raw) + len(data) + 1])
    out = struct.pack("<Q", length) + raw + data
    if op == 9:  # flip bytes in the header
        out = bytearray(out)
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(8, 8 + len(raw))
            out[i] = rng.randrange(256)
        out = bytes(out)
    elif op == 10:
        out = out[: rng.randrange(len(out))]
    elif op == 11:
        out = out + bytes(rng.randrange(1, 64))
    return out


# ---- running the readers -------------------------------------------------------------------------

class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


def allowed_errors():
    from hybridquant.converter.errors import ConverterError
    from hybridquant.converter.formats import FormatError

    return (ConverterError, FormatError)


def _targets():
    import torch

    from hybridquant.converter import metadata as qmeta
    from hybridquant.converter.formats import get_codec
    from hybridquant.converter.safetensors_io import SafetensorsReader, read_header
    from hybridquant.nodes.fileinfo import file_summary
    from hybridquant.ops import quant_data as qd
    from hybridquant.ops.state_dict import prepare_state_dict

    try:
        from hybridquant.converter.inspect import inspect_file
    except ImportError:
        inspect_file = None

    def t_read_header(path, size, problems):
        infos, md = read_header(path)
        total = sum(i.nbytes for i in infos.values())
        if total > size or any(i.offset + i.nbytes > size for i in infos.values()):
            problems.append(f"read_header admitted {total} data bytes in a {size}-byte file")

    def t_discover(path, size, problems):
        with SafetensorsReader(path) as r:
            def small(name):
                if r.infos[name].nbytes > 1 << 16:
                    raise qmeta.FormatError(f"{name}: metadata tensor too large")
                return r.read(name)

            found = qmeta.discover_layers(list(r.infos), r.metadata, small, sizes={n: i.nbytes for n, i in r.infos.items()})
        for info in found.values():
            if info.orig_shape is not None and info.orig_shape[0] * info.orig_shape[1] > 2 * size:
                problems.append(f"discover_layers admitted {info.layer} shape {info.orig_shape} in {size} bytes")

    def t_summary(path, size, problems):
        file_summary(path)

    def t_inspect(path, size, problems):
        info = inspect_file(path)
        for d in info.layers:
            if d.shape is not None and d.shape[0] * d.shape[1] > 2 * size:
                problems.append(f"inspect_file admitted {d.name} shape {d.shape} in {size} bytes")

    def t_load(path, size, problems):
        with SafetensorsReader(path) as r:
            sd = {n: r.read(n) for n in r.infos}
            md = r.metadata
        prepared = prepare_state_dict(sd, md)
        for k, v in prepared.items():
            if isinstance(v, torch.Tensor) and v.numel() > 2 * size + 64:
                problems.append(f"prepare_state_dict made {k} of shape {tuple(v.shape)} from {size} bytes")
        for layer, shape in LAYERS.items():
            p = layer + "."
            if not qd.is_quantized_in(prepared, p):
                continue
            info, tensors = qd.read_layer(prepared, p, shape)
            opts = {k: v for k, v in info.options.items() if k != "dtype"}
            get_codec(info.format).dequantize(tensors, shape, torch.float32, layer=layer, **opts)

    targets = [("read_header", t_read_header), ("discover_layers", t_discover), ("file_summary", t_summary),
               ("load", t_load)]
    if inspect_file is not None:  # the converter's public summary (converter/inspect.py), where present
        targets.append(("inspect_file", t_inspect))
    return targets


def run(cases: int | None, seconds: float | None, seed: int, work: Path, limit_memory: bool = True,
        log=None) -> dict:
    """Run the fuzzer; returns its figures (see the module docstring)."""
    ok = allowed_errors()
    targets = _targets()
    seed_paths = seed_files(work / "seeds")
    for p in seed_paths:  # the seeds themselves must pass every reader without any error
        for tname, fn in targets:
            problems: list[str] = []
            fn(str(p), p.stat().st_size, problems)
            if problems:
                raise RuntimeError(f"seed {p.name}: {tname}: {problems}")
    seeds = [p.read_bytes() for p in seed_paths]
    if limit_memory:
        vm = _vm_size()
        if vm:
            resource.setrlimit(resource.RLIMIT_AS, (vm + ALLOC_SLACK, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rng = random.Random(seed)
    old = signal.signal(signal.SIGALRM, _alarm)
    stats = {"seed": seed, "mutations": 0, "uncaught": 0, "hangs": 0, "oversize": 0, "refused": 0,
             "accepted": 0, "by_kind": {}, "failures": []}
    t0 = time.monotonic()
    path = work / "case.safetensors"
    try:
        i = 0
        while (cases is None or i < cases) and (seconds is None or time.monotonic() - t0 < seconds):
            i += 1
            blob, kind = mutate_file(rng, rng.choice(seeds))
            path.write_bytes(blob)
            size = len(blob)
            stats["mutations"] += 1
            stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
            refused = False
            for tname, fn in targets:
                problems: list[str] = []
                signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
                try:
                    fn(str(path), size, problems)
                except ok:
                    refused = True
                except Hang:
                    stats["hangs"] += 1
                    _record(stats, work, i, kind, tname, blob, "hang", "")
                except BaseException as e:  # noqa: BLE001  (this is what the fuzzer looks for)
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    stats["uncaught"] += 1
                    _record(stats, work, i, kind, tname, blob, f"{type(e).__name__}: {e}"[:300],
                            "".join(traceback.format_exception(e)[-3:])[-800:])
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                for msg in problems:
                    stats["oversize"] += 1
                    _record(stats, work, i, kind, tname, blob, "oversize: " + msg, "")
            stats["refused" if refused else "accepted"] += 1
            if log is not None and i % 1000 == 0:
                log(f"{i} cases, {stats['uncaught']} uncaught, {stats['hangs']} hangs, {time.monotonic() - t0:.0f} s")
    finally:
        signal.signal(signal.SIGALRM, old)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    return stats


def _record(stats, work, i, kind, target, blob, what, tb):
    if len(stats["failures"]) < 50:
        p = work / f"failure_{i}.safetensors"
        p.write_bytes(blob)
        stats["failures"].append({"case": i, "kind": kind, "target": target, "error": what, "where": tb,
                                  "file": str(p)})


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def setup_imports() -> None:
    """Make ``hybridquant`` and ComfyUI's ``comfy_api`` importable (the file summary lives in nodes/)."""
    sys.path.insert(0, str(REPO / ".pyroot"))
    comfy = Path(os.environ.get("HYBRIDQUANT_COMFYUI", REPO / ".comfyui" / "ComfyUI"))
    sys.path.insert(0, str(comfy))
    saved = sys.argv
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="HybridQuant reader fuzzer")
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for seeds and failing cases (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.cases is None and a.seconds is None:
        a.cases = 1000
    setup_imports()
    import logging

    logging.disable(logging.WARNING)
    work = Path(a.work or tempfile.mkdtemp(prefix="hq-fuzz-"))
    stats = run(a.cases, a.seconds, a.seed, work, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(stats))
    return 0 if stats["uncaught"] == stats["hangs"] == stats["oversize"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
