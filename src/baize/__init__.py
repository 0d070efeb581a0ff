"""Baize: self-chat data and int8 LoRA fine-tuning as a reproducible pipeline."""

__version__ = "0.1.0"
