"""GPU memory of a model loaded with our ops vs the bytes stored in its state dict.

    HYBRIDQUANT_COMFYUI=/path/to/ComfyUI python bench/bench_memory.py

Builds a Flux-block-sized stack of Linear layers (3072x3072, 3072x12288, 12288x3072, x4) with our ops
class, one format per run, loads the quantized state dict on CPU, moves the model to the GPU and
compares ``torch.cuda.memory_allocated`` growth with the summed ``nbytes`` of the state dict.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.environ.get("HYBRIDQUANT_COMFYUI", ".comfyui/ComfyUI"))
sys.argv = [sys.argv[0]]  # ComfyUI parses argv at import: give it none of ours

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.ops  # noqa: E402

import hybridquant.ops as ops  # noqa: E402
from hybridquant.converter import metadata as qmeta  # noqa: E402
from hybridquant.converter.formats import get_codec  # noqa: E402

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288)] * 4


def build(fmt):
    sd = {}
    for i, (o, k) in enumerate(SHAPES):
        w = torch.randn(o, k, device="cuda") * 0.02
        if fmt == "bnb_nf4":
            import bitsandbytes.functional as bf

            packed, qs = bf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4", compress_statistics=True)
            sd[f"l{i}.weight"] = packed.cpu()
            for k2, v in qs.as_dict(packed=True).items():
                sd[f"l{i}.weight.{k2}"] = v.cpu()
        elif fmt == "bf16":
            sd[f"l{i}.weight"] = w.to(torch.bfloat16).cpu()
        else:
            q = get_codec(fmt).quantize(w)
            for s, t in q.items():
                sd[f"l{i}.{s}"] = t.cpu()
            sd[f"l{i}.comfy_quant"] = qmeta.encode_comfy_quant(get_codec(fmt).metadata())
        sd[f"l{i}.bias"] = torch.zeros(o, dtype=torch.bfloat16)
    return sd


class Stack(torch.nn.Module):
    def __init__(self, ops_cls):
        super().__init__()
        for i, (o, k) in enumerate(SHAPES):
            setattr(self, f"l{i}", ops_cls.Linear(k, o, bias=True, dtype=torch.bfloat16, device="cpu"))


def main():
    print("| format | stored bytes | GPU bytes after .to(cuda) | ratio |\n|---|---|---|---|")
    for fmt in ("bf16", "float8_e4m3fn", "hybrid_mxfp8", "int8_tensorwise", "nvfp4", "bnb_nf4"):
        sd = build(fmt)
        stored = sum(t.numel() * t.element_size() for t in sd.values())
        cls = ops.choose_ops(sd.keys(), {})
        m = Stack(cls)
        m.load_state_dict(ops.prepare_state_dict(sd, {}))
        del sd
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        m.to("cuda")
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - before
        print(f"| {fmt} | {stored} | {used} | {used / stored:.4f} |", flush=True)
        del m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
