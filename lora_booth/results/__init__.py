"""What a run shows: sample grids and `generate`, logs, report.html, the model card, `eval`."""
