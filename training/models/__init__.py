"""Model registry: every model is ``forward(dense float32[B, D], sparse int64[B, S]) -> logits float32[B]``."""
