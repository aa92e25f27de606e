"""Training data: document sources (corpus.py), tokenizers (tokenizer.py), packing into
sequences and batches (loader.py) and the synthetic passkey evaluation (passkey.py)."""
