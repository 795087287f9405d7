"""Held-out synthetic scenes as a depth benchmark (the quick start's and the tests')."""


from __future__ import annotations


import json
import math


from .base import DepthBenchmark, _pair_by_regex
from .storage import decode_npy


class SyntheticDepth(DepthBenchmark):
    """A folder written by ``python -m d3.data.synthetic`` (d3's plain training-folder layout): rgb/<name>.png +
    depth/<name>.npy (float32 metres, 0 = invalid). Valid: min_depth < d < max_depth from its d3_dataset.json
    (default 0 < d < inf); no crop; least-squares alignment, clipped to that range. For held-out scenes of the quick
    start and the tests, not a benchmark of the paper."""

    name, title = "synthetic", "synthetic"
    layout = "rgb/<name>.png + depth/<name>.npy (metres, 0 = invalid) [+ d3_dataset.json], as d3.data.synthetic writes"
    min_depth, max_depth = 0.0, math.inf
    protocol_processing_res = 0
    valid_mask_rule = "min_depth < d < max_depth of d3_dataset.json (default 0 < d < inf)"

    def __init__(self, root, split=None) -> None:
        super().__init__(root, split)
        if self.source.exists("d3_dataset.json"):

            meta = json.loads(self.source.read("d3_dataset.json"))
            self.min_depth = float(meta.get("min_depth", self.min_depth))
            self.max_depth = float(meta.get("max_depth", self.max_depth))

    def _discover(self, files):
        entries, _ = _pair_by_regex(files, r"rgb/(.+)\.png", lambda m: f"depth/{m[1]}.npy")
        return sorted(entries, key=lambda e: e.rgb)

    def _decode_depth(self, entry):
        return decode_npy(self.source.read(entry.gt))
