"""A broken model file through the real server: the loader node's error reaches the user as one clear
message (``ModelLoadError`` naming the file and what is wrong), and the Info node's too; the server
keeps running."""

from __future__ import annotations

import json
import struct

import pytest

from .harness import status_messages

pytestmark = pytest.mark.comfyui


def _duplicate_name_file(path):
    e = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    text = '{"a.weight": %s, "a.weight": %s}' % (json.dumps(e), json.dumps(dict(e, data_offsets=[16, 32])))
    raw = text.encode() + b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 32)


@pytest.mark.parametrize("node", ["loader", "info"])
def test_broken_file_is_a_message_not_a_traceback(comfy_server, node):
    name = f"hq_broken_{node}.safetensors"
    _duplicate_name_file(comfy_server.models("diffusion_models") / name)
    if node == "loader":
        prompt = {"1": {"class_type": "HybridQuantLoadDiffusionModel", "inputs": {"unet_name": name, "ops": "auto"}},
                  "2": {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": "hq_never"}}}
    else:
        prompt = {"1": {"class_type": "HybridQuantInfo", "inputs": {"file": f"diffusion_models/{name}"}}}
    entry = comfy_server.wait(comfy_server.queue(prompt), timeout=120)
    errors = status_messages(entry, "execution_error")
    assert errors, entry["status"]
    err = errors[0]
    # the Info node reports user errors as a plain ValueError (a short type name next to the message)
    assert err["exception_type"].endswith("ModelLoadError" if node == "loader" else "ValueError"), err
    assert name in err["exception_message"] and "duplicate key 'a.weight'" in err["exception_message"], err
    assert "\n" not in err["exception_message"].strip()  # one line (ComfyUI appends a newline)
    status, _ = comfy_server.get("/hybridquant/capabilities")
    assert status == 200
