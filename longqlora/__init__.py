"""longqlora: extend the context window of Llama-family models on one GPU.

NF4 4-bit loading (LongQLoRA, arXiv 2311.04879), RoPE scaling (YaRN, arXiv 2309.00071, by default; or position
interpolation, arXiv 2306.15595), shifted sparse attention and LoRA with trainable embeddings and norms (LongLoRA,
arXiv 2309.12307), on transformers 5's AttentionInterface.

Importing the package is cheap and works without a GPU: submodules load what they need when used.
"""

import logging as _logging

__version__ = "0.1.0"


def _hub_kernel_warning(record) -> bool:
    """False for bitsandbytes' warning that its optional CPU kernel from the Hugging Face hub (`kernels`) did not
    load: this toolkit never fetches code at run time, and bitsandbytes runs its own CPU kernel instead, so the
    warning (printed once per process on CPUs with AVX512-BF16) would only alarm a user."""
    return "from kernels-community" not in str(record.msg)


# A filter on bitsandbytes' own logger (by name: bitsandbytes itself is imported lazily, by transformers or PEFT)
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_hub_kernel_warning)


def _cpu_accelerator_warning(record) -> bool:
    """False for DeepSpeed's warning, on every machine without a GPU, that it set its accelerator to the CPU: a
    CPU run (the tests, --tiny, merging on a laptop) cannot act on it, and a GPU machine never sees it."""
    return "Setting accelerator to CPU" not in str(record.msg)


_logging.getLogger("DeepSpeed").addFilter(_cpu_accelerator_warning)  # DeepSpeed is imported by accelerate, lazily
