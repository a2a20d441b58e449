"""ditlab: an experiment platform for the Diffusion Transformer (DiT) design space."""

from ditlab import design  # noqa: F401  (registers the `point_name` resolver of conf/train.yaml's run_name)

__version__ = "0.1.0"
