"""Fine-tune a chat model and ship it to NVIDIA Triton, proving fidelity at every step."""

__version__ = "0.1.0"
