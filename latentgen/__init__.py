"""latentgen: latent text-to-image diffusion (VAE + text encoder + cross-attention U-Net) on diffusers."""

from latentgen._version import __version__

__all__ = ["FlowPipeline", "LatentPipeline", "Request", "TransformerDenoiser", "__version__"]


def __getattr__(name):  # keep `import latentgen` light: torch/diffusers load on first use of the pipeline
    if name == "LatentPipeline":
        from latentgen.generation.pipeline import LatentPipeline

        return LatentPipeline
    if name == "FlowPipeline":
        from latentgen.generation.flow import FlowPipeline

        return FlowPipeline
    if name == "TransformerDenoiser":  # the DiT/MMDiT backbone: a pipeline folder's model_index.json names it here
        from latentgen.components.denoisers import TransformerDenoiser

        return TransformerDenoiser
    if name == "Request":
        from latentgen.generation.request import Request

        return Request
    raise AttributeError(name)
