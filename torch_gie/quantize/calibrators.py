"""Observers and calibrators: an ``Observer`` summarizes one activation over the calibration batches
(min, max, a histogram of |x|), and a calibrator turns that summary into the range, hence the
``QParams``, the int8 kernels use for the tensor (``arith.qparams_for_range``).

The histogram has ``NUM_BINS`` bins over [0, R), R the smallest power of two > the largest |x|
seen so far. When a batch exceeds R, R doubles as often as needed and every 2**k old bins merge
into one new bin; the edges stay on one dyadic grid, so the final histogram is exactly the same
whatever the batch order or chunking (the price: the data spans between half and all of the
bins). Exact zeros (ReLU's) are counted apart too: they quantize exactly under both code schemes,
so the entropy and MSE calibrators leave them out of the error they minimize.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from torch_gie.quantize.arith import QParams, qparams_for_range

NUM_BINS = 2048
SYMMETRIC_LEVELS = 128  # entropy: levels of |x| for a signed tensor (127 codes + zero)
UNSIGNED_LEVELS = 256  # ... and for a non-negative one (all 256 codes)
SMOOTHING_EPS = 1e-4  # entropy: mass (in counts) given to an empty Q bin where P is not empty
_ENTROPY_BLOCK = 16384  # entropy: elements per [candidates, levels] block (cache-sized, one thread)


class TensorRange(NamedTuple):
    """A calibrated activation range, what the calibration cache stores and QParams derive from."""

    lo: float
    hi: float
    non_negative: bool

    def qparams(self) -> QParams:
        return qparams_for_range(self.lo, self.hi, non_negative=self.non_negative)


def _dyadic_above(v: float) -> float:
    """The smallest power of two > v (v > 0). Strictly above, so that no value sits on the top
    edge: there it would be clamped into the last bin, which a later merge would get wrong."""
    return math.ldexp(1.0, math.frexp(v)[1])


class Observer:
    """Running statistics of one tensor over many batches: min, max, counts of negative and zero
    values, and a ``num_bins``-bin histogram of |x| over [0, ``hist_max``] (see the module
    docstring for how the range grows). The histogram stays on the batches' device."""

    def __init__(self, num_bins: int = NUM_BINS, name: str = "") -> None:
        if num_bins < 2:
            raise ValueError(f"an Observer needs at least 2 bins, got {num_bins}")
        self.num_bins = num_bins
        self.name = name
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.num_negative = 0
        self.num_zero = 0
        self.batches = 0
        self.hist_max = 0.0  # 0 while every value seen is 0 (all counts then sit in bin 0)
        self.hist: torch.Tensor | None = None  # int64 [num_bins]

    @property
    def non_negative(self) -> bool:
        return self.min >= 0

    @property
    def amax(self) -> float:
        return max(-self.min, self.max, 0.0)

    @property
    def bin_width(self) -> float:
        return self.hist_max / self.num_bins

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of the tensor (any shape, a floating dtype) to the statistics."""
        x = x.detach()
        if not x.is_floating_point():
            raise TypeError(f"Observer {self.name!r}: expected a floating tensor, got {x.dtype}")
        if x.numel() == 0:
            return
        x = x.to(torch.float32)
        lo, hi = torch.aminmax(x)
        stats = torch.stack([lo.double(), hi.double(), (x < 0).sum().double(), (x == 0).sum().double()])
        lo, hi, negative, zero = stats.tolist()  # one device sync per batch
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"Observer {self.name!r}: batch {self.batches} holds NaN or Inf "
                             f"(min {lo}, max {hi}); int8 ranges need finite activations")
        if self.hist is None:
            self.hist = torch.zeros(self.num_bins, dtype=torch.int64, device=x.device)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.numel()
        self.num_negative += int(negative)
        self.num_zero += int(zero)
        self.batches += 1
        amax = max(-lo, hi)
        if amax > self.hist_max:
            self._grow(_dyadic_above(amax))
        if self.hist_max == 0.0:
            self.hist[0] += x.numel()
            return
        # num_bins / hist_max is num_bins times a power of two: the products, hence the bin indices,
        # are exact; the clamp only guards a num_bins that is not a power of two.
        index = (x.abs() * (self.num_bins / self.hist_max)).to(torch.int64).clamp_(max=self.num_bins - 1)
        self.hist += torch.bincount(index.flatten(), minlength=self.num_bins).to(self.hist.device)

    def _grow(self, new_max: float) -> None:
        """Widen the range to ``new_max`` (the old one times 2**k), merging every 2**k old bins."""
        if self.hist_max > 0.0:
            factor = round(new_max / self.hist_max)
            groups = -(-self.num_bins // factor)
            padded = torch.zeros(groups * factor, dtype=torch.int64, device=self.hist.device)
            padded[: self.num_bins] = self.hist
            self.hist = torch.zeros_like(self.hist)
            self.hist[:groups] = padded.view(groups, factor).sum(dim=1)
        self.hist_max = new_max

    def histogram(self) -> tuple[torch.Tensor, float]:
        """(counts as float64 on the CPU, bin width); raises when nothing was observed."""
        if self.hist is None:
            raise ValueError(f"Observer {self.name!r} has seen no data: run calibration batches first")
        return self.hist.to("cpu", torch.float64), self.bin_width

    def data_bins(self) -> int:
        """How many leading bins the observed |x| occupies (the rest are empty): bin k holds
        [k w, (k+1) w), so amax lands in bin floor(amax / w)."""
        if self.hist_max == 0.0:
            return 1
        return min(self.num_bins, math.floor(self.amax / self.bin_width) + 1)


def clipped_range(obs: Observer, threshold: float) -> TensorRange:
    """The range that clips |x| at ``threshold`` (never beyond the observed amax): [0, t] with
    unsigned codes for a never-negative tensor, [-t, t] otherwise."""
    t = min(float(threshold), obs.amax)
    return TensorRange(0.0, t, True) if obs.non_negative else TensorRange(-t, t, False)


class Calibrator(ABC):
    """Picks a tensor's range from its Observer."""

    name: str = ""

    @abstractmethod
    def compute_range(self, obs: Observer) -> TensorRange:
        ...

    def compute(self, obs: Observer) -> QParams:
        return self.compute_range(obs).qparams()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MinMax(Calibrator):
    """The observed [min, max]: nothing clipped, so one outlier stretches the scale."""

    name = "minmax"

    def compute_range(self, obs: Observer) -> TensorRange:
        obs.histogram()  # raises when nothing was observed
        return TensorRange(obs.min, obs.max, obs.non_negative)


class Percentile(Calibrator):
    """Clips |x| at its p-th percentile over all values, zeros included (linear inside the
    histogram bin that holds it)."""

    name = "percentile"

    def __init__(self, p: float = 99.99) -> None:
        if not 0.0 < p <= 100.0:
            raise ValueError(f"Percentile p must be in (0, 100], got {p}")
        self.p = p

    def __repr__(self) -> str:
        return f"Percentile(p={self.p})"

    def compute_range(self, obs: Observer) -> TensorRange:
        hist, width = obs.histogram()
        cdf = torch.cumsum(hist, 0)
        target = cdf[-1].item() * self.p / 100.0
        k = min(int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).item()), len(hist) - 1)
        below = cdf[k - 1].item() if k > 0 else 0.0
        inside = (target - below) / hist[k].item() if hist[k] > 0 else 1.0
        return clipped_range(obs, (k + min(max(inside, 0.0), 1.0)) * width)


def entropy_divergences(hist: torch.Tensor, levels: int, candidates: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) for each candidate threshold (a bin count i), as TensorRT's entropy calibrator:
    P = hist[:i] with the counts beyond folded into bin i-1; Q = hist[:i] merged into ``levels``
    levels (bin k goes to level floor(k * levels / i)), each level's sum spread evenly over the
    bins where P is non-empty; an empty Q bin under a non-empty P bin gets ``SMOOTHING_EPS``
    (``hist`` holds counts: integers, so no level sum lies strictly between 0 and the eps).

    Q is constant over a level's non-empty bins, so with T = sum P = hist.sum() and Z = sum Q,
        KL = (sum_k P_k log P_k - sum_levels P(level) log Q(level)) / T - log T + log Z,
    which prefix sums give in O(levels) per candidate rather than O(i)."""
    hist = hist.to(torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    prefix = torch.cat([zero, torch.cumsum(hist, 0)])
    prefix_nz = torch.cat([zero, torch.cumsum((hist > 0).to(torch.float64), 0)])
    prefix_plogp = torch.cat([zero, torch.cumsum(torch.special.xlogy(hist, hist), 0)])
    total = prefix[-1]
    i = candidates.to(torch.int64)
    outliers = total - prefix[i]
    last_p = hist[i - 1] + outliers  # P's last bin, outliers folded in
    # The last bin is non-empty in P when outliers fold into it, even where hist[i-1] is 0.
    extra = ((hist[i - 1] == 0) & (outliers > 0)).to(torch.float64)
    plogp = prefix_plogp[i - 1] + torch.special.xlogy(last_p, last_p)
    plogq = torch.empty_like(plogp)
    last_level_empty = torch.empty_like(plogp)
    j = torch.arange(levels + 1, dtype=torch.float64)
    rows = max(1, _ENTROPY_BLOCK // levels)
    for start in range(0, len(i), rows):
        block = slice(start, start + rows)
        # Level j holds bins [ceil(j i / L), ceil((j+1) i / L)): L + 1 edges, exact in float64
        # (integers below 2**53; a quotient that is not an integer is >= 1/L away from one).
        edges = torch.ceil(i[block, None].to(torch.float64) * j / levels).to(torch.int64)
        level_sum = torch.diff(prefix[edges], dim=1)  # Q's mass per level (outliers excluded, as TensorRT)
        count = torch.diff(prefix_nz[edges], dim=1)
        count[:, -1] += extra[block]
        last_level_empty[block] = (level_sum[:, -1] == 0).to(torch.float64)
        p_level = level_sum.clone()
        p_level[:, -1] += outliers[block]
        log_q = torch.log(level_sum.clamp_(min=SMOOTHING_EPS)) - torch.log(count.clamp_(min=1.0))
        plogq[block] = (p_level * log_q).sum(dim=1)
    q_total = prefix[i] + SMOOTHING_EPS * extra * last_level_empty  # the one place Q gets an eps
    return (plogp - plogq) / total - torch.log(total) + torch.log(q_total)


class Entropy(Calibrator):
    """TensorRT's entropy calibrator: the threshold (a bin edge, from ``levels`` bins up to the
    data's extent) whose clipped-and-quantized histogram loses the least information, KL(P||Q).
    128 levels for a signed tensor, 256 for a non-negative one. Exact zeros are left out."""

    name = "entropy"

    def compute_range(self, obs: Observer) -> TensorRange:
        hist, width = obs.histogram()
        hist[0] -= obs.num_zero
        levels = UNSIGNED_LEVELS if obs.non_negative else SYMMETRIC_LEVELS
        n = obs.data_bins()
        if n <= levels or hist.sum() == 0:
            return clipped_range(obs, obs.amax)  # no more bins than levels: nothing to gain by clipping
        candidates = torch.arange(levels, n + 1)
        divergence = entropy_divergences(hist[:n], levels, candidates)
        # The last minimizer: on a tie, clip less.
        best = len(divergence) - 1 - int(torch.argmin(divergence.flip(0)))
        return clipped_range(obs, int(candidates[best]) * width)


class MSE(Calibrator):
    """The threshold t (a bin edge) minimizing the expected squared error of quantizing the
    observed values: sum over bins beyond t of count * (center - t)**2 (clipping) plus, for the
    non-zero values inside, step**2 / 12 each (rounding, uniform), step = t / 127 (signed) or
    t / 255 (non-negative). Exact zeros quantize exactly and count for nothing."""

    name = "mse"

    def compute_range(self, obs: Observer) -> TensorRange:
        hist, width = obs.histogram()
        hist[0] -= obs.num_zero
        n = obs.data_bins()
        hist = hist[:n]
        if hist.sum() == 0:
            return clipped_range(obs, obs.amax)
        centers = (torch.arange(n, dtype=torch.float64) + 0.5) * width
        zero = torch.zeros(1, dtype=torch.float64)

        def tail(v: torch.Tensor) -> torch.Tensor:  # tail(v)[i] = sum over bins k >= i, i = 1..n
            return torch.cat([torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0])[1:], zero])

        t = torch.arange(1, n + 1, dtype=torch.float64) * width
        clip_count, clip_sum, clip_sq = tail(hist), tail(hist * centers), tail(hist * centers ** 2)
        clipping = clip_sq - 2 * t * clip_sum + t ** 2 * clip_count
        steps = 255.0 if obs.non_negative else 127.0
        rounding = (hist.sum() - clip_count) * (t / steps) ** 2 / 12.0
        best = int(torch.argmin(clipping + rounding))
        return clipped_range(obs, float(t[best]))


CALIBRATORS: dict[str, type[Calibrator]] = {
    "minmax": MinMax,
    "percentile": Percentile,
    "entropy": Entropy,
    "mse": MSE,
}


def get_calibrator(name_or_instance: str | Calibrator) -> Calibrator:
    """A calibrator by registry name (default settings) or an instance, returned as is."""
    if isinstance(name_or_instance, Calibrator):
        return name_or_instance
    if isinstance(name_or_instance, str) and name_or_instance.lower() in CALIBRATORS:
        return CALIBRATORS[name_or_instance.lower()]()
    raise ValueError(f"unknown calibrator {name_or_instance!r}: pass one of {sorted(CALIBRATORS)} "
                     f"or a Calibrator instance (e.g. Percentile(99.9))")
