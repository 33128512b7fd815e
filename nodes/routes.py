"""HTTP routes for the web extension (registered on ``PromptServer.instance.routes``).

GET /hybridquant/file_info?folder=<model folder>&name=<relative file name>
    The panel's summary of a model file (``fileinfo.file_summary``: header + metadata tensors only)
    plus ``fast_path``: per quantized format, the matmul path this machine takes. Only files inside
    ComfyUI's registered model folders are served (``paths``): 400 for a refused name/folder, 404 for
    a missing file, 422 for a file that is not a readable safetensors model.
POST /hybridquant/plan  {"folder", "name", "settings": {format, preset, custom_layers, custom_format,
                                                       target_size, svd_rank, rotate}}
    Quantize Model's preview: which layer of that file becomes which format and why the rest is kept
    (``converter.plan_file``: header only). A bad setting is a 400 naming its input (``"input"``). With a
    ``target_size`` the answer has ``budget`` (``converter.budget.summary``: per chosen format the
    layers, bytes and expected error; file bytes against the budget) and each row the budget's choice;
    that reads the weights (cached per file version and settings).
GET /hybridquant/formats
    The registry as the page needs it: per format label, colour, summary, search words; the node's
    option texts and the old option values they replace; the nodes' search words and ``name_words``,
    the format words their searchable names start with (``converter.formats.registry.name_words``).
GET /hybridquant/capabilities
    The device, its fast-kernel features and the formats the running core loads natively.
GET /hybridquant/folders
    The model folders the routes accept.

Every response is JSON; errors are ``{"error": message}`` with no server paths in the message.
A file the reader refuses (``converter.safetensors_io`` / ``converter.schema`` rules) is a 422 with the
reader's message; no file makes a route answer 500. The summary is computed from the header (and the
few-hundred-byte metadata tensors) only, off the event loop, and cached by (path, size, mtime): a
panel redrawing, or many clients asking at once, costs one header read per file version.
"""

from __future__ import annotations

import collections
import logging
import os
import threading

from . import capabilities_view
from .paths import PathRejected, model_folders, resolve_model_file

_registered = False
log = logging.getLogger("HybridQuant")


def _json(web, data, status=200):
    return web.json_response(data, status=status)


_CACHE_ENTRIES = 512
_cache: collections.OrderedDict = collections.OrderedDict()
_cache_lock = threading.Lock()


def _resolve(folder_paths, folder: str, name: str):
    try:
        return resolve_model_file(folder_paths, folder, name), None
    except PathRejected as e:
        status = 404 if "is not a file" in str(e) else 400
        return None, (status, {"error": str(e)})


def _short(e: Exception, path: str, name: str) -> str:
    msg = str(e)
    return f"{name}: {msg[len(path) + 2:] if msg.startswith(path + ': ') else msg.replace(path, name)}"


def _summary(path: str) -> tuple[int, dict]:
    """(status, summary or error body) of one file, cached by (path, size, mtime); refusals too."""
    from ..converter.errors import ConverterError
    from ..converter.formats import FormatError
    from ..ops.capabilities import core_quant_algos
    from .fileinfo import file_summary

    try:
        st = os.stat(path)
    except OSError as e:
        return 404, {"error": f"cannot read the file ({e.strerror})"}
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    try:
        result = 200, file_summary(path, core_quant_algos())
    except (ConverterError, FormatError) as e:
        # The converter's message starts with the absolute path; the caller puts the user's name there.
        result = 422, {"error": str(e).replace(path + ": ", "").replace(path, os.path.basename(path))}
    except Exception as e:  # a bug, not the user's file: logged with its traceback, still no 500
        log.exception("HybridQuant: file_info failed on %s", path)
        result = 422, {"error": f"cannot summarize this file ({type(e).__name__})"}
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return result


def file_info(folder_paths, folder: str, name: str) -> tuple[int, dict]:
    """The route's logic without aiohttp (tests call it directly too): (status, body)."""
    path, err = _resolve(folder_paths, folder, name)
    if err:
        return err
    status, body = _summary(path)
    if status != 200:
        return status, {"error": f"{name}: {body['error']}"}
    summary = dict(body)
    summary["file"] = name
    summary["folder"] = folder
    summary["name"] = name
    summary["fast_path"] = capabilities_view.fast_path_for_formats(summary["formats"], summary["quantized_formats"])
    return 200, summary


def plan_preview(folder_paths, body: dict) -> tuple[int, dict]:
    """Quantize Model's plan for a file, from its header: rows of (layer, shape, format, reason)."""
    from ..converter.convert import plan_file
    from ..converter.errors import ConverterError
    from ..converter.formats import FormatError
    from . import quantize_options as qo
    from .quantize_summary import plain_reason, warnings

    if not isinstance(body, dict):
        return 400, {"error": "expected a JSON object"}
    path, err = _resolve(folder_paths, str(body.get("folder", "")), str(body.get("name", "")))
    if err:
        return err
    raw = body.get("settings") if isinstance(body.get("settings"), dict) else {}
    try:
        s = qo.settings_from_inputs({k: raw.get(k) for k in ("format", "preset", "custom_layers", "custom_format",
                                                              "target_size", "svd_rank", "rotate")})
    except (TypeError, ValueError):
        return 400, {"error": f"svd_rank: not an integer: {raw.get('svd_rank')!r}", "input": "svd_rank"}
    for field, check in (("format", lambda: qo.resolve_choice(s["format"])),
                         ("custom_format", lambda: qo.resolve_choice(s["custom_format"], custom=True)),
                         ("custom_layers", lambda: qo.check_regex(s["custom_layers"]))):
        try:
            check()
        except ValueError as e:
            return 400, {"error": str(e), "input": field}
    if s["preset"] not in qo.preset_choices():
        return 400, {"error": f"preset: unknown {s['preset']!r}", "input": "preset"}
    if s["rotate"] not in qo.rotate_choices():
        return 400, {"error": f"rotate: unknown {s['rotate']!r}", "input": "rotate"}
    if not 0 <= s["svd_rank"] <= qo.MAX_SVD_RANK:
        return 400, {"error": f"svd_rank: must be between 0 and {qo.MAX_SVD_RANK}, got {s['svd_rank']}",
                     "input": "svd_rank"}
    try:
        qo.budget_fields(s)
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        return 400, {"error": str(e), "input": field if field in ("target_size", "svd_rank", "rotate") else None}
    try:
        options = qo.build_options(s)
        plans = plan_file(path, options)
        budget = _budget(path, options) if s["target_size"] else None
    except (ConverterError, FormatError, ValueError) as e:
        msg = _short(e, path, body.get("name", ""))
        if s["target_size"] and ("budget" in msg or "target-size" in msg):
            return 422, {"error": f"target_size: {msg}", "input": "target_size"}
        return 422, {"error": msg}
    chosen = budget["choice"] if budget else {}
    rows = []
    counts: dict[str, int] = {}
    for p in plans:
        if not (p.name.endswith(".weight") and len(p.shape) == 2):
            continue
        label = qo.label_of(p.format) if p.quantized else "kept"
        if p.layer in chosen:
            label = chosen[p.layer]
        counts[label] = counts.get(label, 0) + 1
        rows.append({"name": p.name[: -len(".weight")], "shape": list(p.shape), "dtype": p.dtype,
                     "format": p.format, "label": label, "reason": plain_reason(p.reason)})
    out = {"name": body.get("name"), "layers": rows, "counts": counts, "warnings": warnings(plans, s),
           "quantized": sum(1 for r in rows if r["format"])}
    if budget:
        out["budget"] = {k: v for k, v in budget.items() if k != "choice"}
    return 200, out


_budget_cache: collections.OrderedDict = collections.OrderedDict()


def _budget(path: str, options) -> dict:
    """What a size budget chooses for this file (``converter.budget.summary``). Reads and quantizes every
    layer with every candidate (seconds for small models, minutes for 12B ones): cached by file version
    and options, so redrawing the panel costs nothing."""
    import dataclasses

    from ..converter import budget

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, repr(dataclasses.astuple(options)))
    with _cache_lock:
        if key in _budget_cache:
            return _budget_cache[key]
    plain = dataclasses.replace(options, layer_config=None)
    choice, other, total, weights = budget.budget_choice(path, plain, options.target_size, options.target_bpw)
    out = budget.summary(choice, other, total, weights)
    with _cache_lock:
        _budget_cache[key] = out
        while len(_budget_cache) > 16:
            _budget_cache.popitem(last=False)
    return out


def formats_payload() -> dict:
    from ..converter.formats import registry
    from ..converter.inspect import PLAIN_DTYPES
    from . import quantize_options as qo
    from ._api import format_aliases

    fmts = [{"name": s.name, "label": s.label, "family": s.family, "color": s.color, "summary": s.summary,
             "aliases": list(s.aliases), "four_bit": s.four_bit} for s in registry.specs()]
    plain = [{"name": n, "label": n, "color": "#8a8a8a", "summary": "not quantized", "aliases": [],
              "four_bit": False} for n in dict.fromkeys(PLAIN_DTYPES.values())]
    words = format_aliases()
    return {"formats": fmts + plain,
            "choices": {"format": [c.text for c in qo.primary_choices()],
                        "custom_format": [c.text for c in qo.custom_choices()], "legacy": qo.legacy_map()},
            # format words for the searchable node names of name-only search frontends (web/)
            "name_words": registry.name_words(),
            "search_aliases": {"HybridQuantQuantizeModel": ["quantize", *words],
                               "HybridQuantLoadDiffusionModel": words, "HybridQuantLoadCheckpoint": words,
                               "HybridQuantLoadCLIP": words, "HybridQuantInfo": ["inspect", "layers", *words]}}


def register_routes() -> bool:
    """Add our routes to the running PromptServer once; False when there is no server (tests)."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    import folder_paths
    from aiohttp import web

    routes = server.routes

    @routes.get("/hybridquant/file_info")
    async def _file_info(request):
        import asyncio

        q = request.rel_url.query
        # Header reads are file I/O: off the event loop, so the server answers other requests meanwhile.
        status, body = await asyncio.get_running_loop().run_in_executor(
            None, file_info, folder_paths, q.get("folder", ""), q.get("name", ""))
        return _json(web, body, status)

    @routes.post("/hybridquant/plan")
    async def _plan(request):
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - not JSON
            return _json(web, {"error": "expected a JSON body"}, 400)
        import asyncio

        # a budget preview reads and quantizes the weights: off the event loop
        status, out = await asyncio.get_running_loop().run_in_executor(None, plan_preview, folder_paths, body)
        return _json(web, out, status)

    @routes.get("/hybridquant/formats")
    async def _formats(request):
        return _json(web, formats_payload())

    @routes.get("/hybridquant/capabilities")
    async def _capabilities(request):
        return _json(web, capabilities_view.device_report())

    @routes.get("/hybridquant/folders")
    async def _folders(request):
        return _json(web, {"folders": model_folders(folder_paths)})

    _registered = True
    return True
