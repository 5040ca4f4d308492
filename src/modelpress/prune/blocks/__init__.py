"""Block removal that recycles the removed block (FuseGPT): importance, fusion and the ``prune.fuse_blocks`` pass."""
