"""The low-rank branch (SVDQuant-style) kept in bf16 beside any quantized weight.

A layer with ``svd_rank = R`` stores ``svd_up`` [M, R] and ``svd_down`` [R, N] (bfloat16) and a quantized
residual; its decoded weight is ``residual_decoded + svd_up @ svd_down`` and it computes
``q_linear(x) + (x @ svd_down.T) @ svd_up.T``. The branch absorbs the few directions with the largest
(weighted) energy, so the quantized residual has a smaller range.

``fit(E, R, gram=None)`` is the best rank-R approximation of ``E`` under the error metric
``||(E - UD) L||_F`` with ``L Lᵀ = gram`` (the inputs' ``XᵀX``: the expected output error; identity:
the plain weight error; a diagonal: per-column weights). Solution: with ``E L = P S Qᵀ`` (SVD),
``U D = P_R S_R Q_Rᵀ L⁻¹``; split ``U = P_R S_R^½``, ``D = S_R^½ Q_Rᵀ L⁻¹`` so both factors have
similar magnitudes in bf16. Large layers use torch's randomized ``svd_lowrank`` (oversampled, 4 power
iterations), small ones the exact SVD.
"""

from __future__ import annotations

import torch

STORE_DTYPE = torch.bfloat16
EXACT_SVD_MAX = 1024  # min(M, N) up to which the exact SVD is used
DAMP = 0.01  # relative diagonal damping of XᵀX before its Cholesky factor (as GPTQ does)


def output_specs(shape: tuple[int, int], rank: int):
    from .formats.base import TensorSpec

    m, n = int(shape[0]), int(shape[1])
    return {"svd_up": TensorSpec(STORE_DTYPE, (m, rank)), "svd_down": TensorSpec(STORE_DTYPE, (rank, n))}


def _metric(gram: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(L, L⁻¹) of the metric, or (None, None) for the plain weight error. ``gram``: [N, N] or [N]."""
    if gram is None:
        return None, None
    g = gram.to(device=device, dtype=torch.float32)
    if g.ndim == 1:
        d = g.clamp_min(0) + 1e-6 * float(g.mean().clamp_min(1e-30))
        return d.sqrt(), d.rsqrt()  # diagonal, kept as vectors
    g = g + DAMP * float(torch.diagonal(g).mean().clamp_min(1e-30)) * torch.eye(n, device=device)
    L = torch.linalg.cholesky(g.double())
    Linv = torch.linalg.solve_triangular(L, torch.eye(n, device=device, dtype=torch.float64), upper=False)
    return L.float(), Linv.float()


def fit(e: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(up [M, R], down [R, N])`` minimising ``||(e - up @ down) L||_F`` (see the module docstring)."""
    e = e.to(torch.float32)
    m, n = e.shape
    rank = min(rank, m, n)
    L, Linv = _metric(gram, n, e.device)
    a = e if L is None else (e * L if L.ndim == 1 else e @ L)
    if min(m, n) <= EXACT_SVD_MAX:
        p, s, qh = torch.linalg.svd(a, full_matrices=False)
        p, s, q = p[:, :rank], s[:rank], qh[:rank].T
    else:
        gen = torch.random.fork_rng(devices=[]) if a.device.type == "cpu" else torch.random.fork_rng()
        with gen:
            torch.manual_seed(0)  # reproducible files
            p, s, q = torch.svd_lowrank(a, q=min(rank + 16, m, n), niter=4)
        p, s, q = p[:, :rank], s[:rank], q[:, :rank]
    r = s.clamp_min(0).sqrt()
    up = p * r
    down = (q * r).T
    if Linv is not None:
        down = down * Linv if Linv.ndim == 1 else down @ Linv
    return up.contiguous(), down.contiguous()


def stored(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as written to the file (bf16, contiguous)."""
    return up.to(STORE_DTYPE).contiguous(), down.to(STORE_DTYPE).contiguous()


def product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` in float32 (the branch's contribution to the decoded weight)."""
    return up.to(torch.float32) @ down.to(torch.float32)


def check_rank(rank, shape: tuple[int, int], where: str) -> int:
    m, n = shape
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: svd_rank must be a positive integer, found {rank!r}")
    if rank > min(m, n):
        raise ValueError(f"{where}: svd_rank {rank} exceeds min(out, in) = {min(m, n)} of a {m}x{n} layer")
    return rank
