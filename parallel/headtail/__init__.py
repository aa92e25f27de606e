"""The head-tail CP layout: rank r of W holds chunks r and 2W-1-r of the 2W equal chunks of a
sequence (LIGHTHOUSE.md s.8). attention.py computes a shard's Lighthouse or dense attention;
exchange.py and ring.py move K/V (compressed for Lighthouse) between ranks; blocks.py (the
reference) and fused_blocks.py (CUDA) attend one query block to one key block with its
log-sum-exp; halo.py carries the scatter's spill into the next chunk; sharding.py cuts and
gathers shards; traffic.py counts the bytes each rank sends."""
