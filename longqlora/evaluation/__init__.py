"""Evaluation: loading a base, merged model or adapter for inference at its extended context (loading.py),
perplexity by context length and position (perplexity.py), passkey retrieval by length and depth (passkey.py), and
`evaluating`, a block in eval mode that gives the model back in its own mode."""

import contextlib


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode (full attention, no dropout) for the block, and back in its own mode after it, also when
    the block raises: a caught error must not leave a training loop's model in eval mode."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
