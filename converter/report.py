"""The result of a conversion: per-layer decisions and errors, totals, and their text/JSON forms.

``ConversionReport.to_dict()`` is what ``--report FILE.json`` writes; ``summary()`` is what the CLI
prints at the end. Relative error of a layer = ||W - dequant(quant(W))||_F / ||W||_F in float32 over
the whole weight (0 for an all-zero weight).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from .plan import UNSTORABLE


@dataclass
class LayerRecord:
    name: str  # input tensor name
    shape: list[int]
    dtype: str
    format: str | None  # None: copied unchanged
    reason: str
    method: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    rel_error: float | None = None
    error_fraction: float | None = None  # fraction of the weights rel_error was measured on (1 = all)
    transforms: dict | None = None  # {"svd_rank": R, "rotation": {...}} when the layer uses them


@dataclass
class ConversionReport:
    input: str | None = None
    output: str | None = None
    dry_run: bool = False
    device: str = "cpu"
    seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    layers: list[LayerRecord] = field(default_factory=list)
    advice: str | None = None  # --dry-run --advise: per-layer format advice (rounding.advice), as text

    def formats(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.layers:
            if rec.format is not None:
                counts[rec.format] = counts.get(rec.format, 0) + 1
        return dict(sorted(counts.items()))

    def copied(self) -> int:
        return sum(1 for r in self.layers if r.format is None)

    def error_stats(self) -> dict[str, dict[str, float]]:
        """Per format: count, mean, median, max relative error (and the worst layer)."""
        by: dict[str, list[LayerRecord]] = {}
        for r in self.layers:
            if r.format is not None and r.rel_error is not None:
                by.setdefault(r.format, []).append(r)
        out = {}
        for fmt, recs in sorted(by.items()):
            errs = sorted(r.rel_error for r in recs)
            worst = max(recs, key=lambda r: r.rel_error)
            out[fmt] = {"layers": len(errs), "mean": sum(errs) / len(errs), "median": errs[len(errs) // 2],
                        "max": errs[-1], "worst_layer": worst.name}
        return out

    def to_dict(self) -> dict:
        return {
            "input": self.input, "output": self.output, "dry_run": self.dry_run, "device": self.device,
            "seconds": round(self.seconds, 3), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "formats": self.formats(), "copied_tensors": self.copied(), "error_stats": self.error_stats(),
            "layers": [asdict(r) for r in self.layers], "advice": self.advice,
        }

    def write_json(self, path) -> None:
        # atomic like the checkpoint itself: a half-written report is worse than none
        tmp = f"{os.fspath(path)}.partial-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    def plan_table(self) -> str:
        """The per-layer plan of --dry-run: layer, shape, format, reason, sizes."""
        rows = [("tensor", "shape", "dtype", "format", "bytes in -> out", "reason")]
        for r in self.layers:
            rows.append((r.name, "x".join(map(str, r.shape)) or "scalar", r.dtype, r.format or "(copy)",
                         f"{fmt_bytes(r.bytes_in)} -> {fmt_bytes(r.bytes_out)}", r.reason))
        widths = [min(max(len(row[i]) for row in rows), 60) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
        return "\n".join(lines)

    def summary(self) -> str:
        lines = []
        what = "plan (dry run, nothing written)" if self.dry_run else f"wrote {self.output}"
        lines.append(f"{what}")
        fm = self.formats()
        lines.append("layers per format: " + (", ".join(f"{k}: {v}" for k, v in fm.items()) or "none quantized")
                     + f"; copied unchanged: {self.copied()} tensors")
        unstorable = [r for r in self.layers if r.format is None and r.reason.startswith(UNSTORABLE)]
        if unstorable:  # e.g. ConvRot on a layer narrower than its rotation group: the run goes on without it
            lines.append(f"kept in high precision, shape the format cannot store: {len(unstorable)} layer(s): "
                         + "; ".join(f"{r.name} ({_why(r.reason)})" for r in unstorable[:5])
                         + (f"; and {len(unstorable) - 5} more" if len(unstorable) > 5 else ""))
        ratio = self.bytes_out / self.bytes_in if self.bytes_in else 0.0
        lines.append(f"size: {fmt_bytes(self.bytes_in)} -> {fmt_bytes(self.bytes_out)} ({ratio:.1%})")
        if not self.dry_run:
            lines.append(f"time: {self.seconds:.2f} s on {self.device}"
                         + (f" ({self.bytes_in / self.seconds / 1e6:.0f} MB/s in)" if self.seconds > 0 else ""))
        for fmt, st in self.error_stats().items():
            lines.append(f"relative error {fmt}: mean {st['mean']:.4f}, median {st['median']:.4f}, "
                         f"max {st['max']:.4f} ({st['worst_layer']}) over {st['layers']} layers")
        sampled = [r for r in self.layers if r.error_fraction is not None and r.error_fraction < 1]
        if sampled:
            lo = min(r.error_fraction for r in sampled)
            lines.append(f"  (errors of {len(sampled)} large layers measured on evenly spaced rows covering >= {lo:.0%} "
                         "of their weights; --error-sample 1 measures all)")
        if any(r.format is not None and r.method == "gptq" for r in self.layers):
            lines.append("  (gptq layers: this is the WEIGHT error, which error-compensated rounding may raise while it "
                         "lowers the error of the layer's output on the calibration data)")
        if self.advice:
            lines.append(self.advice)
        elif self.dry_run:
            lines.append("(add --advise for per-layer format advice: where another layout cuts the error most for its bytes)")
        return "\n".join(lines)


def _why(reason: str) -> str:
    return reason[len(UNSTORABLE):].strip().removesuffix(": kept in high precision")


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


class TextProgress:
    """A plain-text progress bar with ETA on stderr (byte-weighted). Redraws at most 10x/s; when
    stderr is not a terminal it prints a line every 10 % instead of carriage-return redraws."""

    def __init__(self, total_bytes: int, stream=None, label: str = "converting"):
        self.total = max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.label = label
        self.start = time.monotonic()
        self.last = 0.0
        self.last_decile = -1
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done_bytes: int, total_bytes: int | None = None, current: str = "") -> None:
        if total_bytes:
            self.total = max(total_bytes, 1)
        now = time.monotonic()
        frac = min(done_bytes / self.total, 1.0)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else math.inf
        eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        if self.tty:
            if now - self.last < 0.1 and frac < 1.0:
                return
            self.last = now
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {elapsed:5.0f}s ETA {eta_s} {current[-40:]:<40}")
            if frac >= 1.0:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile == self.last_decile:
                return
            self.last_decile = decile
            self.stream.write(f"{self.label}: {frac:6.1%} elapsed {elapsed:.1f}s ETA {eta_s.strip()}\n")
        self.stream.flush()
