"""lh-cp inside torchtitan 0.3.0 (extra `lh-cp[torchtitan]`), without patching torchtitan.

Lighthouse enters torchtitan's own llama3 model (Llama3Model, GQAttention) as its inner
attention; torchtitan's Trainer, FSDP2, checkpointing, metrics and dataloader machinery run
it. Entry point: `torchrun ... -m torchtitan.train --module lh_cp.torchtitan --config NAME`,
with NAME a function of `lh_cp.torchtitan.config_registry`.

Modules: inner_attention (the attention module), rope (float64-angle RoPE table shared by
layers), model (llama3 configs built from lh-cp's ModelConfig), stage (attention of a stage,
CP exchanges, resume step), parallelize (CP wiring + torchtitan's AC/compile/FSDP2),
tokenizer and data (lh-cp's tokenizers and token windows behind torchtitan's interfaces),
optim (AdamW groups and schedule as lh-cp's trainer), trainer (Trainer subclass carrying the
lh-cp sections), recipe_config (lh-cp recipe -> trainer config per stage), named_recipes and
config_registry (the named configs), convert (CLI), state_dict (weights between lh-cp's model
and torchtitan's).
"""
