"""The queue: one row per run in an SQLite file inside the workspace. SQLite is embedded (nothing
to install) and its transactions make a claim by one worker invisible to the others, so a run is
started once even with a worker per GPU."""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("queued", "running", "done", "failed", "stopped")
FINAL = ("done", "failed", "stopped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'stopped')),
    request TEXT NOT NULL,              -- the train keys as the user gave them (JSON)
    max_steps INTEGER NOT NULL,
    position REAL NOT NULL,             -- queue order: lowest first
    resume INTEGER NOT NULL DEFAULT 0,  -- start with resume=latest (a run that was interrupted)
    stop_requested INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,                        -- the train process while it runs (or ran last)
    slot INTEGER,                       -- the worker (GPU) that runs it
    started REAL,
    finished REAL,
    exit_code INTEGER,
    error TEXT NOT NULL DEFAULT ''
)
"""


@dataclass
class Run:
    id: int
    created: float
    status: str
    request: dict
    max_steps: int
    position: float
    resume: bool
    stop_requested: bool
    pid: int | None
    slot: int | None
    started: float | None
    finished: float | None
    exit_code: int | None
    error: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Run":
        values = dict(row)
        values["request"] = json.loads(values["request"])
        values["resume"], values["stop_requested"] = bool(values["resume"]), bool(values["stop_requested"])
        return cls(**values)


class RunStore:
    """Every method opens its own short connection: the web server's threads and the workers
    share nothing but the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers (the pages) never wait for a writer
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def _write(self, sql: str, args: tuple = ()) -> int:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            cursor = db.execute(sql, args)
            db.execute("COMMIT")
            return cursor.lastrowid if sql.lstrip().upper().startswith("INSERT") else cursor.rowcount
        finally:
            db.close()

    def add(self, request: dict, max_steps: int) -> int:
        now = time.time()
        return self._write("INSERT INTO runs (created, status, request, max_steps, position) VALUES (?, 'queued', ?, ?, "
                           "(SELECT COALESCE(MAX(position), 0) + 1 FROM runs))", (now, json.dumps(request), max_steps))

    def get(self, run_id: int) -> Run | None:
        db = self._connect()
        try:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        finally:
            db.close()
        return Run.from_row(row) if row else None

    def all(self) -> list[Run]:
        db = self._connect()
        try:
            rows = db.execute("SELECT * FROM runs ORDER BY id DESC").fetchall()
        finally:
            db.close()
        return [Run.from_row(row) for row in rows]

    def claim(self, slot: int) -> Run | None:
        """The first queued run, marked running for `slot` in the same transaction."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM runs WHERE status = 'queued' ORDER BY position, id LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE runs SET status = 'running', slot = ?, started = ?, finished = NULL, exit_code = NULL, "
                       "error = '' WHERE id = ?", (slot, time.time(), row["id"]))
            db.execute("COMMIT")
        finally:
            db.close()
        return self.get(row["id"])

    def set_pid(self, run_id: int, pid: int) -> None:
        self._write("UPDATE runs SET pid = ? WHERE id = ?", (pid, run_id))

    def finish(self, run_id: int, status: str, exit_code: int | None, error: str = "") -> None:
        assert status in FINAL or status == "queued"
        resume = 1 if status == "queued" else 0
        self._write("UPDATE runs SET status = ?, exit_code = ?, error = ?, finished = ?, "
                    "resume = CASE WHEN ? THEN 1 ELSE resume END WHERE id = ?",
                    (status, exit_code, error, time.time(), resume, run_id))

    def request_stop(self, run_id: int) -> str:
        """Queued: stopped at once. Running: flagged (the worker signals the process). Else unchanged."""
        self._write("UPDATE runs SET status = 'stopped', finished = ? WHERE id = ? AND status = 'queued'",
                    (time.time(), run_id))
        self._write("UPDATE runs SET stop_requested = 1 WHERE id = ? AND status = 'running'", (run_id,))
        run = self.get(run_id)
        return run.status if run else ""

    def requeue(self, run_id: int) -> bool:
        """A stopped or failed run continues from its last checkpoint (resume=latest), at the end of the queue."""
        return self._write("UPDATE runs SET status = 'queued', resume = 1, stop_requested = 0, error = '', "
                           "position = (SELECT COALESCE(MAX(position), 0) + 1 FROM runs) "
                           "WHERE id = ? AND status IN ('stopped', 'failed')", (run_id,)) == 1

    def move(self, run_id: int, before: int | None) -> bool:
        """Queue order: put a queued run before another queued run, or last (before=None)."""
        run = self.get(run_id)
        if run is None or run.status != "queued":
            return False
        if before is None:
            return self._write("UPDATE runs SET position = (SELECT MAX(position) + 1 FROM runs) WHERE id = ?",
                               (run_id,)) == 1
        other = self.get(before)
        if other is None or other.status != "queued":
            return False
        db = self._connect()
        try:
            row = db.execute("SELECT MAX(position) FROM runs WHERE status = 'queued' AND position < ? AND id != ?",
                             (other.position, run_id)).fetchone()
        finally:
            db.close()
        below = row[0] if row[0] is not None else other.position - 1
        return self._write("UPDATE runs SET position = ? WHERE id = ?", ((below + other.position) / 2, run_id)) == 1

    def interrupted(self) -> list[Run]:
        """Runs a previous server left as running: it died (or was killed) while they ran."""
        return [run for run in self.all() if run.status == "running"]

    def requeue_interrupted(self, run_id: int) -> None:
        """Back to the queue, resuming from its last checkpoint, never from step 0 over its own files."""
        self._write("UPDATE runs SET status = 'queued', resume = 1 WHERE id = ? AND status = 'running'", (run_id,))
