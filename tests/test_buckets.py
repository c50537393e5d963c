"""Aspect-ratio buckets (data.buckets, kohya's enable_bucket): the bucket table, each image in the bucket nearest
its aspect ratio (scaled to cover it, then cropped), every batch from one bucket, exact resume, a training run."""

import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from latentgen.data import DataConfig, build_dataset
from latentgen.data.buckets import bucket_sizes, fit, nearest
from latentgen.errors import UserError
from latentgen.training.loop import BucketBatches, TrainConfig, batch_iterator
from test_train_unet import SMOKE, run

SIZES = [(64, 64), (128, 64), (64, 128), (96, 48), (40, 80), (70, 64), (64, 64), (128, 60), (50, 100), (64, 64),
         (120, 64), (64, 120)]


def test_the_bucket_table_is_kohyas():
    """SD 1.5's table in sd-scripts (512² budget, sides 256-1024 in steps of 64) holds these buckets."""
    sizes = bucket_sizes(512, 256, 1024, 64)
    for size in [(512, 512), (256, 1024), (1024, 256), (320, 768), (384, 640), (448, 576), (576, 448)]:
        assert size in sizes, size
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    # a 2:1 image: 704×320 (2.2:1) is nearer on a log scale than 640×384 (1.67:1) and 768×320 (2.4:1)
    assert sizes[nearest((1000, 500), sizes)] == (704, 320)
    assert sizes[nearest((500, 1000), sizes)] == (320, 704)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i, (w, h) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) + "\n")
    return tmp_path


def _config(folder, **kw):
    return DataConfig(source="hf", path=str(folder), resolution=64, buckets=True, bucket_step=8, **kw).check()


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio(folder):
    data = build_dataset(_config(folder))
    assert data.buckets == bucket_sizes(64, 32, 128, 8)
    for i, (w, h) in enumerate(SIZES):
        bw, bh = data.buckets[data.bucket_of[i]]
        pixels = data.item(i)["pixel_values"]
        assert pixels.shape == (3, bh, bw)
        scale = max(bw / w, bh / h)  # scaled to cover, then cropped: no bucket has a nearer aspect ratio
        assert min(bw / round(w * scale), bh / round(h * scale)) > 0.85, (w, h, bw, bh)
        assert abs(math.log(bw / bh) - math.log(w / h)) <= min(abs(math.log(x / y) - math.log(w / h))
                                                               for x, y in data.buckets) + 1e-12


def test_every_batch_is_one_bucket_and_a_resume_draws_the_same(folder):
    data = build_dataset(_config(folder))
    config = TrainConfig(train_batch_size=2, seed=3, data=_config(folder))
    batches = [b for _, b in zip(range(12), batch_iterator(data, config, 1, 0, 0))]
    assert all(b["pixel_values"].ndim == 4 for b in batches)  # stacked: one shape in a batch
    sampler = BucketBatches(data.bucket_of, 2, 1, 0, 3)
    drawn = [batch for _, batch in zip(range(12), sampler)]
    assert all(len({data.bucket_of[i] for i, _ in batch}) == 1 for batch in drawn)
    assert len({data.bucket_of[i] for batch in drawn for i, _ in batch}) > 1  # several buckets used
    resumed = [batch for _, batch in zip(range(7), BucketBatches(data.bucket_of, 2, 1, 0, 3, start=5))]
    assert resumed == drawn[5:12]
    ranks = [list(zip(range(4), BucketBatches(data.bucket_of, 2, 2, r, 3))) for r in (0, 1)]
    assert [b for _, b in ranks[0]] == drawn[0:8:2] and [b for _, b in ranks[1]] == drawn[1:8:2]
    with pytest.raises(UserError, match="no aspect-ratio bucket holds train_batch_size"):
        BucketBatches(data.bucket_of, 8, 1, 0, 3)


def test_a_unet_trains_on_buckets(folder, tmp_path):
    r = run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(SMOKE)], f"output_dir={tmp_path / 'run'}",
            "max_steps=4", "train_batch_size=2", "cache=false", "data.source=hf", f"data.path={folder}",
            "data.resolution=32", "data.buckets=true", "data.bucket_step=16", "validation_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["data.buckets=true"], "data.buckets sorts a map-style hf dataset's images by aspect ratio"),
    (["data.source=hf", "data.path=x", "data.buckets=true"], "data.buckets needs cache: false"),
    (["data.source=hf", "data.path=x", "data.buckets=true", "cache=false", "data.bucket_min_side=20"],
     "must be multiples of data.bucket_step"),
])
def test_bad_bucket_configs_are_one_line(tmp_path, overrides, message):
    r = run([sys.executable, str(ROOT / "train_unet.py"), "--config", str(SMOKE)], f"output_dir={tmp_path}",
            *overrides)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_fit_covers_then_crops_the_middle():
    """100×50 (left half red, right half blue) into 40×32: scaled to 64×32, then its middle 40 columns kept."""
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    image.paste((0, 0, 255), (50, 0, 100, 50))
    out, sizes = fit(image, (40, 32), np.random.default_rng(0), False)
    out = np.asarray(out)
    assert out.shape == (32, 40, 3) and sizes == (50, 100, 0, 12)  # SDXL's: original size, crop's top-left
    _, flipped = fit(image, (40, 32), np.random.default_rng(0), True, hflip=1.0)
    assert flipped[:2] == (50, 100) and 0 <= flipped[3] <= 24
    assert out[16, 2, 0] > 200 and out[16, 37, 2] > 200  # red at the left edge, blue at the right
    assert abs(int((out[..., 0] > 128).sum()) - int((out[..., 2] > 128).sum())) <= 2 * 32  # cut in the middle
