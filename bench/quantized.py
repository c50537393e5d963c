"""int8 inference on the CPU (torchao) against bf16: is it faster? One U-Net call of the SD-shaped U-Net
(`bench/common.py`: SD 1.x's topology at half width, random weights) on 2 latents of 32×32 (guidance's pair at
256 px), eager and compiled (Inductor with freezing), bf16 against torchao's int8 weight-only and int8 dynamic
(activations and weights) quantization, with each one's relative error against bf16.

    pip install torchao && python bench/quantized.py [--no-compile]

torchao is not a dependency of latentgen: this script measures whether it should be.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from common import best_time, print_table, sd_shaped_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-compile", action="store_true", help="eager only (the compiled rows take minutes)")
    args = p.parse_args()
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise SystemExit("this benchmark needs torchao: pip install torchao")
    import torch
    import torch._inductor.config as inductor

    from latentgen import LatentPipeline

    folder = sd_shaped_folder(Path(tempfile.gettempdir()) / "latentgen-bench-sd")
    unet = LatentPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g).to(torch.bfloat16)
    t = torch.tensor([500, 500])
    text = torch.randn(2, 77, 768, generator=g).to(torch.bfloat16)
    inductor.freezing = True  # weights as constants: what lets Inductor fold the int8 weights' scales

    def run(model):
        with torch.no_grad():
            return model(x, t, text).sample

    variants = {"bf16": None, "int8 weight-only": Int8WeightOnlyConfig(),
                "int8 dynamic (activations and weights)": Int8DynamicActivationInt8WeightConfig()}
    rows, reference = [], {}
    for compiled in ([False] if args.no_compile else [False, True]):
        for name, config in variants.items():
            model = copy.deepcopy(unet)
            if config is not None:
                quantize_(model, config)
            if compiled:
                model = torch.compile(model)
            out = run(model)  # the first call compiles
            seconds = best_time(lambda: run(model))
            key = "compiled" if compiled else "eager"
            reference.setdefault(key, (seconds, out))
            base_s, base_out = reference[key]
            error = float((out.float() - base_out.float()).norm() / base_out.float().norm())
            rows.append({"U-Net": f"{name}, {key}", "s per call": f"{seconds:.3f}",
                         "speed vs bf16": f"{base_s / seconds:.2f}×", "relative error": f"{error:.4f}"})
    print(f"SD-shaped U-Net, 2 × 4 × 32 × 32, {torch.get_num_threads()} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print_table(rows)


if __name__ == "__main__":
    main()
