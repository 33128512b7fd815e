"""The file-info route under load, on loopback against the real ComfyUI server, with a model folder of
thousands of small files (valid ones of every format, and broken ones).

Prints requests per second and latency percentiles (first reads and cached reads); asserts only
correctness: every answer is the right status with the right content, nothing errors, the folder lists
completely. Timing is never asserted (it depends on the machine).
"""

from __future__ import annotations

import json
import random
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
from fuzz_seeds import LAYERS, seed_files

pytestmark = pytest.mark.comfyui

FILES = 3000
CLIENTS = 8
REQUESTS = 100  # per client and phase


@pytest.fixture(scope="module")
def crowded_folder(comfy_server, tmp_path_factory):
    seeds = [p for p in seed_files(tmp_path_factory.mktemp("seeds")) if p.name.startswith("seed0")
             or p.name.startswith("seed1")]
    blobs = [(p.name.split("_", 1)[1].removesuffix(".safetensors"), p.read_bytes()) for p in seeds]
    blobs = [(fmt, blob, _quantized_layers(blob)) for fmt, blob in blobs]
    folder = comfy_server.models("diffusion_models") / "crowd"
    folder.mkdir()
    expected = {}
    for i in range(FILES):
        name = f"crowd/m{i:05d}.safetensors"
        if i % 100 == 99:  # a broken download: the header names one tensor twice
            fmt, blob, _ = blobs[i % len(blobs)]
            n = int.from_bytes(blob[:8], "little")
            header = json.loads(blob[8:8 + n])
            tname = next(k for k in header if k != "__metadata__")
            bad = (json.dumps(header)[:-1] + ", " + json.dumps({tname: header[tname]})[1:-1] + "}").encode()
            bad += b" " * (-len(bad) % 8)
            (folder / name.split("/")[1]).write_bytes(len(bad).to_bytes(8, "little") + bad + blob[8 + n:])
            expected[name] = (422, None, 0)
        else:
            fmt, blob, count = blobs[i % len(blobs)]
            (folder / name.split("/")[1]).write_bytes(blob)
            expected[name] = (200, fmt, count)
    return expected


def _quantized_layers(blob: bytes) -> int:
    """How many of the seed's layers are quantized: seed_files writes a bias only beside a quantized
    layer (layers a format refuses, e.g. ConvRot on odd widths, stay plain without one)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    return sum(f"{layer}.bias" in header for layer in LAYERS)


def _ask(server, name):
    q = urllib.parse.urlencode({"folder": "diffusion_models", "name": name})
    t0 = time.perf_counter()
    status, body = server.get(f"/hybridquant/file_info?{q}", timeout=60)
    return name, status, body, time.perf_counter() - t0


def _check(expected, name, status, body) -> str | None:
    want_status, fmt, count = expected[name]
    if status != want_status:
        return f"{name}: {status} {str(body)[:200]}"
    if status == 200 and (body.get("formats", {}).get(fmt) != count or body.get("name") != name):
        return f"{name}: wrong summary {str(body)[:300]}"
    if status == 422 and "duplicate key" not in body.get("error", ""):
        return f"{name}: wrong error {body}"
    return None


def _phase(server, expected, names, label):
    errors, lat = [], []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for name, status, body, dt in pool.map(lambda n: _ask(server, n), names):
            lat.append(dt)
            problem = _check(expected, name, status, body)
            if problem:
                errors.append(problem)
    wall = time.perf_counter() - t0
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    print(f"\nfile_info {label}: {len(names)} requests, {CLIENTS} clients: {len(names) / wall:.0f} req/s, "
          f"p50 {p(0.50):.1f} ms, p99 {p(0.99):.1f} ms, max {lat[-1] * 1000:.1f} ms, errors={len(errors)}")
    return errors


def test_file_info_under_parallel_requests(comfy_server, crowded_folder):
    rng = random.Random(0)
    names = list(crowded_folder)
    first = rng.sample(names, CLIENTS * REQUESTS)  # distinct files: every request reads a header
    errors = _phase(comfy_server, crowded_folder, first, "first reads")
    again = [rng.choice(first) for _ in range(CLIENTS * REQUESTS)]  # the same files: served from the cache
    errors += _phase(comfy_server, crowded_folder, again, "cached")
    assert errors == [], errors[:5]
    status, body = comfy_server.get("/hybridquant/capabilities")  # the server still answers everything else
    assert status == 200


def test_thousands_of_files_list_completely(comfy_server, crowded_folder):
    t0 = time.perf_counter()
    status, listed = comfy_server.get("/models/diffusion_models", timeout=120)
    dt = time.perf_counter() - t0
    assert status == 200
    crowd = [n for n in listed if n.replace("\\", "/").startswith("crowd/")]
    print(f"\n/models/diffusion_models: {len(listed)} files listed in {dt * 1000:.0f} ms")
    assert sorted(crowd) == sorted(crowded_folder)
