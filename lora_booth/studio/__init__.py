"""The studio (`lora-booth ui`): a local web front end over the same recipe as the CLI. It keeps
datasets and runs in one workspace folder, queues runs in SQLite and starts each as its own
`lora-booth train` process (docs/ui.md)."""
