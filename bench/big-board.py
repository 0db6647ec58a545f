#!/usr/bin/python3
"""Make a big board for `hermes-mgr status` timing: N tasks, LIVE of them running (with an
open run each and a worker pid that does not exist), the rest done with one closed run.
usage: big-board.py DB N LIVE   (DB must be a board hermes-mgr or hermes created)"""
import sqlite3, sys, time
db, n, live = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(db)
now = int(time.time())
with c:
    for i in range(n):
        tid = f"t_{i:08x}"
        running = i < live
        c.execute(
            "INSERT INTO tasks (id, title, assignee, status, priority, created_at, started_at, completed_at, "
            "claim_lock, worker_pid, workspace_kind) VALUES (?,?,?,?,?,?,?,?,?,?, 'scratch')",
            (tid, f"task {i}", "default", "running" if running else "done", i % 5, now - 3600, now - 60,
             None if running else now - 30, "bench:1" if running else None, 4000000 + i if running else None),
        )
        cur = c.execute(
            "INSERT INTO task_runs (task_id, profile, status, started_at, ended_at, outcome) VALUES (?,?,?,?,?,?)",
            (tid, "default", "running" if running else "done", now - 60, None if running else now - 30,
             None if running else "completed"),
        )
        if running:
            c.execute("UPDATE tasks SET current_run_id=? WHERE id=?", (cur.lastrowid, tid))
        c.execute("INSERT INTO task_events (task_id, run_id, kind, payload, created_at) VALUES (?,?,?,?,?)",
                  (tid, None, "created", None, now - 3600))
print(f"{db}: {n} tasks, {live} running")
