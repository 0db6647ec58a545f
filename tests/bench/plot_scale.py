#!/usr/bin/env python3
"""Draw BENCHMARKS.md's scale plot (docs/scale.svg) from the tables that
`BENCH=scale BENCH_SCALE_N=<n>` runs printed: the daemon's RSS, its idle CPU and
worker death -> task ready p99 (each death alone) against the number of live workers.

    python3 tests/bench/plot_scale.py run-1000.log run-2000.log ... > docs/scale.svg
"""
import re
import sys

points = []
for path in sys.argv[1:]:
    text = open(path, encoding="utf-8", errors="replace").read()
    n = int(re.search(r"\| 8\. scale: (\d+) workers started", text).group(1))
    idle = re.search(r"\| 8\. scale: the daemon idle, \d+ live \| RSS ([\d.]+) MiB, \d+ descriptors, CPU ([\d.]+) %", text)
    death = re.search(r"\| 8\. scale: worker death -> task ready, \d+ live, each death alone \| n=\d+ p50=([\d.]+)(ms|µs|s) p99=([\d.]+)(ms|µs|s)", text)
    unit = {"ms": 1.0, "µs": 0.001, "s": 1000.0}
    points.append((n, float(idle.group(1)), float(idle.group(2)), float(death.group(3)) * unit[death.group(4)]))
points.sort()

W, H, PAD = 300, 200, 48
series = [
    ("daemon RSS (MiB)", 1, 50.0, "aim ≤ 50 MiB"),
    ("daemon idle CPU (%)", 2, 1.0, "aim ≤ 1 %"),
    ("death → ready p99 (ms)", 3, 50.0, "aim ≤ 50 ms"),
]
max_n = max(p[0] for p in points)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(series) * (W + PAD) + PAD}" height="{H + 2 * PAD}" font-family="sans-serif" font-size="11">']
for i, (title, col, aim, aim_label) in enumerate(series):
    x0 = PAD + i * (W + PAD)
    top = max(max(p[col] for p in points), aim) * 1.15
    sx = lambda n: x0 + W * n / max_n
    sy = lambda v: PAD + H - H * v / top
    out.append(f'<text x="{x0}" y="{PAD - 18}" font-weight="bold">{title}</text>')
    out.append(f'<line x1="{x0}" y1="{PAD + H}" x2="{x0 + W}" y2="{PAD + H}" stroke="black"/>')
    out.append(f'<line x1="{x0}" y1="{PAD}" x2="{x0}" y2="{PAD + H}" stroke="black"/>')
    out.append(f'<line x1="{x0}" y1="{sy(aim):.1f}" x2="{x0 + W}" y2="{sy(aim):.1f}" stroke="#c00" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x0 + W - 4}" y="{sy(aim) - 4:.1f}" text-anchor="end" fill="#c00">{aim_label}</text>')
    for frac in (0, 0.5, 1):
        v = top * frac
        out.append(f'<text x="{x0 - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    path = " ".join(f"{sx(p[0]):.1f},{sy(p[col]):.1f}" for p in points)
    out.append(f'<polyline points="{path}" fill="none" stroke="#06c" stroke-width="2"/>')
    for p in points:
        out.append(f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[col]):.1f}" r="3" fill="#06c"/>')
        out.append(f'<text x="{sx(p[0]):.1f}" y="{PAD + H + 14}" text-anchor="middle">{p[0] // 1000}k</text>')
        out.append(f'<text x="{sx(p[0]) + 4:.1f}" y="{sy(p[col]) - 6:.1f}">{p[col]:.3g}</text>')
    out.append(f'<text x="{x0 + W / 2}" y="{PAD + H + 32}" text-anchor="middle">live workers</text>')
out.append("</svg>")
print("\n".join(out))
