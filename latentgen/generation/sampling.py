"""The sampling loop of a fitted request (`request.Plan`), as numbered stages: encode the prompts, prepare the
sampler, prepare the latents (noise, or a noised init image for image-to-image and inpainting), denoise, decode.

Nothing here changes the pipeline it runs on, so concurrent callers can share one: each call makes its own
scheduler, and the fp32 retry after a low-precision overflow runs on fp32 copies of the modules instead of
converting them in place.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from latentgen.components.diffusion import scale_latents, takes_sizes, unscale_latents
from latentgen.components.schedulers import (
    CONSISTENCY_GUIDANCE,
    SCHEDULERS,
    UNSTABLE_ABOVE_GUIDANCE,
    as_loop_sampler,
    make_scheduler,
    step_kwargs,
)
from latentgen.errors import UserError
from latentgen.formats import ip_adapter
from latentgen.generation import control, schedule
from latentgen.generation.conditioning import Composable, Conditioning, GuidedConditioning, PromptEncoder
from latentgen.generation.guidance import DYNAMIC_THRESHOLD_FLOOR, alpha_sigma, clip_x0, guide, rescale_guidance
from latentgen.generation.plan import Plan
from latentgen.runtime import threads
from latentgen.runtime.compiled import batch_invariant

log = logging.getLogger("latentgen")


def sample(pipe, plan: Plan, generator, on_step: Callable[[int], None] | None,
           on_latents: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Stages 1-4: the final latents z0 (N, C, h, w), fp32."""
    cond = prepare_conditioning(pipe, plan)
    scheduler = prepare_scheduler(pipe, plan)
    timesteps = timesteps_for(plan, scheduler)
    latents, known = prepare_latents(pipe, plan, scheduler, timesteps, generator)
    return denoise(pipe, latents, cond, plan, scheduler, timesteps, known, generator, on_step, on_latents)


def prepare_conditioning(pipe, plan: Plan) -> GuidedConditioning | Composable:
    """1. The prompts' conditioning, and [negative; prompt] when any step is guided; for prompts that change with
    the step or have several parts (A1111's prompt editing, alternation, AND: `generation.schedule`), what gives
    each step's rows."""
    steps, regions = plan.request.num_inference_steps, plan.request.regions
    if regions is not None and regions.calc == "attention":
        return regional_conditioning(pipe, plan)
    if regions is not None or any(schedule.has_schedule(p) or "AND" in p for p in plan.prompts) or any(
            map(schedule.has_schedule, plan.negative_prompts)):
        f = pipe.vae_scale_factor

        def parts(prompt: str):
            if regions is not None:
                return regions.parts(prompt, plan.height // f, plan.width // f)
            return schedule.parts(prompt)

        return Composable(
            parts=[[(schedule.schedule(text, steps), weight) for text, weight in parts(p)] for p in plan.prompts],
            negatives=[schedule.schedule(n, steps) for n in plan.negative_prompts],
            encode=lambda texts: micro_conditioning(pipe, plan, pipe.encode_conditioning(texts, plan.clip_skip)))
    cond = micro_conditioning(pipe, plan, pipe.encode_conditioning(plan.prompts, plan.clip_skip))
    if plan.request.guidance_scale <= 1.0:
        return GuidedConditioning(cond)
    uncond = micro_conditioning(pipe, plan, pipe.encode_conditioning(plan.negative_prompts, plan.clip_skip))
    return GuidedConditioning(cond, type(cond).concat([uncond, cond]))


def regional_conditioning(pipe, plan: Plan) -> GuidedConditioning:
    """The regional prompter's attention mode: each image's parts (base and regions) side by side along the
    tokens, (N, P·T, D), which `regions.RegionalAttention` splits again; the negative prompt repeated P times."""
    regions = plan.request.regions
    parts, _ = regions.shape_of(plan.prompts)
    texts = [t for p in plan.prompts for t in regions.texts(p)]
    flat = pipe.encode_conditioning(texts, plan.clip_skip)  # (N·P, T, D)
    n, tokens = len(plan.prompts), flat.hidden_states.shape[1]

    def side_by_side(c):  # (N·P, T, ...) -> (N, P·T, ...); the first part's pooled embedding (SDXL)
        return Conditioning(c.hidden_states.reshape(n, parts * tokens, -1),
                            None if c.mask is None else c.mask.reshape(n, parts * tokens),
                            None if c.pooled is None else c.pooled[::parts], {})

    cond = micro_conditioning(pipe, plan, side_by_side(flat))
    if plan.request.guidance_scale <= 1.0:
        return GuidedConditioning(cond)
    negative = pipe.encode_conditioning([x for x in plan.negative_prompts for _ in range(parts)], plan.clip_skip)
    uncond = micro_conditioning(pipe, plan, side_by_side(negative))
    return GuidedConditioning(cond, type(cond).concat([uncond, cond]))


def micro_conditioning(pipe, plan: Plan, cond):
    """SDXL's size conditioning (`add_time_ids`): original size, crop's top-left corner, target size, as
    diffusers and A1111 set them by default: the image's size, no crop."""
    if not takes_sizes(pipe.unet):
        return cond
    ids = torch.tensor([[plan.height, plan.width, 0, 0, plan.height, plan.width]], dtype=cond.hidden_states.dtype,
                       device=cond.hidden_states.device)
    cond.added["time_ids"] = ids.expand(len(cond), -1)
    return cond


def prepare_scheduler(pipe, plan: Plan):
    """2. A fresh sampler for this call (schedulers keep per-run state), with its timesteps set."""
    name = plan.request.scheduler
    if name is None:
        scheduler = as_loop_sampler(type(pipe.scheduler).from_config(pipe.scheduler.config))
    else:
        scheduler = make_scheduler(name, pipe.scheduler.config)
    scheduler.set_timesteps(plan.request.num_inference_steps, device=pipe.execution_device)
    cls = type(scheduler).__name__
    unstable = any(s.cls == cls and not s.stable_with_guidance for s in SCHEDULERS.values())
    consistency = name is not None and SCHEDULERS[name].consistency
    if (consistency and plan.request.guidance_scale > CONSISTENCY_GUIDANCE and name not in pipe.warned
            and pipe.unet.config.get("time_cond_proj_dim") is None):
        pipe.warned.add(name)
        log.warning("%s samples distilled models and LoRAs, which want guidance about 1-2; at %g the images burn",
                    name, plan.request.guidance_scale)
    if unstable and plan.request.guidance_scale > UNSTABLE_ABOVE_GUIDANCE and cls not in pipe.warned:
        pipe.warned.add(cls)  # once per pipeline, not once per batch
        log.warning("%s is a 4th-order multistep sampler and can diverge at guidance %g; "
                    "dpm++ or euler are stable there", cls, plan.request.guidance_scale)
    return scheduler


def timesteps_for(plan: Plan, scheduler) -> torch.Tensor:
    """All timesteps, or for image-to-image the last `strength` fraction of them (SDEdit)."""
    strength = plan.request.strength
    if not plan.has_init or strength >= 1.0:
        return scheduler.timesteps
    n = plan.request.num_inference_steps
    start = (n - min(int(n * strength), n)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents z0 (N, C, H/f, W/f), the posterior mean."""
    z = pipe.vae.encode(images.to(pipe.execution_device, pipe.vae.dtype)).latent_dist.mode().float()
    return scale_latents(pipe.vae, z)


def cpu_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per seed, in its initial state: each image's numbers depend on its seed alone, on any
    device (A1111's "RNG source: CPU")."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def prepare_latents(pipe, plan: Plan, scheduler, timesteps, generator) -> tuple[torch.Tensor, dict]:
    """3. x_T ~ N(0, σ_max² I) (N, C, h, w), each image's noise from its own generator when seeded, turned towards
    its variation seed's noise where the request has a variation strength, drawn at the seed-resize size and
    pasted into the middle where it has one; or an init image noised to the first timestep. Latents stay fp32
    whatever the U-Net's dtype: the same seed gives the same starting noise in every precision, and the sampler's
    arithmetic keeps full precision."""
    f, n = pipe.vae_scale_factor, plan.batch_size
    shape = (n, pipe.vae.config.latent_channels, plan.height // f, plan.width // f)
    noise = randn_tensor(shape, generator=generator, device=pipe.execution_device, dtype=torch.float32)
    resize = plan.request.seed_resize_from
    seeded = shape if resize is None else (*shape[:2], resize[1] // f, resize[0] // f)
    own = noise
    if seeded != shape:  # the same seeds' noise at the other size, pasted into the middle below (A1111's order)
        own = randn_tensor(seeded, generator=cpu_generators(plan.seeds), device=noise.device, dtype=torch.float32)
    if plan.variation_seeds is not None:
        other = randn_tensor(seeded, generator=cpu_generators(plan.variation_seeds), device=noise.device,
                             dtype=torch.float32)
        own = slerp(plan.request.variation_strength, own, other)  # along h, as A1111: (N, C, h, w)
    noise = paste_centered(own, noise) if seeded != shape else own
    known: dict = {"noise": noise}  # what the call knows (noise, z0, mask, ...), and its guidance's state (APG)
    if not plan.has_init:
        return noise * scheduler.init_noise_sigma, known
    z0 = plan.init_latents.to(noise.device) if plan.init_latents is not None else encode_images(pipe, plan.image)
    z0 = z0.expand(n, -1, -1, -1)
    known["z0"] = z0
    if plan.mask is not None:
        mask = F.interpolate(plan.mask, size=shape[-2:]).to(noise.device)  # (N or 1, 1, h, w)
        known["mask"] = mask.expand(n, -1, -1, -1)
        if pipe.inpainting_unet:
            masked = plan.image * (plan.mask < 0.5)
            known["masked_z0"] = encode_images(pipe, masked).expand(n, -1, -1, -1)
    if plan.request.strength >= 1.0:
        return noise * scheduler.init_noise_sigma, known
    if len(timesteps) == 0:  # strength so small that no step remains: the image itself
        return z0.clone(), known
    return scheduler.add_noise(z0, noise, timesteps[:1].repeat(n)), known


def paste_centered(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """`big` with the middle of (N, C, h, w) `small` pasted into its middle: AUTOMATIC1111's "resize seed from"
    (modules/rng.py), whose offsets round down alike, so a seed's noise lands where A1111 puts it. A side shorter
    than big's is centered in it; a longer one gives its middle, one short where the difference is odd (A1111's
    rounding, kept: that row or column stays big's)."""
    out = big.clone()
    spans = []
    for have, want in zip(small.shape[-2:], big.shape[-2:]):
        offset = (want - have) // 2
        length = have if offset >= 0 else have + 2 * offset
        spans.append((max(offset, 0), max(-offset, 0), length))  # (where in big, where in small, how long)
    (ty, sy, h), (tx, sx, w) = spans
    out[..., ty:ty + h, tx:tx + w] = small[..., sy:sy + h, sx:sx + w]
    return out


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1) of the vectors along `dim`: the arc between two Gaussian
    draws, whose points keep a draw's norm where a straight line would shrink it (Shoemake 1985; torch has none).
    The default, the height axis of (N, C, H, W) noise, is where AUTOMATIC1111's variation seeds take their
    vectors (it normalizes its (C, H, W) noise along dim 1), so with A1111's CPU random numbers, which are
    `torch.manual_seed` + `torch.randn` as ours are, the starting noise is A1111's. The ends are a and b exactly;
    nearly parallel vectors take the straight line."""
    if t in (0.0, 1.0):
        return (a if t == 0.0 else b).clone()
    cos = (a * b).sum(dim, keepdim=True) / (a.norm(dim=dim, keepdim=True) * b.norm(dim=dim, keepdim=True))
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    straight = sin < 1e-6
    wa = torch.where(straight, 1.0 - t, torch.sin((1.0 - t) * omega) / sin.clamp_min(1e-6))
    wb = torch.where(straight, t, torch.sin(t * omega) / sin.clamp_min(1e-6))
    return wa * a + wb * b


def predict(pipe, x: torch.Tensor, t, cond: GuidedConditioning | Composable, plan: Plan, step: int, scheduler,
            known: dict, run_step: int = 0) -> torch.Tensor:
    """The (guided) model prediction at x_t; one batched U-Net call on [uncond; cond] when guiding. `run_step`
    counts the steps of this call from 0 (what a prompt's schedule follows, as in A1111)."""
    r = plan.request
    layout = cond.layout(run_step)  # None: one cond row per image, of weight 1
    embedded = pipe.unet.config.get("time_cond_proj_dim") is not None  # an LCM U-Net: guidance is an input
    # several parts are combined around the uncond prediction
    guided = (plan.cfg_at(step) and not embedded) or layout is not None
    c = cond.for_step(guided, run_step)
    x_t = scheduler.scale_model_input(x, t)  # the VP form sqrt(ᾱ_t)·z0 + sqrt(1−ᾱ_t)·ε, (N, C, h, w)
    n = x_t.shape[0]
    rows = torch.arange(n) if layout is None else torch.tensor(layout[0])  # the image of each cond row
    doubled = (lambda v: torch.cat([v] * 2)) if layout is None else (lambda v: torch.cat([v, v[rows]]))  # noqa: E731
    x_in = doubled(x_t) if guided else x_t  # (2N or N, C, h, w), or N + the parts' rows with AND
    extra, labels = None, None
    if "masked_z0" in known:  # 9-channel inpainting U-Net input
        extra = torch.cat([known["mask"], known["masked_z0"]], dim=1)
    if plan.low_res is not None:  # an upscaler's input: the low-resolution latents, and their noise level
        extra, labels = plan.low_res.to(x.device), plan.noise_levels.to(x.device)
    if extra is not None:
        x_in = torch.cat([x_in, doubled(extra) if guided else extra], dim=1)
    if labels is not None and guided:
        labels = doubled(labels)
    groups = None if layout is None else [[i] + [n + j for j, o in enumerate(layout[0]) if o == i] for i in range(n)]
    w_cond = guidance_embedding(pipe.unet.config.time_cond_proj_dim, torch.full((x_in.shape[0],), r.guidance_scale),
                                c.hidden_states) if embedded else None
    x_in = x_in.to(c.hidden_states.dtype)
    progress = known.get("progress", (0, 1))
    residuals = control.residuals(plan.controls, progress, x_in, t, n if guided else 0) if plan.controls else None
    images = control.image_prompts(plan.controls)
    if images:  # IP-Adapters: their image embeddings in the rows, each at its weight while it acts
        ip_adapter.set_scales(pipe.unet, [a.unit.weight if a.on(*progress) else 0.0 for a in images])
        c = control.with_image_embeds(c, images, n if guided else 0)
    pred = run_unet(pipe, x_in, t, c, rows_per_image=2 if guided else 1,
                    class_labels=labels, groups=groups, timestep_cond=w_cond, control=residuals)
    if layout is not None:  # composable: ε̃ = ε∅ + Σ_j w_j·Δ_j, each part's guidance Δ_j = guide(ε∅, ε_j) − ε∅
        uncond, parts = pred[:n], pred[n:]  # (A1111's sum, s·(ε_j − ε∅), with plain guidance; APG's with APG)
        parts = guide(uncond[rows], parts, r.guidance_scale, r.apg or None, known.setdefault("parts", {})) \
            - uncond[rows]
        weights = torch.stack([torch.as_tensor(w, dtype=pred.dtype).reshape(-1, *pred.shape[-2:])
                               if torch.is_tensor(w) else torch.full((1, *pred.shape[-2:]), float(w), dtype=pred.dtype)
                               for w in layout[1]]).to(pred.device)  # (M, 1, h, w): a weight, or a region's map
        pred = uncond.index_add(0, rows.to(pred.device), weights * parts)
    elif guided:
        uncond, cond_pred = pred.chunk(2)
        pred = rescale_guidance(guide(uncond, cond_pred, r.guidance_scale, r.apg or None, known), cond_pred,
                                r.guidance_rescale)
    if r.dynamic_threshold:
        alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, t)
        pred = clip_x0(pred, x_t, alpha, sigma, scheduler.config.prediction_type, r.dynamic_threshold,
                       DYNAMIC_THRESHOLD_FLOOR)
    return pred


def guidance_embedding(dim: int, scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A guidance-distilled (w-conditioned LCM) U-Net's guidance input for guidance scales (N,): the embeddings of
    w − 1 (N, dim), as diffusers' pipelines give them (their `get_guidance_scale_embedding`, which uses nothing of
    its pipeline)."""
    from diffusers import StableDiffusionPipeline

    emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, scales.float().cpu() - 1.0, dim)
    return emb.to(device=like.device, dtype=like.dtype)


def run_unet(pipe, x_in: torch.Tensor, t, cond, rows_per_image: int,
             class_labels: torch.Tensor | None = None, groups: list[list[int]] | None = None,
             timestep_cond: torch.Tensor | None = None, control: Callable | None = None) -> torch.Tensor:
    """One U-Net evaluation of all rows, fp32 out; `control(rows, unet_kwargs)` gives the ControlNets' residuals
    for those rows (`generation.control.residuals`).

    An image's result must not depend on the batch it is in. In bf16 the CPU kernels are batch-invariant
    (tests/test_reliability.py checks it), so the rows go in one call. In fp32, oneDNN and MKL choose their
    convolution and small-matrix algorithms by batch size, so each image's rows ([uncond_i; cond_i]) go in a
    call of their own: the same shapes for every image, whatever the batch. A compiled U-Net whose package for
    the whole batch gives each image bit for bit what the one-image package gives (measured once per shape:
    `compiled.batch_invariant`) takes the rows in one call. `groups`: each image's rows, where they are not
    `rows_per_image` of them in [uncond; cond] halves (a prompt with several parts).
    """

    def call(rows):
        labels = None if class_labels is None else class_labels[rows]
        extra = {} if timestep_cond is None else {"timestep_cond": timestep_cond[rows]}
        kwargs = cond[rows].unet_kwargs()
        if control is not None:
            extra |= control(rows, kwargs | extra)
        return pipe.unet(x_in[rows], t, **kwargs, class_labels=labels, return_dict=False, **extra)[0]

    n = x_in.shape[0] // rows_per_image if groups is None else len(groups)
    if groups is not None and x_in.dtype == torch.float32 and n > 1:
        out = torch.empty_like(x_in[:, :pipe.unet.config.out_channels])
        for rows in groups:
            out[rows] = call(rows).to(out.dtype)  # an autocast around the U-Net gives 16 bits
        return out
    if (x_in.dtype != torch.float32 or n == 1 or (class_labels is None and control is None and batch_invariant(
            pipe.unet, x_in, t, rows_per_image, **cond.unet_kwargs(), timestep_cond=timestep_cond))):
        out = call(slice(None))
        # never the U-Net's own output tensor: CUDA graphs (`compile_unet` on CUDA) write the next call's result
        # into it, and PNDM keeps model outputs across steps
        return out.float() if out.dtype != torch.float32 else out.clone()
    out = torch.empty_like(x_in[:, :pipe.unet.config.out_channels])
    for i in range(n):
        rows = [i + k * n for k in range(rows_per_image)]  # image i in each of the [uncond; cond] halves
        out[rows] = call(rows).to(out.dtype)  # an autocast around the U-Net gives 16 bits
    return out


def denoise(pipe, latents: torch.Tensor, cond: GuidedConditioning, plan: Plan, scheduler, timesteps, known: dict,
            generator, on_step: Callable[[int], None] | None = None,
            on_latents: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """4. Run the sampler over `timesteps`; with a 4-channel U-Net and a mask, the known region is put back
    (noised to the next timestep) after every step, so only the masked region is generated. After each sampling
    step, `on_latents(i, latents)` (before `on_step(i)`) sees the current latents: for live previews, or the
    images so far of an interrupted request."""
    extra = step_kwargs(scheduler, generator, plan.request.eta)
    offset = (len(scheduler.timesteps) - len(timesteps)) // scheduler.order  # steps skipped by img2img
    blend = "mask" in known and "masked_z0" not in known
    on_cpu = latents.device.type == "cpu"
    for i, t in enumerate(pipe.progress_bar(timesteps)):
        if on_cpu:
            threads.adapt()  # as many threads as other processes leave cores free (`latentgen.runtime.threads`)
        known["progress"] = (i, len(timesteps))  # where the ControlNets' start and end fractions are counted
        pred = predict(pipe, latents, t, cond, plan, offset + i // scheduler.order, scheduler, known,
                       run_step=i // scheduler.order)
        latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        if blend:
            if i + 1 < len(timesteps):
                keep = scheduler.add_noise(known["z0"], known["noise"], timesteps[i + 1:i + 2])
            else:
                keep = known["z0"]
            latents = known["mask"] * latents + (1 - known["mask"]) * keep
        last = i == len(timesteps) - 1
        if last or (i + 1) % scheduler.order == 0:  # once per sampling step
            if on_latents is not None:
                on_latents(i // scheduler.order, latents)
            if on_step is not None:
                on_step(i // scheduler.order)
    return latents


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """5. z (N, C, h, w) -> image (N, 3, H, W) in [-1, 1], one image per call: the VAE's attention kernels are
    not batch-invariant, and one decode per image costs little next to the sampling steps."""
    z = unscale_latents(pipe.vae, latents).to(pipe.vae.dtype)
    return torch.cat([pipe.vae.decode(z[i:i + 1], return_dict=False)[0] for i in range(z.shape[0])])


def finite_or_fp32(pipe, run: Callable[[object, bool], torch.Tensor], names: tuple[str, ...], warning: str,
                   fatal: str) -> tuple[torch.Tensor, bool]:
    """`run(pipe, False)`; if its result holds NaN/Inf (a low-precision overflow), `run(twin, True)` on a copy of
    the pipeline whose modules `names` are fp32 copies, after a warning; `pipe` itself is never changed, so
    other callers sharing it are not disturbed. Already fp32 and still not finite: a UserError. Returns the
    result and whether it retried."""
    out = run(pipe, False)
    if torch.isfinite(out).all():
        return out, False
    dtype = next(getattr(pipe, names[0]).parameters()).dtype
    if dtype == torch.float32:
        raise UserError(fatal)
    log.warning(warning.format(dtype=str(dtype).removeprefix("torch.")))
    twin = copy.copy(pipe)
    for name in names:
        twin.__dict__[name] = copy.deepcopy(getattr(pipe, name)).to(torch.float32)
    twin.__dict__["prompt_encoder"] = PromptEncoder()  # embeddings of the fp32 encoder, not shared
    return run(twin, True), True
