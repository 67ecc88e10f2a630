"""Memory and FLOPs of a training step, measured on fake tensors, and presets chosen by card."""
