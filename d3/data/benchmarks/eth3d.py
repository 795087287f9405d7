"""ETH3D depth (docs/protocols.md, "Depth benchmarks")."""


from __future__ import annotations


import io
import math


import numpy as np
from PIL import Image


from .base import DepthBenchmark, _pair_by_regex


class ETH3D(DepthBenchmark):
    """ETH3D DSLR: the depth ``.JPG`` is a headerless float32 buffer (+inf = missing -> 0).

    ``depth_shape`` is the buffer's (H, W): the real 4032x6048 by default; ``None`` takes the RGB
    image's size (tests use small fixtures that way)."""

    name, title = "eth3d", "ETH3D"
    default_paths = ("eth3d/eth3d.tar", "eth3d/eth3d", "eth3d")
    layout = ("rgb/<scene>/images/dslr_images/X.JPG + "
              "depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/X.JPG (raw float32)")
    min_depth, max_depth = 1e-5, math.inf
    protocol_processing_res = 756
    alignment_max_res = 1024
    valid_mask_rule = "d > 1e-5 (finite)"
    HEIGHT, WIDTH = 4032, 6048

    def __init__(self, root, split=None, depth_shape: tuple[int, int] | None = (HEIGHT, WIDTH)) -> None:
        self.depth_shape = depth_shape
        super().__init__(root, split)

    def _discover(self, files):
        entries, _ = _pair_by_regex(
            files, r"(.*/)?rgb/([^/]+)/images/dslr_images/([^/]+\.(?i:jpg))",
            lambda m: f"{m[1] or ''}depth/{m[2]}_dslr_depth/{m[2]}/ground_truth_depth/dslr_images/{m[3]}")
        return entries

    def _decode_depth(self, entry):
        buf = np.frombuffer(self.source.read(entry.gt), dtype="<f4").copy()
        buf[buf == np.inf] = 0.0
        shape = self.depth_shape
        if shape is None:
            with Image.open(io.BytesIO(self.source.read(entry.rgb))) as im:
                shape = (im.height, im.width)
        if buf.size != shape[0] * shape[1]:
            raise ValueError(f"depth buffer {entry.gt} has {buf.size} float32 values, expected "
                             f"{shape[0]}x{shape[1]}")
        return buf.reshape(shape)
