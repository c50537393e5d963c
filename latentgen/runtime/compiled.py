"""The U-Net compiled ahead of time for the CPU (torch's AOTInductor), cached on disk so only the first run pays.

On the CPU a small U-Net's call is partly Python and operator dispatch over a few hundred modules;
`torch.compile` removes some of it but compiles again in every new process (about a minute on 2 cores).
AOTInductor turns the exported U-Net into one shared library that runs its whole forward pass in C++ and
loads in milliseconds, so the compile is paid once per machine: the package is stored under
`cache_dir()/compiled`, named by everything that decides its code (torch version, CPU instruction set, the
U-Net's config, its weights, the input shapes and dtypes).

The weights are compiled into the package. `CompiledForward` checks before each call that the U-Net's
parameters are the ones it compiled (same tensors, not modified in place, the same LoRA adapters, merged or not),
and otherwise compiles for the weights as they are now. Only changes made through a tensor's `.data` escape
this check (torch does not count them); call `install` (or `LatentPipeline.compile_unet`) again after those.
Calls it cannot serve run the U-Net's own forward: with gradients, with inputs beyond the latents, timestep and
text states (class labels, attention masks, SDXL's added conditions), or with LoRA layers that are not fused
(they read their scales at run time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from latentgen.components.diffusion import public_config
from latentgen.errors import first_line
from latentgen.io import atomic_file

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """latentgen's cache: $LATENTGEN_CACHE, else $XDG_CACHE_HOME/latentgen, else ~/.cache/latentgen."""
    if os.environ.get("LATENTGEN_CACHE"):
        return Path(os.environ["LATENTGEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentgen"


class _Plain(torch.nn.Module):
    """What gets exported: three tensors in (four for a guidance-embedding LCM student: its `timestep_cond`), the
    prediction out of the U-Net's own (eager) forward."""

    def __init__(self, unet, eager):
        super().__init__()
        self.unet, self.eager = unet, eager

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.eager(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                          return_dict=False)[0]


def _weights_digest(unet) -> str:
    """Hash of every parameter and buffer: name, dtype, shape, strides (the memory format) and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in unet.state_dict().items():
        t = t.detach()
        h.update(f"{name} {t.dtype} {tuple(t.shape)} {t.stride()}\n".encode())
        # flattened before the byte view: a 1×1 convolution's weight in channels-last counts as contiguous with a
        # last stride of C (its other dims are 1), which `view(torch.uint8)` refuses
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CompiledForward:
    """Installed as `unet.forward` by `install`: serves plain inference calls from AOTInductor packages, one
    per input shape (compiled on first use, or loaded from the cache), and everything else from `eager`.
    `report(message)` hears what happens (compiling, loaded from the cache, and how long it took)."""

    def __init__(self, unet, eager, report: Callable[[str], None] | None = None):
        self.unet, self.eager, self.report = unet, eager, report or (lambda message: None)
        self.packages: dict[tuple, object] = {}  # input shapes and dtypes -> loaded package (None: failed)
        self.lock = threading.Lock()
        self.tensors: list[torch.Tensor] = []
        self.lora_layers: list[torch.nn.Module] = []
        self.fingerprint: tuple = ()
        self.digest = ""
        self.servable = False
        self.invariant: dict[tuple, bool] = {}  # (input shapes and dtypes, rows per image) -> batch_invariant's answer

    def _fingerprint(self) -> tuple:
        """The compiled weights' identity, checked per call in ~0.1 ms: the tensors (storage, in-place-change
        counter, dtype), the adapters peft has added and which of them its LoRA layers have merged (peft merges
        through `.data`, which torch's change counter does not see). A full walk of the modules costs 1.5 ms."""
        peft = getattr(self.unet, "peft_config", None) or {}
        return (tuple((t.data_ptr(), t._version, t.dtype) for t in self.tensors), tuple(sorted(peft)),
                tuple(tuple(m.merged_adapters) for m in self.lora_layers))

    def _refresh(self, force: bool = False) -> None:
        """Forget the packages when the U-Net's weights are not the ones they were compiled with."""
        if not force and self.tensors and self._fingerprint() == self.fingerprint:
            return
        self.tensors = list(self.unet.state_dict(keep_vars=True).values())
        # peft's adapter layers of every kind (LoRA, and LyCORIS's LoHa/LoKr that latentgen.formats.lora loads)
        self.lora_layers = [m for m in self.unet.modules()
                            if hasattr(m, "merged_adapters") and hasattr(m, "base_layer")]
        self.fingerprint, self.digest, self.packages = self._fingerprint(), _weights_digest(self.unet), {}
        self.invariant = {}
        # LoRA layers read their scales and active adapters in forward, which a package would freeze; merged
        # (fused) ones run only the base layer, whose weights are compiled in
        self.servable = all(m.merged for m in self.lora_layers)

    def _inputs(self, sample, timestep, encoder_hidden_states, args=(), kwargs=None) -> tuple | None:
        """The package's three inputs for a call of the U-Net (four with an LCM student's `timestep_cond`), or None
        where a package cannot serve it (a tiled call's circular padding, `latentgen.components.tiling`, is not
        compiled in)."""
        kwargs = dict(kwargs or {})
        cond = kwargs.pop("timestep_cond", None)
        plain = (not args and all(v is None for v in kwargs.values()) and torch.is_tensor(encoder_hidden_states)
                 and sample.device.type == "cpu" and not torch.is_grad_enabled()
                 and self.unet.conv_in.padding_mode == "zeros" and not getattr(self.unet, "regional_attention", False))
        if not plain:
            return None
        # diffusers embeds timesteps in float32 whatever their dtype: one (B,) float32 input serves every
        # sampler's timesteps
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(sample.shape[0])
        inputs = sample.contiguous(), t.contiguous(), encoder_hidden_states.contiguous()
        return inputs if cond is None else (*inputs, cond.contiguous())

    def batch_invariant(self, sample, timestep, rows_per_image: int, encoder_hidden_states=None, **kwargs) -> bool:
        """Whether this call's rows can go in one package call and give each image, bit for bit, what its own
        rows alone give (image i's rows are i, i + n, ... of the n images). fp32 CPU kernels may choose their
        algorithms by batch size, so the answer is measured, once per shape and weights: random inputs through
        the package of this shape and through the one-image package, row by row. Calls a package cannot serve:
        False."""
        inputs = self._inputs(sample, timestep, encoder_hidden_states, kwargs=kwargs)
        if inputs is None:
            return False
        n = sample.shape[0] // rows_per_image
        key = (tuple((tuple(x.shape), str(x.dtype)) for x in inputs), rows_per_image)
        with self.lock:
            self._refresh()  # changed weights: measured again
        if key not in self.invariant:
            generator = torch.Generator().manual_seed(0)
            probe = [torch.randn(x.shape, generator=generator, dtype=x.dtype) for x in inputs]
            probe[1] = torch.rand(probe[1].shape, generator=generator) * 1000
            batched, alone = self.package(tuple(probe)), self.package(tuple(x[:rows_per_image] for x in probe))
            same = batched is not None and alone is not None
            if same:
                out = _first(batched(*probe))
                for i in range(n):
                    rows = [i + k * n for k in range(rows_per_image)]
                    same = same and torch.equal(out[rows], _first(alone(*(x[rows] for x in probe))))
            self.invariant[key] = same
        return self.invariant[key]

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        inputs = self._inputs(sample, timestep, encoder_hidden_states, args, kwargs)
        package = None if inputs is None else self.package(inputs)
        if package is None:
            return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        out = _first(package(*inputs))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def package(self, inputs: tuple[torch.Tensor, ...]):
        """The loaded package for these inputs' shapes and dtypes: from memory, the disk cache, or compiled now;
        None where compiling failed."""
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in inputs)
        with self.lock:
            self._refresh()
            if not self.servable:
                return None
            if shapes not in self.packages:
                self.packages[shapes] = self._load_or_compile(inputs, shapes)
            return self.packages[shapes]

    def _load_or_compile(self, inputs, shapes):
        import torch._inductor

        key = {"torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
               "config": public_config(self.unet), "weights": self.digest, "inputs": shapes}
        name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        path = cache_dir() / "compiled" / f"unet-{name}.pt2"
        start = time.perf_counter()
        cached = path.exists()
        size = "×".join(map(str, shapes[0][0]))
        # torch's C++ toolchain lookup warns "No CUDA runtime is found" on every CPU-only machine
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        try:
            if not cached:
                self.report(f"compiling the U-Net for {size} latents (once for this model, shape and machine; "
                            f"cached in {path.parent})")
                self._compile(inputs, path)
            package = torch._inductor.aoti_load_package(str(path))
        except Exception as err:  # no C++ compiler, a model torch.export cannot trace, a damaged cache file, ...
            log.warning("could not compile the U-Net (%s); it runs uncompiled", first_line(err))
            return None
        seconds = time.perf_counter() - start
        self.report(f"{'loaded the compiled U-Net from the cache' if cached else 'compiled the U-Net'} for {size} "
                    f"latents in {seconds:.1f} s")
        return package

    def _compile(self, inputs, path: Path) -> None:
        with torch.no_grad():
            program = torch.export.export(_Plain(self.unet, self.eager), inputs)
        with atomic_file(path) as tmp:
            package = tmp.with_name(tmp.name + ".pt2")  # AOTInductor wants the .pt2 suffix
            try:
                # freezing: the weights are constants of the package anyway; fold them and prepack for oneDNN
                torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                         inductor_configs={"freezing": True})
                package.replace(tmp)
            finally:
                package.unlink(missing_ok=True)


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def batch_invariant(unet, sample, timestep, rows_per_image: int, **kwargs) -> bool:
    """`CompiledForward.batch_invariant` where `unet` runs compiled, else False."""
    forward = unet.__dict__.get("forward")
    return isinstance(forward, CompiledForward) and forward.batch_invariant(sample, timestep, rows_per_image, **kwargs)


def install(unet, report: Callable[[str], None] | None = None) -> CompiledForward:
    """Make `unet`'s plain CPU inference calls run AOTInductor-compiled code (see the module's docstring)."""
    current = unet.__dict__.get("forward")
    if isinstance(current, CompiledForward):  # installed already: look at the weights afresh
        current.report = report or current.report
        with current.lock:
            current._refresh(force=True)
        return current
    compiled = CompiledForward(unet, unet.forward, report)
    unet.forward = compiled
    return compiled
