"""The HybridQuant Linear: a ``comfy.ops.manual_cast.Linear`` that also loads quantized layers.

A layer whose state-dict entry is plain loads and runs exactly as stock ComfyUI (every method defers
to the base class). A quantized layer (``.comfy_quant``, header-only, legacy scaled-FP8, bitsandbytes
4-bit) keeps its data quantized:

- ``weight`` is a Parameter holding the stored (packed / padded) tensor, other codec tensors are
  registered buffers (``quant_data.buffer_name``), so ``.to()``, pinning, offload, ``state_dict()``
  and ``model_size()`` all see the quantized bytes. ``state_dict()`` writes the file's own key names.
- ``.to(dtype)`` never converts quantized tensors (FP8 counts as floating point in torch; a cast would
  destroy the codes): only their device follows.
- forward: ``comfy.ops.cast_bias_weight(..., offloadable=True)`` moves the stored weight and the bias
  (offload stream, bias_function) through a small carrier object -- the weight is passed in its
  stored dtype so ComfyUI never casts codes; under dynamic VRAM a ``dynamic_vram.VbarView`` instead --
  then ``uncast_bias_weight`` with the token untouched.
  The matmul path comes from ``linear_paths`` (decided per device once); ``weight_function`` (LoRA,
  low-VRAM patches) always runs on the dequantized logical weight.
- LoRA: ``convert_weight`` dequantizes what ComfyUI's patcher hands over (the stored codes cast to a
  float dtype, which is exact for e4m3/e5m2/int8/uint8); ``set_weight`` requantizes with the STORED
  scales (merged for FP8/INT8/MX) so unpatching, which restores ``weight`` only, is exact. 4-bit layers
  are patched on the fly instead (``lora.py``), never rewriting the packed data.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.ops
import torch

from ..converter.formats import FormatError, get_codec
from . import capabilities as caps
from . import direct, dispatch, dynamic_vram, linear_paths
from . import quant_data as qd
from . import transforms as hq_tf

log = logging.getLogger("hybridquant.ops")


class _Carrier:
    """What ``comfy.ops.cast_bias_weight`` needs of a layer, pointing at the stored (quantized) weight."""

    __slots__ = ("weight", "bias", "weight_function", "bias_function", "comfy_cast_weights")

    def __init__(self, layer):
        self.weight = layer.weight
        self.bias = layer.bias
        self.weight_function = []  # applied by us, on the dequantized weight
        self.bias_function = layer.bias_function
        self.comfy_cast_weights = True


def make_linear(base):
    """A Linear class built on ``base`` (a ``comfy.ops.*.Linear``)."""

    class Linear(base):
        hq_format = None  # class default: plain layer

        # ---- loading -----------------------------------------------------------------------
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
            if not qd.is_quantized_in(state_dict, prefix):
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                     missing_keys, unexpected_keys, error_msgs)
            shape = (self.out_features, self.in_features)
            info, tensors = qd.read_layer(state_dict, prefix, shape)
            self._hq_install(prefix[:-1], info, tensors)
            bias = state_dict.get(prefix + "bias")
            if bias is not None:
                if self.bias is None or tuple(bias.shape) != (self.out_features,):
                    raise FormatError(f"{prefix}bias: unexpected bias of shape {tuple(bias.shape)} for layer "
                                      f"with out_features={self.out_features}")
                self.bias = torch.nn.Parameter(bias.to(self._hq_home(), dtype=self.bias.dtype if self.bias.dtype.is_floating_point else bias.dtype),
                                               requires_grad=False)
            elif self.bias is not None and strict:
                missing_keys.append(prefix + "bias")

        def _hq_home(self):
            w = getattr(self, "weight", None)
            return torch.device("cpu") if w is None or w.device.type == "meta" else w.device

        def _hq_install(self, name, info, tensors):
            # ``dtype`` (bitsandbytes' original dtype) names the dequantize argument: kept in hq_bnb instead.
            fmt, meta = info.format, info.comfy_quant()
            opts = {k: v for k, v in info.options.items() if k != "dtype"}
            self.hq_name = name
            self.hq_source_format = fmt
            self.hq_fp_mm = bool(info.meta.get("full_precision_matrix_mult", False)) if info.source != "bnb" else False
            self.hq_bnb = qd.bnb_state(info) if info.source == "bnb" else None
            self.hq_transforms, self.hq_core_only = dict(info.transforms), False  # rotation / low-rank branch
            # Ada/Hopper: no MX matmul; re-express MX weights as true tensorwise FP8 once, here, for the
            # device ComfyUI computes on. A layer first run on another such device does it then
            # (``_hq_reexpress_lazily``): e.g. loaded under --cpu, moved to a GPU later.
            self.hq_patched, self.hq_mx_pending = False, False
            if not self.hq_fp_mm and dispatch.reexpressible(fmt):
                load_dev = comfy.model_management.get_torch_device()
                if dispatch.kernel_for(fmt, load_dev) == dispatch.KERNEL_FP8_AT_LOAD:
                    fmt, meta, opts, tensors = self._hq_tensorwise(fmt, meta, tensors, load_dev)
                else:
                    self.hq_mx_pending = True
            home = self._hq_home()
            self._hq_store(tensors, home)
            if self.hq_bnb is not None and "nested_offset" in self.hq_bnb:
                # bitsandbytes adds this offset on the GPU: keep it beside the data (a CPU tensor makes
                # its CUDA kernels fault; a new CUDA tensor per call is a host-to-device copy per call).
                self.register_buffer("hq_bnb_offset", torch.tensor(float(self.hq_bnb["nested_offset"]),
                                                                   dtype=torch.float32, device=home), persistent=False)
            self.hq_format, self.hq_opts, self.hq_meta = fmt, opts, meta
            self.hq_comfy_quant = qd.comfy_quant_tensor(meta)
            self.hq_static_input_scale = float(tensors["input_scale"]) if "input_scale" in tensors else None
            self._hq_drop_caches()
            self.hq_lora = None
            self.hq_in_forward = False
            # Model code of current cores calls ``comfy.ops.linear_input_act(layer, x, act)`` for an MLP's
            # down projection. From 0.38 on, its fp16-accumulation branch (fp16 CUDA activations with
            # allow_fp16_accumulation) does not call the layer for a weight that is no core QuantizedTensor:
            # it runs ``cast_bias_weight(layer)`` on the raw ``weight`` -- our stored codes -- and a kitchen
            # GEMM on them. It calls the layer when ``_full_precision_mm`` is set (read from 0.38.0's
            # comfy/ops.py, whose other reads of it are on its own MixedPrecisionOps layers only).
            self._full_precision_mm = True

        def _hq_tensorwise(self, fmt, meta, tensors, device):
            """MX tensors -> (format, meta, opts, tensors) of their tensorwise FP8 re-expression."""
            shape = (self.out_features, self.in_features)
            extra = {s: tensors[s] for s in qd.TRANSFORM_TENSORS if s in tensors}
            w, sc, new_fmt = qd.to_tensorwise(fmt, tensors, shape, self.hq_name)
            meta = {**{k: v for k, v in (meta or {}).items() if k not in ("format", "group_size")}, "format": new_fmt}
            log.debug("HybridQuant: %s: %s re-expressed as tensorwise FP8 for %s", self.hq_name, fmt, device)
            return new_fmt, meta, {}, {"weight": w, "weight_scale": sc, **extra}

        def _hq_store(self, tensors, home):
            """Install ``tensors`` as the layer's weight Parameter and codec buffers on ``home``."""
            for suffix in [s for s in getattr(self, "hq_suffixes", ())]:
                delattr(self, qd.buffer_name(suffix))
            self.weight = torch.nn.Parameter(tensors["weight"].to(home), requires_grad=False)
            self.hq_suffixes = tuple(s for s in tensors if s != "weight")
            for suffix in self.hq_suffixes:
                self.register_buffer(qd.buffer_name(suffix), tensors[suffix].to(home))

        def _hq_reexpress_lazily(self, device):
            """First call on a GPU of an MX layer that was not re-expressed at load: re-express now if
            that GPU runs MX weights as tensorwise FP8. Not once ComfyUI's patcher has rewritten the
            weight (``set_weight``): its backup holds MX codes it restores into ``weight`` on unpatch,
            which a re-expressed layer would misread; such a layer keeps dequantizing (logged)."""
            seen = (device, caps.path_for(device))
            if self.__dict__.get("hq_mx_seen") == seen:
                return  # this device was checked: it has an MX path or dequantizes (CPU, old GPUs)
            self.__dict__["hq_mx_seen"] = seen
            if dispatch.kernel_for(self.hq_format, device) != dispatch.KERNEL_FP8_AT_LOAD:
                return
            self.hq_mx_pending = False
            if self.hq_patched:
                caps.log_demotion(self.hq_name, "fp8 (re-expressed MX)",
                                  RuntimeError("weight patched before its first run on this GPU: dequantizing"))
                return
            fmt, meta, opts, tensors = self._hq_tensorwise(self.hq_format, self.hq_meta, self.hq_tensors(), device)
            self._hq_store(tensors, self.weight.device)
            self.hq_format, self.hq_opts, self.hq_meta = fmt, opts, meta
            self.hq_comfy_quant = qd.comfy_quant_tensor(meta)
            self._hq_drop_caches()

        def _hq_drop_caches(self):
            """Forget what was derived from the stored tensors: the paths per device / call and the
            direct-call tensors (set, not Module.__setattr__: plain caches, not module state)."""
            self.hq_paths = {}
            self.__dict__["hq_direct"] = None

        # ---- state dict / device moves -----------------------------------------------------
        def hq_tensors(self, device=None) -> dict:
            t = {"weight": self.weight}
            for s in self.hq_suffixes:
                t[s] = getattr(self, qd.buffer_name(s))
            if device is not None:
                t = {k: v.to(device, non_blocking=True) for k, v in t.items()}
            return t

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            if self.hq_format is None:
                return super()._save_to_state_dict(destination, prefix, keep_vars)
            for suffix, t in self.hq_tensors().items():
                destination[prefix + suffix] = t if keep_vars else t.detach()
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            if self.hq_comfy_quant is not None:
                destination[prefix + "comfy_quant"] = self.hq_comfy_quant

        def _apply(self, fn, recurse=True):
            if self.hq_format is None:
                return super()._apply(fn, recurse)
            quant = {id(self.weight)} | {id(getattr(self, qd.buffer_name(s))) for s in self.hq_suffixes}
            if getattr(self, "hq_bnb_offset", None) is not None:
                quant.add(id(self.hq_bnb_offset))

            def keep_dtype(t):
                if id(t) not in quant:
                    return fn(t)
                probe = fn(torch.empty(0, device=t.device))  # where/what fn sends tensors to
                return t.to(device=probe.device)

            # tensors moved: what was derived from them is stale, and holding it (e.g. the FP8 GEMM
            # operands, linear_paths._fp8_operands) would keep the old device's copies alive
            self._hq_drop_caches()
            return super()._apply(keep_dtype, recurse)

        # ---- forward -------------------------------------------------------------------------
        def forward(self, *args, **kwargs):
            if self.hq_format is None:
                return super().forward(*args, **kwargs)
            direct.run_every_op()
            x = args[0] if args else kwargs.get("input")
            if self.hq_mx_pending and x is not None:
                self._hq_reexpress_lazily(x.device)
            d = self._hq_direct(x) if x is not None and len(args) + len(kwargs) == 1 else None
            if d is None:
                return self.forward_comfy_cast_weights(*args, **kwargs)
            bias = self.bias
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            lora = self.hq_lora
            return self._hq_compute(x, d[2], bias, () if lora is None else (lora,))

        def _hq_compute(self, x, tensors, bias, fns):
            """The quantized matmul on tensors already on ``x``'s device (rotation / low-rank branch too).
            A 4-bit layer's on-the-fly LoRA that is plain LoRA only runs as a low-rank branch beside the
            layer's own path (ops/lora.py); any other patch list dequantizes and patches the weight."""
            lr = None
            lora = self.hq_lora
            if lora is not None and len(fns) == 1 and fns[0] is lora:
                lr = lora.low_rank(x.device, x.dtype, (self.out_features, self.in_features))
                if lr is not None:
                    fns = ()
            if self.hq_transforms:
                out = hq_tf.run(self, x, tensors, bias, fns, linear_paths.run)
            else:
                out = linear_paths.run(self, x, tensors, bias, fns)
            if lr is None:
                return out
            self.__dict__["hq_last_path"] += "+lora"
            return hq_tf.add_low_rank(out, x, *lr)

        def _hq_direct(self, x):
            """``(device, weight, tensors)`` when this call can skip ``cast_bias_weight`` (ops/direct.py):
            nothing patched by ComfyUI (our own on-the-fly LoRA, ``hq_lora``, is applied by
            ``_hq_compute`` either way), every stored tensor and the bias already on ``x``'s device.
            Cached per layer; ``_apply`` (device moves), loading and ``set_weight`` drop the cache."""
            if self.weight_function or self.bias_function or direct.managed(self):
                return None
            w = self.weight
            c = self.__dict__.get("hq_direct")
            dev = x.device
            if c is not None and c[1] is w and c[0] == dev:
                return c
            tensors = self.hq_tensors()
            b = self.bias
            if any(t.device != dev for t in tensors.values()) or (b is not None and b.device != dev):
                return None
            c = (dev, w, tensors)
            self.__dict__["hq_direct"] = c  # not Module.__setattr__: a plain cache, not state
            return c

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            if self.hq_format is None:
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            # Dynamic VRAM (ComfyUI 0.33 aimdo): a view sharing this layer's vbar state, else the carrier
            # (ops/dynamic_vram.py). The only dynamic-VRAM change in forward.
            carrier = dynamic_vram.cast_target(self) or _Carrier(self)
            weight, bias, token = comfy.ops.cast_bias_weight(carrier, input, dtype=self.weight.dtype,
                                                             bias_dtype=input.dtype, offloadable=True)
            try:
                tensors = {"weight": weight}
                for s in self.hq_suffixes:
                    tensors[s] = getattr(self, qd.buffer_name(s)).to(input.device, non_blocking=True)
                out = self._hq_compute(input, tensors, bias, self._hq_functions())
            finally:
                comfy.ops.uncast_bias_weight(carrier, weight, bias, token)
            return out

        def _hq_functions(self):
            fns = list(self.weight_function)
            low = dynamic_vram.lowvram_patch(self)  # dynamic VRAM's LoRA patch: ours to apply (dynamic_vram.py)
            if low is not None:
                fns.insert(0, low)
            lora = self.hq_lora
            if lora is not None and not any(getattr(f, "key", None) == lora.key for f in fns):
                fns.insert(0, lora)  # ComfyUI's own low-VRAM patch for the same key wins
            return fns

        def hq_dequantize(self, tensors, dtype):
            full = self.hq_transforms and not self.hq_core_only
            w = get_codec(self.hq_format).dequantize(tensors, (self.out_features, self.in_features),
                                                     torch.float32 if full else dtype,
                                                     layer=self.hq_name, **self.hq_opts)
            return hq_tf.decode(self, w, tensors).to(dtype) if full else w

        def hq_requant_roundtrip(self, w):
            """What the layer computes with after a fixed-scale requantization of ``w`` (merged LoRA)."""
            tensors = self.hq_tensors(w.device)
            new = self._hq_requantize(w, tensors)
            return self.hq_dequantize({**tensors, "weight": new}, w.dtype)

        def _hq_requantize(self, w, tensors):
            shape = (self.out_features, self.in_features)
            params = qd.scale_params(self.hq_format, tensors, shape, self.hq_name)
            codec = get_codec(self.hq_format)
            opts = dict(self.hq_opts)
            if self.hq_bnb is not None:
                opts["dtype"] = self.hq_bnb.get("dtype")
            if self.hq_transforms:  # store what decodes to ``w``: (w - branch) · H
                w = qd.transforms_core(w, tensors, self.hq_transforms)
            q = codec.quantize(w.to(torch.float32), params=params, **opts)
            return q["weight"].to(self.weight.dtype)

        # ---- ComfyUI patcher hooks (absent on plain layers, exactly like stock) -----------------
        @property
        def convert_weight(self):
            if self.hq_format is None:
                raise AttributeError("convert_weight")
            return self._hq_convert_weight

        @property
        def set_weight(self):
            if self.hq_format is None:
                raise AttributeError("set_weight")
            return self._hq_set_weight

        def _hq_convert_weight(self, weight, inplace=False, **kwargs):
            if self.hq_in_forward:
                return weight  # 0.3.75's LowVramPatch: our forward already passes the dequantized weight
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
            tensors = self.hq_tensors(weight.device)
            tensors["weight"] = weight.to(self.weight.dtype)  # stored codes cast to float: exact round trip
            return self.hq_dequantize(tensors, dtype)

        def _hq_set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            if return_weight or self.hq_in_forward:
                if dispatch.is_four_bit(self.hq_format):
                    return weight  # on the fly: the packed data is never rewritten
                return self.hq_requant_roundtrip(weight)
            self.hq_patched = True  # the patcher holds a backup of these codes (see _hq_reexpress_lazily)
            if dispatch.is_four_bit(self.hq_format):
                # Only reached when the ModelPatcher is not ours (lora.adopt_patcher): merge with the
                # stored block scales; the patcher's backup of ``weight`` restores the codes on unpatch.
                caps.log_demotion(self.hq_name, "on-the-fly 4-bit LoRA (ModelPatcher not adopted)",
                                  RuntimeError("LoRA merged into the 4-bit codes"))
            new = self._hq_requantize(weight, self.hq_tensors(weight.device)).to(self.weight.device)
            if inplace_update:
                self.weight.data.copy_(new)
            else:
                self.weight = torch.nn.Parameter(new, requires_grad=False)
            self._hq_drop_caches()

    return Linear
