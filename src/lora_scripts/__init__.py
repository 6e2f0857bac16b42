"""lora-scripts: train LoRA adapters for Stable Diffusion and causal LLMs from a small dataset."""

__version__ = "0.1.0"
