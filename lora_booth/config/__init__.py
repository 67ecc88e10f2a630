"""The config: typed sections with their --help text, layering (defaults ← preset ← file ← key=value),
validation. Imports only lora_booth.io."""
