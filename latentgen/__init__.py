"""latentgen: latent text-to-image diffusion (VAE + text encoder + cross-attention U-Net) on diffusers."""

__version__ = "0.1.0"

__all__ = ["LatentPipeline", "Request", "__version__"]


def __getattr__(name):  # keep `import latentgen` light: torch/diffusers load on first use of the pipeline
    if name == "LatentPipeline":
        from .pipeline import LatentPipeline

        return LatentPipeline
    if name == "Request":
        from .request import Request

        return Request
    raise AttributeError(name)
