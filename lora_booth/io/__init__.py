"""The bottom layer: whole-or-nothing writes, locks, the run manifest, streamed safetensors, errors.
It imports nothing else from lora_booth."""
