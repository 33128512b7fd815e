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
"""

from __future__ import annotations

import logging

from . import capabilities_view
from .paths import PathRejected, model_folders, resolve_model_file

_registered = False
log = logging.getLogger("HybridQuant")


def _json(web, data, status=200):
    return web.json_response(data, status=status)


def file_info(folder_paths, folder: str, name: str) -> tuple[int, dict]:
    """The route's logic without aiohttp (tests call it directly too): (status, body)."""
    from ..converter.errors import InputFileError
    from .fileinfo import file_summary

    try:
        path = resolve_model_file(folder_paths, folder, name)
    except PathRejected as e:
        status = 404 if "is not a file" in str(e) else 400
        return status, {"error": str(e)}
    try:
        summary = file_summary(path)
    except InputFileError as e:
        # The converter's message starts with the absolute path; show only the name the user gave.
        msg = str(e)
        msg = msg[len(path) + 2:] if msg.startswith(path + ": ") else msg
        return 422, {"error": f"{name}: {msg}"}
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
        q = request.rel_url.query
        status, body = file_info(folder_paths, q.get("folder", ""), q.get("name", ""))
        return _json(web, body, status)

    @routes.get("/hybridquant/capabilities")
    async def _capabilities(request):
        return _json(web, capabilities_view.device_report())

    @routes.get("/hybridquant/folders")
    async def _folders(request):
        return _json(web, {"folders": model_folders(folder_paths)})

    _registered = True
    return True
