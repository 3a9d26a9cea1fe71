"""Evaluation: loading a base, merged model or adapter for inference at its extended context (loading.py),
perplexity by context length and position (perplexity.py), passkey retrieval by length and depth (passkey.py)."""
