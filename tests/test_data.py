"""Contracts of kdedge.train.data: splits, loaders, DatasetInfo, preprocess, readers, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from kdedge.bundle.inputs import InputError
import torch
from torchvision.transforms import v2

from kdedge.train.data import (
    DATASETS,
    DataConfig,
    DataError,
    DatasetInfo,
    EpochSampler,
    LabelledBatchSampler,
    ShardSampler,
    load_data,
    make_loader,
    preprocess,
    set_loader_epoch,
)
from kdedge.train.labels import IGNORE_INDEX

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mnist() -> tuple[DataConfig, dict[int, object]]:
    """mnist5k splits for seeds 0 and 1, loaded once for the module."""
    cfg = DataConfig(name="mnist5k")
    return cfg, {s: load_data(cfg, s) for s in (0, 1)}


def _synthetic(**kw: object) -> DataConfig:
    return DataConfig(name="synthetic", **kw)  # type: ignore[arg-type]


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar10(folder: Path, per_batch: int = 6, test: int = 8) -> dict[str, np.ndarray]:
    """The official cifar-10-batches-py layout with a few random images per batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written: dict[str, np.ndarray] = {}
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(per_batch) + (i - 1) * per_batch) % 10]
        # the first batch with bytes keys (as a pickle read with encoding="bytes" would have them)
        entry = {b"data": data, b"labels": labels} if i == 1 else {"data": data, "labels": labels, "batch_label": "x"}
        _write_pickle(folder / f"data_batch_{i}", entry)
        written[f"data_batch_{i}"] = data
    data = rng.integers(0, 256, size=(test, 3072), dtype=np.uint8)
    _write_pickle(folder / "test_batch", {"data": data, "labels": [int(v) for v in np.arange(test) % 10]})
    written["test_batch"] = data
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return written


def _png_tree(root: Path, sizes: dict[str, int], rng: np.random.Generator) -> None:
    from PIL import Image

    for split, n in sizes.items():
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))  # odd shapes: resize + crop matter
                Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")


def _index_sets(s: object) -> dict[str, set[int]]:
    out = {k: set(getattr(s, k).indices.tolist()) for k in ("train", "val", "test")}
    if s.unlabelled is not None:  # type: ignore[attr-defined]
        out["unlabelled"] = set(s.unlabelled.indices.tolist())  # type: ignore[attr-defined]
    return out


# ---------------------------------------------------------------- splits


def test_mnist5k_splits_are_stratified_disjoint_and_cover_the_dataset(mnist: tuple) -> None:
    _, by_seed = mnist
    s = by_seed[0]
    assert s.info.num_classes == 10 and s.info.input_size == (28, 28) and s.info.in_channels == 1
    # 500 a class: test 100 a class, val 10 % of the remaining 400, train the rest
    assert s.test.class_counts(10).tolist() == [100] * 10
    assert s.val.class_counts(10).tolist() == [40] * 10
    assert s.train.class_counts(10).tolist() == [360] * 10
    sets = _index_sets(s)
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert len(sets["train"] | sets["val"] | sets["test"]) == 5000
    # scale 1/255 is right when the statistics land on MNIST's well-known ones (0.1307, 0.3081)
    assert abs(s.info.mean[0] - 0.1307) < 0.01 and abs(s.info.std[0] - 0.3081) < 0.01
    x, y = s.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    assert y.dtype == torch.int64 and y.ndim == 0


def test_splits_deterministic_per_seed_and_differ_across_seeds(mnist: tuple) -> None:
    cfg, by_seed = mnist
    again = load_data(cfg, 0)
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(again, k).indices, getattr(by_seed[0], k).indices)
    assert again.info == by_seed[0].info
    assert not np.array_equal(by_seed[0].val.indices, by_seed[1].val.indices)
    assert not np.array_equal(by_seed[0].train.indices, by_seed[1].train.indices)
    # the carved test split is fixed like an official one: every seed tests on the same images
    assert np.array_equal(by_seed[0].test.indices, by_seed[1].test.indices)


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, b, c = (load_data(_synthetic(), s) for s in (3, 3, 4))
    assert torch.equal(a.train.source.images, b.train.source.images)
    assert not torch.equal(a.train.source.images, c.train.source.images)
    # a nearest-class-mean classifier on the raw pixels separates the classes
    imgs = a.train.source.images.flatten(1).double()
    means = torch.stack([imgs[a.train.indices[a.train.targets == k]].mean(0) for k in range(4)])
    test_x = imgs[a.test.indices]
    pred = torch.cdist(test_x, means).argmin(1).numpy()
    assert (pred == a.test.targets).mean() > 0.9


def test_per_class_is_exact_and_the_rest_becomes_the_unlabelled_pool() -> None:
    cfg = _synthetic(per_class=7, unlabelled=True, synthetic_samples=200)
    s = load_data(cfg, 0)
    assert s.train.class_counts(4).tolist() == [7] * 4
    full = load_data(_synthetic(synthetic_samples=200), 0)  # same seed without per_class
    assert np.array_equal(np.sort(np.concatenate([s.train.indices, s.unlabelled.indices])), full.train.indices)
    assert np.array_equal(s.val.indices, full.val.indices) and np.array_equal(s.test.indices, full.test.indices)
    sets = _index_sets(s)
    names = list(sets)
    assert all(not sets[p] & sets[q] for i, p in enumerate(names) for q in names[i + 1 :])


def test_train_set_hides_the_labels_of_the_unlabelled_pool() -> None:
    cfg = _synthetic(per_class=5, unlabelled=True)
    s = load_data(cfg, 1)
    ts = s.train_set(cfg)
    assert len(ts) == len(s.train) + len(s.unlabelled)
    ys = torch.stack([ts[i][1] for i in range(len(ts))])
    assert (ys[: len(s.train)] >= 0).all() and (ys[len(s.train) :] == IGNORE_INDEX).all()
    assert s.unlabelled.targets.min() >= 0  # the pool itself keeps its true labels for analysis
    assert s.train_set(_synthetic(per_class=5)) is s.train


def test_per_class_too_large_names_the_class() -> None:
    with pytest.raises(DataError, match=r"per_class=60 .*class 'class0' has only"):
        load_data(_synthetic(per_class=60), 0)


# ---------------------------------------------------------------- loaders


def _epoch(loader: torch.utils.data.DataLoader, seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    torch.manual_seed(seed * 1000 + epoch)  # what the training engine does at each epoch start
    return list(loader)


def test_loader_order_is_a_function_of_seed_and_epoch() -> None:
    s = load_data(_synthetic(), 0)
    a = make_loader(s.train, 16, train=True, seed=5)
    first = [_epoch(a, 5, e) for e in range(3)]
    # a fresh loader resumed at epoch 2 sees exactly the batches (augmentation included)
    resumed = _epoch(make_loader(s.train, 16, train=True, seed=5), 5, 2)
    assert len(resumed) == len(first[2]) == len(s.train) // 16  # drop_last by default when training
    for (x1, y1), (x2, y2) in zip(first[2], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    y_of = lambda batches: torch.cat([y for _, y in batches])  # noqa: E731
    assert not torch.equal(y_of(first[0]), y_of(first[1]))
    other_seed = _epoch(make_loader(s.train, 16, train=True, seed=6), 5, 0)
    assert not torch.equal(y_of(first[0]), y_of(other_seed))
    # the order does not depend on the global RNG
    assert list(EpochSampler(50, 3)) == (torch.manual_seed(99), list(EpochSampler(50, 3)))[1]


def test_worker_processes_repeat_the_augmented_batches() -> None:
    s = load_data(_synthetic(), 0)
    runs = [_epoch(make_loader(s.train, 32, train=True, seed=1, num_workers=2), 1, 3) for _ in range(2)]
    assert len(runs[0]) == len(s.train) // 32
    for (x1, y1), (x2, y2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    single = _epoch(make_loader(s.train, 32, train=True, seed=1), 1, 3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(runs[0], single))  # same order as in one process


def test_eval_loader_keeps_order_and_last_batch() -> None:
    s = load_data(_synthetic(), 0)
    loader = make_loader(s.test, 10, train=False)
    ys = torch.cat([y for _, y in loader])
    assert ys.tolist() == s.test.targets.tolist()
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_distributed_loader_matches_single_process_with_one_rank(tmp_path: Path) -> None:
    import torch.distributed as dist

    s = load_data(_synthetic(), 0)
    with pytest.raises(DataError, match="process group"):
        make_loader(s.train, 8, train=True, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = make_loader(s.train, 8, train=True, seed=2, distributed=True)
        single = make_loader(s.train, 8, train=True, seed=2)
        for e in (0, 4):
            ddp.sampler.set_epoch(e)
            single.sampler.set_epoch(e)
            assert list(ddp.sampler) == list(single.sampler)
    finally:
        dist.destroy_process_group()



# ---------------------------------------------------------------- fixed labelled images per batch


@pytest.fixture(scope="module")
def semi() -> tuple[DataConfig, object]:
    """digits with 10 labelled images per class (100) and the rest (1,193) as the unlabelled pool."""
    cfg = DataConfig(name="digits", per_class=10, unlabelled=True, batch_size=64, labelled_per_batch=16)
    return cfg, load_data(cfg, 0)


def _batches(sampler: LabelledBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_batch_holds_exactly_k_labelled_images(semi: tuple) -> None:
    cfg, s = semi
    ds = s.train_set(cfg)
    loader = make_loader(ds, cfg.batch_size, train=True, seed=3, labelled_per_batch=cfg.labelled_per_batch)
    set_loader_epoch(loader, 2)
    ys = [y for _, y in loader]
    n_u = len(s.unlabelled)
    assert len(ys) == len(loader) == n_u // 48  # one pass over the unlabelled pool, last partial batch dropped
    for y in ys:
        assert len(y) == 64 and int((y != IGNORE_INDEX).sum()) == 16
    # the loader yields the batches its batch sampler lists, and the labels it shows are the true ones
    batches = list(loader.batch_sampler)
    assert all(torch.equal(y, torch.as_tensor(ds.targets[b])) for y, b in zip(ys, batches))
    # the labelled set is cycled evenly: 24 * 16 = 384 uses of 100 images, so each is used 3 or 4 times
    counts = np.bincount(np.concatenate([b[:16] for b in batches]), minlength=len(s.train))[: len(s.train)]
    assert counts.sum() == 24 * 16 and counts.max() - counts.min() <= 1


def test_every_unlabelled_image_appears_once_per_epoch(semi: tuple) -> None:
    cfg, s = semi
    targets = s.train_set(cfg).targets
    unl = set(np.flatnonzero(targets == IGNORE_INDEX).tolist())
    keep = LabelledBatchSampler(np.flatnonzero(targets != IGNORE_INDEX), sorted(unl), 64, 16, seed=0, drop_last=False)
    seen = [i for b in _batches(keep, 1) for i in b[16:]]
    assert len(seen) == len(unl) and set(seen) == unl  # each exactly once
    assert len(keep) == -(-len(unl) // 48) and len(list(keep)[-1]) == 16 + len(unl) % 48  # a smaller last batch
    drop = LabelledBatchSampler(np.flatnonzero(targets != IGNORE_INDEX), sorted(unl), 64, 16, seed=0)
    seen = [i for b in _batches(drop, 1) for i in b[16:]]
    assert len(seen) == len(set(seen)) == len(drop) * 48 and len(unl) - len(seen) < 48 and set(seen) <= unl


def test_labelled_batches_are_a_function_of_seed_and_epoch() -> None:
    lab, unl = np.arange(30), np.arange(30, 500)
    a = LabelledBatchSampler(lab, unl, 32, 8, seed=4)
    first = [_batches(a, e) for e in range(3)]
    torch.manual_seed(123)  # the global RNG plays no part
    resumed = _batches(LabelledBatchSampler(lab, unl, 32, 8, seed=4), 2)
    assert resumed == first[2]
    assert first[0] != first[1] and [b[:8] for b in first[0]] != [b[:8] for b in first[1]]
    assert _batches(LabelledBatchSampler(lab, unl, 32, 8, seed=5), 0) != first[0]
    assert list(a) == first[2]  # iterating again repeats the selected epoch


def test_labelled_batches_shard_disjointly_over_ranks() -> None:
    lab, unl = np.arange(37), np.arange(37, 37 + 401)
    for drop_last in (None, False):
        ranks = [LabelledBatchSampler(lab, unl, 24, 5, seed=1, rank=r, world_size=2, drop_last=drop_last)
                 for r in range(2)]
        per_rank = [_batches(r, 3) for r in ranks]
        assert len(ranks[0]) == len(ranks[1]) == len(per_rank[0]) == len(per_rank[1])
        assert all(len(b) == 24 for b in per_rank[0][:-1]) and all(len(b[:5]) == 5 for b in sum(per_rank, []))
        u0, u1 = ([i for b in batches for i in b[5:]] for batches in per_rank)
        assert all(i >= 37 for i in u0 + u1) and all(i < 37 for b in sum(per_rank, []) for i in b[:5])
        if drop_last is None:  # full batches only, disjoint over ranks
            assert len(ranks[0]) == 401 // 2 // 19 and not set(u0) & set(u1) and len(set(u0)) == len(u0)
        else:  # the pool covered; 401 is odd, so one image is repeated to even out the shards (DistributedSampler's rule)
            assert set(u0) | set(u1) == set(unl.tolist()) and len(u0) == len(u1) == 201 and len(set(u0) & set(u1)) <= 1
        # the labelled stream is split between the ranks too: each pass of a permutation gives each
        # image to one rank, so over the epoch the ranks together use every image evenly
        both = np.bincount([i for batches in per_rank for b in batches for i in b[:5]], minlength=37)
        assert both.max() - both.min() <= 1
    # one rank of a world of one is the single-process sampler
    assert _batches(LabelledBatchSampler(lab, unl, 24, 5, seed=1, rank=0, world_size=1), 3) == \
        _batches(LabelledBatchSampler(lab, unl, 24, 5, seed=1), 3)


def test_labelled_batches_hold_for_odd_sizes() -> None:
    for n_l, n_u, bs, k, world, drop_last in [(3, 10, 4, 2, 1, None), (5, 7, 8, 7, 2, None), (2, 50, 6, 5, 3, True),
                                              (11, 9, 5, 1, 4, False), (4, 3, 16, 3, 2, None)]:
        lab, unl = np.arange(n_l), np.arange(n_l, n_l + n_u)
        ranks = [LabelledBatchSampler(lab, unl, bs, k, seed=0, rank=r, world_size=world, drop_last=drop_last)
                 for r in range(world)]
        batches = [_batches(r, 0) for r in ranks]
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(ranks[0]) >= 1
        for b in sum(batches, []):
            assert sum(i < n_l for i in b) == k and 1 <= len(b) - k <= bs - k


def test_labelled_per_batch_errors(semi: tuple) -> None:
    cfg, s = semi
    ds = s.train_set(cfg)
    with pytest.raises(DataError, match="smaller than batch_size"):
        make_loader(ds, 16, train=True, labelled_per_batch=16)
    with pytest.raises(DataError, match="training loaders only"):
        make_loader(ds, 16, train=False, labelled_per_batch=4)
    with pytest.raises(DataError, match="needs an unlabelled pool"):
        make_loader(s.train, 16, train=True, labelled_per_batch=4)
    with pytest.raises(DataError, match="targets array"):
        make_loader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), 4, train=True, labelled_per_batch=2)
    with pytest.raises(DataError, match="rank 2 outside"):
        LabelledBatchSampler([0], [1, 2], 2, 1, rank=2, world_size=2)


def test_distributed_labelled_loader_with_one_rank_is_the_single_process_one(semi: tuple, tmp_path: Path) -> None:
    import torch.distributed as dist

    cfg, s = semi
    ds = s.train_set(cfg)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = make_loader(ds, 64, train=True, seed=2, distributed=True, labelled_per_batch=16)
        single = make_loader(ds, 64, train=True, seed=2, labelled_per_batch=16)
        set_loader_epoch(ddp, 5)
        set_loader_epoch(single, 5)
        assert list(ddp.batch_sampler) == list(single.batch_sampler)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- DatasetInfo and preprocess


def test_dataset_info_round_trips_through_json() -> None:
    info = load_data(DataConfig(name="digits"), 0).info
    back = DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert back == info and isinstance(back.input_size, tuple) and back.scale == 1 / 16
    with pytest.raises(DataError, match="unknown keys"):
        DatasetInfo.from_dict({**info.to_dict(), "meen": [0.5]})
    with pytest.raises(DataError, match="lacks keys"):
        DatasetInfo.from_dict({k: v for k, v in info.to_dict().items() if k != "std"})


@pytest.mark.parametrize("cfg", [DataConfig(name="digits"), DataConfig(name="digits", image_size=12),
                                 _synthetic(synthetic_channels=3, synthetic_size=10)],
                         ids=["digits", "digits-resized", "synthetic-rgb"])
def test_preprocess_matches_the_eval_transform(cfg: DataConfig) -> None:
    s = load_data(cfg, 0)
    idx = [0, 3, 7]
    expected = torch.stack([s.test[i][0] for i in idx]).numpy()
    batch = np.stack([s.test.raw(i) for i in idx])  # NHWC uint8
    np.testing.assert_array_equal(preprocess(batch, s.info), expected)
    np.testing.assert_array_equal(preprocess(s.test.raw(3), s.info)[0], expected[1])


def test_preprocess_resizes_native_images_like_the_load_time_resize() -> None:
    from sklearn.datasets import load_digits

    s = load_data(DataConfig(name="digits", image_size=12, val_fraction=0.0), 0)
    native = load_digits().images.astype(np.uint8)[s.test.indices[:4]]  # 8x8, before the resize
    expected = torch.stack([s.test[i][0] for i in range(4)]).numpy()
    np.testing.assert_array_equal(preprocess(native, s.info), expected)
    with pytest.raises(InputError, match="expects 1 channel"):
        preprocess(np.zeros((12, 12, 3), np.uint8), s.info)
    plain = load_data(DataConfig(name="digits"), 0).info
    with pytest.raises(InputError, match="resize them first"):
        preprocess(np.zeros((9, 9), np.uint8), plain)


def test_augmentation_flips_only_natural_images(tmp_path: Path) -> None:
    digits = load_data(DataConfig(name="digits"), 0)
    ops = [type(t) for t in digits.train.transform.transforms]
    assert v2.RandomCrop in ops and v2.RandomHorizontalFlip not in ops
    assert digits.train.transform.transforms[0].padding == [1, 1, 1, 1]
    _fake_cifar10(tmp_path / "cifar-10-batches-py")
    cifar = load_data(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.0), 0)
    ops = [type(t) for t in cifar.train.transform.transforms]
    assert v2.RandomCrop in ops and v2.RandomHorizontalFlip in ops
    assert cifar.train.transform.transforms[0].padding == [4, 4, 4, 4]
    torch.manual_seed(0)
    assert not torch.equal(cifar.train[0][0], cifar.train[0][0])  # random crops differ
    no_aug = load_data(DataConfig(name="digits", augment=False), 0)
    assert torch.equal(no_aug.train[0][0], no_aug.train[0][0])


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("parent", [True, False], ids=["root=parent", "root=folder"])
def test_cifar10_reads_the_official_layout(tmp_path: Path, parent: bool) -> None:
    written = _fake_cifar10(tmp_path / "cifar-10-batches-py")
    root = tmp_path if parent else tmp_path / "cifar-10-batches-py"
    s = load_data(DataConfig(name="cifar10", root=str(root), val_fraction=0.0), 0)
    assert len(s.train) == 30 and len(s.test) == 8 and s.info.num_classes == 10
    assert s.info.class_names[3] == "cat" and s.info.channel_order == "RGB" and s.info.input_size == (32, 32)
    # test image 2: the row holds the R plane, then G, then B, each 32x32 row-major
    row = written["test_batch"][2]
    np.testing.assert_array_equal(s.test.raw(2), row.reshape(3, 32, 32).transpose(1, 2, 0))
    assert int(s.test[2][1]) == 2
    np.testing.assert_array_equal(preprocess(s.test.raw(2), s.info)[0], s.test[2][0].numpy())
    # the train pool is the five batches in order; batch 2 image 0 is pool index 6
    first_of_batch2 = written["data_batch_2"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(s.train.source.raw(6), first_of_batch2)


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 200), ("test", 20)):
        _write_pickle(folder / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                      "fine_labels": [i % 100 for i in range(n)],
                                      "coarse_labels": [i % 20 for i in range(n)]})
    _write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                    "coarse_label_names": [f"s{i}" for i in range(20)]})
    s = load_data(DataConfig(name="cifar100", root=str(tmp_path), val_fraction=0.0, per_class=1), 0)
    assert s.info.num_classes == 100 and s.info.class_names[42] == "c42"
    assert s.train.class_counts(100).tolist() == [1] * 100 and len(s.unlabelled) == 100


def test_cifar_refuses_pickled_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _fake_cifar10(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    _write_pickle(folder / "data_batch_3", {"data": Evil(), "labels": []})
    with pytest.raises(DataError, match="refusing to load"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)), 0)
    assert not marker.exists()


def test_missing_cifar_directory_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a directory.*data_batch_1.*never downloads"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "nope")), 0)
    folder = tmp_path / "cifar-10-batches-py"
    _fake_cifar10(folder)
    (folder / "data_batch_4").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_4, test_batch; expected") as e:
        load_data(DataConfig(name="cifar10", root=str(tmp_path)), 0)
    assert "\n" not in str(e.value)


def test_imagefolder_reads_a_png_tree(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": 10, "val": 3}, np.random.default_rng(0))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16)
    s = load_data(cfg, 0)
    assert s.info.class_names == ("cat", "dog") and s.info.input_size == (16, 16) and s.info.resize == 18
    assert len(s.train) == 18 and len(s.val) == 2 and len(s.test) == 6
    assert s.test.targets.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.stack([s.test[i][0] for i in range(6)]).numpy()
    got = np.concatenate([preprocess(s.test.raw(i), s.info) for i in range(6)])  # varied sizes: one at a time
    np.testing.assert_array_equal(got, expected)
    loader = make_loader(s.train, 4, train=True, seed=0)
    loader.sampler.set_epoch(0)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 16, 16) and yb.shape == (4,)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image_size"):
        DataConfig(name="imagefolder", root=str(tmp_path))
    with pytest.raises(DataError, match=r"train.*one subfolder of images per class.*never downloads"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8), 0)
    _png_tree(tmp_path, {"train": 2, "val": 1}, np.random.default_rng(0))
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder .*bird holds no images"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8), 0)


def _png_header(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("damage, words", [
    ("truncated", "cannot read image"),
    ("oversized", "is 9000x8000 pixels (72 MP), more than the 67 MP kdedge decodes"),
    ("bomb", "too large to decode safely"),  # beyond Pillow's own limit: refused by Pillow's open
])
def test_a_bad_image_in_a_folder_is_named_in_one_line(tmp_path: Path, damage: str, words: str) -> None:
    _png_tree(tmp_path, {"train": 2, "val": 1}, np.random.default_rng(0))
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes({"truncated": bad.read_bytes()[:60], "oversized": _png_header(9000, 8000),
                     "bomb": _png_header(30000, 30000)}[damage])
    s = load_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8), 0)
    with pytest.raises(DataError) as e:
        for i in range(len(s.train)):
            s.train[i]
    assert str(bad) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- configuration errors


def test_unknown_dataset_suggests_the_close_name() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'; did you mean 'mnist5k'"):
        DataConfig(name="mnist")
    assert set(DATASETS) == {"mnist5k", "digits", "cifar10", "cifar100", "imagefolder", "synthetic"}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be a fraction"),
        ({"test_fraction": -0.1}, "test_fraction must be a fraction"),
        ({"per_class": 0}, "per_class must be an integer >= 1"),
        ({"unlabelled": True}, "unlabelled needs data.per_class"),
        ({"batch_size": 0}, "batch_size"),
        ({"per_class": 5, "labelled_per_batch": 8}, "labelled_per_batch needs data.unlabelled: true"),
        ({"per_class": 5, "unlabelled": True, "labelled_per_batch": 0}, "labelled_per_batch must be an integer >= 1"),
        ({"per_class": 5, "unlabelled": True, "labelled_per_batch": 32, "batch_size": 32},
         "labelled_per_batch=32 must be smaller than data.batch_size=32"),
    ],
)
def test_bad_config_raises_one_clear_line(kw: dict, match: str) -> None:
    with pytest.raises(DataError, match=match) as e:
        DataConfig(**kw)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_directory_dataset_needs_its_root_when_loaded_not_in_a_recipe() -> None:
    cfg = DataConfig(name="cifar10")  # a recipe may leave the directory to --data-root
    with pytest.raises(DataError, match="needs its directory: --data-root"):
        load_data(cfg, 0)


def test_seed_must_be_a_non_negative_integer() -> None:
    with pytest.raises(DataError, match="seed"):
        load_data(_synthetic(), -1)
