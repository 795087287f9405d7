"""ScanNet depth (docs/protocols.md, "Depth benchmarks")."""


from __future__ import annotations


from .base import DepthBenchmark, _pair_by_regex


class ScanNet(DepthBenchmark):
    """ScanNet 800 sampled validation frames: uint16 mm PNG, 1e-3 < d < 10, no crop."""

    name, title = "scannet", "ScanNet"
    default_paths = ("scannet/scannet_val_sampled_800_1.tar", "scannet/scannet_val_sampled_800_1", "scannet")
    layout = "sceneXXXX_YY/color/NNNNNN.jpg + sceneXXXX_YY/depth/NNNNNN.png (uint16 mm)"
    min_depth, max_depth = 1e-3, 10.0
    protocol_processing_res = 0
    valid_mask_rule = "1e-3 < d < 10"

    def _discover(self, files):
        entries, _ = _pair_by_regex(files, r"(.*/)?([^/]+)/color/(\d+)\.jpg",
                                    lambda m: f"{m[1] or ''}{m[2]}/depth/{m[3]}.png")
        return entries

    def _decode_depth(self, entry):
        return self._png_depth(entry.gt, 1000.0)
