"""Resolve a user-supplied model file name to a path INSIDE one of ComfyUI's registered model folders.

Used by every route and node that takes a file name from the outside (the web page, a workflow).
Rules (the route tests exercise each):
- ``folder`` must be a registered ``folder_paths`` model folder (``diffusion_models``,
  ``checkpoints``, ``text_encoders``, ...) that lists ``.safetensors`` files; ``custom_nodes`` and
  friends are refused.
- ``name`` must be a relative path with no ``..`` component, no NUL, no drive or leading slash
  (either separator), ending in ``.safetensors``.
- the name, joined to one of that folder's base directories, must stay inside it. Symlinks are
  followed as ComfyUI's own loaders follow them (users keep models on other disks through symlinks
  placed in the model folders): a link the user put in a model folder is part of that folder.
"""

from __future__ import annotations

import os
import re


class PathRejected(ValueError):
    """The requested file is not an allowed model file; the message says why (no absolute paths)."""


# Registered folders that are not model folders, even though folder_paths knows them.
_NOT_MODEL_FOLDERS = {"custom_nodes", "configs", "classifiers", "diffusers"}
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def model_folders(folder_paths) -> list[str]:
    """Registered folder names that may hold .safetensors models."""
    out = []
    for name, (paths, exts) in folder_paths.folder_names_and_paths.items():
        if name in _NOT_MODEL_FOLDERS:
            continue
        if ".safetensors" in exts or not exts:
            out.append(name)
    return sorted(out)


def check_name(name) -> str:
    """Syntactic checks on a relative file name; returns it with '/' separators."""
    if not isinstance(name, str) or not name.strip():
        raise PathRejected("no file name given")
    if "\x00" in name:
        raise PathRejected("file name contains a NUL byte")
    if name.startswith(("/", "\\")) or _DRIVE_RE.match(name) or os.path.isabs(name):
        raise PathRejected("absolute paths are not accepted; give a name relative to the model folder")
    parts = re.split(r"[\\/]+", name)
    if any(p in ("..", ".") for p in parts):
        raise PathRejected("'..' and '.' path components are not accepted")
    if not name.lower().endswith(".safetensors"):
        raise PathRejected("only .safetensors files can be inspected")
    return "/".join(parts)


def _inside(path: str, base: str) -> bool:
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:  # different drives
        return False


def resolve_model_file(folder_paths, folder: str, name: str) -> str:
    """Absolute real path of ``name`` in the model folder ``folder``; ``PathRejected`` otherwise."""
    if folder not in model_folders(folder_paths):
        raise PathRejected(f"unknown model folder {folder!r}")
    rel = check_name(name)
    for base in folder_paths.get_folder_paths(folder):
        base = os.path.abspath(base)
        candidate = os.path.normpath(os.path.join(base, *rel.split("/")))
        if not _inside(candidate, base):
            raise PathRejected(f"{name!r} is outside the {folder} folder")
        if os.path.isfile(candidate):  # follows symlinks, as folder_paths.get_full_path does
            return candidate
    raise PathRejected(f"{name!r} is not a file in the {folder} folder")
