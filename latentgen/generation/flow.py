"""Flow-matching transformers (issue #45): SD3/SD3.5 (MMDiT, rectified flow, CLIP-L + CLIP-G + T5) and Flux.1
(MMDiT + single-stream blocks, CLIP-L + T5, guidance-distilled) from diffusers folders or single files
(`formats.flow_file`), run through diffusers' own pipelines; latentgen adds what they lack for its users: the
request checked in one line against what these models can do, one seed per image (the noise drawn on the CPU from
each image's seed, so an image does not depend on its batch beyond float rounding), the flow samplers by name,
and the image's metadata (A1111's infotext with Forge's keys, and latentgen's own for replay).

What runs: text-to-image with prompt, negative prompt (Flux: with true CFG, `--true-cfg`), steps, guidance
(Flux: its embedded guidance), SD3's skip-layer guidance (`--slg`), the T5 sequence length, size, seeds;
image-to-image and inpainting (`--image`, `--strength`, `--mask`: diffusers' img2img and inpainting pipelines on
the same modules); the hires fix with the Lanczos upscaler; ControlNets (diffusers' SD3/Flux ControlNet
pipelines); LoRAs (`--lora`, `<lora:NAME:SCALE>`, through diffusers' SD3/Flux loaders, which read diffusers',
kohya's and other trainers' formats); and the flow samplers of `components.schedulers` (euler, euler-karras,
euler-beta, heun, dpm++, unipc), each built from the model's own scheduler config (its shift, and Flux's
resolution-dependent dynamic shift), under the U-Net samplers' names and A1111 names; A1111's prompt editing and
alternation in text-to-image (`PromptEdits`); offloading (`--offload`).

Everything else a request can ask (regions, tiling, IP-Adapters, LyCORIS files, ...) is a one-line error naming
the option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from latentgen.components import control_images
from latentgen.components.schedulers import FLOW_SAMPLERS, make_flow_scheduler
from latentgen.errors import UserError, first_line, one_of
from latentgen.formats import controlnet as controlnet_files
from latentgen.formats import flow_file, lora
from latentgen.formats.folders import check_pipeline_folder
from latentgen.formats.single_file import read
from latentgen.generation import control, flow_prompts, options, schedule
from latentgen.generation.hires import lanczos
from latentgen.generation.pipeline import GenerationOutput, _request, _target_dtype, offload_hooks
from latentgen.generation.plan import Plan
from latentgen.generation.prompts import BREAK_SPLIT as BREAK
from latentgen.generation.prompts import has_syntax, parse
from latentgen.generation.sampling import cpu_generators
from latentgen.runtime.precision import name_of

KINDS = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
IMG2IMG = {"sd3": "StableDiffusion3Img2ImgPipeline", "flux": "FluxImg2ImgPipeline"}
INPAINT = {"sd3": "StableDiffusion3InpaintPipeline", "flux": "FluxInpaintPipeline"}
CONTROLNET = {"sd3": "StableDiffusion3ControlNetPipeline", "flux": "FluxControlNetPipeline"}
CONTROLNET_MODEL = {"sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}

# What a flow request may set: the rest of Request's options must keep their defaults. eta is accepted and has no
# effect (none of the flow samplers is stochastic; A1111 clients such as webuiapi always send one)
SUPPORTED = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
             "num_images_per_prompt", "seed", "scheduler", "output_type", "guidance_interval", "checked", "apg",
             "generator", "eta", "loras", "image", "mask_image", "strength", "hires", "true_cfg_scale",
             "max_sequence_length", "slg_scale", "slg_layers", "control"}
# diffusers' LoRA loader methods, which `formats.lora` drives, called on the diffusers pipeline (its SD3 and Flux
# loaders read diffusers', kohya's and other trainers' formats)
LORA_METHODS = {"load_lora_weights", "set_adapters", "enable_lora", "disable_lora", "get_list_adapters",
                "fuse_lora", "unfuse_lora", "lora_state_dict"}


def kind_of(folder: Path) -> str | None:
    """"sd3" or "flux" for a diffusers folder of those pipelines, else None."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return KINDS.get(json.loads(index.read_text()).get("_class_name", ""))
    except (ValueError, AttributeError):
        return None


class PromptEdits:
    """A1111's prompt editing and alternation on diffusers' SD3/Flux pipelines, which encode each prompt once: while
    active, a hook on the transformer's calls gives each row the text states and pooled vector of its prompt's text
    at the current step (`step`, which the pipeline's step-end callback advances). Row r belongs to image r mod B
    (B images), and is its prompt or its negative prompt by its values, the states diffusers computed for that
    text's first step (so every layout of rows works: SD3's [negatives; prompts] batch, Flux's separate true-CFG
    pass, skip-layer guidance's third pass); where the two are equal, the first half of a doubled batch is the
    negatives (SD3), other rows the prompts."""

    def __init__(self, transformer, schedules: list[list[tuple]], encode: Callable[[str], tuple]):
        self.transformer, self.schedules, self.step, self.encode = transformer, schedules, 0, encode
        self.changing = any(len(entries) > 1 for pair in schedules for entries in pair)
        # texts with A1111's weights are encoded here too: diffusers would read their brackets as words
        self.weighted = any(has_syntax(text) for pair in schedules for entries in pair for _, text in entries)

    def first_states(self, negatives: bool) -> dict[str, torch.Tensor]:
        """The pipeline's text inputs for the first step, each text encoded alone as the hook's later ones are
        (encoded as one batch, the values could differ in the last bits and match no row)."""
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = lambda text: cache[text] if text in cache else cache.setdefault(text, self.encode(text))
        self.first = [[(entries, self.encoded(entries[0][1])) for entries in pair] for pair in self.schedules]
        out = {}
        for k, prefix in enumerate(("", "negative_")[:1 + negatives]):
            states, pooled = zip(*[pair[k][1] for pair in self.first])
            out |= {f"{prefix}prompt_embeds": torch.stack(states), f"{prefix}pooled_prompt_embeds": torch.stack(pooled)}
        return out

    def __enter__(self):
        self.step = 0
        self.handle = self.transformer.register_forward_pre_hook(self._swap, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _swap(self, module, args, kwargs):
        states, pooled = kwargs["encoder_hidden_states"], kwargs["pooled_projections"]
        new_states, new_pooled = [], []
        images = len(self.first)
        for r, (s, p) in enumerate(zip(states, pooled)):
            prompt, negative = self.first[r % images]
            order = (negative, prompt) if len(states) == 2 * images and r < images else (prompt, negative)
            entries = next((e for e, (s0, p0) in order if torch.equal(s, s0) and torch.equal(p, p0)), None)
            if entries is None:
                raise RuntimeError("prompt editing: a transformer row matches none of the prompts' first texts")
            s1, p1 = self.encoded(schedule.at(entries, self.step))
            new_states.append(s1)
            new_pooled.append(p1)
        return args, kwargs | {"encoder_hidden_states": torch.stack(new_states),
                               "pooled_projections": torch.stack(new_pooled)}


class FlowPipeline:
    """An SD3 or Flux model with latentgen's request interface (`generate`, `__call__`, `check_request`); the
    diffusers pipeline is `inner`."""

    def __init__(self, inner, kind: str, folder: Path | None = None):
        self.inner, self.kind, self.folder = inner, kind, folder
        self.base_scheduler_config = dict(inner.scheduler.config)
        self.lock = threading.Lock()  # one call at a time: the sampler and the active LoRAs are the pipeline's
        self.loras_dir, self.loras_confined = Path("loras"), False
        self.controlnets_dir = Path("controlnets")  # where a unit's ControlNet is found by name

    def __getattr__(self, name: str):
        if name in LORA_METHODS:
            return getattr(self.inner, name)
        raise AttributeError(name)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | str | None = None,
                        allow_pickle: bool = False) -> "FlowPipeline":
        import diffusers

        folder = Path(folder)
        kind = kind_of(folder)
        if kind is None:
            raise UserError(f"{folder} is not an SD3 or Flux pipeline folder (its model_index.json names neither)")
        check_pipeline_folder(folder, allow_pickle, ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"))
        pipeline_cls = getattr(diffusers, next(k for k, v in KINDS.items() if v == kind))
        try:
            inner = pipeline_cls.from_pretrained(folder, dtype=_target_dtype(torch_dtype), local_files_only=True,
                                                 use_safetensors=None if allow_pickle else True)
        except Exception as err:  # diffusers/transformers errors name no file the user can act on
            raise UserError(f"cannot load the {kind} model in {folder}: {first_line(err)}") from err
        return cls(inner, kind, folder)

    @classmethod
    def from_single_file(cls, path: str | Path, torch_dtype: torch.dtype | str | None = None,
                         components: str | Path | None = None) -> "FlowPipeline":
        """An SD3/SD3.5 single-file checkpoint, or a Flux.1 transformer file (`formats.flow_file`: the architecture
        from its weights); what the file lacks (T5's tokenizer; for Flux everything but the transformer) from
        `components`, a diffusers folder of that family."""
        import diffusers

        path = Path(path)
        kind = flow_file.kind_of_file(path)
        if kind is None:
            raise UserError(f"{path} is not an SD3 or Flux checkpoint (no joint_blocks or double_blocks weights)")
        state, _ = read(path)
        try:
            if kind == "flux":
                return cls(flow_file.flux_pipeline(state, components, _target_dtype(torch_dtype)), "flux", None)
            parts = flow_file.sd3_parts(state, components, _target_dtype(torch_dtype))
        except UserError:
            raise
        except Exception as err:  # an architecture diffusers/transformers cannot build from what the file shows
            raise UserError(f"{path}: cannot build the {kind} model its weights describe ({first_line(err)})") from None
        return cls(diffusers.StableDiffusion3Pipeline(**parts), "sd3", None)

    # what infer.py, the server and the option table ask of a pipeline
    @property
    def scheduler(self):
        return self.inner.scheduler

    @property
    def transformer(self):
        return self.inner.transformer

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    @property
    def device(self) -> torch.device:
        """Where the models run: with `offload`, the device the hooks bring them to (diffusers' own)."""
        return self.inner._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.inner.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Flux packs 2×2 latent patches, SD3 patchifies by its patch size: sizes are multiples of this."""
        patch = 2 if self.kind == "flux" else self.inner.transformer.config.patch_size
        return self.vae_scale_factor * patch

    @property
    def default_size(self) -> int:
        return self.inner.default_sample_size * self.vae_scale_factor

    def to(self, *args, **kwargs) -> "FlowPipeline":
        self.inner.to(*args, **kwargs)
        return self

    def offload(self, mode: str, device: torch.device | str) -> None:
        """The models kept in main memory and run on `device` (`LatentPipeline.offload`'s modes): what a Flux
        transformer needs on a GPU smaller than its weights."""
        offload_hooks(self.inner, mode, device)

    def set_progress_bar_config(self, **kwargs) -> None:
        self.inner.set_progress_bar_config(**kwargs)

    def fit_request(self, request, batch_size: int | None = None) -> Plan:
        """The request checked against what a flow model runs here (one-line errors), as a Plan."""
        if request.scheduler is not None and request.scheduler not in FLOW_SAMPLERS:
            raise one_of("scheduler", request.scheduler, list(FLOW_SAMPLERS))
        steps = self.scheduler.config.get("num_train_timesteps")
        # the flow samplers' names are not the U-Net samplers' that Request.check knows
        req = dataclasses.replace(dataclasses.replace(request, scheduler=None, checked=False).check(max_steps=steps),
                                  scheduler=request.scheduler)
        defaults = type(req)(prompt=req.prompt).check(max_steps=steps)
        unsupported = [f.name for f in dataclasses.fields(req) if f.name not in SUPPORTED
                       and getattr(req, f.name) != getattr(defaults, f.name)]
        if unsupported:
            label = options.names(type(req), None).get(unsupported[0], unsupported[0])
            raise UserError(f"{label} is not supported with {self.kind.upper()} models yet; latentgen runs their "
                            "text-to-image (prompt, negative prompt, steps, guidance, size, seeds, sampler)")
        if req.guidance_interval != (0.0, 1.0):
            raise UserError(f"a guidance interval is not supported with {self.kind.upper()} models yet")
        prompts, negatives, seeds = req.per_image()
        self._check_grammar(prompts, negatives, req)
        if self.kind == "flux" and any(negatives) and req.true_cfg_scale == 1.0:
            raise UserError("Flux is guidance-distilled: its negative prompt acts only with true CFG (--true-cfg "
                            "above 1, a second pass a step); its --guidance is the guidance it was distilled with")
        if self.kind == "sd3" and req.true_cfg_scale != 1.0:
            raise UserError("true CFG is for guidance-distilled Flux models; SD3 guides with --guidance")
        if req.slg_scale and self.kind != "sd3":
            raise UserError("skip-layer guidance (--slg) is SD3's; Flux has none")
        depth = self.inner.transformer.config.num_layers
        if req.slg_scale and max(req.slg_layers) >= depth:
            raise UserError(f"--slg-layers name blocks 0-{depth - 1} of this model's {depth}, got "
                            f"{' '.join(map(str, req.slg_layers))}")
        if req.hires is not None and (req.hires.upscaler != "lanczos" or req.image is not None):
            raise UserError("the hires fix of SD3/Flux models enlarges the decoded image: choose the Lanczos upscaler "
                            "(--hires-upscaler lanczos; A1111's hr_upscaler \"Lanczos\"), text-to-image only")
        if req.hires is not None:
            for side, value in zip(("height", "width"), req.hires.size(req.height or self.default_size,
                                                                       req.width or self.default_size,
                                                                       self.size_multiple)):
                if value > 4 * self.default_size:
                    raise UserError(f"the hires fix's {side} {value} is over 4× the model's size")
        if req.control and (req.image is not None or req.hires is not None or req.slg_scale):
            raise UserError(f"ControlNets with {self.kind.upper()} models run with text-to-image only (no image, "
                            "hires fix or skip-layer guidance yet)")
        for unit in req.control or []:
            if unit.mode != "balanced":
                raise UserError(f"ControlNet {unit.name}: control modes other than balanced are U-Net hooks; "
                                f"{self.kind.upper()} ControlNets run as diffusers runs them")
        if req.slg_scale and req.image is not None:
            raise UserError("skip-layer guidance (--slg) is for text-to-image (diffusers' SD3 img2img has none)")
        image = req.image
        if image is not None and not hasattr(image, "convert"):
            raise UserError(f"image-to-image with {self.kind.upper()} models takes the image in pixels (a PIL image)")
        m = self.size_multiple
        size = image.size if image is not None else (self.default_size, self.default_size)
        height, width = req.height or size[1], req.width or size[0]
        for side, value in (("height", height), ("width", width)):
            if value % m:
                raise UserError(f"{side} must be a multiple of {m} for this model, got {value}")
        loras = [(lora.resolve(name, self.loras_dir, self.loras_confined), scale)
                 for name, scale in (req.loras or []) + lora.tags(prompts[0])]
        pixels = None if image is None else self.inner.image_processor.preprocess(image.convert("RGB"), height, width)
        return Plan(req, prompts, negatives, seeds, req.generator, height, width, image=pixels, loras=loras)

    def _check_grammar(self, prompts: list[str], negatives: list[str], req) -> None:
        """What of A1111's prompt grammar a flow model runs: weights (`flow_prompts`), and prompt editing and
        alternation in text-to-image; AND and BREAK, which combine several U-Net predictions or text windows, are
        one-line errors."""
        kind = self.kind.upper()
        for text in prompts + negatives:
            if len(schedule.parts(text)) > 1:
                raise UserError(f"AND (composable prompts) is not supported with {kind} models yet")
            if BREAK.search(text):
                raise UserError(f"BREAK is CLIP's 75-token windows; {kind} models read the prompt whole (remove it)")
        entries = {t: schedule.schedule(t, req.num_inference_steps) for t in prompts + negatives}
        for text in {text for e in entries.values() for _, text in e if has_syntax(text)}:
            parse(text)  # an unbalanced bracket: a one-line error before anything runs
        if any(len(entries[t]) > 1 for t in entries) and (req.image is not None or req.hires is not None
                                                           or req.control):
            raise UserError(f"prompt editing and alternation ([a:b:when], [a|b]) run with {kind} models in "
                            "text-to-image only (no image, hires fix or ControlNet yet)")
        if self.kind == "flux" and any(len(entries[t]) > 1 for t in negatives):
            raise UserError("prompt editing in a Flux negative prompt is not supported (its true-CFG pass reads "
                            "it once)")
        if self.kind == "flux" and req.true_cfg_scale != 1.0 and any(
                len(entries[p]) > 1 and entries[p][0][1] == n for p, n in zip(prompts, negatives)):
            raise UserError("an edited Flux prompt must differ from its negative prompt at the first step")

    def check_request(self, prompt=None, **fields) -> Plan:
        return self.fit_request(_request(prompt, fields))

    @torch.no_grad()
    def __call__(self, prompt=None, *, on_step: Callable[[int], None] | None = None, **fields) -> GenerationOutput:
        return self.generate(_request(prompt, fields), on_step)

    def img2img(self):
        """diffusers' image-to-image pipeline of this model, sharing its modules (built once)."""
        return self._variant(IMG2IMG)

    def inpaint(self):
        """diffusers' inpainting pipeline of this model, sharing its modules (built once)."""
        return self._variant(INPAINT)

    def controlnet_pipeline(self, nets: list):
        """diffusers' ControlNet pipeline of this model with `nets` (several: its Multi-ControlNet wrapper)."""
        import diffusers

        pipe = self._variant(CONTROLNET, controlnet=nets[0])
        multi = getattr(diffusers, CONTROLNET_MODEL[self.kind].replace("ControlNetModel", "MultiControlNetModel"))
        pipe.controlnet = nets[0] if len(nets) == 1 else multi(nets)
        return pipe

    def control_units(self, plan: Plan) -> tuple[list, list]:
        """Each unit's ControlNet (loaded once, on the transformer's device and dtype) and its control image at
        the plan's size; a network made for another family is a one-line error."""
        out_nets, images = [], []
        folders = [self.controlnets_dir, None]
        cache = self.__dict__.setdefault("controlnets", {})
        for unit in plan.request.control:
            net = unit.model
            if isinstance(net, (str, Path)):
                path = controlnet_files.resolve(net, folders, self.loras_confined).resolve()
                if path not in cache:
                    cache[path] = controlnet_files.load(path)
                net = cache[path]
            if type(net).__name__ != CONTROLNET_MODEL[self.kind]:
                raise UserError(f"ControlNet {unit.name} is a {type(net).__name__}; {self.kind.upper()} models take "
                                f"a {CONTROLNET_MODEL[self.kind]} (a diffusers folder)")
            if (net.device, net.dtype) != (self.device, self.dtype):
                net.to(device=self.device, dtype=self.dtype)
            if unit.mask is not None or unit.hr != "both":  # diffusers' SD3/Flux ControlNet pipelines act everywhere
                raise UserError(f"ControlNet {unit.name}: a region mask or an hr option other than both is for SD 1.x/"
                                f"SDXL models; {self.kind.upper()} ControlNets act on the whole image in every pass")
            image = unit.image if isinstance(unit.image, Image.Image) else control.open_image(unit.image)
            images.append(control_images.prepare(image, plan.width, plan.height, unit.module, unit.resize_mode,
                                                 unit.threshold_a, unit.threshold_b))
            out_nets.append(net)
        return out_nets, images

    def _variant(self, classes: dict[str, str], **extra):
        name = classes[self.kind]
        if name not in self.__dict__:
            import diffusers

            cls = getattr(diffusers, name)
            accepted = inspect.signature(cls.__init__).parameters
            self.__dict__[name] = cls(**{k: v for k, v in self.inner.components.items() if k in accepted}, **extra)
            self.__dict__[name].set_progress_bar_config(disable=True)
        self.__dict__[name].scheduler = self.inner.scheduler
        return self.__dict__[name]

    def _edits(self, plan: Plan) -> "PromptEdits":
        """The step-by-step texts of the prompts and negative prompts (A1111's editing and alternation read), and
        the transformer hook that gives them where they change."""
        steps = plan.request.num_inference_steps
        texts = [[lora.strip_tags(t) for t in (p, n)] for p, n in zip(plan.prompts, plan.negative_prompts)]
        schedules = [[schedule.schedule(t, steps) for t in pair] for pair in texts]
        length = plan.request.max_sequence_length or (512 if self.kind == "flux" else 256)

        def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:  # what diffusers' pipeline gives one text
            if has_syntax(text):  # A1111's weights, (word:1.3)
                return flow_prompts.encode(self.inner, self.kind, text, length)
            if self.kind == "flux":
                states, pooled, _ = self.inner.encode_prompt(text, None, self.device, max_sequence_length=length)
            else:
                states, _, pooled, _ = self.inner.encode_prompt(text, None, None, self.device,
                                                                do_classifier_free_guidance=False,
                                                                max_sequence_length=length)
            return states[0], pooled[0]

        return PromptEdits(self.inner.transformer, schedules, encode)

    def noise(self, plan: Plan) -> torch.Tensor:
        """Each image's starting noise from its own seed on the CPU (N, C, h, w), packed as Flux takes it."""
        channels = self.inner.transformer.config.in_channels // (4 if self.kind == "flux" else 1)
        f = self.vae_scale_factor
        shape = (1, channels, plan.height // f, plan.width // f)
        if plan.seeds is not None:
            x = torch.cat([torch.randn(shape, generator=g) for g in cpu_generators(plan.seeds)])
        else:
            x = torch.randn((plan.batch_size, *shape[1:]), generator=plan.generator)
        if self.kind == "flux":
            x = self.inner._pack_latents(x, plan.batch_size, channels, shape[2], shape[3])
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def generate(self, request, on_step: Callable[[int], None] | None = None, on_latents=None) -> GenerationOutput:
        plan = request if isinstance(request, Plan) else self.fit_request(request)
        with self.lock:
            try:
                return self._generate(plan, on_step)
            finally:
                self.inner.maybe_free_model_hooks()  # with offload: every model back in main memory

    def _generate(self, plan: Plan, on_step: Callable[[int], None] | None) -> GenerationOutput:
        req = plan.request
        name = req.scheduler or "euler"
        self.inner.scheduler = make_flow_scheduler(name, self.base_scheduler_config)
        lora.activate(self, plan.loras)

        edits = self._edits(plan)

        def step_end(pipe, i, t, tensors):
            if edits.changing:  # a loop iteration is a sampling step of a first-order sampler, half of Heun's
                edits.step = (i + 1) // pipe.scheduler.order
            if on_step is not None:
                on_step(i)
            return {}

        kwargs: dict[str, Any] = dict(height=plan.height,
                                      width=plan.width,
                                      num_inference_steps=req.num_inference_steps,
                                      guidance_scale=req.guidance_scale, latents=self.noise(plan),
                                      output_type=req.output_type, callback_on_step_end=step_end)
        if req.max_sequence_length is not None:
            kwargs["max_sequence_length"] = req.max_sequence_length
        if self.kind == "sd3" or req.true_cfg_scale != 1.0:
            kwargs["negative_prompt"] = plan.negative_prompts
        if self.kind == "flux" and req.true_cfg_scale != 1.0:
            kwargs["true_cfg_scale"] = req.true_cfg_scale
        # the pipeline encodes the first step's texts (the grammar read); with edits, it is handed their states,
        # and the hook swaps in the later ones
        kwargs["prompt"] = [entries[0][1] for entries, _ in edits.schedules]
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [entries[0][1] for _, entries in edits.schedules]
        if edits.changing or edits.weighted:
            negatives = kwargs.pop("negative_prompt", None) is not None
            kwargs.pop("prompt")
            kwargs |= edits.first_states(negatives)
        if req.slg_scale:  # diffusers' SD3 skip-layer guidance, over its default 1-20% of the steps
            kwargs |= dict(skip_guidance_layers=list(req.slg_layers), skip_layer_guidance_scale=req.slg_scale)
        pipe = self.inner
        if req.image is not None:  # diffusers' img2img/inpainting pipeline on the same modules; noise from the seeds
            pipe = self.img2img() if req.mask_image is None else self.inpaint()
            kwargs |= dict(image=req.image.convert("RGB"), strength=req.strength, latents=None,
                           generator=cpu_generators(plan.seeds) if plan.seeds is not None else plan.generator)
            if req.mask_image is not None:  # white: repainted, black: kept
                kwargs["mask_image"] = req.mask_image.convert("L")
        if req.control:  # diffusers' SD3/Flux ControlNet pipeline on the same modules
            nets, images = self.control_units(plan)
            units = req.control
            one = len(nets) == 1
            pipe = self.controlnet_pipeline(nets)
            kwargs |= dict(control_image=images[0] if one else images,
                           controlnet_conditioning_scale=units[0].weight if one else [u.weight for u in units],
                           control_guidance_start=units[0].start if one else [u.start for u in units],
                           control_guidance_end=units[0].end if one else [u.end for u in units])
        if req.hires is not None:  # A1111's hires fix: the first pass decoded, Lanczos-enlarged, then img2img
            h, w = req.hires.size(plan.height, plan.width, self.size_multiple)
            first = pipe(**(kwargs | {"output_type": "np"})).images
            kwargs |= dict(image=[Image.fromarray((lanczos(x, w, h) * 255).round().astype("uint8")) for x in first],
                           strength=req.hires.denoise, height=h, width=w, latents=None,
                           num_inference_steps=req.hires.steps or req.num_inference_steps,
                           generator=cpu_generators(plan.seeds) if plan.seeds is not None else plan.generator)
            pipe = self.img2img()
        # diffusers' ControlNet pipelines draw the control image's latents from torch's global generator: drawn
        # from the first image's seed here, so that an image depends on its seeds alone
        with torch.random.fork_rng(devices=[]), (edits if edits.changing else contextlib.nullcontext()):
            if plan.seeds is not None:
                torch.manual_seed(plan.seeds[0])
            images = pipe(**kwargs).images
        info = {"scheduler": name, "height": plan.height, "width": plan.width, "dtype": name_of(self.dtype)}
        return GenerationOutput(images=images, seeds=plan.seeds, scheduler=name, info=info,
                                metadata=[plan.record(i, name) for i in range(plan.batch_size)])
