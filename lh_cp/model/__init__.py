"""The Llama-3 style decoder (transformer.py) and its chunked loss (loss.py); no distributed code:
attention goes through the context object parallelize hands each attention module."""
