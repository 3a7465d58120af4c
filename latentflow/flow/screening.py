"""Exact argmin of affine scores o_j - 2 <x, y_j> over many points, with a bfloat16 first pass.

The hard semidiscrete pairing (`latentflow.flow.semidiscrete`) is one matrix product of the noise rows against
every point, then an argmin. In bfloat16 that product runs at the matrix units' rate (AMX or AVX512-BF16 on
CPUs, tensor cores on GPUs: 3x float32 on this 2-core Xeon; 15x float32 without TF32 on an H100), but it is not
exact. So bfloat16 only screens: per row, the K points of lowest approximate score are rescored in float32, and
a per-row bound on the approximation error certifies that no other point can score lower. Rows it cannot
certify get a wider shortlist, and rows that one cannot certify either (near-ties within the bound) are scored
in full in float32. The answer is therefore that of the float32 argmin (up to ties within float32's rounding of
the scores): the screen changes the speed, not the pairing.
(A cheap score and exact re-ranking of a shortlist is the classic route of maximum-inner-product search; the
bound below makes it exact.)

The bound. Let x~ = bf16(x), y~_j = bf16(y_j), and p_j the product <x~, y~_j> accumulated in float32 (at most
gamma ||x~|| ||y~_j|| off, gamma = D 2^-23 with a factor 2 of margin) and rounded to bfloat16 (at most 2^-7
|p_j| off, measured against the rounded value). Then

    |<x, y_j> - p_j| <= ||x - x~|| ||y_j|| + ||x~|| ||y_j - y~_j|| + gamma ||x~|| ||y~_j|| + 2^-7 |p_j|

and, with maxima over j, the approximate score a_j = o_j - 2 p_j is within delta(x) of the score s_j for every
j (delta adds float32's rounding of a_j). If the best rescored candidate satisfies s_best < a_(K) - delta, where
a_(K) is the K-th lowest approximate score, every point outside the shortlist has s_j >= a_j - delta >= a_(K) -
delta > s_best, and the shortlist holds the argmin. On GPUs that allow reduced-precision reductions inside
bfloat16 products (torch's default), gamma also takes 2^-7 for rounded partial sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CANDIDATES = 8
"""Shortlist per row: on the flowers' latents with the demo's potential (classes of about 600 points of 2,048
dimensions) 8 certified 99.5% of the rows."""

WIDE_CANDIDATES = 64
"""The second shortlist, for the rows the first did not certify (about 5% of random points' rows, 0.5% of
the flowers' latents); rows it cannot certify either are scored in full."""

RESCORE_ELEMENTS = 1 << 20
"""Shortlisted float32 values gathered at once (4 MiB: gathering 64 MiB at once was 5x slower per value)."""

MIN_POINTS = 2048
MIN_DIM = 256
"""Smaller problems are scored in float32 at once. On this 2-core CPU (D = 2,048, 13 to 1,024 rows, three runs)
the screen ran at 0.45x-1.0x float32's speed at 600 points (its fixed steps cost more than the small product
saves), 0.75x-1.5x at 1,200, 0.7x-2.2x at 2,000, 1.2x-2.2x at 2,934 and 1.3x-4.6x at 20,000
(benchmarks/results/cpu2_dataset_ot_screen_s20.txt); the 2D lab has D = 2."""

BF16_ROUNDING = 2.0**-7
FP32_ROUNDING = 2.0**-23


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has native bfloat16 kernels: a CUDA GPU that supports bf16, or a CPU where oneDNN has
    them (AVX512-BF16 or AMX). Elsewhere torch emulates bf16, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class Screen:
    """Points (N, D) in bfloat16 beside the norms that bound the screen's error; build with `Screen.of`.

    Attributes:
        low: (N, D) bfloat16 copy of the points.
        point_norm: max_j ||y_j|| (float32 points).
        residual_norm: max_j ||y_j - bf16(y_j)||.
        low_norm: max_j ||bf16(y_j)||.
        reduced_reduction: bfloat16 products may round partial sums (CUDA's default), widening the bound.
    """

    low: torch.Tensor
    point_norm: float
    residual_norm: float
    low_norm: float
    reduced_reduction: bool

    @classmethod
    def of(cls, points: torch.Tensor) -> "Screen":
        """The screen of float32 points (N, D)."""
        low = points.to(torch.bfloat16)
        reduced = points.device.type == "cuda" and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        return cls(low, float(points.norm(dim=1).max()), float((points - low.float()).norm(dim=1).max()),
                   float(low.float().norm(dim=1).max()), reduced)

    @staticmethod
    def pays(points: torch.Tensor) -> bool:
        """Whether screening `points` (N, D) is worth it: at least MIN_POINTS points of MIN_DIM dimensions, on a
        device with native bf16 kernels."""
        return points.shape[0] >= MIN_POINTS and points.shape[1] >= MIN_DIM and native_bf16(points.device)

    def argmin(self, points: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> "ScreenedMin":
        """min_j and argmin_j of o_j - 2 <x, y_j> per row of x (b, D), as float32 scores give them.

        Args:
            points: (N, D) float32, the points this screen was built from.
            offsets: (N,) float32 o_j.
            x: (b, D) float32 rows.
        """
        low_x = x.to(torch.bfloat16)
        product = low_x @ self.low.T  # (b, N) <x~, y~_j>, rounded to bf16
        approx = torch.add(offsets, product, alpha=-2.0)  # (b, N) float32
        bound = self._bound(x, low_x, product, offsets)  # (b,)
        shortlist = approx.topk(min(CANDIDATES, points.shape[0]), dim=1, largest=False)  # values, indices (b, K)
        best, index = self._rescore(points, offsets, x, shortlist.indices)
        certified = best < shortlist.values[:, -1] - bound
        if bool(certified.all()):
            return ScreenedMin(best, index, certified)
        rows = torch.nonzero(~certified).flatten()  # a wider shortlist for the rows not yet certified
        wide = approx[rows].topk(min(WIDE_CANDIDATES, points.shape[0]), dim=1, largest=False)
        best[rows], index[rows] = self._rescore(points, offsets, x[rows], wide.indices)
        unresolved = rows[best[rows] >= wide.values[:, -1] - bound[rows]]
        if unresolved.numel():  # near-ties beyond the wide shortlist: every score in float32
            scores = torch.addmm(offsets.unsqueeze(0), x[unresolved], points.T, alpha=-2.0)  # (r, N)
            best[unresolved], index[unresolved] = scores.min(dim=1)
        return ScreenedMin(best, index, certified)

    @staticmethod
    def _rescore(points: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor, shortlist: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(best float32 score, its point), each (b,), among each row's shortlisted points (b, K); in row blocks
        whose gathered points stay within RESCORE_ELEMENTS (cache-sized: a large block is slower to gather)."""
        rows, count = shortlist.shape
        best = torch.empty(rows, dtype=x.dtype, device=x.device)
        index = torch.empty(rows, dtype=torch.long, device=x.device)
        block = max(1, RESCORE_ELEMENTS // (count * x.shape[1]))
        for start in range(0, rows, block):
            part = slice(start, start + block)
            chosen = shortlist[part]  # (r, K)
            candidates = points.index_select(0, chosen.flatten()).view(*chosen.shape, -1)  # (r, K, D)
            exact = offsets[chosen] - 2.0 * torch.bmm(candidates, x[part].unsqueeze(2)).squeeze(2)  # (r, K)
            best[part], position = exact.min(dim=1)
            index[part] = chosen.gather(1, position.unsqueeze(1)).squeeze(1)
        return best, index

    def _bound(self, x: torch.Tensor, low_x: torch.Tensor, product: torch.Tensor, offsets: torch.Tensor
               ) -> torch.Tensor:
        """(b,) delta(x): every approximate score of row x is within it of the float32 score (module docstring)."""
        low_x = low_x.float()
        gamma = x.shape[1] * 2 * FP32_ROUNDING + (BF16_ROUNDING if self.reduced_reduction else 0.0)
        low_size = low_x.norm(dim=1)  # (b,)
        largest = product.abs().amax(dim=1).float()  # (b,)
        inner = ((x - low_x).norm(dim=1) * self.point_norm + low_size * self.residual_norm
                 + gamma * low_size * self.low_norm + BF16_ROUNDING * largest)
        rounding = 2 * FP32_ROUNDING * (float(offsets.abs().max()) + 2.0 * largest)
        return 2.0 * inner + rounding


@dataclass
class ScreenedMin:
    """Per row: the minimal score (b,), its point (b,) and whether the first shortlist certified it (b,) bool (the
    others went through the wide shortlist, and where that did not certify them either, float32 in full)."""

    values: torch.Tensor
    indices: torch.Tensor
    certified: torch.Tensor
