"""Run a REAL ComfyUI server for the end-to-end tests, and talk to it over HTTP and its websocket.

``ComfyServer`` starts ``python main.py --cpu --listen 127.0.0.1 --port N --base-directory TMP`` in its
own process group. ``--base-directory`` (present in 0.3.75, 0.29 and 0.33) moves models/, input/, output/,
temp/, user/ AND custom_nodes/ into a temp dir, so tests never touch the ComfyUI tree; the pack is
symlinked into that custom_nodes/. ``stop()`` terminates the whole process group (SIGTERM, then
SIGKILL). The server log is kept as a file (copied to artifacts/ by the fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "checkpoints", "vae", "loras", "embeddings")


def free_port(lo: int = 8302, hi: int = 8399) -> int:
    """A free loopback port; HYBRIDQUANT_E2E_PORT pins one."""
    pinned = os.environ.get("HYBRIDQUANT_E2E_PORT")
    if pinned:
        return int(pinned)
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


class ComfyServer:
    def __init__(self, comfy_root: Path, base_dir: Path, python: str = sys.executable, port: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.root = Path(comfy_root)
        self.base = Path(base_dir)
        self.python = python
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.client_id = uuid.uuid4().hex

    # -- layout ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        for d in ("custom_nodes", "input", "output", "temp", "user/default"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for d in MODEL_FOLDERS:
            (self.base / "models" / d).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "ComfyUI-HybridQuant"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        # Keep the new frontend from opening first-run dialogs over the canvas in the browser test.
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            # Only settings the frontend registers: an unknown key makes its settings store throw.
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def models(self, folder: str) -> Path:
        return self.base / "models" / folder

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    # -- process ---------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        self.prepare()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               # the default database lives in the ComfyUI tree's user/ dir: keep it in memory
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("HYBRIDQUANT_COMFYUI", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except json.JSONDecodeError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0):
        return self.request("GET", path, timeout=timeout)

    def queue(self, prompt: dict) -> str:
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(f"POST /prompt refused ({status}): {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 240.0) -> dict:
        """The history entry of a finished prompt (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, hist = self.get(f"/history/{prompt_id}")
            if status == 200 and prompt_id in (hist or {}):
                entry = hist[prompt_id]
                if entry.get("status", {}).get("completed") is not None or entry.get("status", {}).get("status_str"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 240.0) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        st = entry.get("status", {})
        if st.get("status_str") != "success":
            msgs = json.dumps(st.get("messages", []), indent=1)[:6000]
            raise AssertionError(f"workflow failed ({st.get('status_str')}):\n{msgs}\n--- server log ---\n{self.log_tail()}")
        return entry

    # -- websocket -------------------------------------------------------------------------------
    async def ws_connect(self, session):
        return await session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", heartbeat=20)


def status_messages(entry: dict, kind: str) -> list[dict]:
    return [m[1] for m in entry.get("status", {}).get("messages", []) if m[0] == kind]


def run_async(coro):
    return asyncio.run(coro)
