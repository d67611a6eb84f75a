"""sdexport: Stable Diffusion to a frozen, compiled artifact with fused kernels."""
