"""Streaming loader: disjoint equal streams, determinism, resume, exact eval, bad data."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
import torch
import webdataset

from pipeline.data import EvalStream, Loader, TrainStream, load_manifest
from pipeline.errors import DataError, InputError
from pipeline.transforms import Augment

LIGHT = Augment.light(img_size=32)


def rank_batches(stream: TrainStream, workers: int) -> list[dict]:
    """What a DataLoader with ``workers`` workers yields, simulated in-process
    (worker k's j-th batch is the rank's batch j * workers + k)."""
    stream.num_workers = workers
    per_worker = [list(stream.iter_worker(w, workers)) for w in range(workers)]
    out = []
    for j in range(max(len(b) for b in per_worker)):
        out += [b[j] for b in per_worker if j < len(b)]
    return out


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_manifest(photo_shards, tmp_path):
    m = load_manifest(photo_shards)
    assert (m.num_samples, len(m.urls), m.num_classes) == (123, 13, 3)
    assert all(os.path.isfile(u) for u in m.urls)
    assert load_manifest(photo_shards, url_base="pipe:cat /x/{shard}").urls[0].startswith("pipe:cat /x/train-")
    with pytest.raises(InputError, match="no shard manifest"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"shards": []}')
    with pytest.raises(InputError, match="lists no samples"):
        load_manifest(str(tmp_path))


def test_a_pipe_url_base_reads_each_shard_once_also_on_a_resume(photo_shards, tmp_path, monkeypatch):
    """``pipe:`` shards can only be read from their first byte: a slot resumed half-way
    (its wanted samples scattered by the shuffle buffer, one byte range each with no gap
    read through) still runs each shard's pipe once, and gets the samples of a local read."""
    from pipeline.manifest import _Sequence

    monkeypatch.setattr(_Sequence, "gap_bytes", 0)
    calls = tmp_path / "calls"
    piped = load_manifest(photo_shards, url_base=f"pipe:echo {{shard}} >> {calls}; cat {photo_shards}/{{shard}}")
    local = load_manifest(photo_shards)
    got = []
    for m in (local, piped):
        stream = TrainStream(m, 2, augment=LIGHT, shuffle_buffer=8)
        stream.start = 30  # half of the 61 batches
        got.append(keys(stream.iter_worker(0, 1, main=True)))
    assert got[1] == got[0] and len(got[0]) == 2 * 31
    runs = calls.read_text().split()
    assert len(runs) == len(set(runs)), runs


def test_train_disjoint_equal_and_coverage(photo_shards):
    m = load_manifest(photo_shards)
    world, workers, batch = 2, 2, 4
    per_rank = [
        rank_batches(TrainStream(m, batch, rank=r, world_size=world, augment=LIGHT), workers) for r in range(world)
    ]
    counts = [len(b) for b in per_rank]
    assert counts == [123 // (world * batch)] * world == [15, 15]
    seen = [k for b in per_rank for k in keys(b)]
    assert len(seen) == len(set(seen)) == world * 15 * batch  # disjoint across ranks and workers
    coverage = len(set(seen)) / m.num_samples
    print(f"distinct samples per epoch: {coverage:.3f}")
    assert coverage >= 1 - world * batch / m.num_samples
    b = per_rank[0][0]
    assert b["image"].shape == (batch, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and b["target"].shape == (batch, 3)


def test_determinism_and_epochs(photo_shards):
    m = load_manifest(photo_shards)
    a = rank_batches(TrainStream(m, 4, seed=1, augment=LIGHT), 2)
    b = rank_batches(TrainStream(m, 4, seed=1, augment=LIGHT), 2)
    assert keys(a) == keys(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    s = TrainStream(m, 4, seed=1, augment=LIGHT)
    s.epoch = 1
    assert keys(rank_batches(s, 2)) != keys(a)
    assert keys(rank_batches(TrainStream(m, 4, seed=2, augment=LIGHT), 2)) != keys(a)


def test_dataloader_order_matches_and_resume(photo_shards):
    """Real worker processes, full recipe (RandAugment, erasing, Mixup): a loader
    restored from a mid-epoch state yields exactly the batches of an uninterrupted run."""
    m = load_manifest(photo_shards)
    aug = Augment(img_size=32)

    def loader():
        return Loader(TrainStream(m, 6, seed=5, augment=aug, shuffle_buffer=20), workers=2)

    full = loader()
    run = list(full.epoch(0)) + list(full.epoch(1))[:4]
    assert keys(run[:20]) == keys(rank_batches(TrainStream(m, 6, seed=5, augment=aug, shuffle_buffer=20), 2))

    first = loader()
    it = first.epoch(0)
    head = [next(it) for _ in range(7)]  # stop mid-epoch, odd batch: worker rotation matters
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 7
    resumed = loader()
    resumed.load_state_dict(state)
    tail = list(resumed.epoch(0)) + list(resumed.epoch(1))[:4]
    got = head + tail
    assert len(got) == len(run)
    for x, y in zip(got, run):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    t = run[0]["target"]
    assert torch.allclose(t.sum(1), torch.ones(len(t))) and t.min() > 0  # mixed + smoothed


@pytest.mark.parametrize(
    "layouts",
    [((2, 2), (1, 0)), ((2, 0), (3, 2)), ((2, 2), (3, 0), (2, 0)), ((2, 2), (3, 0), (1, 0))],
    ids=["2x2-to-1", "2-to-3x2", "2x2-to-3-to-2", "2x2-to-3-to-1"],
)
def test_an_epoch_resumed_on_other_layouts_uses_every_sample_at_most_once(photo_shards, layouts):
    """Elastic resume: an epoch stopped mid-way and continued on other (ranks, workers)
    layouts, one after another; the state saved by rank 0 is all each needs. Every
    rank has as many batches as the others in every layout, no sample comes twice, and
    fewer than ``ranks x batch`` per layout are left out (the epoch's usual remainder)."""
    _resume_on_layouts(load_manifest(photo_shards), layouts)


def test_a_replan_that_counts_an_old_slots_leftovers_twice_fails_the_check(photo_shards, monkeypatch):
    """The check above can fail: with one old slot's leftovers handed out in place of
    another's (the first slot's counted twice), a sample comes twice."""
    from pipeline import data

    real = data._Left._order
    monkeypatch.setattr(data._Left, "_order", lambda self, i: real(self, 0 if i == 1 else i))
    data._remaining.cache_clear()
    try:
        with pytest.raises(AssertionError, match="a sample came twice"):
            _resume_on_layouts(load_manifest(photo_shards), ((2, 2), (3, 0), (1, 0)))
    finally:
        data._remaining.cache_clear()


def _resume_on_layouts(m, layouts) -> None:
    batch, state, seen = 4, None, []
    for i, (world, workers) in enumerate(layouts):
        loaders = [
            Loader(
                TrainStream(m, batch, rank=r, world_size=world, seed=3, augment=LIGHT, shuffle_buffer=10),
                workers=workers,
            )
            for r in range(world)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        its = [loader.epoch(0) for loader in loaders]
        n = len(loaders[0])
        assert n > 1 and all(len(loader) == n for loader in loaders)
        last = i == len(layouts) - 1
        for _ in range(n if last else n // 2):
            for it in its:
                seen += next(it)["key"]
        if last:
            assert all(next(it, None) is None for it in its)  # equal counts: every rank ends together
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)
        state = states[0]
        del its
    assert len(seen) == len(set(seen)), "a sample came twice in one epoch"
    assert m.num_samples - len(seen) < sum(world * batch for world, _ in layouts)
    assert state["epoch"] == 1 and state["history"] == []
    again = Loader(TrainStream(m, batch, rank=0, world_size=layouts[-1][0], seed=3, augment=LIGHT, shuffle_buffer=10))
    again.load_state_dict(state)
    assert len(again) == m.num_samples // (layouts[-1][0] * batch)  # the next epoch: the layout's own


def test_eval_exact_coverage(photo_shards):
    m = load_manifest(photo_shards)
    world, workers = 2, 2
    seen, counts = [], []
    for r in range(world):
        s = EvalStream(m, 8, rank=r, world_size=world, augment=Augment(img_size=32))
        batches = rank_batches(s, workers)
        counts.append(len(batches))
        for b in batches:
            real = b["label"] >= 0
            assert b["image"].shape == (8, 3, 32, 32)
            assert all(bool(k) == bool(v) for k, v in zip(b["key"], real))
            seen += [k for k in b["key"] if k]
    assert counts[0] == counts[1]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == m.num_samples == 123


def test_eval_through_dataloader(photo_shards):
    m = load_manifest(photo_shards)
    loader = Loader(EvalStream(m, 16, augment=Augment(img_size=32)), workers=2)
    for _ in range(2):  # an eval loader is reusable
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader)
        assert sum(int((b["label"] >= 0).sum()) for b in batches) == 123


def test_repeated_augmentation(photo_shards):
    m = load_manifest(photo_shards)
    batches = rank_batches(TrainStream(m, 4, repeats=3, augment=LIGHT), 2)
    seen = keys(batches)
    counts = {k: seen.count(k) for k in set(seen)}
    assert len(seen) == 120 and max(counts.values()) == 3
    assert 40 <= len(counts) <= 42  # about a third of the images, each three times
    same = [b["image"][i] for b in batches for i, k in enumerate(b["key"]) if k == seen[0]]
    assert len(same) >= 2 and not torch.equal(same[0], same[1])  # each copy its own augmentation


def _damage(split_dir: str, tmp_path) -> str:
    """Copy the shards; corrupt one sample, truncate one shard, delete one shard."""
    out = tmp_path / "damaged"
    shutil.copytree(split_dir, out)
    names = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    src = out / names[0]
    members = []
    with tarfile.open(src) as tar:
        for info in tar.getmembers():
            members.append((info, tar.extractfile(info).read()))
    with tarfile.open(src, "w") as tar:
        first_jpg = next(i for i, (info, _) in enumerate(members) if info.name.endswith(".jpg"))
        for i, (info, data) in enumerate(members):
            if i == first_jpg:
                data = b"\xff\xd8garbage"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    size = os.path.getsize(out / names[1])
    with open(out / names[1], "r+b") as f:
        f.truncate(size // 2)
    os.remove(out / names[2])
    return str(out)


def test_bad_data_is_skipped_counted_and_logged(photo_shards, tmp_path, caplog):
    m = load_manifest(_damage(photo_shards, tmp_path))
    counts, bad = [], {"bad_samples": 0, "bad_shards": 0}
    with caplog.at_level(logging.WARNING, logger="tntpipe.data"):
        for r in range(2):
            loader = Loader(TrainStream(m, 4, rank=r, world_size=2, augment=LIGHT), workers=0)
            counts.append(len(list(loader.epoch(0))))
            for k in bad:
                bad[k] += loader.counters[k]
    assert counts == [15, 15]  # equal batch counts despite the damage
    assert bad["bad_samples"] >= 1 and bad["bad_shards"] >= 2
    text = caplog.text
    assert "rank 0" in text or "rank 1" in text
    assert "train-000002.tar" in text and "skipped sample" in text


def test_damaged_or_truncated_offsets_skip_that_shard_in_one_line_and_ranks_stay_equal(photo_shards, tmp_path, caplog):
    """A shard whose offsets in offsets.bin are damaged, and the last shard's cut off by a
    truncated file: each is named in one line and skipped like an unreadable shard; the
    ranks still get equal batch counts, made up from the other shards."""
    split = tmp_path / "train"
    shutil.copytree(photo_shards, split)
    m = load_manifest(str(split))
    path = str(split / "offsets.bin")
    data = bytearray(open(path, "rb").read())
    first = 8 * m.offsets.starts[3]
    data[first + 8 : first + 16] = (12345).to_bytes(8, "little")  # not a tar block
    with open(path, "wb") as f:
        f.write(bytes(data[: len(data) - 16]))  # the last shard's end cut off
    counts, bad = [], 0
    with caplog.at_level(logging.WARNING, logger="tntpipe.data"):
        for r in range(2):
            loader = Loader(TrainStream(load_manifest(str(split)), 4, rank=r, world_size=2, augment=LIGHT), workers=0)
            counts.append(len(list(loader.epoch(0))))
            bad += loader.counters["bad_shards"]
    assert counts == [15, 15]
    assert bad >= 2
    lines = [r.getMessage() for r in caplog.records]
    assert any("train-000003.tar" in line and "offsets of shard 3 are damaged" in line for line in lines)
    assert any("train-000012.tar" in line and "(truncated)" in line for line in lines)
    assert all("\n" not in line for line in lines)


def test_no_readable_shard_is_a_clear_error(photo_shards, tmp_path):
    m = load_manifest(photo_shards)
    gone = m.__class__(**{**m.__dict__, "urls": tuple(str(tmp_path / os.path.basename(u)) for u in m.urls)})
    with pytest.raises(DataError, match="none of the 13 shards"):
        next(TrainStream(gone, 4, augment=LIGHT).iter_worker(0, 1))


def test_batch_larger_than_split_is_a_clear_error(photo_shards):
    with pytest.raises(InputError, match="more than the 123 samples"):
        TrainStream(load_manifest(photo_shards), 64, world_size=2)


def test_full_recipe_shapes_at_224(photo_shards):
    m = load_manifest(photo_shards)
    b = next(TrainStream(m, 4, augment=Augment()).iter_worker(0, 1))
    assert b["image"].shape == (4, 3, 224, 224) and b["image"].dtype == torch.float32
    assert b["target"].shape == (4, 3) and b["target"].dtype == torch.float32
    e = next(EvalStream(m, 4).iter_worker(0, 1))
    assert e["image"].shape == (4, 3, 224, 224) and e["image"].abs().max() <= 1.0 + 1e-6


def test_draft_decode_matches_full_decode_closely(photo_shards):
    """Reduced-scale JPEG decoding changes pixels only slightly."""
    from pipeline.transforms import EvalTransform

    m = load_manifest(photo_shards)
    sample = next(iter(webdataset.WebDataset(m.urls[0], shardshuffle=False)))
    small = Augment(img_size=24, crop_pct=1.0)
    a = EvalTransform(small)(sample["jpg"]).astype(float)
    b = EvalTransform(dataclasses.replace(small, draft=False))(sample["jpg"]).astype(float)
    assert a.shape == b.shape == (24, 24, 3)
    assert np.abs(a - b).mean() < 6  # of 255


def test_timm_posterize_fix():
    """timm's RandAugment asks Pillow for 0-bit posterize at top magnitudes."""
    from PIL import Image

    from pipeline.compat import fix_timm_posterize

    fix_timm_posterize()
    from timm.data.auto_augment import NAME_TO_OP

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert NAME_TO_OP["PosterizeIncreasing"](img, 0).getextrema() == ((0, 0),) * 3
    assert NAME_TO_OP["PosterizeIncreasing"](img, 4).getpixel((0, 0)) == (192, 96, 48)


@pytest.mark.parametrize("seed", range(6))  # covers Mixup, CutMix and no-mix draws
def test_mixing_equals_timm(seed):
    from timm.data import Mixup

    from pipeline.transforms import BatchFinish

    aug = Augment(img_size=16, mixup_prob=0.8)
    finish = BatchFinish(aug, num_classes=5, train=True)
    x = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    ref_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, label_smoothing=0.1, num_classes=5)
    np.random.seed(seed)
    ref_x, ref_t = ref_mix(x.clone(), labels)
    np.random.seed(seed)
    ours = x.clone()
    t = finish.mix(ours, labels)
    assert torch.allclose(ours, ref_x, atol=1e-6) and torch.allclose(t, ref_t)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_buffers_are_reused_only_when_free(photo_shards, workers):
    """Batch memory is written again once the consumer has let go of it, never before:
    batches held for a while (one of them to the end) keep their values, and fewer
    buffers than batches are used."""
    m = load_manifest(photo_shards)
    ref = [b["image"] for b in rank_batches(TrainStream(m, 4, augment=LIGHT), max(1, workers))]  # fresh memory each
    loader = Loader(TrainStream(m, 4, augment=LIGHT), workers=workers, pin_memory=False)
    first, window, buffers = None, [], set()
    try:
        for k, b in enumerate(loader.epoch(0)):
            buffers.add(b["image"].untyped_storage().data_ptr())
            first = first or (k, b)
            window.append((k, b))
            if len(window) > 2:  # a consumer that looks back two batches
                j, old = window.pop(0)
                assert torch.equal(old["image"], ref[j]), f"batch {j} was overwritten while held"
            del b
    finally:
        loader.close()  # its workers, also when an assertion failed
    assert torch.equal(first[1]["image"], ref[0])
    assert k + 1 == len(ref) and len(buffers) < len(ref) // 2, (len(buffers), len(ref))


def test_cv2_geometry_matches_pil():
    """RandAugment's rotate/shear/translate through OpenCV: timm's matrices and PIL's
    pixel-centre convention; only the bicubic kernel (a=-0.75 vs -0.5) and the border
    blending differ."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import auto_augment as aa

    from pipeline.transforms import _CvAffine

    img = Image.fromarray(np.ascontiguousarray(load_sample_image("china.jpg")[100:324, 200:424]))
    kw = {"fillcolor": (128, 128, 128), "resample": Image.BICUBIC}
    ops = [
        ("Rotate", aa.rotate, 27.0),
        ("Rotate", aa.rotate, -90.0),
        ("ShearX", aa.shear_x, 0.3),
        ("ShearY", aa.shear_y, -0.2),
        ("TranslateXRel", aa.translate_x_rel, 0.37),
        ("TranslateYRel", aa.translate_y_rel, -0.21),
        ("TranslateX", aa.translate_x_abs, 33.3),
    ]
    for name, fn, arg in ops:
        ref = np.asarray(fn(img, arg, **kw)).astype(float)
        out = np.asarray(_CvAffine(name, fn)(img, arg, **kw)).astype(float)
        d = np.abs(ref - out)
        assert out.shape == ref.shape and d.mean() < 1.5 and (d > 12).mean() < 0.01, (
            name,
            arg,
            d.mean(),
            (d > 12).mean(),
        )
    assert np.array_equal(np.asarray(_CvAffine("Rotate", aa.rotate)(img, -90.0, **kw)), np.asarray(img.rotate(-90.0)))


def test_cv2_geometry_keeps_timm_random_draws(photo_shards):
    """With and without OpenCV the same ops and magnitudes are drawn: the images stay close."""
    from pipeline.transforms import TrainTransform, _CvAffine, seeded

    m = load_manifest(photo_shards)
    samples = list(webdataset.WebDataset(m.urls[0], shardshuffle=False))[:8]
    aug = Augment(img_size=48, auto_augment="rand-m9-mstd0.5-inc1")
    fast, slow = TrainTransform(aug), TrainTransform(dataclasses.replace(aug, cv2_geometry=False))
    ops = [op for t in fast.secondary.transforms for op in getattr(t, "ops", [])]
    assert sum(isinstance(op.aug_fn, _CvAffine) for op in ops) == 5  # rotate, shear x/y, translate x/y
    diffs = []
    for i, s in enumerate(samples * 4):
        with seeded(i, restore=True):
            a = fast(s["jpg"]).astype(float)
        with seeded(i, restore=True):
            b = slow(s["jpg"]).astype(float)
        diffs.append(np.abs(a - b).mean())
    assert max(diffs) < 4 and 0 < sum(diffs), diffs  # some geometric op was drawn, and it stayed close


@pytest.mark.timeout(300)
def test_workers_start_after_opencv_threads_ran_here(photo_shards):
    """A 0-worker epoch runs OpenCV in this process; workers forked afterwards must not
    hang reconfiguring a thread pool that does not exist in them (it did once)."""
    import cv2

    cv2.setNumThreads(2)
    cv2.warpAffine(np.zeros((256, 256, 3), np.uint8), np.eye(2, 3), (256, 256))  # starts the pool here
    m = load_manifest(photo_shards)
    loader = Loader(TrainStream(m, 8, augment=Augment(img_size=32)), workers=1, pin_memory=False)
    assert cv2.getNumThreads() == 1
    assert sum(1 for _ in loader.epoch(0)) == len(loader)


def test_ranks_through_real_dataloader_workers_are_disjoint_and_eval_exactly_once(photo_shards):
    """The in-process simulation (rank_batches) checked against what real DataLoader
    worker processes yield: 2 ranks x 2 workers, training disjoint with equal batch
    counts, evaluation every sample exactly once."""
    m = load_manifest(photo_shards)
    train_keys, train_counts, eval_keys, eval_counts = [], [], [], []
    for rank in range(2):
        batches = list(Loader(TrainStream(m, 4, rank=rank, world_size=2, augment=LIGHT), workers=2).epoch(0))
        train_counts.append(len(batches))
        train_keys += keys(batches)
        simulated = rank_batches(TrainStream(m, 4, rank=rank, world_size=2, augment=LIGHT), 2)
        assert keys(batches) == keys(simulated)  # the same batches, in the same order
        evals = list(
            Loader(EvalStream(m, 8, rank=rank, world_size=2, augment=Augment(img_size=32)), workers=2).epoch(0)
        )
        eval_counts.append(len(evals))
        eval_keys += [k for b in evals for k in b["key"] if k]
    assert train_counts == [15, 15] and len(train_keys) == len(set(train_keys)) == 120
    assert eval_counts[0] == eval_counts[1] and sorted(eval_keys) == sorted(set(eval_keys)) and len(eval_keys) == 123


def test_device_finish_matches_the_worker_path_and_is_deterministic(photo_shards):
    """data.finish=device: the workers send uint8 pixels (a quarter of the bytes) and
    DeviceFinish normalises, erases and mixes on the device (here the CPU device; the
    CUDA path is the same code with the CUDA generator, tests/test_gpu.py). Without
    erasing, the result equals the worker path's (Mixup/CutMix drawn from the same
    per-batch seed); with erasing it is a pure function of (seed, epoch, rank, batch)
    and leaves the training RNG alone."""
    from pipeline.transforms import DeviceFinish

    m = load_manifest(photo_shards)
    no_erase = Augment(img_size=32, re_prob=0.0, mixup_prob=0.8)
    for aug in (no_erase, dataclasses.replace(no_erase, mixup=0.0, cutmix=0.0)):
        worker = rank_batches(TrainStream(m, 6, seed=3, rank=1, world_size=2, augment=aug), 2)
        raw = rank_batches(TrainStream(m, 6, seed=3, rank=1, world_size=2, augment=aug, finish="device"), 2)
        finish = DeviceFinish(aug, m.num_classes, True, seed=3, rank=1, device=torch.device("cpu"))
        assert raw[0]["image"].dtype == torch.uint8 and "target" not in raw[0]
        for w, r in zip(worker, raw):
            x, target = finish(r)
            assert torch.allclose(x, w["image"], atol=1e-5) and torch.allclose(target, w["target"]), r["index"]
    erase = Augment(img_size=32, re_prob=1.0, mixup=0.0, cutmix=0.0)
    raw = rank_batches(TrainStream(m, 6, seed=3, augment=erase, finish="device"), 1)
    finish = DeviceFinish(erase, m.num_classes, True, seed=3, rank=0, device=torch.device("cpu"))
    plain = DeviceFinish(
        dataclasses.replace(erase, re_prob=0.0), m.num_classes, True, seed=3, rank=0, device=torch.device("cpu")
    )
    torch.manual_seed(123)
    a = [finish(b)[0] for b in raw[:3]]
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # the training RNG did not move
    b = [finish(b)[0] for b in raw[:3]]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    erased = [(x != plain(r)[0]).any(dim=(1, 2, 3)) for x, r in zip(a, raw[:3])]
    assert all(e.all() for e in erased)  # re_prob=1: every image has a box
    evals = list(EvalStream(m, 8, augment=Augment(img_size=32), finish="device").iter_worker(0, 1))
    ref = list(EvalStream(m, 8, augment=Augment(img_size=32)).iter_worker(0, 1))
    to_eval = DeviceFinish(Augment(img_size=32), m.num_classes, False, seed=0, rank=0, device=torch.device("cpu"))
    for e, r in zip(evals, ref):
        x, y = to_eval(e)
        mask = y >= 0
        assert torch.allclose(x[mask], r["image"][mask], atol=1e-5) and torch.equal(y, r["label"])


def test_workers_persist_across_epochs_with_the_same_batches(photo_shards):
    """The DataLoader's workers are forked once per Loader, not per epoch or evaluation;
    each epoch's place reaches them through shared memory. The batches of a later
    epoch, and of a mid-epoch resume into it, equal those of a fresh Loader."""
    m = load_manifest(photo_shards)

    made = []

    def make():
        made.append(Loader(TrainStream(m, 4, seed=2, augment=LIGHT), workers=2, pin_memory=False))
        return made[-1]

    try:
        _workers_persist(m, make)
    finally:
        for loader in made:  # their workers, also when an assertion failed
            loader.close()


def _workers_persist(m, make):
    loader = make()
    first = [b["key"] for b in loader.epoch(0)]
    pids = [w.pid for w in loader._dl._iterator._workers]
    second = [(b["key"], b["image"].clone()) for b in loader.epoch(1)]
    assert [w.pid for w in loader._dl._iterator._workers] == pids and all(
        w.is_alive() for w in loader._dl._iterator._workers
    )
    assert [k for k, _ in second] != first
    fresh = make()
    fresh.load_state_dict({"epoch": 1, "batch": 0, "seed": 2})
    assert all(k == f["key"] and torch.equal(x, f["image"]) for (k, x), f in zip(second, fresh.epoch(1), strict=True))
    resumed = make()
    resumed.load_state_dict({"epoch": 1, "batch": 3, "seed": 2, "workers": 2, "world_size": 1})
    assert [b["key"] for b in resumed.epoch(1)] == [k for k, _ in second[3:]]
    evals = Loader(EvalStream(m, 16, augment=Augment(img_size=32)), workers=2)
    try:
        once, pids = [b["key"] for b in evals.epoch(0)], [w.pid for w in evals._dl._iterator._workers]
        assert [b["key"] for b in evals.epoch(0)] == once and [w.pid for w in evals._dl._iterator._workers] == pids
    finally:
        evals.close()


def test_close_stops_the_workers_at_once_mid_epoch(photo_shards):
    """A run that stops mid-epoch (max_steps) ends its loaders' workers itself: left to
    interpreter exit, torch 2.11 with pinned memory waited 5 s per worker (issue 81794;
    75 s on an H200 machine). Pinned memory needs CUDA, so here the workers alone."""
    import multiprocessing

    m = load_manifest(photo_shards)
    loader = Loader(TrainStream(m, 4, augment=LIGHT), workers=2, pin_memory=False)
    batches = loader.epoch(0)
    next(batches)  # mid-epoch, the generator still holding the DataLoader iterator
    workers = [p for p in multiprocessing.active_children() if "DataLoader" in p.name or p.daemon]
    assert len(workers) >= 2
    t0 = time.monotonic()
    loader.close()
    assert time.monotonic() - t0 < 3.0
    assert not any(p.is_alive() for p in workers)
    loader.close()  # twice is harmless
    assert len(list(loader.epoch(1))) > 0  # and the loader starts workers again when asked
    loader.close()


def test_the_lazy_replan_is_the_whole_epochs_replan_sliced():
    """data._Left (what an elastic resume uses: each slot replays only the old slots it
    inherits from) equals the plan built over the whole epoch, for random chains of
    layouts, sliced anywhere; and a slot's slice touches only the old slots it overlaps."""
    import random as rnd

    from pipeline.data import _Left, _remaining_eager

    rng = rnd.Random(0)
    for trial in range(40):
        samples = rng.randrange(50, 3000)
        history = []
        n = samples
        for _ in range(rng.randrange(1, 4)):
            world, workers, batch = rng.randrange(1, 5), rng.randrange(1, 4), rng.randrange(1, 9)
            per_rank = n // (world * batch)
            if per_rank == 0:
                break
            history.append((world, workers, batch, rng.randrange(0, per_rank + 1)))
            n = len(_remaining_eager(7, trial, samples, 5, tuple(history)))
        if not history:
            continue
        history = tuple(history)
        whole = _remaining_eager(7, trial, samples, 5, history)
        lazy = _Left(7, trial, samples, 5, history)
        assert len(lazy) == len(whole), (samples, history)
        assert lazy[:] == list(whole)
        for _ in range(5):
            a = rng.randrange(0, len(whole) + 1)
            b = rng.randrange(a, len(whole) + 1)
            assert lazy[a:b] == list(whole[a:b]), (samples, history, a, b)
    # a new slot's share: replayed old slots only where it overlaps them
    lazy = _Left(0, 0, 1_000_000, 1000, ((64, 8, 32, 100),))
    _ = lazy[:500]
    assert len(lazy._held) <= 2


def test_a_slots_start_up_and_elastic_replan_do_not_grow_with_the_data_set(tmp_path):
    """bench/scale_bench.py scaled down: 1M and 4M simulated samples (1,000 per shard) at a
    fixed share per slot (10,000 samples: 25 and 100 ranks x 4 workers). Peak Python
    memory (tracemalloc: exact, not a timing) of one slot's plan and of its elastic
    re-plan (to 3/4 of the ranks at mid-epoch) does not grow with the data set; the
    manifest grows with the shards only, a few hundred bytes each (inline offsets: ~40 KB
    per shard of 1,000). Times get a generous bound: the re-plan over the whole epoch
    (the code before 2026-12-07) takes 4x as long at 4x the samples."""
    import sys
    import tracemalloc

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from scale_bench import write_manifest

    from pipeline import data

    def measure(fn):
        data._remaining.cache_clear()
        tracemalloc.start()
        t = time.perf_counter()
        fn()
        took = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return took, peak

    got = {}
    for samples in (1_000_000, 4_000_000):
        folder = tmp_path / str(samples)
        folder.mkdir()
        path = write_manifest(str(folder), samples // 1000, 1000, inline=False)
        ranks, workers, batch, buffer = samples // 40_000, 4, 32, 1000
        history = ((ranks, workers, batch, samples // (ranks * batch) // 2),)

        def plan():
            lo, hi = data._phase_layout(samples, ranks, workers, batch)[1][0]
            list(data._shuffled(iter(range(lo, hi)), buffer, data._buffer_rng(0, 0, 0, 0, 0)))

        def replan():
            left = data._remaining(0, 0, samples, buffer, history)
            lo, hi = data._phase_layout(len(left), ranks * 3 // 4, workers, batch)[1][0]
            sorted(left[lo:hi])

        got[samples] = {
            "manifest": measure(lambda: load_manifest(path)),
            "plan": measure(plan),
            "replan": measure(replan),
        }
    small, big = got[1_000_000], got[4_000_000]
    for row in ("plan", "replan"):
        assert big[row][1] < 1.5 * small[row][1] + (1 << 20), (row, small[row], big[row])
        assert big[row][0] < 2 * small[row][0] + 0.25, (row, small[row], big[row])
    assert big["manifest"][1] < 4_000 * 2_000, big["manifest"]  # < 2 KB per shard
    data._remaining.cache_clear()
