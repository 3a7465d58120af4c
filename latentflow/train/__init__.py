"""Training: the config, the accelerate loop and what only training needs (EMA, pairing, optimizer, checkpoints,
logs, previews)."""
