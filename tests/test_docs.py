"""The front page and the reference: README.md stays short, and every relative link of README.md and docs/*.md
(and the #anchor after it) leads to a file of the repository and a heading of that file.

Anchors are GitHub's: a heading's text, lower-cased, with everything but letters, digits, spaces, `-` and `_`
removed and spaces made `-`; a repeated heading gets `-1`, `-2`, ... Links inside code (fenced blocks, `inline`)
are not links and are skipped; so are absolute URLs (http, https, mailto).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
# the reference pages the front page sends its readers to (issue 20)
REFERENCE = ("training", "inference", "evaluation", "data", "multi-gpu", "performance", "fidelity", "protocols",
             "memory")

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+).+?\1", re.S)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (each replaced by spaces of its length's lines)."""
    text = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
    return INLINE_CODE.sub(lambda m: " " * len(m[0].replace("\n", " ")), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (markdown marks, links and inline code reduced to their text)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters (any script), digits, _
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m[1])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in `page`'s prose that is not an absolute URL."""
    text = prose(page.read_text(encoding="utf-8"))
    out = []
    for m in LINK.finditer(text):
        target = m[1]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        out.append((text.count("\n", 0, m.start()) + 1, target))
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per link of `page` that leads to no file of `root`, or to no heading of that file."""
    problems = []
    for line, target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(root)}:{line}: ({target})"
        if root not in dest.parents:
            problems.append(f"{where} points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file {dest.relative_to(root)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.quick
def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"


@pytest.mark.quick
@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    assert broken_links(ROOT / page) == []


@pytest.mark.quick
def test_front_page_links_every_reference_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in relative_links(ROOT / "README.md")}
    missing = [name for name in REFERENCE if (ROOT / "docs" / f"{name}.md").resolve() not in linked]
    assert missing == [], f"README.md links no docs/<name>.md for {missing}"


@pytest.mark.quick
def test_link_checker_sees_what_it_must(tmp_path):
    """The checker itself, on a page with one good and three bad links, and links in code that must be skipped."""
    tmp_path = tmp_path.resolve()
    (tmp_path / "other.md").write_text("# Other page\n## Sub-section: `x` (y)\n## Repeat\n## Repeat\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[ok](other.md#sub-section-x-y) [ok2](other.md#repeat-1) [self](#title) [web](https://x.org/a)\n"
        "[gone](missing.md) [bad anchor](other.md#nope)\n`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "![img](other.md)\n[no](#absent)\n")
    links = [t for _, t in relative_links(page)]
    assert links == ["other.md#sub-section-x-y", "other.md#repeat-1", "#title", "missing.md", "other.md#nope",
                     "other.md", "#absent"]
    problems = broken_links(page, tmp_path.resolve())
    assert [p.split(": (")[1].split(")")[0] for p in problems] == ["missing.md", "other.md#nope", "#absent"]


def test_figure_script_makes_the_panel(tmp_path):
    """docs/make_figure.py at the smallest sizes (1 teaching step, 1 training step per task): the three tiny models
    are trained and run through the project's own commands, and one PNG of four labelled tiles comes out."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    out = tmp_path / "figure.png"
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(photo)  # 40 wide, 48 high
    subprocess.run([sys.executable, str(ROOT / "docs" / "make_figure.py"), "--output", str(out), "--photo", str(photo),
                    "--teach_steps", "1", "--train_steps", "1", "--num_scenes", "4", "--processing_res", "32",
                    "--height", "60", "--workdir", str(tmp_path / "work")], check=True, timeout=900)
    panel = np.asarray(Image.open(out).convert("RGB"))
    tile_w, label_h, gap = 50, 22, 4  # each tile keeps the photo's aspect: 40x48 -> 50x60
    assert panel.shape == (60 + label_h, 4 * tile_w + 3 * gap, 3)
    tiles = [panel[label_h:, i * (tile_w + gap):i * (tile_w + gap) + tile_w] for i in range(4)]
    photo_tile = np.asarray(Image.open(photo).convert("RGB").resize((tile_w, 60), Image.BICUBIC))
    assert np.array_equal(tiles[0], photo_tile)  # the photograph first, as it is
    for name, tile in zip(("depth", "normals", "matte"), tiles[1:]):
        assert (tile != 255).any(), f"the {name} tile is blank"
    assert (panel[:label_h] != 255).any()  # the labels
    for task in ("depth", "normal", "matting"):  # each tile is infer.py's output of its own model
        assert (tmp_path / "work" / f"d3-{task}" / "d3_config.json").is_file()
