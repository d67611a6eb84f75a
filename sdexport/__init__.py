"""sdexport: Stable Diffusion to a frozen, compiled artifact with fused kernels."""

from sdexport.controlnet import ControlNet
from sdexport.pipeline import StableDiffusion

__all__ = ["ControlNet", "StableDiffusion"]
