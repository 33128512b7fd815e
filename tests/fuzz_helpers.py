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

Seeds and packing are in ``fuzz_seeds.py``, the mutations in ``fuzz_mutations.py``; this module runs
the readers. Run: ``python tests/fuzz_helpers.py --cases 10000 --seed 1`` (or ``--seconds 600``); prints one JSON
line of figures. ``tests/test_fuzz.py`` runs a bounded number in CI (``HYBRIDQUANT_FUZZ_CASES``,
``HYBRIDQUANT_FUZZ_SECONDS`` for more).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its siblings import by name

from comfy_import import REPO, comfyui_root, import_comfy  # noqa: E402
from fuzz_mutations import mutate_file  # noqa: E402
from fuzz_seeds import LAYERS, seed_files  # noqa: E402

CASE_TIMEOUT = 10.0
ALLOC_SLACK = 512 << 20


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
    import_comfy(comfyui_root())


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
