"""longqlora: extend the context window of Llama-family models on one GPU.

NF4 4-bit loading (LongQLoRA, arXiv 2311.04879), position interpolation (arXiv 2306.15595), shifted sparse attention
and LoRA with trainable embeddings and norms (LongLoRA, arXiv 2309.12307), on transformers 5's AttentionInterface.

Importing the package is cheap and works without a GPU: submodules load what they need when used.
"""

__version__ = "0.1.0"
