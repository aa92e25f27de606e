"""The contiguous CP layout of the Ulysses exchanges: rank r of W holds tokens [r*C, (r+1)*C).
plain.py runs DeepSpeed's DistributedAttention around the attention (uncompressed q, k, v
move), compressed.py all-to-alls only the compressed entries; comm.py has their collectives
(all-to-all, next-rank halo), sharding.py cuts and gathers shards, traffic.py counts bytes."""
