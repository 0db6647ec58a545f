#!/usr/bin/env python3
"""Draw the soak's figure (docs/soak.svg) from what `cargo test --release --test soak` wrote
to $SOAK_OUT: samples.csv (every 5 s) and faults.csv. Against the tasks settled so far: the
daemon's RSS, descriptors and inotify watches, its CPU per task settled (each daemon life
on its own: a SIGKILL starts the count again), PID 1's and journald's RSS; each fault a tick
on the axis (daemon kills in red).

    python3 tests/soak/plot.py /var/tmp/hermes-mgr-soak > docs/soak.svg
"""
import csv
import os
import sys

out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "samples.csv"))))
faults = list(csv.DictReader(open(os.path.join(out, "faults.csv"))))
t = [float(r["seconds"]) for r in rows]
settled = [int(r["settled"]) for r in rows]


def settled_at(sec):
    """Tasks settled at `sec` seconds (the sample before it)."""
    best = 0
    for s, n in zip(t, settled):
        if s <= sec:
            best = n
    return best


# CPU per task settled between two samples of one daemon life.
cpu = []
for a, b in zip(rows, rows[1:]):
    if a["daemon_pid"] == b["daemon_pid"] and a["daemon_pid"] != "0":
        dn = int(b["settled"]) - int(a["settled"])
        if dn >= 20:
            cpu.append((int(b["settled"]), 1000 * (float(b["daemon_cpu_s"]) - float(a["daemon_cpu_s"])) / dn))

live = [r for r in rows if r["daemon_pid"] != "0"]
series = [
    ("daemon RSS (MiB)", [(int(r["settled"]), int(r["daemon_rss_kb"]) / 1024) for r in live]),
    ("daemon descriptors", [(int(r["settled"]), int(r["daemon_fds"])) for r in live]),
    ("daemon inotify watches", [(int(r["settled"]), int(r["daemon_watches"])) for r in live]),
    ("daemon CPU per task (ms)", cpu),
    ("PID 1 / journald RSS (MiB)", [(int(r["settled"]), int(r["pid1_rss_kb"]) / 1024) for r in rows]),
    ("live worker scopes", [(int(r["settled"]), int(r["scopes"])) for r in rows]),
]
second = [(int(r["settled"]), int(r["journald_rss_kb"]) / 1024) for r in rows]

W, H, PAD = 300, 170, 46
COLS = 3
max_x = max(settled) or 1
out_svg = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{COLS * (W + PAD) + PAD}" '
    f'height="{2 * (H + 2 * PAD)}" font-family="sans-serif" font-size="11">',
    '<rect width="100%" height="100%" fill="white"/>',
]
for i, (title, pts) in enumerate(series):
    x0 = PAD + (i % COLS) * (W + PAD)
    y0 = PAD + (i // COLS) * (H + 2 * PAD)
    ys = [y for _, y in pts] + ([y for _, y in second] if i == 4 else [])
    max_y = max(ys + [1e-9]) * 1.15
    sx = lambda x: x0 + W * x / max_x
    sy = lambda y: y0 + H - H * y / max_y
    out_svg.append(f'<text x="{x0}" y="{y0 - 8}" font-weight="bold">{title}</text>')
    out_svg.append(f'<rect x="{x0}" y="{y0}" width="{W}" height="{H}" fill="none" stroke="#888"/>')
    for f in faults:
        fx = sx(settled_at(float(f["seconds"])))
        colour = "#d33" if "SIGKILL" in f["fault"] else "#bbb"
        out_svg.append(f'<line x1="{fx:.1f}" y1="{y0 + H}" x2="{fx:.1f}" y2="{y0 + H + 6}" stroke="{colour}"/>')
    for frac in (0, 0.5, 1):
        out_svg.append(f'<text x="{x0 - 4}" y="{sy(max_y / 1.15 * frac) + 4:.1f}" text-anchor="end">{max_y / 1.15 * frac:.3g}</text>')
    out_svg.append(f'<text x="{x0 + W}" y="{y0 + H + 18}" text-anchor="end">{max_x:,} tasks settled</text>')
    out_svg.append(f'<text x="{x0}" y="{y0 + H + 18}">0</text>')
    for data, colour in ((pts, "#1f77b4"), (second if i == 4 else [], "#2ca02c")):
        if data:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data)
            out_svg.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="1"/>')
    if i == 4:
        out_svg.append(f'<text x="{x0 + W - 4}" y="{y0 + 14}" text-anchor="end" fill="#1f77b4">PID 1</text>')
        out_svg.append(f'<text x="{x0 + W - 4}" y="{y0 + 28}" text-anchor="end" fill="#2ca02c">journald</text>')
out_svg.append("</svg>")
print("\n".join(out_svg))
