"""mtpeft: multitask parameter-efficient fine-tuning of code LLMs on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
