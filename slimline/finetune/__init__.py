"""Fine-tuning stages (LoRA now; QLoRA next)."""
