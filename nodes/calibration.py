"""The "Collect Calibration (HybridQuant)" node: records calibration statistics from real sampling runs.

Put it between a model loader and the KSampler(s) of your own workflow. It returns a clone of the
MODEL with an ``OUTER_SAMPLE`` wrapper (``comfy.patcher_extension``): while a sampler runs, forward
pre-hooks on every ``nn.Linear`` of the diffusion model (ComfyUI's ops classes subclass it) add up
each layer's input second moments ``X^T X``, ``x^2`` and ``max |x|``
(``converter.rounding.calibration.Collector``); after each completed sampling run the totals so far
are written atomically to ``models/calibration/<filename>.safetensors``. Queue the workflow with
several prompts / seeds: the same node instance keeps accumulating (ComfyUI reuses the node's output
while its inputs are unchanged), and each run rewrites the file with all statistics so far.

That file is what ``convert_to_quant --calibration FILE`` and the "Quantize Model" node (rounding
``gptq``) read. Layer names are the diffusion model's module names (``double_blocks.0.img_attn.qkv``),
i.e. the keys of a ``diffusion_models`` file; the loader also resolves the ``model.diffusion_model.``
prefix of full checkpoints.

Cost: one extra ``N x N`` matmul per layer call (about the cost of the layer itself) plus moving the
``N x N`` result to the statistics device. Memory: ``4 N^2`` bytes per layer; layers wider than
``max_full_dim`` inputs keep only the diagonal (weighted clipping instead of GPTQ for them).
"""

from __future__ import annotations

import logging
import os
import threading

from ._api import io

log = logging.getLogger("HybridQuant")
CATEGORY = "HybridQuant"
FOLDER = "calibration"
WRAPPER_KEY = "hybridquant_calibration"


def calibration_dir() -> str:
    import folder_paths

    d = os.path.join(folder_paths.models_dir, FOLDER)
    table = folder_paths.folder_names_and_paths
    if FOLDER not in table:  # lets other nodes list the files with folder_paths.get_filename_list
        table[FOLDER] = ([d], {".safetensors"})
    return table[FOLDER][0][0]


def calibration_files() -> list[str]:
    import folder_paths

    calibration_dir()
    return folder_paths.get_filename_list(FOLDER)


def _target_path(filename: str) -> str:
    name = (filename or "").strip().replace("\\", "/")
    if not name or name.startswith("/") or any(p in ("..", ".") for p in name.split("/")) or ":" in name:
        raise ValueError(f"calibration filename {filename!r}: give a plain relative name like 'flux_calibration'")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    base = calibration_dir()
    path = os.path.join(base, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class Recorder:
    """Holds the collector of one node output; installed as the OUTER_SAMPLE wrapper."""

    def __init__(self, path: str, token_stride: int, max_full_dim: int, on_cpu: bool):
        self.path = path
        self.opts = dict(token_stride=token_stride, max_full_dim=max_full_dim, device="cpu" if on_cpu else None)
        self.collector = None
        self.runs = 0
        self.lock = threading.Lock()

    def _collector_for(self, diffusion_model):
        from ..converter.rounding.calibration import Collector

        if self.collector is None or self.collector.model is not diffusion_model:
            if self.collector is not None:  # model object replaced (reloaded): start over, keep nothing stale
                log.info("[HybridQuant] calibration: diffusion model changed, statistics restart")
            self.collector = Collector(diffusion_model, **self.opts)
        return self.collector

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        dm = guider.model_patcher.model.diffusion_model
        with self.lock:
            col = self._collector_for(dm)
            col.attach()
            try:
                out = executor(*args, **kwargs)
            finally:
                col.detach()
            self.runs += 1
            col.save(self.path, source=f"ComfyUI sampling runs: {self.runs}", overwrite=True)
            n = len(col.acc)
            log.info("[HybridQuant] calibration: %d layers, %d sampling runs -> %s", n, self.runs, self.path)
        return out


class CollectCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HybridQuantCollectCalibration",
            display_name="Collect Calibration (HybridQuant)",
            category=CATEGORY,
            description=("Records the inputs of every Linear layer of the diffusion model while you sample with the "
                         "returned MODEL, and saves them to models/calibration after each run. Feed the file to "
                         "'Quantize Model' (rounding gptq) or convert_to_quant --calibration for lower error."),
            inputs=[
                io.Model.Input("model", tooltip="The model to record; sample with the MODEL this node returns."),
                io.String.Input("filename", default="hybridquant_calibration",
                                tooltip="File name under models/calibration (.safetensors is added). Rewritten after "
                                        "every sampling run with all statistics collected so far."),
                io.Int.Input("token_stride", default=1, min=1, max=64,
                             tooltip="Use every k-th token only (cheaper for video models)."),
                io.Int.Input("max_full_dim", default=4096, min=0, max=65536,
                             tooltip="Layers with more input features keep only per-channel statistics "
                                     "(X^T X costs 4*N^2 bytes per layer)."),
                io.Boolean.Input("statistics_on_cpu", default=True,
                                 tooltip="Keep the accumulated statistics in RAM instead of VRAM."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The same model, recording while it samples."),
                io.String.Output(display_name="calibration_file", tooltip="Path of the statistics file."),
            ],
        )

    @classmethod
    def execute(cls, model, filename, token_stride, max_full_dim, statistics_on_cpu) -> io.NodeOutput:
        import comfy.patcher_extension

        path = _target_path(filename)
        rec = Recorder(path, int(token_stride), int(max_full_dim), bool(statistics_on_cpu))
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, rec)
        return io.NodeOutput(m, path)


NODES = [CollectCalibration]

__all__ = ["CollectCalibration", "NODES", "Recorder", "calibration_dir", "calibration_files"]
