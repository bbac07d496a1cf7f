"""Fine-tuning: the LoRA training loop and what it trains on."""
