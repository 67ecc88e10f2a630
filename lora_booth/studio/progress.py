"""What a run shows while it trains, read from the files train writes: metrics.jsonl (step, losses,
step time), samples/*.png (the grids as they are drawn), the adapter files and the log."""
from __future__ import annotations

import json
from pathlib import Path

from .store import Run
from .workspace import Workspace

TAIL_BYTES = 64 * 1024
LOSS_POINTS = 400   # the loss curve sent to the page: evenly thinned


def log_tail(path: Path, lines: int) -> list[str]:
    """The last lines of a log, read from its end only (a log may be long)."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    # progress bars rewrite one line with carriage returns: keep each line's last state
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()][-lines:]


def metrics(run_dir: Path) -> list[dict]:
    records = []
    try:
        text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the line being written
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def files(run_dir: Path) -> list[str]:
    """The files a person downloads: adapters at the top and in each checkpoint, the report."""
    found = []
    if run_dir.is_dir():
        found += sorted(p.name for p in run_dir.glob("*.safetensors"))
        found += ["report.html"] if (run_dir / "report.html").is_file() else []
        for checkpoint in sorted((run_dir / "checkpoints").glob("step-*")):
            found += sorted(f"checkpoints/{checkpoint.name}/{p.name}" for p in checkpoint.glob("*.safetensors")
                            if p.name not in ("adapter.safetensors", "optimizer.safetensors"))
    return found


def snapshot(workspace: Workspace, run: Run, log_lines: int = 30) -> dict:
    """The run's state for GET /api/runs/{id} and the progress stream."""
    run_dir = workspace.run_dir(run.id)
    records = metrics(run_dir)
    step = records[-1]["step"] if records else 0
    recent = [r["step_seconds"] for r in records[-20:] if isinstance(r.get("step_seconds"), (int, float))]
    eta = (sum(recent) / len(recent)) * max(0, run.max_steps - step) if recent and run.status == "running" else None
    every = max(1, len(records) // LOSS_POINTS)
    samples = sorted(p.name for p in (run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
    return {
        "id": run.id, "status": run.status, "step": step, "max_steps": run.max_steps,
        "loss": records[-1].get("loss") if records else None, "eta_s": eta,
        "losses": [[r["step"], r.get("loss")] for r in records[::every]],
        "validation": [[r["step"], r["val_instance_loss"]] for r in records if "val_instance_loss" in r][-LOSS_POINTS:],
        "samples": samples, "files": files(run_dir), "error": run.error,
        "request": run.request, "queued_at": run.created, "started": run.started, "finished": run.finished,
        "log": log_tail(workspace.log_file(run.id), log_lines),
    }
