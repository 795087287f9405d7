"""Source mixing: the authors' per-epoch sampler (`--mixing official`) and the paper's with-replacement reading
(`--mixing paper`), their logged shares, and the flags that reach them through `build_training_data`."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

import train_depth
import train_normal
from d3.data.mixing import (
    OfficialMixSampler,
    PaperMixSampler,
    expected_shares,
    make_sampler,
)
from d3.training import build_parser
from d3.training_data import build_training_data

pytestmark = pytest.mark.quick

P = [0.76, 0.12, 0.12]


def sources_of(batch: list[int], sizes: list[int]) -> set[int]:
    """The sources a batch's ConcatDataset indices fall in, from the sizes alone."""
    bounds = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return {next(s for s, b in enumerate(bounds) if i < b) for i in batch}


def epoch_sources(sampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    out = []
    for batch in sampler:
        (source,) = sources_of(batch, sampler.sizes)  # one source per batch
        out.append(source)
    return out


# ------------------------------------------------------------------------------------------------------ official
def test_official_yields_every_full_batch_of_every_source_once_per_epoch():
    sizes = [41, 11, 10]  # 41 and 11 leave one sample over: drop_last per source
    sampler = OfficialMixSampler(sizes, P, batch_size=2, seed=0)
    assert len(sampler) == 20 + 5 + 5
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)  # the same every epoch
        assert all(len(b) == 2 and len(sources_of(b, sizes)) == 1 for b in batches)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen))  # no sample twice in an epoch
        per_source = Counter(next(iter(sources_of([i], sizes))) for i in seen)
        assert per_source == {0: 40, 1: 10, 2: 10}  # all but the incomplete last batch


def test_official_shares_follow_the_sizes_not_the_probabilities():
    sampler = OfficialMixSampler([40, 10, 10], P, batch_size=2, seed=1)
    assert sampler.expected_shares() == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert expected_shares("official", [40, 10, 10], P, 2) == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert expected_shares("paper", [40, 10, 10], P, 2) == pytest.approx(P)
    for epoch in range(5):
        assert Counter(epoch_sources(sampler, epoch)) == {0: 20, 1: 5, 2: 5}


def test_official_order_follows_the_probabilities():
    """Equal sizes, p 0.9 / 0.1: the likely source fills the start of the epoch, the unlikely one its end."""
    sampler = OfficialMixSampler([20, 20], [0.9, 0.1], batch_size=2, seed=0)
    first, last = Counter(), Counter()
    for epoch in range(40):
        order = epoch_sources(sampler, epoch)
        assert Counter(order) == {0: 10, 1: 10}
        first.update(order[:5])
        last.update(order[-5:])
    assert first[0] / sum(first.values()) > 0.8
    assert last[1] / sum(last.values()) > 0.8


def test_official_order_replays_from_seed_and_epoch():
    a = OfficialMixSampler([40, 10, 10], P, batch_size=2, seed=7)
    b = OfficialMixSampler([40, 10, 10], P, batch_size=2, seed=7)  # a resumed run builds a fresh sampler
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) == [batch for _, batch in a.epoch_batches(3)]
    assert [s for s, _ in a.epoch_batches(3)] == a.source_order(3)
    b.set_epoch(4)
    assert list(b) != list(a)
    c = OfficialMixSampler([40, 10, 10], P, batch_size=2, seed=8)
    c.set_epoch(3)
    assert list(c) != list(a)


def test_official_exhausted_source_drops_out_and_the_rest_follow():
    """A likely but small source runs out early; the epoch still yields every batch of the others."""
    sampler = OfficialMixSampler([4, 40], [0.99, 0.01], batch_size=2, seed=0)
    for epoch in range(10):
        order = epoch_sources(sampler, epoch)
        assert len(order) == len(sampler) == 22
        assert Counter(order) == {0: 2, 1: 20}
        assert max(i for i, s in enumerate(order) if s == 0) < 5  # gone within the first draws; source 1 fills the rest


def test_official_leaves_out_sources_without_a_full_batch_or_probability(caplog):
    caplog.set_level(logging.WARNING, logger="d3.train")
    sampler = OfficialMixSampler([1, 8, 6], [0.5, 0.5, 0.0], batch_size=2, seed=0, names=["tiny", "big", "off"])
    assert "tiny has 1 samples" in caplog.text
    assert len(sampler) == 4 and sampler.expected_shares() == [0.0, 1.0, 0.0]
    assert set(epoch_sources(sampler, 0)) == {1}


def test_official_without_any_full_batch_names_the_sources():
    with pytest.raises(ValueError, match=r"no training source has a full batch of 4 .*hypersim: 3 samples, coco: 2"):
        OfficialMixSampler([3, 2], [0.5, 0.5], batch_size=4, names=["hypersim", "coco"])


# --------------------------------------------------------------------------------------------------------- paper
def test_paper_shares_are_the_probabilities():
    sampler = PaperMixSampler([40, 10, 10], P, batch_size=2, seed=0)
    assert len(sampler) == 30
    counts = Counter()
    for epoch in range(200):
        batches = sampler.epoch_batches(epoch)
        assert len(batches) == 30 and all(sources_of(b, sampler.sizes) == {s} for s, b in batches)
        counts.update(s for s, _ in batches)
    total = sum(counts.values())
    assert [counts[i] / total for i in range(3)] == pytest.approx(P, abs=0.02)


def test_paper_mode_repeats_a_small_source_and_replays():
    sampler = PaperMixSampler([3, 30], [0.5, 0.5], batch_size=2, seed=2)
    batches = sampler.epoch_batches(0)
    small = [i for s, b in batches if s == 0 for i in b]
    assert len(small) > 3 and set(small) <= {0, 1, 2}  # more draws than samples: reshuffled and reused
    assert sampler.epoch_batches(0) == batches and sampler.epoch_batches(1) != batches
    with pytest.raises(ValueError, match="no samples"):
        PaperMixSampler([0, 4], [0.5, 0.5], batch_size=2, names=["empty", "full"])


# ------------------------------------------------------------------------------------------------ logged shares
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_running_shares_count_the_batches_the_run_has_seen(mode):
    sampler = make_sampler(mode, [12, 6, 4], P, batch_size=2, seed=3, names=["hypersim", "vkitti", "coco"])
    seen = Counter()
    n = 0
    for epoch in range(4):
        for source, _ in sampler.epoch_batches(epoch):
            seen[source] += 1
            n += 1
            if n % 5 == 0 or n == 4 * len(sampler):
                assert sampler.batch_counts(n) == [seen[i] for i in range(3)]
    fresh = make_sampler(mode, [12, 6, 4], P, batch_size=2, seed=3, names=["hypersim", "vkitti", "coco"])
    shares = fresh.running_shares(n)  # a resumed run computes the same from the step count alone
    assert shares == pytest.approx({f"mix/{k}": seen[i] / n for i, k in enumerate(["hypersim", "vkitti", "coco"])})
    merged = make_sampler(mode, [12, 6], [0.5, 0.5], batch_size=2, names=["coco", "coco"])
    assert merged.running_shares(7) == pytest.approx({"mix/coco": 1.0})  # same-named folders are summed


# ---------------------------------------------------------------------------------------------------- the flags
@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    from d3.data.synthetic import write_synthetic_dataset

    roots = []
    for name, n in (("hypersim", 8), ("vkitti", 4), ("coco", 4)):
        root = write_synthetic_dataset(tmp_path_factory.mktemp(name) / "data", n, 16, 16, seed=0, tasks=("depth",))
        meta = json.loads((root / "d3_dataset.json").read_text())
        (root / "d3_dataset.json").write_text(json.dumps({**meta, "source": name}))
        roots.append(str(root))
    return roots


def _args(roots, *extra):
    flags = [f for r in roots for f in ("--dataset", r)]
    return build_parser(train_depth.RECIPE).parse_args([*flags, "--resolution", "16", "--train_batch_size", "2",
                                                        *extra])


def test_mixing_flag_reaches_the_sampler(three_sources):
    args = _args(three_sources)
    assert args.mixing == "official" and args.hflip_prob == 0.0  # the authors apply no augmentation
    sources, probs, dataset, sampler = build_training_data(args, train_depth.RECIPE)
    assert [s.name for s in sources] == ["hypersim", "vkitti", "coco"] and probs == pytest.approx(P)
    assert isinstance(sampler, OfficialMixSampler) and len(sampler) == 4 + 2 + 2
    assert sampler.expected_shares() == pytest.approx([0.5, 0.25, 0.25])
    sampler.set_epoch(0)
    assert sorted(i for b in sampler for i in b) == list(range(len(dataset)))

    sources, probs, _, sampler = build_training_data(_args(three_sources, "--mixing", "paper"), train_depth.RECIPE)
    assert isinstance(sampler, PaperMixSampler) and sampler.expected_shares() == pytest.approx(P)
    # PROB sets the paper share; under official it only orders the batches
    args = _args([three_sources[0] + ":0.5", three_sources[2] + ":0.5"], "--mixing", "paper")
    assert build_training_data(args, train_depth.RECIPE)[3].expected_shares() == pytest.approx([0.5, 0.5])
    args = _args([three_sources[0] + ":0.5", three_sources[2] + ":0.5"])
    assert build_training_data(args, train_depth.RECIPE)[3].expected_shares() == pytest.approx([2 / 3, 1 / 3])


def test_no_full_batch_stops_with_the_sources_and_their_sizes(three_sources):
    with pytest.raises(SystemExit, match=r"full batch of 16 .*hypersim: 8 samples, vkitti: 4 samples, coco: 4"):
        build_training_data(_args(three_sources, "--train_batch_size", "16"), train_depth.RECIPE)
    _, _, _, sampler = build_training_data(_args(three_sources, "--train_batch_size", "16", "--mixing", "paper"),
                                           train_depth.RECIPE)
    assert len(sampler) == 3  # the paper reading refills small sources


def test_normal_defaults_are_the_authors_code_and_paper_mode_the_papers():
    assert train_normal.RECIPE.default_mixing == {"hypersim": 0.985, "sintel": 0.015}
    assert train_normal.RECIPE.paper_mixing == {"hypersim": 0.9, "sintel": 0.1}
    assert train_depth.RECIPE.paper_mixing is None  # depth's stated and coded shares agree


def test_training_logs_each_sources_running_share(three_sources, tiny_backbone_dir, tmp_path, one_thread, caplog):
    from d3.training import train

    caplog.set_level(logging.INFO, logger="d3.train")
    args = _args(three_sources, "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--output_dir",
                 str(tmp_path / "run"), "--gradient_accumulation_steps", "1", "--max_train_steps", "5",
                 "--lr_warmup_steps", "0", "--checkpointing_steps", "1000", "--report_to", "none",
                 "--dataloader_num_workers", "0", "--resolution", "32")
    result = train(args, train_depth.RECIPE)
    assert "mixing official: 8 batches per epoch" in caplog.text
    assert "p=0.760, expected share of batches per epoch 0.50" in caplog.text
    sampler = build_training_data(args, train_depth.RECIPE)[3]
    order = sampler.source_order(0)
    for row in result.history:
        n = row["step"]
        assert {k: v for k, v in row.items() if k.startswith("mix/")} == pytest.approx(
            {f"mix/{name}": order[:n].count(i) / n for i, name in enumerate(["hypersim", "vkitti", "coco"])})
