"""ditlab: an experiment platform for the Diffusion Transformer (DiT) design space."""

__version__ = "0.1.0"
