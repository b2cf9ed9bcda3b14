"""Quality evaluation: a DiT trained on sklearn digits, metrics, and the FORA comparison."""
