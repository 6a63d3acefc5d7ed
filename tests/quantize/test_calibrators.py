"""Observers and calibrators against ranges computed directly on the same samples: quantiles,
brute-force MSE over a grid of thresholds, a loop implementation of TensorRT's entropy divergence."""
import math
import time

import numpy as np
import pytest
import torch

from torch_gie.quantize.arith import QMIN, QParams, dequantize, qparams_for_range, quantize
from torch_gie.quantize.calibrators import (
    CALIBRATORS,
    MSE,
    SMOOTHING_EPS,
    Entropy,
    MinMax,
    Observer,
    Percentile,
    entropy_divergences,
    get_calibrator,
)

ALL = ["minmax", "percentile", "entropy", "mse"]


def observe(x: torch.Tensor, chunks: int = 1, num_bins: int = 2048) -> Observer:
    obs = Observer(num_bins)
    for part in x.flatten().chunk(chunks):
        obs.update(part)
    return obs


def quant_mse(x: torch.Tensor, t: float, non_negative: bool = False) -> float:
    qp = qparams_for_range(0.0 if non_negative else -t, t, non_negative=non_negative)
    return float(((dequantize(quantize(x, qp), qp) - x) ** 2).mean())


def brute_force_mse_threshold(x: torch.Tensor, lo: float, hi: float, non_negative: bool = False) -> tuple[float, float]:
    """The threshold with the least quantization error on the samples: a coarse grid, then a fine
    one around the coarse minimum."""
    for _ in range(2):
        ts = torch.linspace(lo, hi, 30).tolist()
        errors = [quant_mse(x, t, non_negative) for t in ts]
        best = int(np.argmin(errors))
        step = ts[1] - ts[0]
        lo, hi = max(ts[best] - step, 1e-3), ts[best] + step
    return ts[best], errors[best]


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300_000, generator=g)
    x[:2] = 50.0
    return x


def test_uniform_non_negative():
    a = 3.0
    x = torch.rand(400_000, generator=torch.Generator().manual_seed(1)) * a
    obs = observe(x, chunks=7)
    assert obs.non_negative and obs.num_negative == 0
    width = obs.bin_width
    assert MinMax().compute_range(obs).hi == float(x.max())
    for p in (90.0, 99.0, 99.99):
        expected = float(torch.quantile(x[:100_000], p / 100)) if p < 99.99 else a * 0.9999
        got = Percentile(p).compute_range(obs).hi
        assert abs(got - expected) < 2 * width + 0.002 * a, (p, got, expected)
    for name in ALL:
        qp = get_calibrator(name).compute(obs)
        assert qp.unsigned and qp.zero_point == QMIN
    # A uniform distribution has no tail to trade away: entropy keeps (nearly) its whole range.
    assert Entropy().compute_range(obs).hi > 0.97 * a


def test_percentile_interpolates_inside_a_bin():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(9))  # range [0, 1): 64 bins of 1/64
    obs = observe(x, num_bins=64)
    for p in (37.0, 81.3):
        assert Percentile(p).compute_range(obs).hi == pytest.approx(float(torch.quantile(x[:100_000], p / 100)),
                                                                   abs=0.003)


def test_gaussian_with_outliers(gaussian_with_outliers):
    x = gaussian_with_outliers
    obs = observe(x)
    assert not obs.non_negative
    mm = MinMax().compute_range(obs)
    assert mm.hi == 50.0 and mm.lo == float(x.min())
    assert MinMax().compute(obs) == QParams(50.0 / 127)
    pct = Percentile(99.9).compute_range(obs)
    expected = float(torch.quantile(x.abs()[:200_000], 0.999))  # torch.quantile caps its input size
    assert abs(pct.hi - expected) < 0.03 and pct.lo == -pct.hi
    ent = Entropy().compute_range(obs)
    assert 3.0 < ent.hi < 6.0, ent  # the Gaussian's body, not the outliers
    mse = MSE().compute_range(obs)
    assert mse.hi < 0.7 * 50.0
    for name in ALL:
        assert not get_calibrator(name).compute(obs).unsigned


@pytest.mark.parametrize("outliers", [0, 2])
@pytest.mark.parametrize("non_negative", [False, True])
def test_mse_matches_brute_force(outliers, non_negative):
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    x[:outliers] = 50.0
    if non_negative:
        x = x.abs()
    obs = observe(x)
    got = MSE().compute_range(obs)
    assert got.non_negative == non_negative
    t_best, err_best = brute_force_mse_threshold(x, 0.5, float(x.abs().max()), non_negative)
    # The error curve is flat near its minimum: compare errors tightly, thresholds loosely.
    assert quant_mse(x, got.hi, non_negative) <= 1.03 * err_best, (got.hi, t_best)
    assert abs(got.hi - t_best) < 0.1 * t_best, (got.hi, t_best)


def reference_divergence(hist: np.ndarray, levels: int, i: int) -> float:
    """TensorRT's pseudocode, one bin at a time."""
    p = hist[:i].astype(np.float64).copy()
    p[i - 1] += hist[i:].sum()
    level_of = np.arange(i) * levels // i
    q = np.zeros(i)
    for j in range(levels):
        members = np.nonzero(level_of == j)[0]
        nonempty = members[p[members] > 0]
        if len(nonempty):
            s = hist[members].sum()
            q[nonempty] = s / len(nonempty) if s > 0 else SMOOTHING_EPS
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float((p[m] * np.log(p[m] / q[m])).sum())


@pytest.mark.parametrize("levels", [128, 256])
def test_entropy_divergences_match_reference(levels):
    rng = np.random.default_rng(3)
    hist = rng.poisson(rng.exponential(30, 700)).astype(np.float64)
    hist[rng.random(700) < 0.2] = 0  # empty bins, including (by the seed) some right before outliers
    hist[650:] = 0
    hist[690] = 5
    candidates = torch.arange(levels, 701, 7)
    got = entropy_divergences(torch.from_numpy(hist), levels, candidates)
    expected = [reference_divergence(hist, levels, int(i)) for i in candidates]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert np.isfinite(got.numpy()).all()


def test_rebinning_is_order_independent():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(4)) * 2
    x[17] = 40.0
    one = observe(x)
    shuffled = observe(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(5))], chunks=13)
    # Growing in many small steps: chunks in increasing order of magnitude.
    growing = observe(x[torch.argsort(x.abs())], chunks=20)
    for other in (shuffled, growing):
        assert other.hist_max == one.hist_max
        assert torch.equal(other.hist, one.hist)
        for name in ALL:
            assert get_calibrator(name).compute(other) == get_calibrator(name).compute(one)


def test_rebinning_merges_counts():
    obs = Observer(num_bins=8)
    obs.update(torch.tensor([0.1, -0.25, 0.5, 0.0]))  # range 1 (a power of two > 0.5), bins of 1/8
    assert obs.hist_max == 1.0 and obs.hist.tolist() == [2, 0, 1, 0, 1, 0, 0, 0]
    obs.update(torch.tensor([1.9]))  # range 2: every 2 old bins merge into one
    assert obs.hist_max == 2.0 and obs.hist.tolist() == [2, 1, 1, 0, 0, 0, 0, 1]
    obs.update(torch.tensor([1000.0]))  # a growth beyond num_bins: everything old lands in bin 0
    assert obs.hist_max == 1024.0 and obs.hist.tolist() == [5, 0, 0, 0, 0, 0, 0, 1]
    direct = Observer(num_bins=8)
    direct.update(torch.tensor([0.1, -0.25, 0.5, 0.0, 1.9]))
    assert direct.hist.tolist() == [2, 1, 1, 0, 0, 0, 0, 1]  # 0.5 on a bin edge, as after the merge
    assert (obs.min, obs.max, obs.count, obs.num_negative, obs.num_zero) == (-0.25, 1000.0, 6, 1, 1)


@pytest.mark.parametrize("name", ALL)
def test_all_zero_tensor(name):
    obs = observe(torch.zeros(1000), chunks=3)
    qp = get_calibrator(name).compute(obs)
    assert qp.unsigned and 0 < qp.scale < 1e-6 and math.isfinite(qp.inv_scale)
    # Zeros first, then data: the zeros stay in bin 0 and the range follows the data.
    obs.update(torch.full((10,), 2.0))
    assert obs.hist[0] == 1000 and obs.hist_max == 4.0
    assert get_calibrator(name).compute_range(obs).hi == pytest.approx(2.0, rel=1e-3)


def test_relu_like_zero_spike_is_not_quantization_error():
    # Half exact zeros, half |N(0, 1)|: the zeros quantize exactly, so they must not drag the
    # entropy/MSE thresholds compared with the same data without them.
    g = torch.Generator().manual_seed(6)
    body = torch.randn(200_000, generator=g).abs()
    with_zeros = observe(torch.cat([body, torch.zeros(200_000)]))
    without = observe(body)
    for cal in (Entropy(), MSE()):
        assert cal.compute_range(with_zeros).hi == pytest.approx(cal.compute_range(without).hi, rel=0.02)
        assert cal.compute(with_zeros).unsigned


def test_one_negative_value_makes_codes_symmetric():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(7))
    x[5] = -1e-3
    obs = observe(x)
    for name in ALL:
        r = get_calibrator(name).compute_range(obs)
        assert not r.non_negative and r.lo == -r.hi or name == "minmax"
        assert not get_calibrator(name).compute(obs).unsigned


def test_observer_errors():
    with pytest.raises(ValueError, match="seen no data"):
        MinMax().compute(Observer())
    with pytest.raises(ValueError, match="NaN or Inf"):
        Observer(name="conv1").update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Observer().update(torch.tensor([1.0, -float("inf")]))
    with pytest.raises(TypeError, match="floating"):
        Observer().update(torch.arange(4))
    obs = Observer()
    obs.update(torch.empty(0))  # an empty batch adds nothing
    assert obs.hist is None and obs.count == 0


def test_registry():
    assert set(CALIBRATORS) == set(ALL)
    for name in ALL:
        cal = get_calibrator(name)
        assert cal.name == name and isinstance(cal, CALIBRATORS[name])
    assert get_calibrator("MSE").name == "mse"
    custom = Percentile(99.0)
    assert get_calibrator(custom) is custom
    with pytest.raises(ValueError, match="'entropy', 'minmax', 'mse', 'percentile'"):
        get_calibrator("kl")
    with pytest.raises(ValueError, match="Percentile p"):
        Percentile(0.0)


def test_calibrators_are_fast():
    # ~1900 entropy candidates over a full 2048-bin histogram: vectorized, well under 50 ms on one
    # core; a per-threshold Python loop would take seconds. The bound is loose for loaded machines.
    obs = observe(torch.cat([torch.randn(100_000) * 0.5, torch.tensor([1023.0])]))
    assert obs.data_bins() == 2047
    for cal in (Percentile(), Entropy(), MSE()):
        cal.compute(obs)
        best = min(_timed(cal, obs) for _ in range(3))
        assert best < 0.5, (cal, best)


def _timed(cal, obs) -> float:
    start = time.perf_counter()
    cal.compute(obs)
    return time.perf_counter() - start


@pytest.mark.gpu
def test_observer_on_cuda_matches_cpu():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(8))
    cpu, gpu = observe(x, chunks=4), observe(x.cuda(), chunks=4)
    assert gpu.hist.device.type == "cuda" and torch.equal(gpu.hist.cpu(), cpu.hist)
    for name in ALL:
        assert get_calibrator(name).compute(gpu) == get_calibrator(name).compute(cpu)
