"""Baize: self-chat data and int8 LoRA fine-tuning as a reproducible pipeline."""

import warnings

# PEFT still asks transformers 5 for the deprecated `is_gradient_checkpointing` each time it wraps a model: noise
# on every training and evaluation run that a user can do nothing about.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
