"""`lora-booth generate` on a run's adapter, from the run page: the final files or one checkpoint's,
each request drawn into a new folder of the workspace (workspace/generated/run-N/K-…), never over
earlier images. The drawing is the CLI's own verb in a process of its own, one at a time."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from ..io.errors import ConfigError
from .store import FINAL
from .workspace import Workspace, inside

CHECKPOINT = re.compile(r"step-\d{8}")
MAX_PROMPT = 1000
MAX_IMAGES = 8
TIMEOUT_S = 1800
ADAPTER = "pytorch_lora_weights.safetensors"
_one_at_a_time = threading.Lock()


def folder(workspace: Workspace, run_id: int) -> Path:
    """Where a run's generated images live: beside the run folder, which train keeps to its own files."""
    return workspace.root / "generated" / f"run-{run_id}"


def checked(run, request: dict) -> tuple[str, str, int, int]:
    """(checkpoint, prompt, n, seed) of a request, or a ConfigError naming the key."""
    if run.status not in FINAL:
        raise ConfigError("generate", f"run {run.id} is {run.status}; generate once it has ended (stop it: it saves a "
                          "checkpoint), so drawing does not compete with its training for the GPU")
    checkpoint, prompt = request.get("checkpoint") or "", request.get("prompt")
    if not isinstance(checkpoint, str) or (checkpoint and not CHECKPOINT.fullmatch(checkpoint)):
        raise ConfigError("checkpoint", f"{str(checkpoint)[:60]!r} is not a checkpoint name",
                          "leave it empty for the final files, or give one like step-00000500")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT or \
            any(ord(c) < 32 for c in prompt):
        raise ConfigError("prompt", f"must be one line of 1 to {MAX_PROMPT} characters")
    n, seed = request.get("n", 1), request.get("seed", 0)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise ConfigError("n", f"must be a whole number from 1 to {MAX_IMAGES}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError("seed", "must be a whole number from 0 to 2147483647")
    return checkpoint, prompt, n, seed


def generate(workspace: Workspace, run, request: dict, busy: list[int] = ()) -> list[str]:
    """Draw with the run's adapter (final or checkpoint); the new images' names under folder().
    `busy`: the runs training now, with which drawing would share the GPU."""
    checkpoint, prompt, n, seed = checked(run, request)
    if busy:
        raise ConfigError("generate", f"run {busy[0]} is training now; drawing beside it could take the memory it "
                          "needs", "generate when the queue is idle (or stop that run: it saves a checkpoint)")
    run_dir = workspace.run_dir(run.id)
    adapter = inside(run_dir, f"checkpoints/{checkpoint}" if checkpoint else ".", "checkpoint")
    if not (adapter / ADAPTER).is_file():
        raise ConfigError("checkpoint", f"run {run.id} has no adapter {'in ' + checkpoint if checkpoint else 'yet'}",
                          "pick a checkpoint that is listed under Files")
    with _one_at_a_time:
        root = folder(workspace, run.id)
        root.mkdir(parents=True, exist_ok=True)
        index = 1 + max((int(p.name.split("-")[0]) for p in root.iterdir() if p.name.split("-")[0].isdigit()), default=0)
        out = root / f"{index:04d}-{checkpoint or 'final'}"
        words = [sys.executable, "-m", "lora_booth", "generate", f"lora={adapter}", f"prompt={prompt}", f"n={n}",
                 f"seed={seed}", f"out={out}"]
        # the run's base model path is as train read it: relative to the workspace, where runs start
        try:
            done = subprocess.run(words, cwd=workspace.root, capture_output=True, text=True, timeout=TIMEOUT_S)
            failure = "" if done.returncode == 0 else "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        except subprocess.TimeoutExpired:
            failure = f"it ran past {TIMEOUT_S} s"
        if failure:
            shutil.rmtree(out, ignore_errors=True)  # the folder this request made, with what it drew
            raise ConfigError("generate", f"lora-booth generate failed: {failure}")
    return [str(p.relative_to(folder(workspace, run.id))) for p in sorted(out.glob("*.png"))]
