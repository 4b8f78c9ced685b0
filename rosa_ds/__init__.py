"""rosa-ds: distributed LoRA / RoSA / ROSA fine-tuning on DeepSpeed ZeRO."""

from rosa_ds.startup import hide_mlflow_from_deepspeed_autotuner

__version__ = "0.1.0"

hide_mlflow_from_deepspeed_autotuner()
