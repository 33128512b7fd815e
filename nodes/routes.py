"""HTTP routes for the web extension (registered on ``PromptServer.instance.routes``).

GET /hybridquant/file_info?folder=<model folder>&name=<relative file name>
    JSON summary of a model file from its safetensors HEADER ONLY (``fileinfo.file_summary``) plus
    ``fast_path``: for this machine, per format present, whether ops takes a fast matmul path and
    which. Only files inside ComfyUI's registered model folders are served (``paths``): 400 for a
    refused name/folder, 404 for a missing file, 422 for a file that is not safetensors.
GET /hybridquant/capabilities
    JSON of the device and the matmul path per format, from ``ops.capabilities`` (the one place that
    decides paths).
GET /hybridquant/folders
    JSON list of the model folders the routes accept.

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


def _summary(path: str) -> tuple[int, dict]:
    """(status, summary or error body) of one file, cached by (path, size, mtime); refusals too."""
    from ..converter.errors import ConverterError
    from ..converter.formats import FormatError
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
        result = 200, file_summary(path)
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
    try:
        path = resolve_model_file(folder_paths, folder, name)
    except PathRejected as e:
        status = 404 if "is not a file" in str(e) else 400
        return status, {"error": str(e)}
    status, body = _summary(path)
    if status != 200:
        return status, {"error": f"{name}: {body['error']}"}
    summary = dict(body)
    summary["folder"] = folder
    summary["name"] = name
    summary["fast_path"] = capabilities_view.fast_path_for_formats(summary["formats"])
    return 200, summary


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

    @routes.get("/hybridquant/capabilities")
    async def _capabilities(request):
        return _json(web, capabilities_view.device_report())

    @routes.get("/hybridquant/folders")
    async def _folders(request):
        return _json(web, {"folders": model_folders(folder_paths)})

    _registered = True
    return True
