"""Training support: run configs, task data, atomic checkpoints (the loop is growmem.train)."""
