"""rosa-ds: distributed LoRA / RoSA / ROSA fine-tuning on DeepSpeed ZeRO."""

__version__ = "0.1.0"
