"""dreambooth: personalize text-to-image diffusion models from a few photos (Ruiz et al., 2023)."""

__version__ = "0.1.0"
