"""Writers of tiny evaluation benchmarks in their real on-disk layouts (docs/protocols.md, "Depth benchmarks",
"Normal benchmarks and metrics", "Matting (P3M-500-NP)").

Each writer builds a few samples with the real file formats (uint16 PNG depth, the headerless
float32 ETH3D buffer, DIODE ``.npy`` depth + mask, Marigold normals ``.npy``, P3M folders) and
returns what a reader should give back: ``{rgb relative path: (gt, valid mask)}``.
Sizes are the real ones where a fixed crop depends on them (NYU 480x640 for the Eigen box,
KITTI 375x1242 for the KB crop), tiny elsewhere. ETH3D's real buffer is 4032x6048 float32 (97 MB);
the fixture writes a 24x36 one and the reader is given ``depth_shape=ETH3D_SHAPE`` (the
reader's default is the real size).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

Expected = dict[str, tuple[np.ndarray, np.ndarray]]
ETH3D_SHAPE = (24, 36)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write_rgb(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(rgb).save(path, quality=95)
    else:
        Image.fromarray(rgb).save(path, compress_level=1)
    return rgb


def _write_u16(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint16)).save(path, compress_level=1)


def _holes(shape, seed: int, frac: float = 0.2) -> np.ndarray:
    return _rng(seed).random(shape) < frac


def make_tar(src: Path, dst: Path) -> Path:
    """An uncompressed tar created from inside the dataset root (members ``./<rel>``)."""
    with tarfile.open(dst, "w") as tar:
        tar.add(src, arcname=".")
    return dst


# ----------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------

def write_nyu(root: Path) -> Expected:
    """One test frame (+ one train frame that discovery must ignore); list with 3 columns."""
    exp: Expected = {}
    lines = []
    for split, scene, idx in (("test", "bathroom_0001", "0001"), ("train", "office_0003", "0002")):
        rgb_rel = f"{split}/{scene}/rgb_{idx}.png"
        _write_rgb(root / rgb_rel, 480, 640, seed=int(idx))
        mm = _rng(int(idx)).integers(500, 9500, (480, 640))
        mm[_holes(mm.shape, int(idx) + 10)] = 0
        mm[0, 0] = 12000  # beyond max_depth 10 m: invalid even inside... (outside the box anyway)
        mm[100, 100] = 10000  # exactly 10 m: invalid (strict <)
        _write_u16(root / f"{split}/{scene}/depth_{idx}.png", mm)
        _write_u16(root / f"{split}/{scene}/filled_{idx}.png", np.full_like(mm, 3000))
        if split == "test":
            d = (mm / 1000.0).astype(np.float32)
            box = np.zeros(d.shape, bool)
            box[45:471, 41:601] = True
            exp[rgb_rel] = (d, (d > 1e-3) & (d < 10) & box)
            lines.append(f"{rgb_rel} {split}/{scene}/depth_{idx}.png {split}/{scene}/filled_{idx}.png")
    (root.parent / "nyu_filename_list_test.txt").write_text("\n".join(lines) + "\n")
    return exp


def write_kitti(root: Path) -> Expected:
    """One 375x1242 frame with GT, one without (a ``None`` line in the split)."""
    h, w = 375, 1242
    drive = "2011_09_26_drive_0002_sync"
    rgb_rel = f"2011_09_26/{drive}/image_02/data/0000000005.png"
    gt_rel = f"{drive}/proj_depth/groundtruth/image_02/0000000005.png"
    _write_rgb(root / rgb_rel, h, w, seed=5)
    raw = _rng(5).integers(256, 85 * 256, (h, w))  # 1 m .. 85 m
    raw[_holes(raw.shape, 6, 0.7)] = 0  # sparse LiDAR
    _write_u16(root / gt_rel, raw)
    nogt_rel = f"2011_09_26/{drive}/image_02/data/0000000069.png"
    _write_rgb(root / nogt_rel, h, w, seed=69)
    d = (raw / 256.0).astype(np.float32)[23:375, 13:1229]  # KB crop: rows 23..374, cols 13..1228
    box = np.zeros(d.shape, bool)
    box[117:321, 43:1172] = True  # Eigen box on the 352x1216 crop
    (root.parent / "kitti_eigen_test_files_with_gt.txt").write_text(
        f"{rgb_rel} {gt_rel} 721.5377\n{nogt_rel} None 721.5377\n")
    return {rgb_rel: (d, (d > 1e-5) & (d < 80) & box)}


def write_eth3d(root: Path, shape: tuple[int, int] = ETH3D_SHAPE) -> Expected:
    h, w = shape
    scene = "courtyard"
    rgb_rel = f"rgb/{scene}/images/dslr_images/DSC_0286.JPG"
    gt_rel = f"depth/{scene}_dslr_depth/{scene}/ground_truth_depth/dslr_images/DSC_0286.JPG"
    _write_rgb(root / rgb_rel, h, w, seed=286)
    d = _rng(286).uniform(0.5, 60.0, (h, w)).astype(np.float32)
    d[_holes(d.shape, 287, 0.3)] = np.inf  # missing
    d[0, :3] = 0.0
    (root / gt_rel).parent.mkdir(parents=True, exist_ok=True)
    d.astype("<f4").tofile(root / gt_rel)  # headerless little-endian float32, row-major
    gt = np.where(np.isinf(d), 0, d).astype(np.float32)
    (root.parent / "eth3d_filename_list.txt").write_text(f"{rgb_rel} {gt_rel}\n")
    return {rgb_rel: (gt, gt > 1e-5)}


def write_scannet(root: Path) -> Expected:
    exp: Expected = {}
    lines = []
    for scene, fid in (("scene0011_00", "000100"), ("scene0015_00", "001200")):
        rgb_rel, gt_rel = f"{scene}/color/{fid}.jpg", f"{scene}/depth/{fid}.png"
        _write_rgb(root / rgb_rel, 48, 64, seed=int(fid))
        mm = _rng(int(fid)).integers(300, 11000, (48, 64))
        mm[_holes(mm.shape, 3)] = 0
        _write_u16(root / gt_rel, mm)
        d = (mm / 1000.0).astype(np.float32)
        exp[rgb_rel] = (d, (d > 1e-3) & (d < 10))
        lines.append(f"{rgb_rel} {gt_rel}")
    (root.parent / "scannet_val_sampled_list.txt").write_text("\n".join(lines) + "\n")
    return exp


def write_diode(root: Path, normals: bool = False) -> Expected:
    """Indoor + outdoor scan; depth HxWx1 float32 ``.npy``, mask ``.npy``; optionally normals."""
    exp: Expected = {}
    lines = []
    for i, (io_, scene, scan) in enumerate((("indoors", "scene_00019", "scan_00183"),
                                             ("outdoor", "scene_00022", "scan_00193"))):
        stem = f"{io_}/{scene}/{scan}/{scene[6:]}_{scan[5:]}_{io_}_000_010"
        _write_rgb(root / f"{stem}.png", 24, 32, seed=40 + i)
        d = _rng(40 + i).uniform(0.7, 300.0, (24, 32, 1)).astype(np.float32)
        mask = ~_holes((24, 32), 50 + i, 0.25)
        d[0, 0, 0] = 400.0 if mask[0, 0] else d[0, 0, 0]  # out of [0.6, 350] yet valid: the mask rules
        np.save(root / f"{stem}_depth.npy", d)
        np.save(root / f"{stem}_depth_mask.npy", mask.astype(np.float32))
        if normals:
            np.save(root / f"{stem}_normal.npy", random_normals((24, 32), 60 + i))
        exp[f"{stem}.png"] = (d[..., 0], mask)
        lines.append(f"{stem}.png {stem}_depth.npy {stem}_depth_mask.npy")
    (root.parent / "diode_val_all_filename_list.txt").write_text("\n".join(lines) + "\n")
    return exp


# ----------------------------------------------------------------------------------------------
# Normals
# ----------------------------------------------------------------------------------------------

def random_normals(shape: tuple[int, int], seed: int, invalid_frac: float = 0.2) -> np.ndarray:
    """Unit vectors facing the camera (z > 0), zero vectors where invalid; float32 HxWx3."""
    r = _rng(seed)
    n = r.normal(size=shape + (3,))
    n[..., 2] = np.abs(n[..., 2]) + 0.2
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[r.random(shape) < invalid_frac] = 0
    return n.astype(np.float32)


def write_normals(root: Path, stems=("000000", "000001"), shape=(24, 32), subdir: str = "") -> Expected:
    """Marigold-Normals layout: ``<stem>_img.png`` + ``<stem>_normal.npy`` (HxWx3)."""
    exp: Expected = {}
    for i, stem in enumerate(stems):
        rel = f"{subdir}{stem}_img.png"
        _write_rgb(root / rel, *shape, seed=70 + i)
        n = random_normals(shape, 80 + i)
        np.save(root / f"{subdir}{stem}_normal.npy", n)
        exp[rel] = (n, np.linalg.norm(n, axis=-1) > 0)
    return exp


# ----------------------------------------------------------------------------------------------
# Matting and segmentation
# ----------------------------------------------------------------------------------------------

def write_p3m(root: Path, stems=("p_0a1b2c3d", "p_1f2e3d4c"), shape=(20, 28)) -> Expected:
    """P3M-500-NP: original_image/*.jpg, mask/*.png (8-bit alpha), trimap/*.png (0/128/255)."""
    exp: Expected = {}
    for i, stem in enumerate(stems):
        _write_rgb(root / "original_image" / f"{stem}.jpg", *shape, seed=90 + i)
        alpha = np.zeros(shape, np.uint8)
        alpha[4:16, 6:22] = 255
        alpha[3, 6:22] = 128
        alpha[16, 6:22] = _rng(i).integers(0, 256, 16)
        trimap = np.zeros(shape, np.uint8)
        trimap[3:17, 5:23] = 128
        trimap[5:15, 8:20] = 255
        for d, a in (("mask", alpha), ("trimap", trimap)):
            (root / d).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / d / f"{stem}.png")
        exp[f"original_image/{stem}.jpg"] = (alpha / 255.0, trimap)
    (root / "original_image" / ".DS_Store").write_bytes(b"hidden")  # must be ignored
    return exp


def write_segmentation_folder(root: Path, names=("crack_01", "crack_02"), shape=(16, 20)) -> Expected:
    exp: Expected = {}
    for i, name in enumerate(names):
        _write_rgb(root / "images" / f"{name}.png", *shape, seed=100 + i)
        m = np.zeros(shape, np.uint8)
        m[3:10, 4 + i:15] = 255
        m[12, 2] = 127  # not foreground (> 127 is)
        m[13, 2] = 128  # foreground
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "masks" / f"{name}.png")
        exp[f"images/{name}.png"] = (m > 127, np.ones(shape, bool))
    return exp


WRITERS = {
    "nyu": write_nyu, "kitti": write_kitti, "eth3d": write_eth3d, "scannet": write_scannet,
    "diode": write_diode,
}
