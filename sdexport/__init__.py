"""sdexport: Stable Diffusion to a frozen, compiled artifact with fused kernels."""

from sdexport.pipeline import StableDiffusion

__all__ = ["StableDiffusion"]
