"""Recovery: short, bounded training after compression (pruning's last step)."""
