"""What a format IS, declared once: the traits every other part of the pack reads.

Each codec class carries one ``FormatSpec`` as its ``spec`` attribute, next to the code that
implements the layout. The registry (``registry.py``) lists the codecs; every table elsewhere (the
converter's modes and padding rules, the loaders' logical-shape recovery, the ops' kernel choice, the
nodes' option lists, the web panel's labels and colours, file info) is derived from these specs, so
adding a format is one module plus one registry line (ARCHITECTURE.md, "Adding a format").

Vocabulary
----------
- ``family``: the CLI primary mode the format belongs to (``--fp8``, ``--int8``, ``--mxfp8``,
  ``--nvfp4``, ``--bnb-4bit`` ... spelled without dashes). A family may hold several formats; a
  ``Variant`` says which choice of the user selects which format with which options.
- ``storage``: how the stored ``weight`` relates to the logical ``[M, N]`` shape:
  ``"exact"`` (stored at the logical shape: the stored shape IS the logical shape),
  ``"padded"`` (rows/columns padded to block multiples, possibly packed: the converter records
  ``orig_shape``, readers never guess it), ``"flat"`` (packed over the flattened tensor; the logical
  shape lives in the format's own serialization, e.g. the bitsandbytes quant state).
- ``kernels``: device path (``ops.capabilities``: ``"mx_blockscaled"``, ``"fp8_tensorwise"``,
  ``"int8_tensorcore"``, ``"fp8_rowwise"``, ``"triton_cuda"`` for the 4-bit Triton kernels, ``"cuda"`` for any CUDA GPU) -> the id of the fast kernel the ops run for
  this format there. A device path not listed means "dequantize per call". Ids are the ops' business
  (``ops/linear_paths.py``); a format only names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    """One user-facing choice that selects this format.

    ``key`` is the selector inside the family (the ``--scaling_mode`` value ``tensor``/``row``/
    ``block`` for FP8/INT8, the ``--bnb-quant-type`` for bitsandbytes, ``""`` when the family has a
    single format). ``opts`` are the codec options the choice sets; ``group_size`` in them is the
    default block size, replaced by ``--block_size`` when given.
    """

    key: str
    label: str
    opts: Mapping = field(default_factory=dict)
    note: str = ""  # what distinguishes this choice, for tooltips


@dataclass(frozen=True)
class FormatSpec:
    name: str  # the "format" written in .comfy_quant / the header (bitsandbytes layers: bnb_nf4/bnb_fp4)
    label: str  # short display name
    family: str  # CLI primary mode
    color: str  # web panel colour (#rrggbb)
    summary: str  # plain language: what it is, quality, who runs it fast
    variants: tuple[Variant, ...] = ()
    storage: str = "exact"  # "exact" | "padded" | "flat"
    four_bit: bool = False  # packed 4-bit codes: patched on the fly by LoRA, never requantized
    scale_out: bool = False  # dequant(w) = codes * (scalar or per-row scale): the scale factors out of a GEMM
    writes_comfy_quant: bool = True  # False: the layout carries its own serialization (bitsandbytes)
    custom: bool = True  # usable as --custom-type (8-bit layers inside a 4-bit file)
    clipping: bool = False  # uniform grid: the data-free clipping search pays (converter.rounding)
    input_scale: bool = False  # may store a static e4m3 activation scale (``.input_scale``, --input_scale)
    kernels: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # words users search for
    # The word this format puts into the pack's searchable node names, for frontends whose node search
    # reads names only (ComfyUI frontend 1.32): None = its family when the label starts with it
    # ("FP8" of family fp8, "INT6" of int6: the word of its CLI flag and node option), "" = none.
    name_word: str | None = None
    advice: tuple[tuple[str, Mapping], ...] = ()  # (format, opts) worth trying when this one's error is high
    bits_shape: tuple[int, int] = (3072, 3072)  # the shape its bits-per-weight figure is quoted for
    # codec option sets a size budget (converter.budget, --target-size) may pick for a layer; empty: the
    # format is not a budget step (e.g. FP8 tensorwise: INT8 per-row has ~4x less error at the same size)
    budget_steps: tuple[Mapping, ...] = ()

    def search_name_word(self) -> str:
        """``name_word`` or its default (see the field): "" for labels that do not start with the family
        ("Hybrid MXFP8", "W4A8 INT8": their family words come from the other formats or are bit notation,
        which a name-only fuzzy search ranks poorly and which pushes the other words back)."""
        if self.name_word is not None:
            return self.name_word
        first = self.label.split(" ")[0].lower()
        return first if first == self.family else ""

    def variant(self, key: str) -> Variant | None:
        for v in self.variants:
            if v.key == key:
                return v
        return None
