"""SD3/SD3.5 and Flux.1 single-file checkpoints (formats.flow_file): files written here in Stability's and BFL's
layouts with key maps of this test's own (diffusers -> theirs: fused q/k/v, adaLN modulation, the final layer's
shift/scale order), read back with the architecture taken from their weights, give diffusers' own pipeline's
image."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import components as C
from conftest import ROOT
from latentgen.errors import UserError
from latentgen.formats import single_file as sf
from latentgen.formats.flow_file import mmdit_config
from latentgen.generation.flow import FlowPipeline
from latentgen.generation.models import open_pipeline


def _swap(w):  # diffusers' AdaLayerNormContinuous holds (scale, shift); Stability's (shift, scale)
    a, b = w.chunk(2)
    return torch.cat([b, a])


def mmdit_to_stability(transformer) -> dict[str, torch.Tensor]:
    d, n = transformer.state_dict(), transformer.config.num_layers
    out = {"pos_embed": d["pos_embed.pos_embed"], "x_embedder.proj.weight": d["pos_embed.proj.weight"],
           "x_embedder.proj.bias": d["pos_embed.proj.bias"], "context_embedder.weight": d["context_embedder.weight"],
           "context_embedder.bias": d["context_embedder.bias"], "final_layer.linear.weight": d["proj_out.weight"],
           "final_layer.linear.bias": d["proj_out.bias"]}
    for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for i, k in (("0", "1"), ("2", "2")):
            for p in ("weight", "bias"):
                out[f"{ours}.mlp.{i}.{p}"] = d[f"time_text_embed.{theirs}.linear_{k}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(d[f"norm_out.linear.{p}"])
        for i in range(n):
            b, s = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            last = i == n - 1
            out[f"{s}x_block.attn.qkv.{p}"] = torch.cat([d[f"{b}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{s}context_block.attn.qkv.{p}"] = torch.cat([d[f"{b}attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{s}x_block.attn.proj.{p}"] = d[f"{b}attn.to_out.0.{p}"]
            out[f"{s}x_block.adaLN_modulation.1.{p}"] = d[f"{b}norm1.linear.{p}"]
            modulation = d[f"{b}norm1_context.linear.{p}"]
            out[f"{s}context_block.adaLN_modulation.1.{p}"] = _swap(modulation) if last else modulation
            out[f"{s}x_block.mlp.fc1.{p}"], out[f"{s}x_block.mlp.fc2.{p}"] = d[f"{b}ff.net.0.proj.{p}"], \
                d[f"{b}ff.net.2.{p}"]
            if not last:
                out[f"{s}context_block.attn.proj.{p}"] = d[f"{b}attn.to_add_out.{p}"]
                out[f"{s}context_block.mlp.fc1.{p}"] = d[f"{b}ff_context.net.0.proj.{p}"]
                out[f"{s}context_block.mlp.fc2.{p}"] = d[f"{b}ff_context.net.2.{p}"]
    return out


def sd3_file(parts: dict, path, with_t5=True, transformer_only=False, fp8=False):
    state = {"model.diffusion_model." + k: v for k, v in mmdit_to_stability(parts["transformer"]).items()}
    if not transformer_only:
        state |= sf.vae_to_ldm(parts["vae"])
        for name, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            state |= {f"text_encoders.{prefix}.transformer.{k}": v
                      for k, v in parts[name].state_dict().items() if not k.endswith("position_ids")}
        if with_t5:
            state |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in parts["text_encoder_3"].state_dict().items()
                      if k != "encoder.embed_tokens.weight"}  # tied to shared.weight, as the released files store it
    if fp8:
        state = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.") and v.ndim == 2 else v
                 for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """Tiny SD3 parts as Stability's conventions have them (CLIP-L quick-GELU, CLIP-G's "!" padding, the VAE's
    scaling 1.5305), their diffusers folder and their diffusers pipeline."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    from latentgen.components.text_encoders import clip_tokenizer

    parts = C.sd3_components()
    parts["text_encoder"] = C.clip("quick_gelu", True, 32, 0)
    parts["tokenizer_2"] = clip_tokenizer(77, pad_token="!")
    torch.manual_seed(0)
    parts["vae"] = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                 scaling_factor=1.5305).eval()  # SD's 32 norm groups
    folder = tmp_path_factory.mktemp("sd3") / "folder"
    reference = StableDiffusion3Pipeline(**parts)
    reference.save_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return parts, folder, reference


CALL = dict(num_inference_steps=3, height=32, width=32, guidance_scale=4.0)


def _diffusers(reference, prompt, seed):
    return reference(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **CALL).images


def _ours(pipe, prompt, seed):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, seed=seed, output_type="np", **CALL).images


def test_the_architecture_comes_from_the_weights(sd3):
    parts, _, _ = sd3
    config = mmdit_config(mmdit_to_stability(parts["transformer"]))
    theirs = parts["transformer"].config
    for key in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
                "pos_embed_max_size"):
        assert config[key] == theirs[key], key
    assert config["dual_attention_layers"] == [] and config["qk_norm"] is None


def test_an_all_in_one_file_gives_diffusers_image(sd3, tmp_path):
    """SD3.5's all-in-one layout (MMDiT, VAE, CLIP-L, CLIP-G, T5): T5's tokenizer from --components."""
    parts, folder, reference = sd3
    path = sd3_file(parts, tmp_path / "sd35.safetensors")
    pipe = FlowPipeline.from_single_file(path, torch_dtype=torch.float32, components=folder)
    assert pipe.kind == "sd3" and pipe.inner.text_encoder_3 is not None
    # the component folder gives only the tokenizer: its T5 weights are not the file's
    assert torch.equal(pipe.inner.text_encoder_3.shared.weight, parts["text_encoder_3"].shared.weight)
    np.testing.assert_allclose(_ours(pipe, "a red circle", 3), _diffusers(reference, "a red circle", 3), atol=1e-4,
                               rtol=0)


def test_a_file_without_t5_runs_as_diffusers_does_without_it(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    parts, _, _ = sd3
    path = sd3_file(parts, tmp_path / "incl_clips.safetensors", with_t5=False)
    pipe = FlowPipeline.from_single_file(path, torch_dtype=torch.float32)
    assert pipe.inner.text_encoder_3 is None
    reference = StableDiffusion3Pipeline(**(parts | {"text_encoder_3": None, "tokenizer_3": None}))
    reference.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_ours(pipe, "a blue square", 4), _diffusers(reference, "a blue square", 4), atol=1e-4,
                               rtol=0)


def test_a_transformer_only_fp8_file_takes_the_rest_from_components(sd3, tmp_path):
    """fp8 weights upcast: the image is the one of the fp8-rounded transformer."""
    from diffusers import StableDiffusion3Pipeline

    parts, folder, _ = sd3
    path = sd3_file(parts, tmp_path / "mmdit-fp8.safetensors", transformer_only=True, fp8=True)
    pipe = FlowPipeline.from_single_file(path, torch_dtype=torch.float32, components=folder)
    rounded = C.sd3_components()["transformer"]
    rounded.load_state_dict({k: v.to(torch.float8_e4m3fn).float() if v.ndim == 2 and "pos_embed" not in k else v
                             for k, v in parts["transformer"].state_dict().items()})
    reference = StableDiffusion3Pipeline(**(parts | {"transformer": rounded}))
    reference.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_ours(pipe, "a red circle", 5), _diffusers(reference, "a red circle", 5), atol=1e-4,
                               rtol=0)


def test_infer_runs_a_single_file_and_replays_it(sd3, tmp_path):
    parts, folder, _ = sd3
    path = sd3_file(parts, tmp_path / "sd35.safetensors")
    out = tmp_path / "x.png"
    run = [sys.executable, str(ROOT / "infer.py"), "--model", str(path), "--components", str(folder), "--prompt",
           "a red circle", "--steps", "2", "--width", "32", "--height", "32", "--seed", "1", "--out", str(out)]
    r = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--replay", str(out), "--out", str(tmp_path / "again")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "identical" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("case, message", [
    ("t5-without-tokenizer", "the checkpoint holds T5, whose tokenizer single files do not carry: give --components"),
    ("transformer-only", "the checkpoint has no vae; give --components FOLDER, a diffusers SD3 folder with it"),
    ("no-clip-g", "the checkpoint has no text_encoder_2; give --components"),
    ("flux", "a Flux file holds the transformer only: give --components FOLDER"),
    ("components-not-a-folder", "--components"),
    ("t5-mismatch", "the T5 tokenizer of --components has"),
])
def test_incomplete_files_are_one_line_errors(sd3, tmp_path, case, message):
    parts, _, _ = sd3
    path = tmp_path / "model.safetensors"
    components = None
    if case == "flux":
        save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(path))
    else:
        sd3_file(parts, path, with_t5=case in ("t5-without-tokenizer", "t5-mismatch"),
                 transformer_only=case == "transformer-only")
    if case == "no-clip-g":
        from safetensors.torch import load_file

        save_file({k: v for k, v in load_file(str(path)).items() if "clip_g" not in k}, str(path))
    if case == "components-not-a-folder":
        components = tmp_path
    if case == "t5-mismatch":  # a T5 of 100 embeddings: the tokenizer has more
        from safetensors.torch import load_file

        state = load_file(str(path))
        for key in [k for k in state if k.endswith("shared.weight")]:
            state[key] = state[key][:100].clone()
        save_file(state, str(path))
        components = sd3[1]
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)")) as err:
        open_pipeline(path, dtype="fp32", components=components)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Flux.1: BFL's layout


def flux_to_bfl(transformer) -> dict[str, torch.Tensor]:
    d = transformer.state_dict()
    out = {}
    top = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    for p in ("weight", "bias"):
        for ours, theirs in top.items():
            if f"{ours}.{p}" in d:
                out[f"{theirs}.{p}"] = d[f"{ours}.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(d[f"norm_out.linear.{p}"])
        for i in range(transformer.config.num_layers):
            b, s = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            for ours, theirs in double.items():
                out[f"{s}{theirs}.{p}"] = d[f"{b}{ours}.{p}"]
            out[f"{s}img_attn.qkv.{p}"] = torch.cat([d[f"{b}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{s}txt_attn.qkv.{p}"] = torch.cat([d[f"{b}attn.add_{x}_proj.{p}"] for x in "qkv"])
        for i in range(transformer.config.num_single_layers):
            b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[f"{s}modulation.lin.{p}"], out[f"{s}linear2.{p}"] = d[f"{b}norm.linear.{p}"], d[f"{b}proj_out.{p}"]
            out[f"{s}linear1.{p}"] = torch.cat([d[f"{b}attn.to_{x}.{p}"] for x in "qkv"] + [d[f"{b}proj_mlp.{p}"]])
    for i in range(transformer.config.num_layers):
        b, s = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        for ours, theirs in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                             ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{s}{theirs}.scale"] = d[f"{b}{ours}.weight"]
    for i in range(transformer.config.num_single_layers):
        b, s = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out[f"{s}norm.query_norm.scale"] = d[f"{b}norm_q.weight"]
        out[f"{s}norm.key_norm.scale"] = d[f"{b}norm_k.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in d.values())  # every weight written
    return out


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_a_flux_transformer_file_with_components_gives_diffusers_image(tmp_path, guidance):
    """A Flux transformer (dev: with its guidance embedding; schnell: without) in BFL's layout, its VAE and
    encoders from a diffusers Flux folder. 16-wide heads: the rotary axes by Flux's proportions, (4, 6, 6)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    parts = C.flux_components(guidance=guidance)
    torch.manual_seed(1)
    parts["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6], guidance_embeds=guidance).eval()
    reference = FluxPipeline(**parts)
    reference.save_pretrained(tmp_path / "folder")
    reference.set_progress_bar_config(disable=True)
    path = tmp_path / "flux1.safetensors"
    save_file({k: v.contiguous() for k, v in flux_to_bfl(parts["transformer"]).items()}, str(path))
    pipe = FlowPipeline.from_single_file(path, torch_dtype=torch.float32, components=tmp_path / "folder")
    assert pipe.kind == "flux" and pipe.inner.transformer.config.guidance_embeds == guidance
    assert torch.equal(pipe.inner.transformer.x_embedder.weight, parts["transformer"].x_embedder.weight)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe("a red circle", seed=2, output_type="np", num_inference_steps=3, height=32, width=32,
                guidance_scale=3.5).images
    theirs = reference("a red circle", generator=torch.Generator().manual_seed(2), output_type="np",
                       num_inference_steps=3, height=32, width=32, guidance_scale=3.5).images
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_the_server_runs_a_single_file_with_components(sd3, tmp_path):
    """serve.py --components: an SD3 single file served through A1111's API gives FlowPipeline's image."""
    import base64
    import io

    from PIL import Image

    from conftest import Server

    parts, folder, _ = sd3
    path = sd3_file(parts, tmp_path / "sd35.safetensors")
    server = Server(["--model", str(path), "--components", str(folder), "--dtype", "fp32"])
    try:
        r = server.post("/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32,
                                              "seed": 4, "cfg_scale": 4.0, "sampler_name": "Euler"})
        assert r.status_code == 200, r.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    finally:
        server.close()
    pipe = FlowPipeline.from_single_file(path, torch_dtype=torch.float32, components=folder)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe("a red circle", seed=4, num_inference_steps=2, width=32, height=32, guidance_scale=4.0,
                  scheduler="euler").images[0]
    assert np.array_equal(served, np.asarray(direct))
