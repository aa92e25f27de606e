# Sourced by the launchers. Long sequences fragment the CUDA caching allocator (a 768K-token
# step of the 270M model left 24 GiB reserved but unusable); expandable segments avoid that,
# unless PYTORCH_CUDA_ALLOC_CONF is already set.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
