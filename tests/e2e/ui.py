"""Drive the real ComfyUI page in headless chromium, synchronously, from pytest.

``UI`` owns one chromium, one page and one event loop (CDP messages need a running loop), so a test
module opens the page once per renderer and its tests call ``ui.js(...)`` / ``ui.wait(...)``.
``renderer`` "classic" is the LiteGraph canvas; "vue" turns on the frontend setting
``Comfy.VueNodes.Enabled`` (the Vue node renderer) before the page loads.
"""

from __future__ import annotations

import asyncio
import json

from .cdp import Chromium, Page, chromium_path
from .conftest import ARTIFACTS

OUR_SCRIPT = "/extensions/ComfyUI-HybridQuant/"


class UI:
    def __init__(self, server, renderer: str):
        import aiohttp

        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium not installed: run scripts/install_browser.sh (scripts/test.sh does)")
        self.server, self.renderer = server, renderer
        self.loop = asyncio.new_event_loop()
        self.browser = Chromium(exe)
        self.browser.start()
        self.session = self.run(self._session(aiohttp))
        self.page = self.run(Page.open(self.session, self.browser.port))
        status, _ = server.request("POST", "/settings/Comfy.VueNodes.Enabled", renderer == "vue")
        assert status == 200, status
        self.reload()

    async def _session(self, aiohttp):
        return aiohttp.ClientSession()

    def run(self, coro, timeout: float = 300):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def reload(self) -> None:
        self.run(self.page.call("Page.navigate", {"url": self.server.url + "/"}))
        self.wait("!!(window.app && window.app.canvas && window.app.graph && window.LiteGraph)", 120)
        self.wait("(window.app.extensions || []).some(e => e.name === 'HybridQuant.Panels')", 60)
        vue = self.js("!!window.app.extensionManager.setting.get('Comfy.VueNodes.Enabled')")
        assert vue == (self.renderer == "vue"), (vue, self.renderer)

    def js(self, expression: str, timeout: float = 60):
        return self.run(self.page.eval(expression, timeout=timeout), timeout + 5)

    def wait(self, expression: str, timeout: float = 60):
        return self.run(self.page.wait_for(expression, timeout=timeout), timeout + 5)

    def dismiss_dialogs(self) -> None:
        """Close the frontend's dialogs (error reports of earlier steps) so the canvas is visible."""
        self.js("""(() => { for (const b of document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close'))
            b.click(); return true; })()""")
        self.run(asyncio.sleep(0.3))

    def shot(self, name: str, keep_dialogs: bool = False):
        ARTIFACTS.mkdir(exist_ok=True)
        if not keep_dialogs:
            self.dismiss_dialogs()
        path = ARTIFACTS / f"e2e-ui-{self.renderer}-{name}.png"
        self.js("window.app.canvas.setDirty(true, true); window.app.canvas.draw(true, true); true")
        self.run(asyncio.sleep(0.6))
        self.run(self.page.screenshot(path))
        return path

    def add(self, node_type: str, pos=(60, 80), widgets: dict | None = None, var: str | None = None) -> int:
        """Create a node on the canvas the way the UI does; returns its id (kept as window[var]). The
        frontend of ComfyUI 0.33 (1.49) gives string ids ("1"); getNodeById takes the number either way."""
        nid = self.js("""(() => {
            const n = window.LiteGraph.createNode(%s);
            n.pos = %s;
            window.app.graph.add(n);
            for (const [k, v] of Object.entries(%s)) {
                const w = n.widgets.find(w => w.name === k);
                if (!w) throw new Error('no widget ' + k);
                w.value = v;
                w.callback && w.callback(v);
            }
            %s
            return n.id;
        })()""" % (json.dumps(node_type), json.dumps(list(pos)), json.dumps(widgets or {}),
                   f"window[{json.dumps(var)}] = n;" if var else ""))
        return int(nid) if isinstance(nid, str) and nid.isdigit() else nid

    def connect(self, src: int, out_slot: int, dst: int, in_name: str) -> None:
        self.js("""(() => { const g = window.app.graph; const d = g.getNodeById(%d);
            g.getNodeById(%d).connect(%d, d, d.findInputSlot(%s)); return true; })()"""
                % (dst, src, out_slot, json.dumps(in_name)))

    def clear(self) -> None:
        """Start the test on a new blank workflow, as the user's "New" (Comfy.NewBlankWorkflow) does.

        Not ``graph.clear()`` (nor ``app.clean()``, the Clear button's call): frontend 1.49 keeps widget
        values in a store keyed by (graph id, node id, widget name), and a cleared graph keeps its id
        and numbers nodes from 1 again, so a new node inherited the widget values of the earlier node
        with its id (a stock CLIPTextEncode its old text, Quantize Model the previous test's
        custom_layers). A new blank workflow has a graph id of its own; 1.32 behaves the same with it."""
        self.dismiss_dialogs()
        self.js("window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow').then(() => true)")
        self.wait("window.app.graph.nodes.length === 0")
        self.js("window.app.canvas.ds.offset = [80, 90]; window.app.canvas.ds.scale = 1; true")

    def panel_text(self, node_id: int) -> str:
        """What the user reads in the node's panel (the DOM element both renderers show)."""
        return self.js("(() => { const n = window.app.graph.getNodeById(%d); return n.__hqPanel ? "
                       "n.__hqPanel.innerText : null; })()" % node_id)

    def panel_state(self, node_id: int) -> str:
        return self.js("window.app.graph.getNodeById(%d).__hqPanel.dataset.state" % node_id)

    def panel_visible(self, node_id: int) -> bool:
        """The panel element is attached to the page and has a size (rendered by the active renderer)."""
        return self.js("""(() => { const e = window.app.graph.getNodeById(%d).__hqPanel;
            const r = e.getBoundingClientRect(); return e.isConnected && r.width > 20 && r.height > 10; })()""" % node_id)

    def queue(self) -> dict:
        """Queue the canvas like the Run button; returns {"ok": prompt id} or {"error": node_errors}."""
        # app.queuePrompt shows a refused prompt in its dialog and keeps the node errors (it does not throw)
        return self.js("""(async () => {
            try { await window.app.queuePrompt(0, 1); } catch (e) { return {error: String(e)}; }
            const ne = window.app.lastNodeErrors;
            return ne && Object.keys(ne).length ? {error: {node_errors: JSON.parse(JSON.stringify(ne))}} : {ok: true};
        })()""", timeout=60)

    def wait_idle(self, timeout: float = 240) -> None:
        """Until the server's queue is empty (the queued prompt finished, whatever its result)."""
        self.wait("""(async () => { const r = await window.app.api.fetchApi('/queue'); const q = await r.json();
            return q.queue_running.length === 0 && q.queue_pending.length === 0; })()""", timeout)

    def close(self) -> None:
        try:
            self.run(self.page.close())
            self.run(self.session.close())
        finally:
            self.browser.stop()
            self.loop.close()
