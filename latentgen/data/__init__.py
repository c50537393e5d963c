"""Data: the built-in captioned shapes dataset and any 🤗 datasets source."""

from .shapes import COLORS, KINDS, Shape, ShapesSample, ShapesSpec, heldout_triples, is_heldout, make_sample
from .sources import DataConfig, build_dataset, check_resolution

__all__ = ["COLORS", "KINDS", "Shape", "ShapesSample", "ShapesSpec", "heldout_triples", "is_heldout",
           "make_sample", "DataConfig", "build_dataset", "check_resolution"]
