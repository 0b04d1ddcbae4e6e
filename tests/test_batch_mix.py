"""The official batch mix (``data.pairing=official``): per-epoch type counts and order, the epoch length rule, the
first / second position structure (ba delivered source first), ranks, skipped aa batches, resume, and the batches
the datamodule serves."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from configs import small_data_config, typed_train

from dgnetpp_pl.config import ConfigError
from dgnetpp_pl.data import torch_datasets
from dgnetpp_pl.data.batch_mix import MixSampler
from dgnetpp_pl.data.datamodule import CrossDomainDataModule
from dgnetpp_pl.label_store import PseudoLabelStore
from dgnetpp_pl.schedule import AdaptSchedule

B = 4
WARMUP = AdaptSchedule("adapt", warmup_epochs=5, pairing="official")
SELF_TRAINING = AdaptSchedule("adapt", warmup_epochs=0, pairing="official")


def sampler(
    num_source: int,
    num_target: int,
    seed: int = 0,
    schedule: AdaptSchedule = WARMUP,
    labels: np.ndarray | None = None,
    **kwargs: object,
) -> MixSampler:
    store = PseudoLabelStore()
    if labels is not None:
        store.update(labels, for_epoch=0)
    kwargs = {"xx_port": 0.9, "ab_port": 0.1, **kwargs}
    return MixSampler(
        np.arange(num_source) % 17, store, num_target, B, seed, schedule=schedule, **kwargs
    )  # fmt: skip


def official_length(num_source: int, num_target: int, ab_port: float = 0.1) -> dict[str, int]:
    """The official get_mix_data_loaders index counts, written out: ab_num and xx_num images per kind."""
    n = min(num_source, num_target)
    ab_num = math.floor(ab_port * n) // B * B
    xx_num = (n - ab_num) // B * B
    return {"aa": xx_num // B, "bb": xx_num // B, "ab": ab_num // B, "ba": ab_num // B}


@pytest.mark.parametrize(("num_source", "num_target"), [(403, 250), (250, 403), (97, 97)])
def test_type_counts_match_the_config_within_one_batch_and_the_length_follows_the_rule(
    num_source: int, num_target: int
) -> None:
    expected = official_length(num_source, num_target)
    n = min(num_source, num_target)
    for seed in range(4):
        s = sampler(num_source, num_target, seed=seed)
        batches = s.epoch_batches()
        counts = Counter(b.drawn_as for b in batches)
        assert dict(counts) == {k: v for k, v in expected.items() if v}
        assert len(s) == len(batches) == sum(expected.values())
        assert abs(len(batches) - 2 * n / B) <= 2  # about 2 min(N_s, N_t) / B
        for kind, share in (("aa", 0.45), ("bb", 0.45), ("ab", 0.05), ("ba", 0.05)):
            assert abs(counts[kind] - share * len(batches)) <= 1, (kind, counts, len(batches))


def test_other_shares_move_the_counts() -> None:
    counts = Counter(b.drawn_as for b in sampler(400, 400, xx_port=0.6, ab_port=0.4).epoch_batches())
    assert counts == {"aa": 60, "bb": 60, "ab": 40, "ba": 40}


def test_every_batch_holds_one_type_and_each_image_one_first_and_one_second_place() -> None:
    num_source, num_target = 203, 150
    batches = sampler(num_source, num_target, seed=3).epoch_batches()
    places: dict[tuple[str, str], list[int]] = {(d, p): [] for d in ("source", "target") for p in ("1st", "2nd")}
    for batch in batches:
        keys = batch.keys
        if batch.drawn_as in ("aa", "bb"):
            assert len(keys) == 2 * B
            domain, other = ("source", "target") if batch.drawn_as == "aa" else ("target", "source")
            assert all(getattr(k, other) == -1 and getattr(k, f"{other}_pos") == -1 for k in keys)
            places[domain, "1st"] += [getattr(k, domain) for k in keys[:B]]
            places[domain, "2nd"] += [getattr(k, domain) for k in keys[B:]]
        else:
            assert len(keys) == B and all(k.source >= 0 and k.target >= 0 for k in keys)
            # ab: source from the first position, target from the second; ba: target first, source second,
            # delivered source first all the same.
            src_place, tgt_place = ("1st", "2nd") if batch.drawn_as == "ab" else ("2nd", "1st")
            places["source", src_place] += [k.source for k in keys]
            places["target", tgt_place] += [k.target for k in keys]
        assert batch.batch_type == ("ab" if batch.drawn_as == "ba" else batch.drawn_as)
    for (domain, place), images in places.items():
        size = num_source if domain == "source" else num_target
        assert len(images) == len(set(images)), f"a {domain} image twice in the {place} place"
        assert all(0 <= i < size for i in images)
    # The larger domain is subsampled to n = min(N_s, N_t) images, which both places draw from.
    assert set(places["source", "1st"]) | set(places["source", "2nd"]) <= set(range(num_source))
    assert len(set(places["source", "1st"]) | set(places["source", "2nd"])) <= min(num_source, num_target)


def test_the_order_is_seeded_by_seed_and_epoch() -> None:
    a, b = sampler(200, 200, seed=1), sampler(200, 200, seed=1)
    assert a.epoch_batches() == b.epoch_batches()
    b.set_epoch(1)
    assert [x.drawn_as for x in a.epoch_batches()] != [x.drawn_as for x in b.epoch_batches()]
    assert sampler(200, 200, seed=2).epoch_batches() != a.epoch_batches()


def test_ranks_draw_the_same_types_and_disjoint_batches() -> None:
    ranks = [sampler(301, 260, seed=5, num_replicas=3, rank=r) for r in range(3)]
    epochs = [r.epoch_batches() for r in ranks]
    assert len({len(e) for e in epochs}) == 1 and all(len(r) == len(e) for r, e in zip(ranks, epochs, strict=True))
    for step in zip(*epochs, strict=True):
        assert len({b.drawn_as for b in step}) == 1, "every rank trains the same type at a step"
    counts = official_length(301, 260)
    assert len(epochs[0]) == sum(c // 3 for c in counts.values())
    for kind in ("aa", "bb", "ab", "ba"):
        keys = [k for e in epochs for b in e if b.drawn_as == kind for k in b.keys]
        assert len(set(keys)) == len(keys), f"{kind}: ranks share a pair"
    with pytest.raises(ValueError, match="rank 3"):
        sampler(10, 10, num_replicas=3, rank=3)


def test_usable_targets_set_the_length_with_drop_target_outliers() -> None:
    labels = np.full(300, -1)
    labels[:90] = np.arange(90) % 9
    kept = sampler(300, 300, labels=labels, drop_target_outliers=True)
    assert len(kept) == sum(official_length(300, 90).values())
    targets = {k.target for b in kept.epoch_batches() for k in b.keys if k.target >= 0}
    assert targets <= set(range(90))
    assert len(sampler(300, 300, labels=labels)) == sum(official_length(300, 300).values())


def test_self_training_marks_aa_batches_skipped_and_the_dataset_loads_nothing_for_them(monkeypatch) -> None:
    warm, self_training = sampler(120, 120).epoch_batches(), sampler(120, 120, schedule=SELF_TRAINING).epoch_batches()
    assert [b.drawn_as for b in warm] == [b.drawn_as for b in self_training]  # still drawn, still counted
    assert not any(b.skipped for b in warm)
    assert all(b.skipped == (b.drawn_as == "aa") for b in self_training)

    def no_loading(path: str) -> None:
        raise AssertionError(f"a skipped batch loaded {path}")

    monkeypatch.setattr(torch_datasets, "load_image", no_loading)
    dataset = torch_datasets.MixedBatchDataset(torch_datasets.PairedTrainDataset([], [], transform=None))
    skipped = next(b for b in self_training if b.skipped)
    assert dataset[skipped] == {"skip": "aa"}
    no_skip = AdaptSchedule("adapt", warmup_epochs=0, pairing="official", aa_drop=False)
    assert not any(b.skipped for b in sampler(120, 120, schedule=no_skip).epoch_batches())


# ----------------------------------------------------------------------------------------- the datamodule
def make_dm(data_dir: Path, schedule: AdaptSchedule = WARMUP, **data: object) -> CrossDomainDataModule:
    dm = CrossDomainDataModule(small_data_config(data_dir, pairing="official", **data), schedule=schedule)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_the_datamodule_serves_type_homogeneous_batches(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir)
    n_target = len(dm.target_train_records)
    labels = np.arange(n_target) % 5
    dm.labels.update(labels, for_epoch=0)
    loader = dm.train_dataloader()
    keys = loader.sampler.epoch_batches()
    batches = list(loader)
    assert len(batches) == len(loader) == len(keys) and {k.drawn_as for k in keys} == {"aa", "bb", "ab", "ba"}
    source_pids = [r.pid for r in dm.source_train_records]
    for key, batch in zip(keys, batches, strict=True):
        domains = {"aa": {"source"}, "bb": {"target"}, "ab": {"source", "target"}, "ba": {"source", "target"}}
        assert set(batch) == domains[key.drawn_as]
        per_domain = 2 * B if key.drawn_as in ("aa", "bb") else B
        for domain, part in batch.items():
            assert part["image"].shape == (per_domain, 3, 32, 16) and part["pos"].shape == part["image"].shape
            index = part["index"].numpy()
            expected = [source_pids[i] for i in index] if domain == "source" else labels[index].tolist()
            assert part["label"].tolist() == expected, f"{key.drawn_as}: {domain} labels"
            assert index.tolist() == [getattr(k, domain) for k in key.keys]


def test_the_datamodule_draws_the_official_mix_only_with_pairing_official(synthetic_data_dir: Path) -> None:
    cross = CrossDomainDataModule(small_data_config(synthetic_data_dir))
    cross.prepare_data()
    cross.setup("fit")
    assert set(next(iter(cross.train_dataloader()))) == {"source", "target"}
    assert not isinstance(cross.train_dataloader().sampler, MixSampler)
    assert isinstance(make_dm(synthetic_data_dir).train_dataloader().sampler, MixSampler)
    with pytest.raises(ValueError, match="pairing 'cross'.*data.pairing='official'"):
        CrossDomainDataModule(small_data_config(synthetic_data_dir, pairing="official"), schedule=AdaptSchedule())


def test_a_restored_mix_loader_continues_the_epoch(synthetic_data_dir: Path) -> None:
    dm = make_dm(synthetic_data_dir, schedule=SELF_TRAINING)
    dm.labels.update(np.arange(len(dm.target_train_records)) % 3, for_epoch=0)
    full = dm.train_dataloader()
    first = iter(full)
    seen = [next(first) for _ in range(3)]
    state = full.state_dict()
    assert state == {"batches": 3}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    whole = list(dm.train_dataloader())
    assert len(seen) + len(rest) == len(whole)
    for got, want in zip(seen + rest, whole, strict=True):
        assert got.keys() == want.keys()
        if "skip" in want:
            assert got == want
            continue
        for domain in want:
            assert all(torch.equal(got[domain][k], want[domain][k]) for k in want[domain])
    assert any("skip" in b for b in whole)


def test_bad_mix_settings_name_the_keys() -> None:
    with pytest.raises(ConfigError, match=r"data.xx_port=0.9 and data.ab_port=0.2 must sum to 1.*xx_port=0.8"):
        typed_train("experiment=demo", "data.pairing=official", "data.ab_port=0.2")
    with pytest.raises(ConfigError, match="data.pairing"):
        typed_train("experiment=demo", "data.pairing=mixed")
    assert typed_train("experiment=demo", "data.xx_port=0.8", "data.ab_port=0.2").data.ab_port == 0.2


@pytest.mark.parametrize("pairing", ["official", "cross"])
def test_a_new_train_loader_starts_at_the_epoch_lightning_is_about_to_run(
    synthetic_data_dir: Path, pairing: str
) -> None:
    """A resumed run trains on the loader iterator Lightning builds before it calls ``set_epoch``, and loader
    workers draw their first batches as that iterator is built: the loader must already be at the right epoch."""
    if pairing == "official":
        dm = make_dm(synthetic_data_dir, schedule=SELF_TRAINING)
    else:
        dm = CrossDomainDataModule(small_data_config(synthetic_data_dir))
        dm.prepare_data()
        dm.setup("fit")
    dm.labels.update(np.arange(len(dm.target_train_records)) % 3, for_epoch=0)
    progress = SimpleNamespace(current=SimpleNamespace(processed=2, completed=2))
    dm.trainer = SimpleNamespace(
        current_epoch=2, world_size=1, global_rank=0, fit_loop=SimpleNamespace(epoch_progress=progress)
    )
    assert dm.train_dataloader().sampler.epoch == 2
    dm.config.num_workers = 2
    with_workers = iter(dm.train_dataloader())  # the workers draw from the sampler here, before any set_epoch
    dm.config.num_workers = 0
    dm.trainer = None  # an epoch-0 loader, then told its epoch as Lightning does
    reference = dm.train_dataloader()
    reference.sampler.set_epoch(2)
    wanted = list(reference)
    for want in wanted[:3]:
        got = next(with_workers)
        assert got.keys() == want.keys()
        if "skip" in want:
            assert got == want
            continue
        for domain in want:
            assert all(torch.equal(got[domain][k], want[domain][k]) for k in ("image", "label", "index"))
