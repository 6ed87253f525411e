"""Two shardio trees' file drivers in one run: cached and cold QD32 reads, alternating.

    python bench/uring_compare.py OLD_TREE [--rounds 6] [--seconds 2] [--file PATH]

OLD_TREE is a checkout of another commit (e.g. ``git archive main | tar -x -C
/tmp/base`` and ``python setup.py build_ext --inplace`` there), with any
dependencies it needs but this tree does not (pyuring 0.3.0 for main before
issue 10) unpacked next to it, in OLD_TREE/site. Each round runs this tree's
``bench/tame.py`` measurements in a fresh ``python -S`` with one tree first
on ``PYTHONPATH``, old and new in alternating order; the table gives medians
and the median of the per-round new/old ratios. Each round also runs fio (io_uring,
iodepth 32, O_DIRECT) on the same file first, for the ratio of each tree to fio.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MEASURE = r"""
import asyncio, json, sys, uvloop
sys.path.insert(0, sys.argv[1])
import tame as bench
path, seconds = sys.argv[2], float(sys.argv[3])
size = __import__("os").path.getsize(path)
out = {}
for name, run in (("asyncio", asyncio.run), ("uvloop", uvloop.run)):
    out["cached 4 KiB read, TameEnv f.pread (%s), us" % name] = run(
        bench.tame_cached_read_us(path, 50_000))
    iops, st = run(bench.tame_qd_iops(path, size, seconds, 32, True))
    out["cold QD32 O_DIRECT, TameEnv (%s), IOPS" % name] = iops
    out["cold QD32 O_DIRECT, TameEnv (%s), CPU us per read" % name] = st.get(
        "cpu_us_per_read", float("nan"))
print(json.dumps(out))
"""


def measure(tree_path: str, path: str, seconds: float) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree_path, *site.getsitepackages()]))
    out = subprocess.run(
        [sys.executable, "-S", "-c", MEASURE, HERE, path, str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("old_tree")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--file", default="/var/tmp/shardio-uring-compare.data")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import tame as bench

    bench.make_file(args.file, 512 << 20)
    trees = {
        "old": os.pathsep.join([args.old_tree, os.path.join(args.old_tree, "site")]),
        "new": os.path.dirname(HERE),
    }
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    fio: list[tuple[float, float]] = []
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        run = bench.fio_run(args.file, 512 << 20, args.seconds)
        if run is not None:
            fio.append(run)
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            results[name].append(measure(trees[name], args.file, args.seconds))
    load.append(os.getloadavg()[0])
    print(
        f"old: {args.old_tree}; new: {trees['new']}; {args.rounds} alternating rounds; "
        f"load average {load[0]:.1f} -> {load[1]:.1f}"
    )
    print()
    print("| what | old | new | new/old, median of rounds |")
    print("|---|---|---|---|")
    for key in results["new"][0]:
        old = [d[key] for d in results["old"]]
        new = [d[key] for d in results["new"]]
        ratios = [n / o for n, o in zip(new, old, strict=True)]
        print(
            f"| {key} | {statistics.median(old):.2f} | {statistics.median(new):.2f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    if len(fio) == args.rounds:  # each round's fio run, just before that round's two trees
        print()
        print("| cold QD32 O_DIRECT vs fio (same round), median of rounds | old | new |")
        print("|---|---|---|")
        fio_iops = statistics.median(f[0] for f in fio)
        fio_cpu = statistics.median(f[1] for f in fio)
        print(f"| fio io_uring QD32: {fio_iops / 1000:.1f}k IOPS, CPU {fio_cpu:.1f} us/read | | |")
        for key in results["new"][0]:
            if not key.endswith("IOPS"):
                continue
            share = {
                name: [d[key] / f[0] for d, f in zip(results[name], fio, strict=True)]
                for name in ("old", "new")
            }
            print(
                f"| {key.removesuffix(', IOPS')} | "
                + " | ".join(
                    f"{statistics.median(v):.0%} ({min(v):.0%}-{max(v):.0%})"
                    for v in share.values()
                )
                + " |"
            )


if __name__ == "__main__":
    main()
