"""The Lighthouse op on one device: its configuration (config.py), the pyramid and scores
(pyramid.py), the selection (select.py), gather and scatter (compress.py, scatter.py), the
attention over the selected entries and dense causal attention (attention.py), and the Triton
kernels with their pure-PyTorch twins (kernels/). Nothing here talks to other ranks."""
