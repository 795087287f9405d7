"""Benchmark readers on tiny fixtures written in each dataset's real on-disk layout."""

import numpy as np
import pytest
from PIL import Image

from d3.data import benchmarks as B
from tests import benchmark_fixtures as F

pytestmark = pytest.mark.quick


def _read_all(bench):
    return {s.name: s for s in (bench[i] for i in range(len(bench)))}


def _check(bench, expected, rgb_shape=None):
    got = _read_all(bench)
    assert sorted(got) == sorted(expected)
    for name, (gt, valid) in expected.items():
        s = got[name]
        assert s.rgb.dtype == np.uint8 and s.rgb.ndim == 3 and s.rgb.shape[2] == 3
        assert s.rgb.shape[:2] == (rgb_shape or gt.shape[:2])
        assert s.gt.shape == gt.shape
        np.testing.assert_array_equal(s.gt, gt)
        np.testing.assert_array_equal(s.valid, valid)
    return got


@pytest.fixture(scope="module")
def depth_sets(tmp_path_factory):
    """Each depth set written once as a folder and as the distributed .tar."""
    out = {}
    for name, write in F.WRITERS.items():
        base = tmp_path_factory.mktemp(name)
        root = base / "data"
        root.mkdir()
        expected = write(root)
        out[name] = (root, F.make_tar(root, base / f"{name}.tar"), expected, base)
    return out


def _kw(name):
    return {"depth_shape": F.ETH3D_SHAPE} if name == "eth3d" else {}


@pytest.mark.parametrize("name", list(F.WRITERS))
@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_depth_reader_values_and_masks(depth_sets, name, kind):
    root, tar, expected, _ = depth_sets[name]
    bench = B.get_benchmark(name, root if kind == "folder" else tar, **_kw(name))
    got = _check(bench, expected)
    assert all(s.gt.dtype == np.float32 for s in got.values())


def test_nyu_eigen_box_and_range(depth_sets):
    root, _, expected, _ = depth_sets["nyu"]
    s = B.get_benchmark("nyu", root)[0]
    assert s.name == "test/bathroom_0001/rgb_0001.png"  # the train/ frame is not part of the eval
    assert s.rgb.shape == (480, 640, 3)
    assert not s.valid[:45].any() and not s.valid[471:].any()
    assert not s.valid[:, :41].any() and not s.valid[:, 601:].any()
    assert s.valid[45:471, 41:601].mean() > 0.7
    assert s.gt[100, 100] == pytest.approx(10.0) and not s.valid[100, 100]  # d < 10 is strict
    raw = np.asarray(Image.open(root / "test/bathroom_0001/depth_0001.png"))
    np.testing.assert_array_equal(s.gt, (raw / 1000.0).astype(np.float32))  # uint16 mm -> m
    rgb = np.asarray(Image.open(root / s.name))
    np.testing.assert_array_equal(s.rgb, rgb)


def test_kitti_kb_crop_eigen_box_and_none_lines(depth_sets):
    root, tar, _, base = depth_sets["kitti"]
    bench = B.get_benchmark("kitti", root)
    assert len(bench) == 1 and bench.skipped_without_gt == 1  # the frame without GT is not evaluated
    s = bench[0]
    assert s.rgb.shape == (352, 1216, 3) and s.gt.shape == (352, 1216)
    full = np.asarray(Image.open(root / s.name))
    np.testing.assert_array_equal(s.rgb, full[23:375, 13:1229])  # bottom-aligned, centred
    raw = np.asarray(Image.open(root / "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000005.png"))
    np.testing.assert_array_equal(s.gt, (raw / 256.0).astype(np.float32)[23:375, 13:1229])
    rows, cols = np.nonzero(s.valid)
    assert rows.min() >= 117 and rows.max() <= 320 and cols.min() >= 43 and cols.max() <= 1171
    assert not s.valid[(s.gt >= 80)].any()
    split = base / "kitti_eigen_test_files_with_gt.txt"
    for src in (root, tar):
        b = B.get_benchmark("kitti", src, split)
        assert len(b) == 1 and b.skipped_without_gt == 1  # 'None' lines dropped like the protocol


def test_eth3d_raw_float_buffer(depth_sets):
    root, _, expected, _ = depth_sets["eth3d"]
    s = B.get_benchmark("eth3d", root, depth_shape=F.ETH3D_SHAPE)[0]
    assert not s.valid[np.isinf(np.fromfile(root / "depth/courtyard_dslr_depth/courtyard/ground_truth_depth/"
                                                    "dslr_images/DSC_0286.JPG", "<f4").reshape(F.ETH3D_SHAPE))].any()
    assert (s.gt[~s.valid] == 0).all()
    # the reader's default is the real 4032x6048 buffer: a wrong size is an error naming the file
    with pytest.raises(ValueError, match="DSC_0286.JPG.*4032x6048"):
        B.get_benchmark("eth3d", root)[0]
    # depth_shape=None takes the RGB image's size
    np.testing.assert_array_equal(B.get_benchmark("eth3d", root, depth_shape=None)[0].gt, s.gt)
    assert B.ETH3D.alignment_max_res == 1024 and B.ETH3D.max_depth == np.inf


def test_diode_mask_file_only(depth_sets):
    root, _, expected, base = depth_sets["diode"]
    bench = B.get_benchmark("diode", root, base / "diode_val_all_filename_list.txt")
    got = _check(bench, expected)
    inside = [s for s in got.values() if s.valid[0, 0]]
    assert inside and all(s.gt[0, 0] == 400.0 for s in inside)  # > max_depth 350 yet valid


def test_split_files_match_discovery(depth_sets):
    lists = {"nyu": "nyu_filename_list_test.txt", "eth3d": "eth3d_filename_list.txt",
             "scannet": "scannet_val_sampled_list.txt", "diode": "diode_val_all_filename_list.txt"}
    for name, lst in lists.items():
        root, tar, expected, base = depth_sets[name]
        b = B.get_benchmark(name, tar, base / lst, **_kw(name))
        assert [e.rgb for e in b.entries] == sorted(expected)


def test_base_dir_with_usual_names(tmp_path, depth_sets):
    _, tar, _, _ = depth_sets["nyu"]
    (tmp_path / "nyuv2").mkdir()
    (tmp_path / "nyuv2" / "nyu_labeled_extracted.tar").write_bytes(tar.read_bytes())
    bench = B.get_benchmark("nyu", tmp_path)
    assert bench.root == tmp_path / "nyuv2" / "nyu_labeled_extracted.tar" and len(bench) == 1
    assert B.NYUv2.present_in(tmp_path) is not None and B.KITTI.present_in(tmp_path) is None


def test_normals_layouts(tmp_path):
    nyu = F.write_normals(tmp_path / "nyuv2" / "test")
    bench = B.get_benchmark("nyu_normal", tmp_path)  # base dir -> nyuv2/test
    got = _check(bench, nyu)
    s = next(iter(got.values()))
    assert s.gt.dtype == np.float32 and s.gt.shape == (24, 32, 3) and (~s.valid).any()
    scan = F.write_normals(tmp_path / "scannet", stems=("001170",), subdir="scene0001_01/")
    _check(B.get_benchmark("scannet_normal", tmp_path / "scannet"), scan)
    ib = F.write_normals(tmp_path / "ibims" / "ibims", stems=("corridor_01",))
    _check(B.get_benchmark("ibims", tmp_path), ib)
    oasis = F.write_normals(tmp_path / "oasis" / "val", stems=("268584_ALI",))
    tar = F.make_tar(tmp_path / "oasis" / "val", tmp_path / "oasis.tar")
    _check(B.get_benchmark("oasis", tar), oasis)


def test_diode_normals_share_the_depth_folder(tmp_path):
    root = tmp_path / "diode" / "val"
    root.mkdir(parents=True)
    F.write_diode(root, normals=True)
    normals = B.get_benchmark("diode_normal", tmp_path)
    depth = B.get_benchmark("diode", tmp_path)
    assert [e.rgb for e in normals.entries] == [e.rgb for e in depth.entries]
    s = normals[0]
    np.testing.assert_array_equal(s.gt, np.load(root / s.name.replace(".png", "_normal.npy")))


def test_p3m_layout(tmp_path):
    root = tmp_path / "P3M-10k" / "validation" / "P3M-500-NP"
    exp = F.write_p3m(root)
    bench = B.get_benchmark("p3m", tmp_path)
    assert bench.root == root
    got = _read_all(bench)
    assert sorted(got) == sorted(exp)  # .DS_Store ignored, sorted stems
    for name, (alpha, trimap) in exp.items():
        s = got[name]
        assert s.gt.dtype == np.float64
        np.testing.assert_array_equal(s.gt, alpha)
        np.testing.assert_array_equal(s.trimap, trimap)
        assert s.valid.all() and s.rgb.shape == alpha.shape + (3,)
    tar = F.make_tar(root, tmp_path / "p3m.tar")
    assert len(B.get_benchmark("p3m", tar)) == 2
    split = tmp_path / "list.txt"
    split.write_text("p_1f2e3d4c.jpg\n")
    assert [e.rgb for e in B.get_benchmark("p3m", root, split).entries] == ["original_image/p_1f2e3d4c.jpg"]


def test_segmentation_folder(tmp_path):
    exp = F.write_segmentation_folder(tmp_path)
    got = _check(B.get_benchmark("folder", tmp_path), exp)
    s = got["images/crack_01.png"]
    assert s.gt.dtype == bool and not s.gt[12, 2] and s.gt[13, 2]  # > 127 is foreground


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        B.get_benchmark("nyu", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no samples found.*rgb_NNNN"):
        B.get_benchmark("nyu", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset"):
        B.get_benchmark("middlebury", tmp_path)


def test_missing_gt_file_names_the_sample(tmp_path):
    F.write_scannet(tmp_path / "scannet")
    split = tmp_path / "scannet_val_sampled_list.txt"
    (tmp_path / "scannet" / "scene0011_00/depth/000100.png").unlink()
    bench = B.get_benchmark("scannet", tmp_path / "scannet", split)
    with pytest.raises(FileNotFoundError, match="scene0011_00/color/000100.jpg"):
        bench[0]


def test_a_tar_root_is_closed_by_close_or_when_the_reader_goes(depth_sets):
    import gc

    _, tar, _, _ = depth_sets["nyu"]
    bench = B.get_benchmark("nyu", tar)
    archive = bench.source._tar
    bench.close()
    assert archive.fileobj.closed
    bench.close()  # a second close does nothing
    bench = B.get_benchmark("nyu", tar)
    archive = bench.source._tar
    del bench
    gc.collect()
    assert archive.fileobj.closed  # no file left open for the interpreter to warn about (ResourceWarning)
