"""Draws bench/sweep.sh's results as SVG (no plotting library needed):
memory per idle connection vs connections, and fan-out p50/p99 latency vs
offered deliveries per second, one line per server.

    python3 bench/plot.py docs/plots/sweep.jsonl docs/plots
"""

import json
import math
import pathlib
import sys

COLORS = {"switchyard": "#1f77b4", "tungstenite-4k-batched": "#2ca02c", "node-ws": "#d62728"}
W, H, LEFT, RIGHT, TOP, BOTTOM = 700, 400, 70, 220, 40, 50


def scale(value, lo, hi, a, b, log=False):
    if log:
        value, lo, hi = math.log10(value), math.log10(lo), math.log10(hi)
    return a + (value - lo) / (hi - lo) * (b - a) if hi > lo else (a + b) / 2


def nice_ticks(lo, hi, count=5):
    """Ticks at 1, 2 or 5 times a power of ten, about `count` of them."""
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def chart(title, xlabel, ylabel, series, log_y=False):
    """series: {label: (color, dash, [(x, y), ...])}"""
    points = [p for _, _, pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = 0, max(xs) * 1.05
    y0, y1 = (min(ys) / 1.5, max(ys) * 1.5) if log_y else (0, max(ys) * 1.1)
    px = lambda x: scale(x, x0, x1, LEFT, W - RIGHT)
    py = lambda y: scale(y, y0, y1, H - BOTTOM, TOP, log_y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2 - RIGHT / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="black"/>',
           f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">{ylabel}</text>']
    for x in nice_ticks(x0, x1):
        out.append(f'<text x="{px(x)}" y="{H - BOTTOM + 16}" text-anchor="middle">{x:,.0f}</text>')
    ticks = ([m * 10 ** e for e in range(math.floor(math.log10(y0)), math.ceil(math.log10(y1)) + 1)
              for m in (1, 2, 5) if y0 <= m * 10 ** e <= y1] if log_y else nice_ticks(y0, y1))
    for y in ticks:
        out.append(f'<line x1="{LEFT - 4}" y1="{py(y)}" x2="{W - RIGHT}" y2="{py(y)}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4}" text-anchor="end">{y:g}</text>')
    for n, (label, (color, dash, pts)) in enumerate(series.items()):
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        ly = TOP + 16 * n
        out.append(f'<line x1="{W - RIGHT + 10}" y1="{ly}" x2="{W - RIGHT + 30}" y2="{ly}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{W - RIGHT + 34}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(results, outdir):
    rows = [json.loads(line) for line in open(results) if line.strip()]
    outdir = pathlib.Path(outdir)
    memory = {}
    for r in rows:
        if r["workload"] == "idle":
            memory.setdefault(r["server"], []).append((r["connections"], r["kib_per_connection"]))
    series = {name: (COLORS.get(name, "black"), "", pts) for name, pts in memory.items()}
    (outdir / "memory.svg").write_text(chart("Idle memory per connection", "connections",
                                             "RSS KiB per connection", series))
    latency = {}
    for r in rows:
        if r["workload"] == "fanout":
            offered = r["offered_per_sec"]
            for q, dash in (("p50", "4 3"), ("p99", "")):
                latency.setdefault(f'{r["server"]} {q}', (COLORS.get(r["server"], "black"), dash, []))[2].append(
                    (offered, max(r["latency_ms"][q], 0.01)))
    (outdir / "latency.svg").write_text(chart("Fan-out latency, 10k subscribers", "offered deliveries per second",
                                              "publish → receive, ms (log)", latency, log_y=True))
    print(f"wrote {outdir / 'memory.svg'} and {outdir / 'latency.svg'}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
