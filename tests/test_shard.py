"""pipeline/shard.py on small ImageNet-like trees of real encoded JPEGs."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import webdataset as wds
from conftest import WNIDS, jpeg_bytes, photo_crops, write
from PIL import Image

from pipeline import shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return shard.main([str(a) for a in args] + ["--quiet"])


def digests(directory) -> dict[str, str]:
    """sha256 of every shard, manifest and offsets file under ``directory`` (relative names)."""
    out = {}
    for path in sorted(
        glob.glob(os.path.join(directory, "*", "*.tar"))
        + glob.glob(os.path.join(directory, "*", "manifest.json"))
        + glob.glob(os.path.join(directory, "*", shard.OFFSETS))
    ):
        with open(path, "rb") as f:
            out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def load_manifest(out, split="train"):
    with open(os.path.join(out, split, "manifest.json")) as f:
        return json.load(f)


def urls(out, split="train"):
    return [os.path.join(out, split, s["name"]) for s in load_manifest(out, split)["shards"]]


def read_samples(out, split="train"):
    return list(wds.WebDataset(urls(out, split), shardshuffle=False, empty_check=False).decode("pil"))


def test_manifest_counts_odd_images_and_every_sample_decodes(imagenet_tree, tmp_path):
    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out, "--shard-size", 4, "--workers", 2) == 0
    m = load_manifest(out)
    assert m["num_samples"] == imagenet_tree["valid"]
    assert m["num_shards"] == -(-imagenet_tree["valid"] // 4)
    assert sum(s["samples"] for s in m["shards"]) == m["num_samples"]
    assert [c["id"] for c in m["classes"]] == sorted(WNIDS)
    assert m["classes"][0]["name"].startswith("tench")  # names from timm's synset list
    odd = imagenet_tree["odd"]
    converted = {c["path"]: c["reason"] for c in m["converted"]}
    assert set(converted) == {odd["cmyk"], odd["png"]}
    assert "CMYK" in converted[odd["cmyk"]] and "PNG" in converted[odd["png"]]
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {odd["truncated"], odd["empty"], odd["text"]}
    assert "truncated" in skipped[odd["truncated"]]
    assert "empty" in skipped[odd["empty"]]
    # every input is accounted for: samples + skipped = files in the tree
    files = [p for p in glob.glob(os.path.join(imagenet_tree["root"], "train", "*", "*"))]
    assert m["num_samples"] + len(m["skipped"]) == len(files)
    for s in m["shards"]:
        path = os.path.join(out, "train", s["name"])
        assert os.path.getsize(path) == s["bytes"]
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == s["sha256"]

    samples = read_samples(out)
    assert len(samples) == m["num_samples"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    for s in samples:
        assert s["jpg"].mode in ("RGB", "L")
        assert s["jpg"].size == (s["json"]["width"], s["json"]["height"])
        assert WNIDS.index(s["json"]["class"]) == s["cls"]
        assert s["json"]["path"].split(os.sep)[1] == s["json"]["class"]
    raw = {s["json"]["path"]: s for s in wds.WebDataset(urls(out), shardshuffle=False, empty_check=False).decode()}
    gray = raw[odd["gray"]]
    assert Image.open(io.BytesIO(gray["jpg"])).mode == "L" and "converted" not in gray["json"]  # stored as-is
    assert Image.open(io.BytesIO(raw[odd["cmyk"]]["jpg"])).mode == "RGB"
    # shards mix classes (seeded shuffle), not one class per shard
    first = [s["cls"] for s in samples[:8]]
    assert len(set(first)) > 1


def test_original_bytes_kept_for_valid_jpegs(imagenet_tree, tmp_path):
    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out) == 0
    for s in wds.WebDataset(glob.glob(str(out / "train" / "*.tar")), shardshuffle=False, empty_check=False).decode():
        if "converted" not in s["json"]:
            with open(os.path.join(imagenet_tree["root"], s["json"]["path"]), "rb") as f:
                assert f.read() == s["jpg"]


def test_resize_and_quality_reencode(imagenet_tree, tmp_path):
    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out, "--resize-max-side", 32, "--quality", 80) == 0
    samples = read_samples(out)
    assert samples and all(max(s["jpg"].size) == 32 for s in samples)
    assert all("converted" in s["json"] for s in samples)


def test_deterministic_byte_identical(imagenet_tree, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(imagenet_tree["root"], "--out", a, "--shard-size", 5, "--workers", 2) == 0
    assert run(imagenet_tree["root"], "--out", b, "--shard-size", 5, "--workers", 1) == 0
    assert digests(a) == digests(b) and len(digests(a)) > 4
    assert run(imagenet_tree["root"], "--out", c, "--shard-size", 5, "--seed", 1) == 0
    assert digests(c) != digests(a)  # the seed changes the shard assignment


def test_limit_per_class(imagenet_tree, tmp_path):
    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out, "--limit-per-class", 2) == 0
    m = load_manifest(out)
    assert all(c["count"] <= 2 for c in m["classes"]) and m["num_samples"] <= 6


def test_resume_after_damage_rebuilds_only_what_is_missing(imagenet_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out, "--shard-size", 3) == 0
    want = digests(out)
    shards = sorted(glob.glob(str(out / "train" / "*.tar")))
    os.remove(shards[0])  # lost
    with open(shards[1], "r+b") as f:  # corrupted after completion
        f.seek(600)
        f.write(b"XXXX")
    write(shards[2] + ".tmp-99999", b"partial")  # left by a killed run
    os.remove(out / "train" / "manifest.json")
    capsys.readouterr()
    assert shard.main([imagenet_tree["root"], "--out", str(out), "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(shards) - 2} shard(s) already complete and verified, 2 to build" in printed
    assert digests(out) == want
    assert not glob.glob(str(out / "train" / "*.tmp-*"))


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    src = tmp_path / "big"
    crops = photo_crops(240, size=(500, 375))
    for i, img in enumerate(crops):
        write(str(src / "train" / WNIDS[i % 3] / f"img_{i:04d}.JPEG"), jpeg_bytes(img))
    opts = ["--shard-size", "8", "--workers", "1", "--check", "full", "--resize-max-side", "300", "--quiet"]
    ref = tmp_path / "ref"
    assert shard.main([str(src), "--out", str(ref)] + opts) == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "pipeline", "shard.py"), str(src), "--out", str(out)] + opts
    )
    records = out / "train" / ".records"
    deadline = time.time() + 60
    while time.time() < deadline and len(glob.glob(str(records / "*.json"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(glob.glob(str(records / "*.json")))
    assert 2 <= done < 30, "the kill must land mid-run"
    assert not (out / "train" / "manifest.json").exists()
    assert shard.main([str(src), "--out", str(out)] + opts) == 0
    assert digests(out) == digests(ref)


def test_multi_task_then_merge_equals_single_run(imagenet_tree, tmp_path, capsys):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert run(imagenet_tree["root"], "--out", single, "--shard-size", 2) == 0
    args = [imagenet_tree["root"], "--out", multi, "--shard-size", 2]
    assert run(*args, "--task-index", 0, "--num-tasks", 3) == 0
    assert not (multi / "train" / "manifest.json").exists()
    assert run(*args, "--merge") == 2  # task 1 and 2 have not run
    assert "cannot merge" in capsys.readouterr().err
    assert run(*args, "--task-index", 2, "--num-tasks", 3) == 0
    assert run(*args, "--task-index", 1, "--num-tasks", 3) == 0
    assert (multi / "train" / "manifest.json").exists()  # the last task merged
    os.remove(multi / "train" / "manifest.json")
    assert run(*args, "--merge") == 0
    assert digests(multi) == digests(single)


def _flat_val(tmp_path, per_class=3):
    root = tmp_path / "flat"
    truth = []
    crops = photo_crops((per_class + 1) * len(WNIDS), seed=3)
    for wnid in WNIDS:
        write(str(root / "train" / wnid / f"{wnid}_0.JPEG"), jpeg_bytes(next(crops)))
    n = 0
    for wnid in WNIDS:
        for _ in range(per_class):
            n += 1
            write(str(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG"), jpeg_bytes(next(crops)))
            truth.append(wnid)
    return root, truth


def _val_labels(out):
    return {os.path.basename(s["json"]["path"]): (s["cls"], s["json"]["class"]) for s in read_samples(out, "val")}


def test_flat_val_with_kaggle_solution(tmp_path):
    root, truth = _flat_val(tmp_path)
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for n, wnid in enumerate(truth, start=1):
            w.writerow([f"ILSVRC2012_val_{n:08d}", f"{wnid} 1 2 30 40 {wnid} 5 6 7 8"])
    with open(root / "LOC_synset_mapping.txt", "w") as f:
        f.writelines(f"{w} fish number {i}\n" for i, w in enumerate(WNIDS))
    out = tmp_path / "out"
    assert run(root, "--out", out) == 0
    labels = _val_labels(out)
    assert len(labels) == len(truth)
    for n, wnid in enumerate(truth, start=1):
        assert labels[f"ILSVRC2012_val_{n:08d}.JPEG"] == (WNIDS.index(wnid), wnid)
    assert load_manifest(out, "val")["classes"][1]["name"] == "fish number 1"


@pytest.mark.parametrize("id_map", ["txt", "mat"])
def test_flat_val_with_devkit_ground_truth(tmp_path, id_map):
    root, truth = _flat_val(tmp_path)
    # ILSVRC2012_IDs are not in WNID order: give the classes shuffled IDs.
    ids = {"n01440764": 2, "n01443537": 3, "n01484850": 1}
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    os.makedirs(devkit)
    with open(devkit / "ILSVRC2012_validation_ground_truth.txt", "w") as f:
        f.writelines(f"{ids[w]}\n" for w in truth)
    by_id = sorted(ids, key=ids.get)
    if id_map == "txt":
        with open(devkit / "ILSVRC2012_id_to_wnid.txt", "w") as f:
            f.writelines(f"{w}\n" for w in by_id)
    else:
        import scipy.io

        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = np.array([(ids[w], w, "fish", 0) for w in WNIDS] + [(1001, "n00000001", "animal", 3)], dtype=dtype)
        scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    out = tmp_path / "out"  # the devkit unpacked beside train/ and val/ is found there
    assert run(root, "--out", out) == 0
    labels = _val_labels(out)
    assert len(labels) == len(truth)
    for n, wnid in enumerate(truth, start=1):
        assert labels[f"ILSVRC2012_val_{n:08d}.JPEG"] == (WNIDS.index(wnid), wnid)


def test_flat_val_without_ground_truth_is_a_clear_error(tmp_path, capsys):
    root, _ = _flat_val(tmp_path)
    assert run(root, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "ground truth" in err and "\n" not in err
    assert f"looked in {os.path.join(root, 'val')}, {root}," in err  # where it looked


def test_empty_directory_says_it_holds_no_images(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    assert run(tmp_path / "empty", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds no images" in err and "holds images" not in err


def test_quality_change_is_accepted_when_nothing_was_reencoded(tmp_path, capsys):
    for i, img in enumerate(photo_crops(6, (40, 30), seed=1)):
        write(os.path.join(tmp_path, "src", "train", WNIDS[i % 2], f"{i}.JPEG"), jpeg_bytes(img))
    out = tmp_path / "out"
    assert run(tmp_path / "src", "--out", out) == 0
    assert load_manifest(out)["converted"] == []
    shards = lambda: {k: v for k, v in digests(out).items() if k.endswith(".tar")}  # noqa: E731
    before = shards()
    assert run(tmp_path / "src", "--out", out, "--quality", 90) == 0, capsys.readouterr().err
    assert shards() == before and load_manifest(out)["options"]["quality"] == 90


def test_help_names_each_default_once():
    text = subprocess.run(
        [sys.executable, os.path.join(REPO, "pipeline", "shard.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    import re

    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\)\s*\(default:", text)
    assert "(default: 1000)" in " ".join(text.split()) and "--verify found problems" in " ".join(text.split())


def test_clear_errors_exit_2(tmp_path, imagenet_tree, capsys):
    assert run(tmp_path / "nope", "--out", tmp_path / "o") == 2
    assert "input directory not found" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty" / "train" / "n0")
    assert run(tmp_path / "empty", "--out", tmp_path / "o") == 2
    assert "no images found" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(imagenet_tree["root"], "--out", blocker / "sub") == 2
    err = capsys.readouterr().err
    assert "cannot write to output directory" in err and len(err.strip().splitlines()) == 1


def test_refuses_to_mix_builds_unless_overwrite(imagenet_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(imagenet_tree["root"], "--out", out) == 0
    assert run(imagenet_tree["root"], "--out", out, "--quality", 80) == 2
    assert "options differ: quality" in capsys.readouterr().err
    assert run(imagenet_tree["root"], "--out", out, "--quality", 80, "--shard-size", 2, "--overwrite") == 0
    assert load_manifest(out)["options"]["shard_size"] == 2
    assert len(glob.glob(str(out / "train" / "*.tar"))) == load_manifest(out)["num_shards"]


def test_verify_detects_damage(imagenet_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(imagenet_tree["root"], "--out", out, "--shard-size", 4) == 0
    assert shard.main(["--verify", str(out), "--quiet"]) == 0
    tars = sorted(glob.glob(str(out / "train" / "*.tar")))
    with open(tars[0], "r+b") as f:
        f.seek(700)
        f.write(b"XYZ")
    with open(tars[1], "r+b") as f:
        f.truncate(1024)
    capsys.readouterr()
    assert shard.main(["--verify", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "sha256 does not match" in err and "size 1024" in err
    assert shard.main(["--verify", str(tmp_path), "--quiet"]) == 2


def test_demo_data_shards(tmp_path):
    from pipeline import demo

    root = demo.write_demo_tree(str(tmp_path / "mnist"))
    out = tmp_path / "shards"
    assert run(root, "--out", out, "--shard-size", 500) == 0
    train, val = load_manifest(out, "train"), load_manifest(out, "val")
    assert (train["num_samples"], val["num_samples"]) == (4000, 1000)
    assert train["num_classes"] == 10 and all(c["count"] == 400 for c in train["classes"])
    assert not train["skipped"] and not train["converted"]
    assert shard.main(["--verify", str(out), "--quiet"]) == 0
    sample = next(
        iter(wds.WebDataset(str(out / "val" / "val-000000.tar"), shardshuffle=False, empty_check=False).decode("pil"))
    )
    assert sample["jpg"].size == (28, 28) and 0 <= sample["cls"] < 10


def test_a_tree_without_split_folders_is_one_split_named_by_split_name(tmp_path):
    """README: a SRC without train/ or val/ is one class-per-folder split, named by
    --split-name (default train)."""
    for i, img in enumerate(photo_crops(6, seed=5)):
        write(str(tmp_path / "src" / WNIDS[i % 2] / f"{i}.JPEG"), jpeg_bytes(img))
    assert run(tmp_path / "src", "--out", tmp_path / "a", "--quiet") == 0
    assert load_manifest(tmp_path / "a", "train")["num_samples"] == 6
    assert run(tmp_path / "src", "--out", tmp_path / "b", "--split-name", "val", "--quiet") == 0
    assert os.listdir(tmp_path / "b") == ["val"] and load_manifest(tmp_path / "b", "val")["num_samples"] == 6


def test_sample_offsets_live_in_one_binary_file_beside_the_manifest(imagenet_tree, tmp_path):
    """The manifest grows with the shards, not the samples: every shard's offsets are in
    offsets.bin (int64, shard after shard, samples + 1 each), exactly what the tars hold;
    the loader reads them from there, one shard at a time."""
    from pipeline.manifest import OffsetsFile
    from pipeline.manifest import load_manifest as load

    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out, "--shard-size", 4) == 0
    m = load_manifest(out)
    assert all("offsets" not in s for s in m["shards"]) and m["offsets"]["file"] == shard.OFFSETS
    data = (out / "train" / shard.OFFSETS).read_bytes()
    assert len(data) == m["offsets"]["bytes"] and hashlib.sha256(data).hexdigest() == m["offsets"]["sha256"]
    expected = [o for url in urls(out) for o in shard.sample_offsets(url)]
    assert np.frombuffer(data, dtype="<i8").tolist() == expected
    loaded = load(str(out / "train"))
    assert isinstance(loaded.offsets, OffsetsFile)
    for i, url in enumerate(loaded.urls):
        assert loaded.offsets[i].tolist() == shard.sample_offsets(url)


def test_a_manifest_with_inline_offsets_still_loads_and_reads_the_same_samples(imagenet_tree, tmp_path):
    """Manifests written before the offsets file (each shard's offsets inline) load as they
    did, and a stream reads the same samples from either."""
    from pipeline.data import TrainStream
    from pipeline.manifest import load_manifest as load
    from pipeline.transforms import Augment

    def keys(manifest):
        stream = TrainStream(manifest, 2, augment=Augment.light(32), shuffle_buffer=3)
        return [k for b in stream.iter_worker(0, 1, main=True) for k in b["key"]]

    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out, "--shard-size", 4) == 0
    from_file = keys(load(str(out / "train")))
    m = load_manifest(out)
    for s, url in zip(m["shards"], urls(out)):
        s["offsets"] = shard.sample_offsets(url)
    del m["offsets"]
    (out / "train" / shard.OFFSETS).unlink()
    (out / "train" / "manifest.json").write_text(json.dumps(m))
    old = load(str(out / "train"))
    assert isinstance(old.offsets, tuple)
    assert keys(old) == from_file and len(from_file) >= 10


def test_verify_checks_the_offsets_file_and_each_shards_offsets(imagenet_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run(imagenet_tree["root"], "--out", out, "--shard-size", 4) == 0
    assert run("--verify", out) == 0
    path = out / "train" / shard.OFFSETS
    good = path.read_bytes()
    path.write_bytes(good[:-8] + (123).to_bytes(8, "little"))  # damaged: no longer the manifest's sha256
    assert run("--verify", out) == 1
    assert "offsets.bin: size or sha256 does not match the manifest" in capsys.readouterr().err
    # consistent with the manifest, but not what the tar holds: a shard's own check finds it
    m = load_manifest(out)
    bad = good[:8] + (int.from_bytes(good[8:16], "little") + 512).to_bytes(8, "little") + good[16:]
    path.write_bytes(bad)
    m["offsets"]["sha256"] = hashlib.sha256(bad).hexdigest()
    (out / "train" / "manifest.json").write_text(json.dumps(m))
    assert run("--verify", out) == 1
    assert "sample offsets differ from the manifest's" in capsys.readouterr().err


def test_a_split_past_table_above_lists_its_shards_in_a_binary_table_that_reads_the_same(
    imagenet_tree, tmp_path, monkeypatch, capsys
):
    """Past shard.TABLE_ABOVE shards (100,000; here 0) the manifest names its shards by
    pattern and keeps samples, bytes and sha256 in shards.bin: the loader gives the same
    shards and a stream the same samples as from the JSON list; --verify checks the table;
    a truncated table is one line at load, and a --verify problem."""
    from pipeline.data import TrainStream
    from pipeline.errors import InputError
    from pipeline.manifest import load_manifest as load
    from pipeline.transforms import Augment

    def keys(manifest):
        stream = TrainStream(manifest, 2, augment=Augment.light(32), shuffle_buffer=3)
        return [k for b in stream.iter_worker(0, 1, main=True) for k in b["key"]]

    listed, table = tmp_path / "listed", tmp_path / "table"
    assert run(imagenet_tree["root"], "--out", listed, "--shard-size", 4, "--quiet") == 0
    monkeypatch.setattr(shard, "TABLE_ABOVE", 0)
    assert run(imagenet_tree["root"], "--out", table, "--shard-size", 4, "--quiet") == 0
    m = load_manifest(table)
    assert "shards" not in m and m["shard_table"]["names"] == "train-{:06d}.tar"
    path = table / "train" / shard.SHARD_TABLE
    assert path.stat().st_size == 48 * m["shard_table"]["count"] == 48 * len(load_manifest(listed)["shards"])
    a, b = load(str(listed / "train")), load(str(table / "train"))
    assert [os.path.basename(u) for u in a.urls] == [os.path.basename(u) for u in b.urls]
    assert list(a.sizes) == list(b.sizes) and list(a.shard_bytes) == list(b.shard_bytes)
    assert list(a.sha256) == list(b.sha256) and a.num_samples == b.num_samples
    assert keys(a) == keys(b) and len(keys(b)) >= 10
    assert run("--verify", table) == 0
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(InputError, match="the shard table is missing or truncated"):
        load(str(table / "train"))
    assert run("--verify", table) == 1
    assert "the shard table" in capsys.readouterr().err


def test_val_fraction_cuts_a_seeded_stratified_val_split_from_train(imagenet_tree, tmp_path, capsys):
    """A tree with no val split (ImageNet-21k's fall11): --val-fraction takes that share of
    each class's train images (at least one), disjoint from train, the same on a re-run,
    another draw with another --seed."""
    out, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    args = ("--splits", "train", "--val-fraction", "0.25", "--shard-size", 4)
    assert run(imagenet_tree["root"], "--out", out, *args) == 0
    train, val = read_samples(out, "train"), read_samples(out, "val")
    per_class = {}
    for s in train + val:
        per_class[s["cls"]] = per_class.get(s["cls"], 0) + 1
    taken = {}
    for s in val:
        taken[s["cls"]] = taken.get(s["cls"], 0) + 1
    assert set(taken) == set(per_class)  # every class in val
    for cls, n in per_class.items():
        assert taken[cls] == min(n - 1, max(1, round(0.25 * n))), (cls, n, taken[cls])
    paths = lambda samples: {s["json"]["path"] for s in samples}  # noqa: E731
    assert not paths(train) & paths(val)
    ids = lambda split: [c["id"] for c in load_manifest(out, split)["classes"]]  # noqa: E731
    assert ids("val") == ids("train")
    assert run(imagenet_tree["root"], "--out", again, *args) == 0
    assert digests(out) == digests(again)
    assert run(imagenet_tree["root"], "--out", other, *args, "--seed", 1) == 0
    assert paths(read_samples(other, "val")) != paths(val)
    capsys.readouterr()
    assert run(imagenet_tree["root"], "--out", tmp_path / "d", "--val-fraction", "0.25") == 2  # a val folder exists
    assert "needs a train split and no val split" in capsys.readouterr().err


# --------------------------------------------------------------------------- planning at fall11's size

PREFIX_CLASSES = ["a", "a-b", "a.b", "a0", "b", "n01440764"]  # "a-b/" sorts before "a/": paths, not names


def synthetic_listing(seed: int, per_class: int = 30):
    """A listing of PREFIX_CLASSES' folders, made as a walk makes it (nested names, random
    sizes and counts, names unsorted within a folder); with its files as (rel, class, size)
    tuples, one per file, in walk order: what the listing held before 2026-12-07."""
    from pipeline.imagenet import Listing

    rng = np.random.default_rng(seed)
    listing, files = Listing("/data"), []
    for cls in PREFIX_CLASSES:
        names = [f"{'sub/' if rng.random() < 0.2 else ''}{rng.integers(1e6):06d}_{i}.JPEG" for i in range(per_class)]
        chunk = [(name, cls, int(rng.integers(1, 5000))) for name in names[: int(rng.integers(0, per_class))]]
        listing.add_chunk(os.path.join("train", cls), chunk)
        files += [(os.path.join("train", cls, name), c, size) for name, c, size in chunk]
    return listing.close(), files


def reference_plan(files, classes, options, split):
    """The plan as made with one object per file: sort by path, keep --limit-per-class,
    shuffle with the split's seed, cut greedily by count and bytes."""
    import random
    from collections import Counter

    index = {c: i for i, c in enumerate(classes)}
    entries, seen = [], Counter()
    for f in sorted((f for f in files if f[1] in index), key=lambda f: f[0]):
        seen[f[1]] += 1
        if not options.limit_per_class or seen[f[1]] <= options.limit_per_class:
            entries.append(f)
    random.Random(f"{options.seed}:{split}").shuffle(entries)
    shards, current, nbytes = [], [], 0
    for i, (rel, cls, size) in enumerate(entries):
        if current and (len(current) >= options.shard_size or nbytes + size > options.shard_bytes):
            shards.append(current)
            current, nbytes = [], 0
        current.append((f"{split}_{i:08d}", "/data/" + rel, rel, index[cls], cls))
        nbytes += size
    return shards + ([current] if current else [])


@pytest.mark.parametrize(
    "options",
    [
        shard.Options(shard_size=7),
        shard.Options(seed=3, shard_size=50, shard_bytes=9000),
        shard.Options(seed=1, shard_size=4, limit_per_class=5),
    ],
    ids=["count", "bytes", "limit"],
)
def test_the_columnar_plan_is_the_plan_made_with_one_object_per_file(options):
    """The listing's columns, the array shuffle and the per-shard cut place every sample
    where sorting, shuffling and cutting one object per file placed it (bit-identical
    shards for a build started before 2026-12-07); the --val-fraction cut and the inputs
    digest too; a class missing from the class list is rejected, not placed."""
    import random

    listing, files = synthetic_listing(seed=options.seed + options.shard_size)
    classes = PREFIX_CLASSES[1:]  # "a" is rejected, as a val class that train lacks
    plan, rejected = shard.plan_split("train", listing, classes, options, "/out")
    got = [[(s.key, s.path, s.rel, s.label, s.cls) for s in plan.job(k).samples] for k in range(len(plan))]
    assert got == reference_plan(files, classes, options, "train")
    assert [r["path"] for r in rejected] == [f[0] for f in files if f[1] == "a"]

    train, val = shard.cut_validation(listing, 0.25, seed=options.seed)
    picked = set()
    for cls in PREFIX_CLASSES:
        items = sorted((f for f in files if f[1] == cls), key=lambda f: f[0])
        k = min(len(items) - 1, max(1 if len(items) >= 2 else 0, round(0.25 * len(items))))
        picked.update(f[0] for f in random.Random(f"{options.seed}:{cls}").sample(items, k))
    assert train.rels(train.order) == sorted(f[0] for f in files if f[0] not in picked)
    assert val.rels(val.order) == sorted(picked)
    expected = hashlib.sha256()
    for rel, cls, size in sorted(files):
        expected.update(f"{rel}\0{cls}\0{size}\n".encode())
    assert shard.inputs_digest(listing, batch=7) == expected.hexdigest()


def test_listing_and_planning_memory_grow_by_bytes_per_image_not_by_objects():
    """fall11 (14.2M images, 21,841 classes) in bounded memory: the listing, the val cut,
    the class index, the plan, the digest and one task's jobs for 4x the classes (fixed
    images per class) add under 100 bytes of traced memory per extra image (~50 here). One
    object per image (the listing before 2026-12-07) cost ~620 (bench/build_bench.py)."""
    import tracemalloc

    from pipeline.imagenet import Listing

    def peak(classes: int, per_class: int = 100) -> int:
        tracemalloc.start()
        try:
            listing = Listing("/data")
            for c in range(classes):
                wnid = f"n{c:08d}"
                listing.add_chunk(f"train/{wnid}", [(f"{wnid}_{i}.JPEG", wnid, 1000 + i) for i in range(per_class)])
            train, val = shard.cut_validation(listing.close(), 0.02, 0)
            names = sorted(train.used_classes())
            plan, _ = shard.plan_split("train", train, names, shard.Options(shard_size=1000), "/out")
            shard.inputs_digest(train)
            assert sum(len(plan.job(k).samples) for k in range(0, len(plan), 16)) > 0  # a task's, one at a time
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(400), peak(1600)
    per_image = (large - small) / (1200 * 100)
    assert per_image < 100, f"{per_image:.0f} bytes per image"


@pytest.mark.slow
def test_a_fall11_shaped_tree_of_21841_class_folders_shards_as_a_two_task_array(tmp_path):
    """fall11's layout end to end: 21,841 class folders (two small JPEGs each, no val
    folder), --val-fraction cuts one image of every class, and a two-task array (as
    SLURM_ARRAY_TASK_ID/COUNT set it) writes every shard once; the last task writes the
    manifests, which list every class in WNID order, each class once in train and once
    in val."""
    src = tmp_path / "fall11"
    data = [jpeg_bytes(img) for img in photo_crops(2, (16, 16))]
    wnids = [f"n{i:08d}" for i in range(21_841)]
    for wnid in wnids:
        os.makedirs(src / wnid)
        for i in range(2):
            (src / wnid / f"{wnid}_{i}.JPEG").write_bytes(data[i])
    out = tmp_path / "shards"
    args = (src, "--out", out, "--val-fraction", "0.02", "--shard-size", 2000, "--workers", 2)
    for task in (0, 1):
        assert run(*args, "--num-tasks", 2, "--task-index", task) == 0
    train, val = load_manifest(out, "train"), load_manifest(out, "val")
    assert [c["id"] for c in train["classes"]] == wnids == [c["id"] for c in val["classes"]]
    assert {c["count"] for c in train["classes"]} == {1} == {c["count"] for c in val["classes"]}
    assert train["num_shards"] == val["num_shards"] == 11
    assert run("--verify", out) == 0
