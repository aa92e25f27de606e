"""lh_cp.parallel: everything that talks to other ranks (context parallelism, FSDP2, launch)."""
