"""The shapes dataset and 🤗 datasets sources."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from latentgen.data import DataConfig, ShapesSpec, build_dataset, check_resolution, heldout_triples, make_sample
from latentgen.data.__main__ import export
from latentgen.data.shapes import ALL_KINDS, COLOR_NAMES, COLORS, KINDS, ZH_COLORS, ZH_KINDS, train_triples
from latentgen.errors import UserError


def test_same_seed_same_samples_different_seed_different():
    a = [make_sample(ShapesSpec(seed=1), i) for i in range(20)]
    b = [make_sample(ShapesSpec(seed=1), i) for i in range(20)]
    c = [make_sample(ShapesSpec(seed=2), i) for i in range(20)]
    assert [s.text for s in a] == [s.text for s in b]
    assert all(np.array_equal(np.asarray(x.render()), np.asarray(y.render())) for x, y in zip(a, b))
    assert [s.text for s in a] != [s.text for s in c]
    assert make_sample(ShapesSpec(seed=1), 7).text == a[7].text  # sample i does not depend on the others


@pytest.mark.parametrize("resolution,kinds", [(32, KINDS), (64, KINDS), (96, KINDS), (64, ALL_KINDS)])
def test_captions_and_pixels_agree_with_the_ground_truth(resolution, kinds):
    spec = ShapesSpec(resolution=resolution, two_shape_fraction=0.5, language="both", kinds=kinds)
    for i in range(60):
        s = make_sample(spec, i)
        img = np.asarray(s.render()).astype(int)
        assert img.shape == (resolution, resolution, 3)
        assert all(sh.color != s.background for sh in s.shapes)
        for caption in s.captions:
            zh = caption[0] in "".join(ZH_COLORS.values())
            colors, kinds = (ZH_COLORS, ZH_KINDS) if zh else ({c: c for c in COLORS}, {k: k for k in ALL_KINDS})
            assert colors[s.background] in caption
            for sh in s.shapes:
                assert f"{colors[sh.color]}{'' if zh else ' '}{kinds[sh.kind]}" in caption
        if len(s.shapes) == 2:
            left, right = s.shapes
            assert left.box[2] <= right.box[0]  # left to right, not overlapping
            assert f"a {left.color} {left.kind} to the left of" in s.captions[0].replace("an ", "a ")
        for sh in s.shapes:  # the shape's center has its color
            x, y = int(sh.center[0]), int(sh.center[1])
            assert np.abs(img[y, x] - COLORS[sh.color]).max() <= 2, (i, sh)
        covered = np.zeros(img.shape[:2], bool)
        for sh in s.shapes:
            x0, y0, x1, y1 = sh.box
            covered[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
        assert (np.abs(img[~covered] - COLORS[s.background]).max(axis=-1) == 0).all()


def test_heldout_combinations_never_occur_in_train():
    held = set(heldout_triples())
    assert len(held) == 27
    for i in range(1500):
        s = make_sample(ShapesSpec(split="train"), i)
        assert not {(sh.color, sh.kind, s.background) for sh in s.shapes} & held
    for i in range(300):
        s = make_sample(ShapesSpec(split="heldout"), i)
        assert {(sh.color, sh.kind, s.background) for sh in s.shapes} & held


def test_kind_weights_draw_kinds_that_often_and_keep_the_heldout_split_out():
    def share(spec, n=1500):
        kinds = [sh.kind for i in range(n) for sh in make_sample(spec, i).shapes]
        return {k: kinds.count(k) / len(kinds) for k in KINDS}

    plain = share(ShapesSpec())
    assert all(abs(plain[k] - 1 / 3) < 0.04 for k in KINDS), plain
    weighted = share(ShapesSpec(kind_weights=(1, 1, 4)))
    assert abs(weighted["triangle"] - 4 / 6) < 0.04 and abs(weighted["circle"] - 1 / 6) < 0.04, weighted
    assert share(ShapesSpec(kind_weights=(0, 1, 0)), 200)["square"] == 1.0
    held = set(heldout_triples())
    for i in range(500):
        s = make_sample(ShapesSpec(kind_weights=(1, 1, 4)), i)
        assert not {(sh.color, sh.kind, s.background) for sh in s.shapes} & held
    # without weights the samples are the ones they were before weights existed (configs and caches rely on it)
    digest = hashlib.sha256()
    for i in range(20):
        s = make_sample(ShapesSpec(seed=3), i)
        digest.update(s.text.encode() + np.asarray(s.render()).tobytes())
    assert digest.hexdigest()[:16] == "7599fe6b8643afae"
    for weights in [(1, 1), (1, -1, 1), (0, 0, 0)]:
        with pytest.raises(UserError, match=r"kind_weights must be 3 numbers ≥ 0 \(one per kind: circle, square, "):
            ShapesSpec(kind_weights=weights).check()
    assert DataConfig(kind_weights=[1, 1, 4]).shapes_spec().kind_weights == (1, 1, 4)


def test_new_kinds_only_when_asked_and_with_a_heldout_split_of_their_own():
    assert not any(sh.kind == "star" for i in range(300) for sh in make_sample(ShapesSpec(), i).shapes)
    stars = [sh for i in range(300) for sh in make_sample(ShapesSpec(kinds=ALL_KINDS), i).shapes if sh.kind == "star"]
    assert 0.15 <= len(stars) / 390 <= 0.35  # about a quarter of ~390 shapes
    assert set(heldout_triples()) < set(heldout_triples(ALL_KINDS))  # the old split is unchanged
    held_stars = {t for t in heldout_triples(ALL_KINDS) if t[1] == "star"}
    assert len(held_stars) == 9
    for i in range(500):
        s = make_sample(ShapesSpec(split="train", kinds=ALL_KINDS), i)
        assert not {(sh.color, sh.kind, s.background) for sh in s.shapes} & held_stars
    with pytest.raises(UserError, match="unknown shape kind 'hexagon'.*star"):
        ShapesSpec(kinds=("circle", "hexagon")).check()
    assert make_sample(ShapesSpec(kinds=("star",), language="zh", max_shapes=1), 0).text.endswith("五角星")


def test_every_part_of_a_heldout_combination_is_seen_in_training():
    train = train_triples()
    for c, k, b in heldout_triples():
        assert any(t[:2] == (c, k) for t in train)
        assert any((t[0], t[2]) == (c, b) for t in train)
        assert any(t[1:] == (k, b) for t in train)
    assert len(train) + len(heldout_triples()) == len(COLOR_NAMES) * len(KINDS) * (len(COLOR_NAMES) - 1)


def test_chinese_captions():
    s = make_sample(ShapesSpec(language="zh", max_shapes=1), 0)
    shape = s.shapes[0]
    assert s.captions[0] == f"{ZH_COLORS[s.background]}背景上的{ZH_COLORS[shape.color]}{ZH_KINDS[shape.kind]}"


def test_export_loads_with_datasets_imagefolder(tmp_path):
    import datasets

    spec = ShapesSpec(split="heldout", resolution=32, seed=3)
    export(tmp_path / "ds", 6, spec)
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "ds"), split="train")
    assert len(ds) == 6
    for row in ds:
        sample = make_sample(spec, row["index"])
        assert row["text"] == sample.text and row["background"] == sample.background
        assert [s["kind"] for s in row["shapes"]] == [s.kind for s in sample.shapes]
        assert list(row["shapes"][0]["box"]) == list(sample.shapes[0].box)
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(sample.render()))


def test_export_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "latentgen.data", *map(str, a)], cwd=ROOT,  # noqa
                                    capture_output=True, text=True, timeout=120)
    r = run("export", "--out", tmp_path / "x", "--count", 3, "--split", "train", "--resolution", 48)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "x" / "metadata.jsonl").read_text().splitlines()) == 3
    r = run("export", "--out", tmp_path / "y", "--count", 3, "--split", "test")
    assert r.returncode == 2 and "invalid choice: 'test'" in r.stderr and not (tmp_path / "y").exists()
    r = run("export", "--out", tmp_path / "y", "--count", 3, "--resolution", 4)
    assert r.returncode == 2 and "resolution must be an integer ≥ 16" in r.stderr
    r = run("heldout")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 27


@pytest.fixture
def folder(tmp_path):
    export(tmp_path / "ds", 5, ShapesSpec(resolution=32, two_shape_fraction=0.0))
    return tmp_path / "ds"


def test_folder_source_with_transforms(folder):
    config = DataConfig(source="hf", path=str(folder), resolution=24, random_crop=True, hflip=1.0)
    ds = build_dataset(config)
    item = ds.item(0, epoch=0, seed=0)
    assert item["pixel_values"].shape == (3, 24, 24)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert torch.equal(item["pixel_values"], ds.item(0, epoch=0, seed=0)["pixel_values"])  # deterministic


def test_several_captions_per_image_drawn_at_random(folder):
    ds = build_dataset(DataConfig(source="hf", path=str(folder), resolution=32, caption_column="captions"))
    captions = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["captions"]
    drawn = {ds.item(0, epoch=e)["text"] for e in range(30)}
    assert drawn <= set(captions) and len(drawn) > 1


def test_corrupt_image_is_skipped_and_counted(folder):
    (folder / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = build_dataset(DataConfig(source="hf", path=str(folder), resolution=32))
    assert len(ds) == 4 and ds.skipped == 1
    texts = {ds.item(i)["text"] for i in range(len(ds))}
    assert len(texts) >= 1 and all(ds.item(i)["pixel_values"].shape == (3, 32, 32) for i in range(4))


def test_parquet_source(folder, tmp_path):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    ds.to_parquet(str(tmp_path / "shapes.parquet"))
    loaded = build_dataset(DataConfig(source="hf", path=str(tmp_path / "shapes.parquet"), resolution=32))
    assert len(loaded) == 5 and loaded.item(0)["text"] == ds[0]["text"]


@pytest.mark.parametrize("as_dict", [True, False], ids=["DatasetDict", "Dataset"])
def test_save_to_disk_folder_source(folder, tmp_path, as_dict):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(tmp_path / "saved"))
    loaded = build_dataset(DataConfig(source="hf", path=str(tmp_path / "saved"), resolution=32))
    assert len(loaded) == 5 and [loaded.item(i)["text"] for i in range(5)] == ds["text"]
    if as_dict:
        with pytest.raises(UserError, match="has no split 'test'; its splits are: train"):
            build_dataset(DataConfig(source="hf", path=str(tmp_path / "saved"), hf_split="test"))


def test_webdataset_tar_shards(folder, tmp_path):
    """A folder of webdataset shards (key.png + key.txt in each tar), the form large image-text sets ship in."""
    import io
    import tarfile

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(tmp_path / "shards" / f"shard-{shard:05d}.tar", "w") as tar:
            for row in rows[shard::2]:
                key = Path(row["file_name"]).stem
                for name, data in ((f"{key}.png", (folder / row["file_name"]).read_bytes()),
                                   (f"{key}.txt", row["text"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    ds = build_dataset(DataConfig(source="hf", path=str(tmp_path / "shards"), resolution=32, image_column="png",
                                  caption_column="txt"))
    assert len(ds) == 5
    assert sorted(ds.item(i)["text"] for i in range(5)) == sorted(r["text"] for r in rows)
    assert ds.item(0)["pixel_values"].shape == (3, 32, 32)


def test_streaming_source(folder):
    ds = build_dataset(DataConfig(source="hf", path=str(folder), resolution=32, streaming=True))
    items = list(ds.iterate(epoch=0, seed=0))
    assert len(items) == 5
    assert [i["text"] for i in ds.iterate(epoch=0, seed=0)] == [i["text"] for i in items]  # one order per epoch


def test_a_stream_is_split_across_ranks_and_resumes_where_it_stopped(tmp_path):
    """Two ranks read disjoint parts of a streamed folder (split_dataset_by_node) that together are all of it;
    a rank's batches from micro-step 3 on are those of its unbroken stream from there, across an epoch's end."""
    from itertools import islice

    from latentgen.training.loop import TrainConfig, batch_iterator

    export(tmp_path / "ds", 12, ShapesSpec(resolution=32, two_shape_fraction=0.0))
    config = TrainConfig(train_batch_size=2, seed=1,
                         data=DataConfig(source="hf", path=str(tmp_path / "ds"), resolution=32, streaming=True))
    ds = build_dataset(config.data)
    parts = [[item["text"] for item in ds.iterate(0, 1, rank, 2)] for rank in (0, 1)]
    everything = [item["text"] for item in ds.iterate(0, 1)]
    assert len(parts[0]) + len(parts[1]) == 12 and sorted(parts[0] + parts[1]) == sorted(everything)
    assert parts[0] != parts[1][:len(parts[0])]
    for rank in (0, 1):
        whole = [b["text"] for b in islice(batch_iterator(ds, config, 2, rank, 0), 8)]  # past the 3 of epoch 0
        resumed = [b["text"] for b in islice(batch_iterator(ds, config, 2, rank, 3), 5)]
        assert resumed == whole[3:]
        assert [t for b in whole[:3] for t in b] == parts[rank]


def test_bad_sources(folder, tmp_path):
    with pytest.raises(UserError, match="dataset folder .*nowhere does not exist"):
        build_dataset(DataConfig(source="hf", path=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="caption column 'caption' is not in dataset .* columns are: image, text"):
        build_dataset(DataConfig(source="hf", path=str(folder), caption_column="caption"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="cannot load dataset|has no rows"):
        build_dataset(DataConfig(source="hf", path=str(empty)))
    with pytest.raises(UserError, match="unknown data source 'shape'.*did you mean 'shapes'"):
        build_dataset(DataConfig(source="shape"))
    with pytest.raises(UserError, match="resolution 60 is not a multiple of 8.*try 56 or 64"):
        check_resolution(60, 8)
