"""Training data: the built-in shapes dataset or any 🤗 datasets source, as (image tensor, caption) pairs.

Randomness (crop, flip, which of several captions) is drawn from a generator seeded by (seed, epoch, index), so
an item is a pure function of where the run is: exact resume needs no data-loader state beyond the position.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latentgen.data import buckets
from latentgen.data.shapes import KINDS, ShapesSpec, make_sample
from latentgen.errors import UserError, first_line, one_of

log = logging.getLogger(__name__)

SOURCES = ("shapes", "hf")
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tar")  # the usual ones, for messages


@dataclass
class DataConfig:
    """Where the training images and captions come from, and how they are transformed."""

    source: str = "shapes"  # "shapes" (built in) or "hf" (any 🤗 datasets source)
    resolution: int = 64
    # shapes
    num_samples: int = 20000
    split: str = "train"  # shapes split: train or heldout
    seed: int = 0  # which shapes dataset (not the training seed)
    max_shapes: int = 2
    two_shape_fraction: float = 0.3
    language: str = "en"  # en, zh or both
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # shape kinds; "star" is new to the default model
    kind_weights: list[float] = field(default_factory=list)  # relative frequency of each of `kinds` (train split)
    # hf: a local image folder (metadata.jsonl/csv), parquet/arrow/json files, or a hub dataset id
    path: str | None = None
    hf_split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    streaming: bool = False
    # transforms (hf): resize the short side to `resolution`, then crop a square
    random_crop: bool = False
    hflip: float = 0.0  # probability of a horizontal flip
    # aspect-ratio buckets (hf, kohya's `enable_bucket`): each image to the bucket of about resolution² pixels
    # nearest its aspect ratio (sides from bucket_min_side to bucket_max_side in steps of bucket_step; default
    # resolution/2 to 2·resolution), every batch from one bucket; instead of square crops
    buckets: bool = False
    bucket_min_side: int | None = None
    bucket_max_side: int | None = None
    bucket_step: int = 64

    def check(self) -> "DataConfig":
        if self.source not in SOURCES:
            raise one_of("data source", self.source, list(SOURCES))
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise UserError(f"data.resolution must be an integer ≥ 8, got {self.resolution!r}")
        if not 0.0 <= self.hflip <= 1.0:
            raise UserError(f"data.hflip is a probability in [0, 1], got {self.hflip!r}")
        if self.source == "shapes":
            if self.num_samples < 1:
                raise UserError(f"data.num_samples must be ≥ 1, got {self.num_samples}")
            self.shapes_spec()
        elif not self.path:
            raise UserError("data.source is 'hf' but data.path is empty; give a folder, data files or a hub id")
        if self.buckets:
            if self.source != "hf" or self.streaming:
                raise UserError("data.buckets sorts a map-style hf dataset's images by aspect ratio: set data.source "
                                "hf and data.streaming false (the shapes are square)")
            low, high = self.bucket_sides
            if self.bucket_step < 8 or low % self.bucket_step or high % self.bucket_step or not low <= high:
                raise UserError(f"bucket sides {low}-{high} must be multiples of data.bucket_step "
                                f"({self.bucket_step}, ≥ 8), the smaller first")
        return self

    @property
    def bucket_sides(self) -> tuple[int, int]:
        """(smallest, largest) bucket side: as given, else resolution/2 and 2·resolution in whole steps."""
        step = self.bucket_step
        low = self.bucket_min_side or max(step, self.resolution // 2 // step * step)
        return low, self.bucket_max_side or 2 * self.resolution // step * step

    def shapes_spec(self) -> ShapesSpec:
        return ShapesSpec(split=self.split, resolution=self.resolution, seed=self.seed, max_shapes=self.max_shapes,
                          two_shape_fraction=self.two_shape_fraction, language=self.language,
                          kinds=tuple(self.kinds), kind_weights=tuple(self.kind_weights)).check()


def check_resolution(resolution: int, factor: int, what: str = "the VAE") -> None:
    """A resolution the model can take: a multiple of its total downsampling factor."""
    if resolution % factor:
        lower, upper = resolution - resolution % factor, resolution - resolution % factor + factor
        raise UserError(f"resolution {resolution} is not a multiple of {factor}, which {what} needs "
                        f"(try {lower or upper} or {upper})")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB (H, W) -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def transform(image: Image.Image, resolution: int, rng: np.random.Generator, random_crop: bool,
              hflip: float) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square (center or random), maybe flip."""
    return transform_sized(image, resolution, rng, random_crop, hflip)[0]


def transform_sized(image: Image.Image, resolution: int, rng: np.random.Generator, random_crop: bool,
                    hflip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`transform`'s pixels and their SDXL size conditioning (`buckets.Sizes`, a (4,) tensor)."""
    image = image.convert("RGB")
    image, sizes = buckets.fit(image, (resolution, resolution), rng, random_crop, hflip)
    return to_tensor(image), torch.tensor(sizes)


def _whole(pixels: torch.Tensor) -> torch.Tensor:
    """The size conditioning of an image used whole: its own size, no crop."""
    return torch.tensor([pixels.shape[1], pixels.shape[2], 0, 0])


class ShapesDataset(torch.utils.data.Dataset):
    """The shapes dataset as a map-style dataset of {pixel_values, text, index}."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.spec = config.shapes_spec()
        self.skipped = 0

    def __len__(self) -> int:
        return self.config.num_samples

    def item(self, index: int, epoch: int = 0, seed: int = 0) -> dict[str, Any]:
        sample = make_sample(self.spec, index)
        pixels = to_tensor(sample.render())
        return {"pixel_values": pixels, "text": sample.text, "index": index, "sizes": _whole(pixels)}

    def captions(self, index: int) -> list[str]:
        return [make_sample(self.spec, index).text]

    def condition(self, index: int) -> torch.Tensor:
        """Sample `index`'s layout map (a ControlNet's control image), (3, H, W) in [0, 1]."""
        return (to_tensor(make_sample(self.spec, index).render(layout=True)) + 1) / 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)


def _decode(value: Any) -> Image.Image:
    """An image column value (decode=False: {'bytes', 'path'}) as a fully loaded PIL image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise UnidentifiedImageError(f"not an image: {type(value).__name__}")
    image.load()
    return image.convert("RGB")


UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError)


def _load_hf(config: DataConfig):
    """The 🤗 dataset that `config.path` names, with images left undecoded (so bad files can be skipped).

    datasets chooses the reader: `load_from_disk` for a `save_to_disk` folder (a Dataset or a DatasetDict),
    else `load_dataset` on the folder (image folders with metadata, parquet/arrow/json/csv files, webdataset
    `.tar` shards: whatever its packaged builders recognise), on a file by its suffix, or on a hub id.
    """
    import datasets
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    path = Path(config.path).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _finish_hf(_load_saved(path, config), config)
    kwargs: dict[str, Any] = {"split": config.hf_split, "streaming": config.streaming}
    if path.is_dir():
        args: tuple = (str(path),)
    elif path.is_file() or any(ch in config.path for ch in "*?"):
        builder = _EXTENSION_TO_MODULE.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"data.path {config.path} is a file datasets cannot read; give a folder or a "
                            f"{', '.join(DATA_SUFFIXES)} file")
        args = (builder[0],)
        kwargs |= builder[1] | {"data_files": {config.hf_split: config.path}}
    elif "/" in config.path and not config.path.startswith((".", "/", "~")) and config.path.count("/") == 1:
        args = (config.path,)  # a hub id such as "lambdalabs/naruto-blip-captions"
    else:
        raise UserError(f"dataset folder {config.path} does not exist")
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except UserError:
        raise
    except Exception as err:  # datasets raises many kinds; the first line says what went wrong
        raise UserError(f"cannot load dataset {config.path}: {first_line(err)}") from None
    return _finish_hf(ds, config)


def _load_saved(path: Path, config: DataConfig):
    """A `save_to_disk` folder: the configured split of a DatasetDict, or the Dataset itself."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"cannot load dataset {config.path}: {first_line(err)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if config.hf_split not in ds:
            raise UserError(f"dataset {config.path} has no split '{config.hf_split}'; "
                            f"its splits are: {', '.join(ds)} (set data.hf_split)")
        ds = ds[config.hf_split]
    return ds.to_iterable_dataset() if config.streaming else ds


def _finish_hf(ds, config: DataConfig):
    """Check the configured columns exist; leave images undecoded."""
    import datasets

    columns = list(ds.column_names or [])
    if columns:
        for what, col in (("image", config.image_column), ("caption", config.caption_column)):
            if col not in columns:
                raise UserError(f"{what} column '{col}' is not in dataset {config.path}; "
                                f"its columns are: {', '.join(columns)}")
    if config.image_column in (ds.features or {}) and isinstance(ds.features[config.image_column], datasets.Image):
        ds = ds.cast_column(config.image_column, datasets.Image(decode=False))
    return ds


class HFImageTextDataset(torch.utils.data.Dataset):
    """A map-style 🤗 dataset of (image, caption); unreadable images are found once, skipped and counted."""

    def __init__(self, config: DataConfig, ds=None):
        self.config = config
        self.ds = ds if ds is not None else _load_hf(config)
        if len(self.ds) == 0:
            raise UserError(f"dataset {config.path} has no rows")
        self.valid, self.skipped_files, sizes = self._scan()
        self.skipped = len(self.skipped_files)
        if self.skipped:
            log.warning("skipped %d unreadable image(s) of %d, e.g. %s", self.skipped, len(self.ds),
                        self.skipped_files[0])
        if not self.valid:
            raise UserError(f"dataset {config.path} has no readable images ({self.skipped} unreadable)")
        self.buckets = self.bucket_of = None  # with data.buckets: the sizes, and each image's bucket
        if config.buckets:
            self.buckets = buckets.bucket_sizes(config.resolution, *config.bucket_sides, config.bucket_step)
            self.bucket_of = [buckets.nearest(size, self.buckets) for size in sizes]

    def _scan(self) -> tuple[list[int], list[str], list[tuple[int, int]]]:
        valid, bad, sizes = [], [], []
        column = self.ds.select_columns([self.config.image_column])
        for start, batch in enumerate(column.iter(batch_size=256)):
            for offset, value in enumerate(batch[self.config.image_column]):
                i = start * 256 + offset
                try:
                    sizes.append(_decode(value).size)
                    valid.append(i)
                except UNREADABLE:
                    bad.append(str(value.get("path") if isinstance(value, dict) else i))
        return valid, bad, sizes

    def __len__(self) -> int:
        return len(self.valid)

    def item(self, index: int, epoch: int = 0, seed: int = 0) -> dict[str, Any]:
        row = self.ds[self.valid[index]]
        rng = np.random.default_rng([seed, epoch, index])
        if self.bucket_of is not None:
            image, sizes = buckets.fit(_decode(row[self.config.image_column]).convert("RGB"),
                                       self.buckets[self.bucket_of[index]], rng, self.config.random_crop,
                                       self.config.hflip)
            pixels, sizes = to_tensor(image), torch.tensor(sizes)
        else:
            pixels, sizes = _row_pixels(row, self.config, rng)
        return {"pixel_values": pixels, "sizes": sizes,
                "text": choose_caption(_captions(row, self.config), seed, epoch, index), "index": index}

    def captions(self, index: int) -> list[str]:
        """Every caption of image `index` (training draws one per epoch with `choose_caption`)."""
        return _captions(self.ds[self.valid[index]], self.config)

    def condition(self, index: int, column: str = "conditioning_image") -> torch.Tensor:
        """Image `index`'s control image from `column` (diffusers' `train_controlnet.py` layout), cropped as its
        image is (the cache keeps the centre crop), (3, H, W) in [0, 1]."""
        row = self.ds[self.valid[index]]
        if column not in row:
            raise UserError(f"dataset {self.config.path} has no column {column!r} (controlnet.condition names the "
                            f"control images' column; it has {', '.join(row)})")
        image = transform(_decode(row[column]), self.config.resolution, np.random.default_rng(0), False, 0.0)
        return (image + 1) / 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)


def _row_pixels(row: dict, config: DataConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return transform_sized(_decode(row[config.image_column]), config.resolution, rng, config.random_crop, config.hflip)


def _captions(row: dict, config: DataConfig) -> list[str]:
    """An image's captions: the caption column holds one string or a list of them."""
    text = row[config.caption_column]
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text if isinstance(t, str) and t.strip()] or [""]
    return ["" if text is None else str(text)]


def choose_caption(captions: list[str], seed: int, epoch: int, index: int) -> str:
    """With several captions per image, one drawn at random for this (seed, epoch, index)."""
    if len(captions) == 1:
        return captions[0]
    return captions[int(np.random.default_rng([seed, epoch, index, 1]).integers(len(captions)))]


class StreamingImageTextDataset:
    """A streamed 🤗 dataset for sets too large to index: bad images are skipped and counted on the fly. The
    trainer takes its batches from `iterate` (training.loop's `batch_iterator`)."""

    def __init__(self, config: DataConfig, ds=None, buffer_size: int = 1000):
        self.config = config
        self.ds = ds if ds is not None else _load_hf(config)
        self.buffer_size = buffer_size
        self.skipped = 0

    def iterate(self, epoch: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[dict[str, Any]]:
        """Items of one epoch, shuffled by (seed, epoch); with `world` ranks, rank `rank`'s part: 🤗 datasets'
        `split_dataset_by_node` (each rank its own shards when their number divides among the ranks, so no rank
        reads another's; else every `world`-th example)."""
        ds = self.ds
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        stream = ds.shuffle(seed=seed * 1000003 + epoch, buffer_size=self.buffer_size)
        position = 0
        for row in stream:
            try:
                image = _decode(row[self.config.image_column])
            except UNREADABLE:
                self.skipped += 1
                continue
            rng = np.random.default_rng([seed, epoch, position])
            pixels, sizes = transform_sized(image, self.config.resolution, rng, self.config.random_crop,
                                            self.config.hflip)
            yield {"pixel_values": pixels, "sizes": sizes, "index": position,
                   "text": choose_caption(_captions(row, self.config), seed, epoch, position)}
            position += 1


def build_dataset(config: DataConfig):
    """The dataset a config describes (checked, with one-line errors)."""
    config.check()
    if config.source == "shapes":
        return ShapesDataset(config)
    if config.streaming:
        return StreamingImageTextDataset(config)
    return HFImageTextDataset(config)
