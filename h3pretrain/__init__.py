"""h3pretrain: pretraining hybrid H3 + attention language models."""
__version__ = "0.1.0"
