"""layerctl: transparent images and image layers from Stable Diffusion (LayerDiffuse)."""

__version__ = "0.1.0"
