"""D³-Predictor: noise-free deterministic diffusion for dense prediction."""

__version__ = "0.1.0"
