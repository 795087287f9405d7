"""KITTI depth (docs/protocols.md, "Depth benchmarks")."""


from __future__ import annotations


from .base import DepthBenchmark, _pair_by_regex


class KITTI(DepthBenchmark):
    """KITTI Eigen test split with depth-completion GT: uint16/256, KB crop, Eigen box."""

    name, title = "kitti", "KITTI"
    default_paths = ("kitti/kitti_eigen_split_test.tar", "kitti/kitti_eigen_split_test", "kitti")
    layout = ("YYYY_MM_DD/<drive>_sync/image_02/data/<frame>.png + "
              "<drive>_sync/proj_depth/groundtruth/image_02/<frame>.png (uint16 /256)")
    min_depth, max_depth = 1e-5, 80.0
    protocol_processing_res = 0
    crop = "KB crop 352x1216 (bottom, centred) on RGB and GT; eigen valid box on the cropped frame"
    valid_mask_rule = "1e-5 < d < 80 & eigen box (fractions of the KB-cropped frame)"
    KB_H, KB_W = 352, 1216

    def _discover(self, files):
        entries, missing = _pair_by_regex(
            files, r"(.*/)?\d{4}_\d{2}_\d{2}/([^/]+_sync)/image_02/data/(\d+)\.png",
            lambda m: f"{m[1] or ''}{m[2]}/proj_depth/groundtruth/image_02/{m[3]}.png")
        self.skipped_without_gt = missing
        return entries

    def _parse_split(self, lines):
        entries = super()._parse_split(lines)
        kept = [e for e in entries if e.gt != "None"]  # the 45 Eigen frames without GT
        self.skipped_without_gt = len(entries) - len(kept)
        return kept

    def _crop(self, arr):
        h, w = arr.shape[:2]
        if h < self.KB_H or w < self.KB_W:
            raise ValueError(f"frame {h}x{w} is smaller than the KB crop {self.KB_H}x{self.KB_W}")
        top, left = int(h - self.KB_H), int((w - self.KB_W) / 2)
        return arr[top:top + self.KB_H, left:left + self.KB_W]

    def _decode_depth(self, entry):
        return self._png_depth(entry.gt, 256.0)

    def _eval_box(self, h, w):
        return (slice(int(0.3324324 * h), int(0.91351351 * h)),
                slice(int(0.0359477 * w), int(0.96405229 * w)))
