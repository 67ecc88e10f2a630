"""The model being trained: the frozen base (locate, detect, load), the adapter modules on it (LoRA,
LyCORIS, fp8 storage), precision, prompt encoding, pivotal tokens, the loss and checkpoints."""
