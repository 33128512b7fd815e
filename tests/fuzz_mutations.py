"""The fuzzer's mutations (``fuzz_helpers.py``): ``mutate_file(rng, blob)`` applies one to three
mutations of one kind (header, quant_header, comfy_quant, quant_state, tensors) to a seed file.
The JSON-level kinds re-pack the file (``fuzz_seeds.pack``) so they reach the metadata readers.
"""

from __future__ import annotations

import json
import struct

from fuzz_seeds import pack, unpack


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
