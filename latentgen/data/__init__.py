"""Data: the built-in captioned shapes dataset and any 🤗 datasets source."""

from latentgen.data.shapes import (
           COLORS,
           KINDS,
           Shape,
           ShapesSample,
           ShapesSpec,
           heldout_triples,
           is_heldout,
           make_sample,
)
from latentgen.data.sources import DataConfig, build_dataset, check_resolution

__all__ = ["COLORS", "KINDS", "Shape", "ShapesSample", "ShapesSpec", "heldout_triples", "is_heldout",
           "make_sample", "DataConfig", "build_dataset", "check_resolution"]
