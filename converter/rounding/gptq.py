"""GPTQ-style error-compensated rounding for every format, through the codec decomposition.

Objective: for a linear layer ``y = x W^T`` with calibration inputs ``x`` (rows of ``X``), minimise
the output error ``||X (W - Q)^T||^2 = sum_i e_i H e_i^T`` with ``H = X^T X / n`` (the input second
moment, stored by ``calibration.py``) and ``e_i`` row ``i`` of ``W - Q``, subject to every ``Q[i, j]``
being ``S[i, j] * g`` with ``g`` on the format's grid.

Method (Frantar et al., "GPTQ", 2022; the optimal-brain-surgeon update applied column by column):
the scales ``S`` are fixed up front ("static groups": computed from the original weight, optionally
after the clipping search of ``scale_search.py``), so every column's grid is known before rounding
starts and the result is storable in the format exactly. Columns are rounded one after the other;
the rounding error of column ``j`` is spread over the not-yet-rounded columns ``k > j`` by the
closed-form least-squares update ``W[:, k] -= (w_j - q_j) / U[j, j] * U[j, k]`` where ``U`` is the
upper Cholesky factor of ``H^{-1}`` (equivalently: the update minimising the objective for the
remaining columns given the rounded ones). Updates are applied lazily in blocks of ``block_size``
columns (same arithmetic, fewer large matmuls).

Practicalities:
- dampening ``H += damp * mean(diag H) * I`` keeps ``H`` positive definite (few samples, correlated
  channels); on a failed Cholesky the dampening is raised tenfold and retried;
- inputs that never fired (``H[j, j] == 0``) get ``H[j, j] = 1``: their weights do not matter for the
  calibration set, they are rounded to nearest and receive no updates from other columns' errors
  beyond what the (then diagonal) row of ``U`` allows;
- ``act_order``: columns are processed in order of decreasing ``H[j, j]`` (largest inputs first, whose
  error is hardest to compensate), then restored; valid with static scales because every element
  keeps its own precomputed scale;
- runs where the weight is (the converter's ``--device``: ``cuda`` runs GPTQ on the GPU), or on
  ``device`` when given, in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from ..formats.base import Codec


def output_error(w32: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``sum_i e_i H e_i^T`` for ``E = W - Q`` (the expected squared output error times n)."""
    e = (w32 - q).to(h.dtype)
    return float(((e @ h) * e).sum())


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*mean(diag)*I)^{-1}``, raising ``damp`` until it exists."""
    n = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    for attempt in range(6):
        hd = h + (damp * (10 ** attempt)) * mean_diag * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return u
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with strong dampening")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of tiny sequential ops: with intra-op threads each one pays a
    thread-pool barrier, which costs 10x on an oversubscribed CPU (measured: 16 s vs 1.7 s for a
    384x1536 layer on 2 busy cores). GPTQ runs on one CPU thread; the caller's setting is restored.
    (The converter may run several layers in parallel threads itself.)"""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_round(codec: Codec, w: torch.Tensor, h: torch.Tensor, params: Mapping[str, torch.Tensor], *,
               damp: float = 0.01, block_size: int = 128, act_order: bool = True,
               device: torch.device | str | None = None, **opts) -> torch.Tensor:
    """Return ``Q`` (float32 ``[M, N]`` on ``w``'s device): ``w`` rounded onto the grid given by
    ``params`` with GPTQ error feedback under the input second moment ``h`` (``[N, N]``)."""
    m, n = w.shape
    if tuple(h.shape) != (n, n):
        raise ValueError(f"GPTQ: Hessian has shape {tuple(h.shape)}, expected {(n, n)} for weight {(m, n)}")
    dev = torch.device(device) if device is not None else w.device
    with _one_cpu_thread(dev):
        return _gptq(codec, w, h, params, damp, block_size, act_order, dev, opts)


def _gptq(codec, w, h, params, damp, block_size, act_order, dev, opts):
    m, n = w.shape
    W = w.detach().to(device=dev, dtype=torch.float32).clone()
    S = codec.element_scale(params, (m, n), **opts).to(device=dev, dtype=torch.float32)
    H = h.to(device=dev, dtype=torch.float32).clone()

    dead = torch.diagonal(H) <= 0
    if bool(dead.any()):
        H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, S, H = W[:, perm], S[:, perm], H[perm][:, perm]
    U = _inverse_cholesky_upper(H, damp)
    del H

    # Work on transposed copies so that a "column" of W is a contiguous row (cheaper small ops in
    # the sequential loop). Elements of all-zero blocks (S == 0) round to 0 with any finite x.
    Wt = W.t().contiguous()
    St = S.t().contiguous()
    inv = 1.0 / torch.where(St > 0, St, torch.ones_like(St))
    del W, S
    Qt = torch.zeros_like(Wt)
    _column_loop(codec, Wt, St, inv, U, Qt, block_size, opts)
    Q = Qt.t()
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.contiguous().to(w.device)


def _column_loop(codec, Wt, St, inv, U, Qt, block_size, opts):
    n = Wt.shape[0]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[i]
            q = codec.round_to_grid(col * inv[i1 + i], **opts).mul_(St[i1 + i])
            Qt[i1 + i] = q
            err = (col - q).div_(U1[i, i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            E1[i] = err
        if i2 < n:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
