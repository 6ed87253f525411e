"""Plots of a latency suite run (bench/latency.py): PNGs next to its points.json.

    python bench/plot.py [RESULTS_DIR]        # default bench/latency-results

* ``latency-vs-throughput.png`` -- p50, p90, p99 and p99.9 against achieved
  throughput, one line per server, cached working set, open loop (latency
  from the intended send time), sustained points only;
* ``latency-cdf.png`` -- the latency distribution of every server at one
  offered load (the highest one every server sustained), as a CDF and as an
  HDR percentile plot for the tail;
* ``uncached.png`` -- p50 and p99 per server, uncached working set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hdrh.histogram import HdrHistogram  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {
    "shardio": "#d62728", "asyncio": "#1f77b4", "uvloop": "#17becf", "gevent": "#2ca02c",
    "threaded": "#9467bd", "reuseport": "#ff7f0e",
}  # fmt: skip
MARKERS = {"shardio": "o", "asyncio": "s", "uvloop": "D", "gevent": "^", "threaded": "v",
           "reuseport": "P"}


def _servers(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["server"] for r in rows))


def _style(server: str) -> dict[str, Any]:
    return {"color": COLORS.get(server), "marker": MARKERS.get(server, "o"), "markersize": 4}


def latency_vs_throughput(rows: Sequence[dict[str, Any]], path: str, subtitle: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    for ax, q in zip(axes.flat, ("p50", "p90", "p99", "p99.9"), strict=True):
        for s in _servers(rows):
            pts = sorted(
                (r for r in rows if r["server"] == s and r["scenario"] == "cached"
                 and r["mode"] == "open" and r["sustained"]),
                key=lambda r: r["offered"],
            )
            if not pts:
                continue
            label = pts[0]["label"] if q == "p50" else None
            ax.plot([r["throughput"] for r in pts], [r["latency_us"][q] / 1e3 for r in pts],
                    label=label, **_style(s))
        ax.set_yscale("log")
        ax.set_title(f"{q} latency")
        ax.set_ylabel("ms (log)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("achieved throughput, reads/s")
    fig.legend(loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle("4 KiB OSD reads, cached working set, open loop (latency from the intended "
                 f"send time)\n{subtitle}", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cdf_rate(rows: Sequence[dict[str, Any]]) -> float | None:
    """The highest cached open-loop offered load that every server sustained."""
    servers = _servers(rows)
    common: set[float] | None = None
    for s in servers:
        ok = {r["offered"] for r in rows if r["server"] == s and r["scenario"] == "cached"
              and r["mode"] == "open" and r["sustained"]}
        common = ok if common is None else common & ok
    return max(common) if common else None


def _nines(p: float, _pos: Any = None) -> str:
    return f"{100 - 100 / 10**p:g}%"


def latency_cdf(rows: Sequence[dict[str, Any]], path: str, subtitle: str) -> float | None:
    rate = cdf_rate(rows)
    if rate is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    for s in _servers(rows):
        pts = [r for r in rows if r["server"] == s and r["scenario"] == "cached"
               and r["mode"] == "open" and r["offered"] == rate and r["hdr"]]
        if not pts:
            continue
        h = HdrHistogram.decode(pts[0]["hdr"])
        total = h.get_total_count()
        xs: list[float] = []
        ys: list[float] = []
        seen = 0
        for item in h.get_recorded_iterator():
            seen += item.count_at_value_iterated_to
            xs.append(item.value_iterated_to / 1e6)
            ys.append(seen / total)
        ax1.plot(xs, ys, label=pts[0]["label"], color=COLORS.get(s))
        # HDR-style: latency by percentile, x in "nines"
        import math

        nx: list[float] = []
        ny: list[float] = []
        for x, y in zip(xs, ys, strict=True):
            if y < 1.0:
                nx.append(-math.log10(1.0 - y))
                ny.append(x)
        nx.append(math.log10(total))
        ny.append(pts[0]["latency_us"]["max"] / 1e3)
        ax2.plot(nx, ny, label=pts[0]["label"], color=COLORS.get(s))
    ax1.set_xscale("log")
    ax1.set_xlabel("latency, ms (log)")
    ax1.set_ylabel("fraction of reads")
    ax1.set_title("CDF")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.set_yscale("log")
    ax2.set_xlabel("percentile")
    ax2.set_ylabel("latency, ms (log)")
    ax2.set_title("by percentile (tail)")
    ax2.xaxis.set_major_formatter(FuncFormatter(_nines))
    ax2.set_xticks([0, 1, 2, 3, 4])
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"4 KiB reads at {rate:.0f} reads/s offered, cached, open loop\n{subtitle}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rate


def uncached(rows: Sequence[dict[str, Any]], path: str, subtitle: str) -> bool:
    pts = [r for r in rows if r["scenario"] == "uncached"]
    if not pts:
        return False
    groups = [("closed", None)] + sorted(
        {("open", r["offered"]) for r in pts if r["mode"] == "open"}, key=lambda g: g[1] or 0)
    servers = _servers(pts)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / len(servers)
    for i, s in enumerate(servers):
        p50s, p99s = [], []
        for mode, rate in groups:
            m = [r for r in pts if r["server"] == s and r["mode"] == mode
                 and (rate is None or r["offered"] == rate)]
            p50s.append(m[0]["latency_us"].get("p50", 0) / 1e3 if m else 0)
            p99s.append(m[0]["latency_us"].get("p99", 0) / 1e3 if m else 0)
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, p99s, width, color=COLORS.get(s), alpha=0.35)
        ax.bar(xs, p50s, width, color=COLORS.get(s), label=pts[[r["server"] for r in pts]
                                                                .index(s)]["label"])
    names = []
    for mode, rate in groups:
        if mode == "closed":
            c = next(r for r in pts if r["mode"] == "closed")
            names.append(f"closed loop, {c['concurrency']} in flight")
        else:
            names.append(f"open loop, {rate:.0f}/s")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], names)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log): p50 solid, p99 light")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"4 KiB reads, uncached (page cache evicted every 20 ms)\n{subtitle}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = args[0] if args else os.path.join(HERE, "latency-results")
    with open(os.path.join(out, "points.json")) as f:
        rows = json.load(f)
    with open(os.path.join(out, "run.json")) as f:
        machine = json.load(f)["machine"]
    subtitle = (f"{machine['cpus']} CPUs ({machine['cpu_model']}); servers on CPUs "
                f"{machine['server_cpus']}, load generator on CPU {machine['client_cpus']}; "
                f"load average {machine['loadavg_start']}-{machine['loadavg_end']}")
    latency_vs_throughput(rows, os.path.join(out, "latency-vs-throughput.png"), subtitle)
    rate = latency_cdf(rows, os.path.join(out, "latency-cdf.png"), subtitle)
    made = uncached(rows, os.path.join(out, "uncached.png"), subtitle)
    print(f"plots in {out}: latency-vs-throughput.png"
          + (f", latency-cdf.png (at {rate:.0f}/s)" if rate else "")
          + (", uncached.png" if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
