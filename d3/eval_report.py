"""What `evaluate.py` prints and writes: the tables in the paper's columns and JSON-safe summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from d3.data.benchmarks import BENCHMARKS, GROUPS


def jsonable(x):
    """`x` with non-finite floats as JSON can hold them (NaN -> null, ±inf -> "inf" / "-inf")."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

# (metric key, column title, scale) per task; the paper's columns first.
TABLE_COLUMNS = {
    "depth": [("abs_rel", "AbsRel↓", 1), ("delta1", "δ1↑", 1), ("delta2", "δ2↑", 1), ("delta3", "δ3↑", 1),
              ("sq_rel", "SqRel↓", 1), ("rmse", "RMSE↓", 1), ("rmse_log", "RMSElog↓", 1),
              ("log10", "log10↓", 1), ("i_rmse", "iRMSE↓", 1), ("silog", "SILog↓", 1)],
    "normal": [("mean", "Mean↓", 1), ("median", "Med↓", 1), ("rmse", "RMSE↓", 1), ("a5", "5°↑", 1),
               ("a7_5", "7.5°↑", 1), ("a11_25", "11.25°↑", 1), ("a22_5", "22.5°↑", 1), ("a30", "30°↑", 1)],
    "matting": [("sad", "SAD↓", 1), ("mad", "MAD↓", 1), ("mse", "MSE↓", 1), ("conn", "CONN↓", 1),
                ("grad", "Grad↓", 1)],
    "segmentation": [("iou", "IoU↑", 1), ("pixel_acc", "PA↑", 1), ("dice", "Dice↑", 1)],
}
UNITS_NOTE = {
    "depth": "AbsRel and δ as fractions, as in the paper's Table 1 (Marigold prints them ×100); "
             "RMSE in m, iRMSE in 1/m, SILog ×100",
    "normal": "angles in degrees, thresholds in % (the paper's Table 2 prints Mean/100 and 11.25° as a fraction)",
    "matting": "SAD and CONN ÷1000, MAD and MSE raw fractions, Grad ÷10, as P3M and the paper's Table 3",
    "segmentation": "fractions, per-image mean, as in the paper's Tables 4 and 10-29",
}
GROUP_COLUMNS = {
    "all_depth": [("abs_rel", "AbsRel↓"), ("delta1", "δ1↑")],
    "all_normal": [("mean", "Mean↓"), ("median", "Med↓"), ("a11_25", "11.25°↑"), ("a22_5", "22.5°↑"),
                   ("a30", "30°↑")],
}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    if v != 0 and abs(v) < 1e-3 or abs(v) >= 1e5:
        return f"{v:.3e}"
    return f"{v:.4f}" if abs(v) <= 1 else f"{v:.3f}" if abs(v) < 100 else f"{v:.2f}"


def _render(header: list[list[str]], rows: list[list[str]]) -> str:
    all_rows = header + rows
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([*(line(h) for h in header), sep, *(line(r) for r in rows)])


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """One row per summary (all of one task) with the task's columns."""
    task = summaries[0]["task"]
    cols = TABLE_COLUMNS[task]
    head = ["Dataset", "N"] + [c[1] for c in cols]
    if task == "segmentation":
        head.append("Avg↑")
    rows = []
    for s in summaries:
        row = [BENCHMARKS[s["dataset"]].title, str(s["num_samples"])] + [_fmt(s.get(k)) for k, _, _ in cols]
        if task == "segmentation":
            row.append(_fmt(sum(s[k] for k, _, _ in cols) / len(cols)))
        rows.append(row)
    return f"[{UNITS_NOTE[task]}]\n" + _render([head], rows)


def format_group_table(group: str, summaries: dict[str, dict[str, Any]], label: str) -> str:
    """The paper's Table 1 / Table 2 layout: one column group per dataset, one row for the method."""
    names = GROUPS[group]
    cols = GROUP_COLUMNS[group]
    top, sub, vals = ["Method"], [""], [label]
    for name in names:
        title = BENCHMARKS[name].title
        n = summaries[name]["num_samples"] if name in summaries else 0
        for j, (key, ctitle) in enumerate(cols):
            top.append(f"{title} (N={n})" if j == 0 and name in summaries else (title if j == 0 else ""))
            sub.append(ctitle)
            vals.append(_fmt(summaries[name].get(key)) if name in summaries else "-")
    task = "depth" if group == "all_depth" else "normal"
    return f"[{UNITS_NOTE[task]}]\n" + _render([top, sub], [vals])


def report_skipped(summary: dict[str, Any], print_fn=print) -> None:
    """Name every sample --allow_invalid left out, so a partial average is never mistaken for a full one."""
    skipped = summary.get("skipped_invalid", {}).get("samples", {})
    for reason in skipped.values():
        print_fn(f"skipped: {reason}")
    nonfinite = summary.get("invalid", {}).get("samples_with_nonfinite", 0)
    if skipped or nonfinite:
        print_fn(f"{summary['dataset']}: {len(skipped)} samples skipped as invalid, {nonfinite} with non-finite "
                 f"values scored as 0; averages over {summary['num_samples']} samples (details in summary.json)")


# ----------------------------------------------------------------------------------------------
# Entry point used by evaluate.py
# ----------------------------------------------------------------------------------------------
