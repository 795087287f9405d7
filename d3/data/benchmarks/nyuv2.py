"""NYUv2 depth (docs/protocols.md, "Depth benchmarks")."""


from __future__ import annotations


from .base import DepthBenchmark, _pair_by_regex


class NYUv2(DepthBenchmark):
    """NYUv2 labeled, Eigen test split: uint16 mm PNG, 1e-3 < d < 10, Eigen box [45:471, 41:601]."""

    name, title = "nyu", "NYU"
    default_paths = ("nyuv2/nyu_labeled_extracted.tar", "nyuv2/nyu_labeled_extracted", "nyuv2")
    layout = "test/<scene>/rgb_NNNN.png + depth_NNNN.png (uint16 mm), folder or nyu_labeled_extracted.tar"
    min_depth, max_depth = 1e-3, 10.0
    protocol_processing_res = 0
    crop = "eigen valid box rows 45..470, cols 41..600"
    valid_mask_rule = "1e-3 < d < 10 & eigen box [45:471, 41:601]"
    pred_name_mode = "rgb_id"

    def _discover(self, files):
        entries, _ = _pair_by_regex(files, r"(.*/)?rgb_(\d+)\.png", lambda m: f"{m[1] or ''}depth_{m[2]}.png")
        test = [e for e in entries if e.rgb.startswith("test/")]
        return test or entries  # the archive also holds train/: evaluate test/ when present

    def _decode_depth(self, entry):
        return self._png_depth(entry.gt, 1000.0)

    def _eval_box(self, h, w):
        return slice(45, 471), slice(41, 601)
