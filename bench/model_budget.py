"""``--budget-s``: keep the whole run under a wall-clock limit by estimating each piece of work before
starting it and skipping (and listing) what would not fit.

Estimates: a row's round from one forward's time (model_timing.row_round_cost), then from its measured
round; conversion / load from the slowest seconds-per-GB measured so far in this run (before the first
measurement: the guesses below); compile from the slowest compile measured (guess before). A row that is
accepted has its later rounds reserved, so rows taken early are never starved by rows taken later.
"""

from __future__ import annotations

import time

# Guesses used only until this run has measured the thing (seconds per GB of file, seconds). CUDA
# conversion: 0.4-0.7 s per GB of bf16 input on the H200 (bench/RESULTS_H200_c009feb.json, convert_s: 2.7-4.6 s
# for the 6.36 GB Flux file); the guess keeps a 1.5x margin (it was 8, which made --budget-s skip rows
# that fitted).
GUESS_CONVERT_S_PER_GB = {"cuda": 1.0, "cpu": 60.0}
GUESS_LOAD_S_PER_GB = {"cuda": 2.0, "cpu": 10.0}
GUESS_COMPILE_S = {"cuda": 90.0, "cpu": 30.0}


class Budget:
    def __init__(self, limit_s: float | None, t0: float | None = None, device_type: str = "cuda",
                 reserve_s: float | None = None):
        self.limit = limit_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.dev = "cuda" if device_type == "cuda" else "cpu"
        # Unload, report writing, model activation between rounds: not estimated per row.
        self.reserve = (10.0 + 0.02 * limit_s if limit_s else 0.0) if reserve_s is None else reserve_s
        self.committed = 0.0
        self.convert_rate = None
        self.load_rate = None
        self.compile_s = None
        self.skipped: list[dict] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Seconds not yet spent nor reserved for accepted rows."""
        if self.limit is None:
            return float("inf")
        return self.limit - self.elapsed() - self.committed - self.reserve

    def fits(self, est_s: float) -> bool:
        return self.limit is None or est_s <= self.left()

    def commit(self, s: float):
        self.committed += max(0.0, s)

    def release(self, s: float):
        self.committed = max(0.0, self.committed - max(0.0, s))

    # ---- measured rates -------------------------------------------------------------------------
    def saw_convert(self, seconds: float, src_gb: float):
        if src_gb > 0:
            self.convert_rate = max(self.convert_rate or 0.0, seconds / src_gb)

    def saw_load(self, seconds: float, file_gb: float):
        if file_gb > 0:
            self.load_rate = max(self.load_rate or 0.0, seconds / file_gb)

    def saw_compile(self, seconds: float):
        self.compile_s = max(self.compile_s or 0.0, seconds)

    def setup_estimate(self, src_gb: float, file_gb: float | None, convert: bool, compile_: bool) -> float:
        est = 0.0
        if convert:
            est += src_gb * (self.convert_rate or GUESS_CONVERT_S_PER_GB[self.dev])
        est += (file_gb if file_gb is not None else src_gb) * (self.load_rate or GUESS_LOAD_S_PER_GB[self.dev])
        if compile_:
            est += self.compile_s or GUESS_COMPILE_S[self.dev]
        return est

    def skip(self, what: str, est_s: float, **row) -> None:
        entry = {**row, "what": what, "estimate_s": round(est_s, 1), "left_s": round(self.left(), 1),
                 "reason": f"needs ~{est_s:.1f} s, {max(0.0, self.left()):.1f} s of --budget-s left"}
        self.skipped.append(entry)
        print(f"[bench_model] skipped {what} {row}: {entry['reason']}", flush=True)
