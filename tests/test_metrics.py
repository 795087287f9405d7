"""d3.metrics against hand-computed values on small arrays."""

import math

import numpy as np
import pytest
import torch

from d3 import metrics as M

pytestmark = pytest.mark.quick

LN = math.log
LOG10 = math.log10


# ----------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------

def _depth_case():
    # 4 pixels, the last one invalid (GT 0): its terms would be inf/NaN and must not matter.
    pred = torch.tensor([[2.0, 1.0], [3.0, 7.0]])
    gt = torch.tensor([[1.0, 1.0], [4.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    return pred, gt, mask


def test_depth_metrics_hand_values():
    m = {k: float(v) for k, v in M.depth_metrics(*_depth_case()).items()}
    # valid pairs (p, g): (2, 1), (1, 1), (3, 4)
    assert m["abs_rel"] == pytest.approx((1 / 1 + 0 + 1 / 4) / 3, rel=1e-6)
    assert m["sq_rel"] == pytest.approx((1 / 1 + 0 + 1 / 4) / 3, rel=1e-6)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1) / 3), rel=1e-6)
    assert m["rmse_log"] == pytest.approx(math.sqrt((LN(2) ** 2 + LN(3 / 4) ** 2) / 3), rel=1e-6)
    assert m["log10"] == pytest.approx((LOG10(2) + abs(LOG10(3 / 4))) / 3, rel=1e-6)
    # ratios max(p/g, g/p) = 2, 1, 4/3
    assert m["delta1"] == pytest.approx(1 / 3)
    assert m["delta2"] == pytest.approx(2 / 3)   # 4/3 < 1.5625
    assert m["delta3"] == pytest.approx(2 / 3)   # 2 is not < 1.953125
    assert m["i_rmse"] == pytest.approx(math.sqrt(((1 / 2 - 1) ** 2 + (1 / 3 - 1 / 4) ** 2) / 3), rel=1e-6)
    d = [LN(2), 0.0, LN(3 / 4)]
    var = sum(x * x for x in d) / 3 - (sum(d) / 3) ** 2
    assert m["silog"] == pytest.approx(100 * math.sqrt(var), rel=1e-5)
    assert set(m) == set(M.DEPTH_METRICS)


def test_delta_threshold_is_strict_and_batched():
    pred = torch.tensor([[[1.25, 1.0]], [[1.0, 1.5625]]])  # [2, 1, 2]: ratio exactly 1.25 / 1.25^2
    gt = torch.ones(2, 1, 2)
    mask = torch.ones(2, 1, 2, dtype=torch.bool)
    m = M.depth_metrics(pred, gt, mask)
    assert m["delta1"].tolist() == [0.5, 0.5]  # 1.25 is not < 1.25
    assert m["delta2"].tolist() == [1.0, 0.5]  # 1.5625 is not < 1.5625
    assert m["delta3"].tolist() == [1.0, 1.0]


def test_silog_of_a_scaled_prediction_is_zero_not_nan():
    gt = torch.tensor([[1.0, 2.0, 3.0]])
    m = M.depth_metrics(gt * 1.7, gt, torch.ones_like(gt, dtype=torch.bool))
    assert float(m["silog"]) == pytest.approx(0.0, abs=1e-3)


def test_metrics_accept_numpy():
    p, g, m = _depth_case()
    a = M.depth_metrics(p.numpy(), g.numpy(), m.numpy())
    b = M.depth_metrics(p, g, m)
    assert all(float(a[k]) == float(b[k]) for k in M.DEPTH_METRICS)


def test_least_squares_recovers_scale_and_shift():
    gt = torch.tensor([[1.0, 2.0, 5.0, 0.0]])
    mask = gt > 0
    pred = (gt - 3.0) / 2.0  # gt = 2 * pred + 3 on the mask
    pred[0, 3] = 100.0       # invalid pixel: ignored by the fit, still aligned
    aligned, s, b = M.align_least_squares(pred, gt, mask)
    assert (s, b) == pytest.approx((2.0, 3.0))
    assert aligned[mask].tolist() == pytest.approx([1.0, 2.0, 5.0])
    assert float(aligned[0, 3]) == pytest.approx(203.0)


def test_least_squares_matches_numpy_lstsq_on_noisy_data():
    r = np.random.default_rng(0)
    gt = r.uniform(1, 10, (30, 40)).astype(np.float32)
    pred = (0.3 * gt + 0.1 + r.normal(0, 0.2, gt.shape)).astype(np.float32)
    mask = r.random(gt.shape) > 0.3
    A = np.stack([pred[mask], np.ones(mask.sum(), np.float32)], -1)
    ref = np.linalg.lstsq(A, gt[mask][:, None], rcond=None)[0].ravel()
    _, s, b = M.align_least_squares(pred, gt, mask)
    assert (s, b) == pytest.approx((float(ref[0]), float(ref[1])), rel=1e-6)


def test_constant_prediction_gets_lstsq_minimum_norm_solution():
    gt = np.array([[1.0, 2.0, 3.0]], np.float32)
    pred = np.full_like(gt, 2.0)
    mask = np.ones(gt.shape, bool)
    ref = np.linalg.lstsq(np.stack([pred.ravel(), np.ones(3, np.float32)], -1), gt.ravel(), rcond=None)[0]
    _, s, b = M.align_least_squares(pred, gt, mask)
    assert (s, b) == pytest.approx((2 * 2 / 5, 2 / 5), rel=1e-6)  # mean 2 * (c, 1) / (c^2 + 1)
    assert (s, b) == pytest.approx(tuple(ref), rel=1e-5)


def test_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        M.align_least_squares(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), np.zeros((2, 2), bool))


def test_max_res_subsamples_only_the_width_like_marigold():
    cols = M.marigold_max_res_columns(4032, 6048, 1024)  # ETH3D
    assert cols is not None and len(cols) == 1024
    assert cols[:4].tolist() == [0, 5, 11, 17]
    assert M.marigold_max_res_columns(480, 640, 1024) is None  # f >= 1: no-op
    assert M.marigold_max_res_columns(480, 640, None) is None


def _marigold_alignment(gt, pred, mask, max_res):
    """Marigold's align_depth_least_square, written out with its torch Upsample on 3-D arrays."""
    f = np.min(max_res / np.array(pred.shape[-2:]))
    down = torch.nn.Upsample(scale_factor=float(f), mode="nearest")
    g = down(torch.as_tensor(gt).unsqueeze(0)).numpy()
    p = down(torch.as_tensor(pred).unsqueeze(0)).numpy()
    m = down(torch.as_tensor(mask).unsqueeze(0).float()).bool().numpy()
    assert g.shape == (1, gt.shape[0], int(gt.shape[1] * f))  # all rows kept
    A = np.concatenate([p[m].reshape(-1, 1), np.ones((m.sum(), 1), np.float32)], -1)
    s, b = np.linalg.lstsq(A, g[m].reshape(-1, 1), rcond=None)[0]
    return float(s[0]), float(b[0])


def test_max_res_alignment_reproduces_marigold_exactly():
    r = np.random.default_rng(1)
    gt = r.uniform(1, 5, (12, 300)).astype(np.float32)
    pred = (gt * r.uniform(0.5, 1.5, gt.shape)).astype(np.float32)  # fit depends on which pixels
    mask = r.random(gt.shape) > 0.2
    ref = _marigold_alignment(gt, pred, mask, 64)
    _, s, b = M.align_least_squares(pred, gt, mask, max_res=64)
    assert (s, b) == pytest.approx(ref, rel=1e-6)
    _, s_full, _ = M.align_least_squares(pred, gt, mask)
    assert s_full != pytest.approx(s, rel=1e-6)  # the subsampling does change the fit


def test_clip_order_after_alignment():
    gt = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones_like(gt, dtype=torch.bool)
    out, _, _ = M.align_depth(torch.tensor([[-1.0, 0.5, 20.0]]), gt, mask, "none", min_depth=1e-3, max_depth=10)
    assert out[0].tolist() == pytest.approx([1e-3, 0.5, 10.0])
    out, _, _ = M.align_depth(torch.tensor([[-1.0, 0.5, 20.0]]), gt, mask, "none", min_depth=0.0, max_depth=math.inf)
    assert out[0].tolist() == pytest.approx([1e-6, 0.5, 20.0])  # the final >= 1e-6 clip
    # least squares: gt = pred - 4 -> aligned [-3, -2, ...] clipped to min_depth
    out, s, b = M.align_depth(torch.tensor([[5.0, 6.0, 7.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                              torch.tensor([[True, True, True, False]]), "least_square", min_depth=0.5, max_depth=2.5)
    assert (s, b) == pytest.approx((1.0, -4.0))
    assert out[0].tolist() == pytest.approx([1.0, 2.0, 2.5, 0.5])


def test_disparity_alignment():
    gt = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    mask = gt > 0
    disp = torch.where(mask, 1 / gt.clamp_min(1e-9), torch.zeros_like(gt))
    pred = (disp + 0.5) / 3.0  # "disparity" prediction, affine in disparity space
    out, s, b = M.align_depth(pred, gt, mask, "least_square_disparity", min_depth=1e-3, max_depth=10)
    assert (s, b) == pytest.approx((3.0, -0.5), rel=1e-5)
    assert out[mask].tolist() == pytest.approx([1.0, 2.0, 4.0], rel=1e-5)
    # the invalid pixel aligns to disparity 0 -> clipped to 1e-3 -> depth 1000 -> dataset clip 10
    assert float(out[0, 3]) == pytest.approx(10.0)
    # pixels with pred <= 0 are left out of the fit (docs/protocols.md, "Depth metrics")
    bad = pred.clone()
    bad[0, 2] = -5.0
    _, s2, b2 = M.align_depth(bad, gt, mask, "least_square_disparity", min_depth=1e-3, max_depth=10)
    assert (s2, b2) == pytest.approx((3.0, -0.5), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Normals
# ----------------------------------------------------------------------------------------------

def _deg(v):
    return np.array([0.0, math.sin(math.radians(v)), math.cos(math.radians(v))])


def _normal_pair():
    gt = np.zeros((2, 2, 3), np.float32)
    pred = np.zeros((2, 2, 3), np.float32)
    gt[0, 0], pred[0, 0] = (0, 0, 1), _deg(10)          # 10 degrees
    gt[0, 1], pred[0, 1] = (1, 0, 0), (2, 0, 0)          # 0 degrees, non-unit prediction
    gt[1, 0], pred[1, 0] = (0, 0, 0), (1, 0, 0)          # invalid GT (zero vector)
    gt[1, 1], pred[1, 1] = (0, 1, 0), (0, 0, 1)          # 90 degrees
    return pred, gt


def test_normal_metrics_hand_values():
    pred, gt = _normal_pair()
    e = M.angular_errors(pred, gt)
    assert e.tolist() == pytest.approx([10.0, 0.0, 90.0], abs=1e-3)
    m = M.normal_metrics(pred, gt)
    assert m["mean"] == pytest.approx(100 / 3, abs=1e-4)
    assert m["median"] == pytest.approx(10.0, abs=1e-3)
    assert m["rmse"] == pytest.approx(math.sqrt((100 + 8100) / 3), abs=1e-3)
    assert m["a5"] == m["a7_5"] == pytest.approx(33.3333)
    assert m["a11_25"] == m["a22_5"] == m["a30"] == pytest.approx(66.6667)
    # Marigold rounds each per-image value to 4 decimals (np.float32 rounding)
    assert m["mean"] == pytest.approx(33.3333, abs=1e-5) and m["rmse"] == pytest.approx(52.2813, abs=1e-5)


def test_normal_thresholds_are_strict():
    e = np.array([5.0, 7.5, 11.25, 22.5, 30.0, 4.0], np.float32)
    m = M.normal_metrics_from_errors(e)
    assert m["a5"] == pytest.approx(100 / 6, abs=1e-4)          # only the 4
    assert [m[k] for k in ("a7_5", "a11_25", "a22_5", "a30")] == pytest.approx([100 * 2 / 6, 100 * 3 / 6, 100 * 4 / 6, 100 * 5 / 6], abs=1e-4)
    assert m["median"] == pytest.approx((7.5 + 11.25) / 2)  # np.median: mean of the middle pair


def test_normal_pooling_per_image_vs_pixel():
    img1 = np.array([10.0, 0.0, 90.0], np.float32)
    img2 = np.array([20.0], np.float32)
    per_image = [M.normal_metrics_from_errors(e) for e in (img1, img2)]
    mean_img = M.mean_over_samples(per_image, M.NORMAL_METRICS)
    assert mean_img["mean"] == pytest.approx((100 / 3 + 20) / 2, abs=1e-4)
    assert mean_img["median"] == pytest.approx((10 + 20) / 2)
    pooled = M.normal_metrics_from_errors(np.concatenate([img1, img2]), decimals=None)
    assert pooled["mean"] == pytest.approx(30.0)
    assert pooled["median"] == pytest.approx(15.0)
    assert pooled["a11_25"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------------------
# Matting
# ----------------------------------------------------------------------------------------------

def test_sad_mse_mad_hand_values():
    p = np.array([[0.0, 0.5], [1.0, 1.0]])
    a = np.array([[0.0, 1.0], [1.0, 0.0]])
    sad, mse, mad = M.matting_sad_mse_mad(p, a)
    assert sad == pytest.approx(1.5 / 1000)
    assert mse == pytest.approx((0.25 + 1.0) / 4)
    assert mad == pytest.approx(1.5 / 4)


def test_trimap_variants_hand_values():
    p = np.array([[0.2, 0.5, 0.9, 0.3]])
    a = np.array([[0.0, 1.0, 1.0, 0.5]])
    t = np.array([[0, 128, 255, 128]], np.uint8)
    m = M.matting_trimap_metrics(p, a, t)
    # modified prediction [0, 0.5, 1, 0.3] -> |d| = [0, 0.5, 0, 0.2]; 2 unknown pixels
    assert m["sad_trimap"] == pytest.approx(0.7 / 1000)
    assert m["mse_trimap"] == pytest.approx((0.25 + 0.04) / 2)
    assert m["mad_trimap"] == pytest.approx(0.7 / 2)
    assert m["sad_fg"] == pytest.approx(0.1 / 1000)  # unmodified prediction on trimap 255
    assert m["sad_bg"] == pytest.approx(0.2 / 1000)


def test_grad_of_an_impulse_equals_the_kernel_energy():
    # Alpha 0 vs a unit impulse far from the border: d/dy = k1 (x) k0, d/dx = k0 (x) k1, so
    # sum |grad|^2 = 2 * sum(k1^2) * sum(k0^2), with SciPy's sampled Gaussian (sigma 1.4,
    # radius int(4 * 1.4 + 0.5) = 6) and its first derivative -x / sigma^2 * k0.
    sigma, radius = 1.4, 6
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k0 = np.exp(-0.5 * x ** 2 / sigma ** 2)
    k0 /= k0.sum()
    k1 = -x / sigma ** 2 * k0
    expected = 2 * (k1 ** 2).sum() * (k0 ** 2).sum() / 10
    p = np.zeros((21, 21))
    p[10, 10] = 1.0
    assert M.matting_grad(p, np.zeros_like(p)) == pytest.approx(expected, rel=1e-5)
    assert M.matting_grad(np.zeros_like(p), p) == pytest.approx(expected, rel=1e-5)
    # a constant offset has no gradient
    assert M.matting_grad(p + 0.3, p) == pytest.approx(0.0, abs=1e-9)


def test_conn_hand_value_on_a_row():
    # Levels: t <= 0.5 -> largest component {0, 1}: pixels 2, 3 get l = 0; t = 0.6 -> {0} and {3}
    # tie, the first wins: pixel 1 gets l = 0.5; pixel 0 never drops -> l = 1. l = [1, .5, 0, 0]
    # phi_P = [1, 1, 1, 0], phi_A = [1, .5, 1, 0] -> Conn = 0.5 / 1000
    p = np.array([[1.0, 0.55, 0.0, 1.0]])
    a = np.array([[1.0, 1.0, 0.0, 1.0]])
    assert M.matting_conn(p, a) == pytest.approx(0.5 / 1000)
    assert M.matting_conn(a, a) == 0.0


def test_conn_uses_4_connectivity():
    # Diagonal cells touch only with 8-connectivity.
    a = np.array([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
    p = a.copy()
    p[1, 1] = 0.12
    comp = M.largest_component(a > 0)
    assert comp.sum() == 1 and comp[0, 0]  # 4 singletons; ties go to the first in raster order
    # 4-connectivity: at t = 0.1 the largest component is {(0,0)}: (1,1) gets l = 0,
    # d_P = 0.12 < 0.15 -> phi_P = 1, d_A = 1 -> phi_A = 0: Conn = 1 / 1000.
    # (8-connectivity would keep (1,1) until t = 0.2, l = 0.1, giving 0.9 / 1000.)
    assert M.matting_conn(p, a) == pytest.approx(1.0 / 1000)


def test_matting_metrics_keys():
    a = np.random.default_rng(0).random((8, 9))
    t = np.full(a.shape, 128, np.uint8)
    m = M.matting_metrics(a, a, t)
    assert set(m) == set(M.MATTING_METRICS + M.MATTING_TRIMAP_METRICS)
    assert all(v == 0 for v in m.values())


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------

def test_segmentation_hand_values():
    pred = np.array([[0.9, 0.2], [0.6, 0.5]])  # > 0.5 -> [[1, 0], [1, 0]] (0.5 is background)
    gt = np.array([[True, True], [False, False]])
    m = M.segmentation_metrics(pred, gt)
    assert m == pytest.approx({"iou": 1 / 3, "pixel_acc": 0.5, "dice": 0.5})  # tp=fp=fn=tn=1
    assert M.segmentation_metrics(gt, gt) == {"iou": 1.0, "pixel_acc": 1.0, "dice": 1.0}
    empty = np.zeros((2, 2), bool)
    assert M.segmentation_metrics(empty, empty) == {"iou": 1.0, "pixel_acc": 1.0, "dice": 1.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_depth_and_normals_on_gpu_match_cpu():
    p, g, m = _depth_case()
    cpu = M.depth_metrics(p, g, m)
    gpu = M.depth_metrics(p.cuda(), g.cuda(), m.cuda())
    assert all(float(cpu[k]) == pytest.approx(float(gpu[k]), rel=1e-6) for k in M.DEPTH_METRICS)
    r = np.random.default_rng(0)
    pred = r.normal(size=(50, 300)).astype(np.float32)
    gt = (2 * pred + 1).astype(np.float32)
    mask = r.random(pred.shape) > 0.5
    a, s, b = M.align_least_squares(torch.from_numpy(pred).cuda(), torch.from_numpy(gt).cuda(),
                                    torch.from_numpy(mask).cuda(), max_res=64)
    _, s2, b2 = M.align_least_squares(pred, gt, mask, max_res=64)
    assert (s, b) == pytest.approx((s2, b2), rel=1e-6)
    np_, ng = _normal_pair()
    assert M.angular_errors(torch.from_numpy(np_).cuda(), torch.from_numpy(ng).cuda()).cpu().tolist() == \
        pytest.approx(M.angular_errors(np_, ng).tolist(), abs=1e-4)
