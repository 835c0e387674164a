"""Metrics against hand-made cases, scipy.stats.spearmanr / rankdata and scipy.ndimage.center_of_mass."""

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch

from flipfrag.metrics import (
    ReferenceMaps,
    center_of_mass,
    center_of_mass_shift,
    default_k,
    mass_in_region,
    rankdata,
    spearman,
    topk_intersection,
)


def test_topk_intersection_hand_cases():
    a = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    rev = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert topk_intersection(a, a, 3).tolist() == [1.0]
    assert topk_intersection(a, rev, 2).tolist() == [0.0]  # {0,1} vs {3,4}
    assert topk_intersection(a, rev, 3).tolist() == pytest.approx([1 / 3])  # {0,1,2} vs {2,3,4}
    assert topk_intersection(a, rev, 5).tolist() == [1.0]


def test_topk_intersection_batched_against_python_sets():
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 7, 9)), rng.random((6, 7, 9))
    got = topk_intersection(a, b, 10)
    for i in range(6):
        sa = set(np.argsort(-a[i].ravel())[:10])
        sb = set(np.argsort(-b[i].ravel())[:10])
        assert got[i] == pytest.approx(len(sa & sb) / 10)


def test_rankdata_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    v = rng.integers(0, 5, size=(4, 30)).astype(float)
    got = rankdata(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, scipy.stats.rankdata(v, axis=1, method="average"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rankdata_leading_dims_runs_of_ties_and_edges(dtype):
    rng = np.random.default_rng(3)
    # (2, 3, 50): long runs of ties, ties at both ends of the sorted order, single distinct values, a constant row
    v = rng.integers(0, 6, size=(2, 3, 50)).astype(float)
    v[0, 1] = rng.random(50)  # no ties
    v[1, 2] = 7.0  # constant
    got = rankdata(torch.from_numpy(v).to(dtype))
    assert got.dtype == torch.float64 and got.shape == v.shape
    np.testing.assert_array_equal(got.numpy(), scipy.stats.rankdata(v, axis=-1, method="average"))
    single = rankdata(torch.tensor([[4.0]]))
    assert single.tolist() == [[1.0]]


def test_reference_maps_equal_the_functions():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.integers(0, 4, size=(6, 9, 7)).astype(np.float32))  # ties in ranks and top-k
    b = a + torch.from_numpy(rng.random((6, 9, 7)).astype(np.float32))
    b[0] = a[0]  # an identical pair
    for floor in (False, True):
        ref = ReferenceMaps(a, k=10, floor_center=floor)
        torch.testing.assert_close(ref.center_shift(b), center_of_mass_shift(a, b, floor=floor))
    torch.testing.assert_close(ref.spearman(b), spearman(a, b))
    assert ref.spearman(b)[0].item() == pytest.approx(1.0)
    # top-k with ties: both sides pick their top-k sets with torch.topk, as the function does
    torch.testing.assert_close(ref.topk_intersection(b), topk_intersection(a, b, 10))
    assert ref.topk_intersection(b)[0].item() == 1.0
    with pytest.raises(ValueError, match="k must"):
        ReferenceMaps(a, k=64)
    with pytest.raises(ValueError, match="maps must"):
        ref.spearman(b[:2])
    with pytest.raises(ValueError, match="maps must"):
        ReferenceMaps(a.flatten(1), k=3)


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_matches_scipy(ties):
    rng = np.random.default_rng(2)
    if ties:
        a = rng.integers(0, 4, size=(5, 6, 6)).astype(float)
        b = a + rng.integers(0, 3, size=(5, 6, 6))
    else:
        a = rng.random((5, 6, 6))
        b = a + 0.5 * rng.random((5, 6, 6))
    got = spearman(a, b)
    want = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    got_t = spearman(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float32
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-5, atol=1e-6)


def test_spearman_extremes():
    a = torch.arange(12.0).view(1, 3, 4)
    assert spearman(a, a).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert math.isnan(spearman(a, torch.ones_like(a)).item())  # constant map: undefined, as SciPy


def test_center_of_mass_hand_cases_and_scipy():
    m = torch.zeros(2, 5, 7)
    m[0, 1, 4] = 1.0  # a single bright pixel
    m[1, 0, 0] = m[1, 4, 6] = 2.0  # two equal pixels: the midpoint
    np.testing.assert_allclose(center_of_mass(m).numpy(), [[1, 4], [2, 3]])
    rng = np.random.default_rng(3)
    r = rng.random((3, 8, 5))
    got = center_of_mass(r)
    assert isinstance(got, np.ndarray) and got.shape == (3, 2)
    np.testing.assert_allclose(got, [scipy.ndimage.center_of_mass(r[i]) for i in range(3)], rtol=1e-12)


def test_center_of_mass_shift_hand_and_floor():
    a = torch.zeros(1, 10, 10)
    b = torch.zeros(1, 10, 10)
    a[0, 1, 1] = 1.0
    b[0, 4, 5] = 1.0  # (3, 4) apart: 5 pixels
    assert center_of_mass_shift(a, b).item() == pytest.approx(5.0)
    # centers (0.6, 0.6) and (1.4, 1.4): float distance 0.8*sqrt(2), floored (0,0) vs (1,1): sqrt(2)
    c = torch.zeros(1, 3, 3)
    c[0, 0, 0], c[0, 1, 1] = 0.4, 0.6
    d = torch.zeros(1, 3, 3)
    d[0, 1, 1], d[0, 2, 2] = 0.6, 0.4
    assert center_of_mass_shift(c, d).item() == pytest.approx(0.8 * math.sqrt(2), rel=1e-6)
    assert center_of_mass_shift(c, d, floor=True).item() == pytest.approx(math.sqrt(2), rel=1e-6)


def test_mass_in_region():
    m = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    mask = torch.tensor([[True, False], [False, True]])
    assert mass_in_region(m, mask).item() == pytest.approx(5 / 8)
    per_image = torch.tensor([[[0, 1], [0, 0]]])
    assert mass_in_region(m, per_image).item() == pytest.approx(3 / 8)
    out = mass_in_region(m.numpy(), mask.numpy())
    assert isinstance(out, np.ndarray) and out[0] == pytest.approx(5 / 8)


def test_center_and_region_are_differentiable():
    m = torch.rand(2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: center_of_mass(t), (m,))
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[:2] = 1
    assert torch.autograd.gradcheck(lambda t: mass_in_region(t, mask), (m,))


def test_types_follow_inputs():
    a = np.random.default_rng(4).random((2, 4, 4))
    assert isinstance(topk_intersection(a, a, 3), np.ndarray)
    assert isinstance(center_of_mass_shift(a, a), np.ndarray)
    t = torch.from_numpy(a)
    assert isinstance(topk_intersection(t, t, 3), torch.Tensor)
    assert isinstance(topk_intersection(a, t, 3), torch.Tensor)  # mixed -> torch


def test_default_k():
    assert default_k(227 * 227) == 1000
    assert default_k(224 * 224) == 1000
    assert default_k(32 * 32) == 100
    assert default_k(28 * 28) == 77
    assert default_k(8 * 8) == 6
    assert default_k(1) == 1
    with pytest.raises(ValueError, match="n_features"):
        default_k(0)


def test_errors_name_the_argument():
    a = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="k must"):
        topk_intersection(a, a, 0)
    with pytest.raises(ValueError, match="k must"):
        topk_intersection(a, a, 17)
    with pytest.raises(ValueError, match="map_a and map_b"):
        spearman(a, torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="maps"):
        center_of_mass(torch.rand(4, 4))
    with pytest.raises(ValueError, match="mask"):
        mass_in_region(a, torch.ones(3, 3))
    with pytest.raises(TypeError, match="map_a"):
        spearman([[1.0, 2.0]], a)


# ------------------------------------------------------------------ edges found by mutation testing (mutmut, issue 22)


def test_default_k_thresholds_are_inclusive():
    assert default_k(50_000) == 1000 and default_k(49_999) == 100
    assert default_k(1000) == 100 and default_k(999) == round(999 * 100 / 1024) == 98
    assert default_k(10) == 1 and default_k(11) == 1 and default_k(16) == 2  # round(1.5625) = 2


def test_k_edges():
    a = torch.tensor([[3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(topk_intersection(a, b, 1)) == 0.0 and float(topk_intersection(a, a, 1)) == 1.0  # k = 1 is valid
    assert float(topk_intersection(a, b, 3)) == 1.0  # k = D: every feature
    for bad in (True, 1.0, np.float64(2.0)):
        with pytest.raises(ValueError, match="k must be an integer"):
            topk_intersection(a, b, bad)
    assert float(topk_intersection(a, a, np.int64(2))) == 1.0


def test_dtypes_promote_and_integers_become_float64():
    a32 = torch.rand(2, 4, 4)
    b64 = torch.rand(2, 4, 4, dtype=torch.float64)
    for fn in (spearman, center_of_mass_shift, lambda x, y: topk_intersection(x, y, 3)):
        assert fn(a32, b64).dtype == torch.float64 and fn(b64, a32).dtype == torch.float64
        assert fn(a32, a32).dtype == torch.float32
    # numpy with torch float32: float64 torch results, in either order, equal to the all-float64 values
    an = np.random.default_rng(0).random((2, 4, 4))
    for x, y in ((an, a32), (a32, an)):
        got = center_of_mass_shift(x, y)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        want = center_of_mass_shift(torch.as_tensor(x).double(), torch.as_tensor(y).double())
        torch.testing.assert_close(got, want)
    # integer and bool inputs are read as float64
    ints = torch.tensor([[[0, 3], [1, 0]]])
    assert center_of_mass(ints).dtype == torch.float64
    torch.testing.assert_close(center_of_mass(ints), torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    ni = np.array([[[0, 3], [1, 0]]])
    got = topk_intersection(ni, ni, 1)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.tolist() == [1.0]
    got = mass_in_region(ni, np.array([[True, True], [False, False]]))
    assert got.dtype == np.float64 and got.tolist() == [0.75]
    rho = spearman(np.array([[1, 2, 3, 4]]), np.array([[1, 3, 2, 4]]))
    assert isinstance(rho, np.ndarray) and rho.dtype == np.float64
    assert rho[0] == pytest.approx(scipy.stats.spearmanr([1, 2, 3, 4], [1, 3, 2, 4]).statistic)


def test_type_errors_name_the_argument_and_what_it_got():
    a = torch.rand(2, 4, 4)
    with pytest.raises(TypeError, match="map_b must be a torch.Tensor or numpy.ndarray, got list"):
        spearman(a, [[1.0]])
    with pytest.raises(TypeError, match="map_a must be a real-valued tensor, got torch.complex64"):
        topk_intersection(torch.zeros(2, 3, dtype=torch.complex64), torch.zeros(2, 3), 1)
    with pytest.raises(TypeError, match="map_b must be a numeric array, got dtype <U1"):
        topk_intersection(np.zeros((2, 3)), np.array([["a", "b", "c"]] * 2), 1)
    with pytest.raises(ValueError, match=r"map_a must have a batch dimension and at least 2 dims, got shape \(3,"):
        spearman(torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match=r"at least 3 dims, got shape \(2, 3\)"):
        center_of_mass_shift(torch.rand(2, 3), torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"map_a and map_b must have shape \(N, H, W\), got \(1, 2, 3, 3\)"):
        center_of_mass_shift(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3))
    with pytest.raises(TypeError, match="values must be a torch.Tensor, got list"):
        rankdata([1.0, 2.0])
    with pytest.raises(ValueError, match=r"maps must have shape \(N, H, W\), got \(4, 4\)"):
        center_of_mass(torch.rand(4, 4))
    with pytest.raises(TypeError, match="maps must be"):
        center_of_mass([[1.0]])


def test_mass_in_region_masks_per_sample_weights_and_mixed_types():
    maps = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 2.0], [0.0, 0.0]]])
    per_sample = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    torch.testing.assert_close(mass_in_region(maps, per_sample), torch.tensor([0.25, 0.5]))
    weights = torch.tensor([[0.5, 0.0], [0.0, 1.0]])  # real weights weight the mass
    torch.testing.assert_close(mass_in_region(maps, weights), torch.tensor([3.5 / 4, 1.0 / 4]))
    assert mass_in_region(maps, per_sample).dtype == torch.float32
    got = mass_in_region(maps.numpy(), per_sample)  # numpy maps, torch mask: torch float64
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([0.25, 0.5], dtype=torch.float64))
    got = mass_in_region(maps, per_sample.numpy())
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    got = mass_in_region(maps.numpy(), per_sample.numpy())
    assert isinstance(got, np.ndarray) and got.tolist() == [0.25, 0.5]
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2\) or \(2, 2, 2\), got \(3, 2, 2\)"):
        mass_in_region(maps, torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match=r"maps must have shape \(N, H, W\), got \(2, 2\)"):
        mass_in_region(maps[0], torch.ones(2, 2))
    with pytest.raises(TypeError, match="mask must be"):
        mass_in_region(maps, [[1, 0], [0, 1]])


def test_reference_maps_checks_and_dtype():
    ref32 = torch.rand(3, 5, 5)
    other64 = torch.rand(3, 5, 5, dtype=torch.float64)
    ref = ReferenceMaps(ref32, 4, floor_center=True)
    o32 = other64.float()
    pairs = ((ref.topk_intersection(other64), topk_intersection(ref32, o32, 4)),
             (ref.spearman(other64), spearman(ref32, o32)),
             (ref.center_shift(other64), center_of_mass_shift(ref32, o32, floor=True)))  # fmt: skip
    for got, want in pairs:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float())
    assert ref.floor_center is True and ReferenceMaps(ref32, 4).floor_center is False
    with pytest.raises(ValueError, match=r"of shape \(N, H, W\), got torch.int64 \(3, 5, 5\)"):
        ReferenceMaps(torch.ones(3, 5, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="got ndarray"):
        ReferenceMaps(np.ones((3, 5, 5)), 4)
    with pytest.raises(ValueError, match=r"got torch.float32 \(15, 5\)"):
        ReferenceMaps(torch.rand(15, 5), 4)
    with pytest.raises(ValueError, match="k must"):
        ReferenceMaps(ref32, 26)
    assert ReferenceMaps(torch.rand(2, 3, 5), 15).k == 15  # k up to H * W (not W * W, not N * W)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 15\]"):
        ReferenceMaps(torch.rand(2, 3, 5), 16)
    with pytest.raises(ValueError, match=r"reference's shape \(3, 5, 5\), got \(3, 5, 4\)"):
        ref.spearman(torch.rand(3, 5, 4))
    with pytest.raises(ValueError, match="got ndarray"):
        ref.topk_intersection(np.ones((3, 5, 5)))


def test_floor_applies_to_both_centers():
    # centers (0.6, 0.6) and (1.4, 1.4): floored (0, 0) and (1, 1), distance sqrt(2); float distance 0.8 sqrt(2)
    a = torch.zeros(1, 3, 3, dtype=torch.float64)
    a[0, 0, 0], a[0, 1, 1] = 0.4, 0.6
    b = torch.zeros(1, 3, 3, dtype=torch.float64)
    b[0, 1, 1], b[0, 2, 2] = 0.6, 0.4
    assert float(center_of_mass_shift(a, b)) == pytest.approx(0.8 * math.sqrt(2))
    assert float(center_of_mass_shift(a, b, floor=True)) == pytest.approx(math.sqrt(2))
    assert float(ReferenceMaps(a, 1, floor_center=True).center_shift(b)) == pytest.approx(math.sqrt(2))
    assert float(ReferenceMaps(a, 1).center_shift(b)) == pytest.approx(0.8 * math.sqrt(2))
