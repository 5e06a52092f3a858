"""Training loops: train-vae, train-lora, datasets and losses."""
