"""`python tests/rank_weights.py ARGS...`: train_unet.py ARGS, and each rank writes the U-Net weights it holds at
the end to {output_dir}/rank-{r}.safetensors (run it under `accelerate launch` to compare the ranks)."""

import importlib.util
import sys
from pathlib import Path

from safetensors.torch import save_file

from latentgen.cli import run_cli
from latentgen.training import loop

_finish = loop.Run.finish


def _finish_and_dump(self, samples_per_step):
    weights = {k: v.detach().contiguous() for k, v in self.models["unet"].state_dict().items()}
    save_file(weights, str(Path(self.config.output_dir) / f"rank-{self.accelerator.process_index}.safetensors"))
    return _finish(self, samples_per_step)


loop.Run.finish = _finish_and_dump
# Imported, not run with runpy (which would set sys.argv[0] to train_unet.py): a relaunch of the ranks
# (latentgen.runtime.distributed) must run this file again.
spec = importlib.util.spec_from_file_location("train_unet_script",
                                              Path(__file__).resolve().parents[1] / "train_unet.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
sys.exit(run_cli(script.main))
