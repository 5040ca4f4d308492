"""The one training loop (distillation, budget, resume)."""
