"""kohya's ControlNet-LLLite ("LoRA-like lite" ControlNets for SDXL, sd-scripts' `sdxl_train_control_net_lllite.py`;
run in ComfyUI by kohya's ControlNet-LLLite-ComfyUI node): a file of small modules, each beside one attention
projection of the U-Net (attn1's to_q/to_k/to_v and attn2's to_q in kohya's files).

A module `lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (the projection's name in Stability's
layout, as sd-scripts names SDXL LoRA layers) holds
- `conditioning1`: convolutions that take the control image in [-1, 1] down to the projection's resolution (by 8,
  16 or 32: one, two or three stages, told apart by their weights as the node does), giving an embedding per
  position;
- `down` (Linear + ReLU), `mid` (Linear + ReLU over [embedding, down(x)]) and `up` (Linear): from the projection's
  input x, a change added to x before the projection: to_q(x + weight · up(mid([emb, down(x)]))).

diffusers has no LLLite; the modules are written here after kohya's node (its structure, its depth rule, its
concatenation order), and they act through forward pre-hooks on the projections while a generation runs
(`applied`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from latentgen.formats.lora import kohya_layer_names

PREFIX = "lllite_unet_"


def is_lllite(keys) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


class Module(torch.nn.Module):
    """One LLLite module for a Linear projection of `in_dim` features."""

    def __init__(self, in_dim: int, depth: int, emb_dim: int, mlp_dim: int):
        super().__init__()
        half = emb_dim // 2
        stages = {1: [(half, emb_dim, 2)], 2: [(half, emb_dim, 4)], 3: [(half, half, 4), (half, emb_dim, 2)]}[depth]
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, half, kernel_size=4, stride=4)]
        for c_in, c_out, k in stages:
            layers += [torch.nn.ReLU(), torch.nn.Conv2d(c_in, c_out, kernel_size=k, stride=k)]
        self.conditioning1 = torch.nn.Sequential(*layers)
        self.down = torch.nn.Sequential(torch.nn.Linear(in_dim, mlp_dim), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(torch.nn.Linear(mlp_dim + emb_dim, mlp_dim), torch.nn.ReLU())
        self.up = torch.nn.Sequential(torch.nn.Linear(mlp_dim, in_dim))

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1] -> (1, emb_dim, h, w) at the projection's resolution."""
        return self.conditioning1(image * 2 - 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim), emb (1, N, emb_dim): its embedding flattened in the raster order of the U-Net's tokens."""
        if emb.shape[1] != x.shape[1]:
            raise ValueError(f"its control image gives {emb.shape[1]} positions where the U-Net has {x.shape[1]}")
        emb = emb.expand(x.shape[0], -1, -1)
        return self.up(self.mid(torch.cat([emb, self.down(x)], dim=-1)))


class LLLite(torch.nn.Module):
    """A ControlNet-LLLite file's modules by the U-Net layer they act on; `image` and `scale` are what the next
    U-Net call uses (`scale`: one weight per row of the call, None: off)."""

    def __init__(self, modules: dict[str, Module]):
        super().__init__()
        self.targets = list(modules)
        self.blocks = torch.nn.ModuleList(modules.values())
        self.image: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # (1, 1, H, W) in [0, 1]: where it acts (a region mask), None: everywhere
        self._embeddings: dict[int, torch.Tensor] = {}
        self._grids: dict[int, tuple[int, int]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_image(self, image: torch.Tensor | None) -> None:
        self.image, self.scale, self.mask = image, None, None
        self._embeddings, self._grids = {}, {}

    def use(self, image: torch.Tensor) -> None:
        """Off, with `image` as the control image (its embeddings kept while it stays the same)."""
        if image is not self.image:
            self.set_image(image)
        self.scale = None

    def delta(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Module i's change to its projection's input x (B, N, C), times each row's weight."""
        if i not in self._embeddings:  # one per generation: the control image does not change
            e = self.blocks[i].embed(self.image.to(x.device, self.dtype))
            self._grids[i] = tuple(e.shape[-2:])
            self._embeddings[i] = e.flatten(2).transpose(1, 2)
        out = self.blocks[i](x.to(self.dtype), self._embeddings[i]).to(x.dtype)
        out = out * self.scale.to(x.device, x.dtype).view(-1, 1, 1)
        if self.mask is not None:  # at the module's positions, as A1111's extension resizes region masks (bilinear)
            mask = F.interpolate(self.mask.to(x.device, x.dtype), size=self._grids[i], mode="bilinear")
            out = out * mask.flatten(2).transpose(1, 2)
        return out


def from_state(state: dict[str, torch.Tensor], unet, name: str = "the file") -> LLLite:
    """The LLLite of a kohya file's tensors, its modules matched to `unet`'s layers."""
    layers = kohya_layer_names(unet, "unet")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, weight = key.partition(".")
        grouped.setdefault(module, {})[weight] = tensor
    modules = {}
    for module, weights in grouped.items():
        target = layers.get(module.removeprefix(PREFIX)) if module.startswith(PREFIX) else None
        if target is None:
            raise ValueError(f"{name}'s {module} is not a layer of this model's U-Net (ControlNet-LLLite files are "
                             "made for SDXL)")
        if "conditioning1.4.weight" in weights:
            depth = 3
        elif weights["conditioning1.2.weight"].shape[-1] == 4:
            depth = 2
        else:
            depth = 1
        down = weights["down.0.weight"]
        if down.ndim != 2:
            raise ValueError(f"{name}'s {module} acts on a convolution; only projections' modules are read")
        layer = unet.get_submodule(target)
        if layer.in_features != down.shape[1]:
            raise ValueError(f"{name}'s {module} takes {down.shape[1]} features where this U-Net's layer takes "
                             f"{layer.in_features}: it was made for another base model")
        block = Module(down.shape[1], depth, weights["conditioning1.0.weight"].shape[0] * 2, down.shape[0])
        block.load_state_dict(weights)
        modules[target] = block
    return LLLite(modules).eval()


@contextmanager
def applied(unet, nets: list[LLLite]) -> Iterator[None]:
    """Each net's modules hooked to their U-Net layers inside the block (acting while the net's `scale` is set),
    none after it."""
    handles = []
    try:
        for net in nets:
            for i, target in enumerate(net.targets):
                def hook(module, args, net=net, i=i):
                    if net.scale is None:
                        return None
                    x = args[0]
                    return (x + net.delta(i, x), *args[1:])

                handles.append(unet.get_submodule(target).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for net in nets:
            net.set_image(None)
