"""latentflow: latent flow matching and diffusion on cached VAE latents.

Time convention everywhere: t=0 is noise x0 ~ N(0, I), t=1 is data x1, and the
conditional velocity target is u_t = x1 - x0.
"""

from latentflow.errors import LatentflowError

__version__ = "0.1.0"

__all__ = ["LatentflowError", "__version__"]
