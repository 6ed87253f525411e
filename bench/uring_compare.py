"""Two shardio trees' file drivers in one run: cached and cold QD32 reads, alternating.

    python bench/uring_compare.py OLD_TREE [--rounds 6] [--seconds 2] [--file PATH]

OLD_TREE is a checkout of another commit (e.g. ``git archive main | tar -x -C
/tmp/base`` and ``python setup.py build_ext --inplace`` there), with any
dependencies it needs but this tree does not (pyuring 0.3.0 for main before
issue 10) unpacked next to it, in OLD_TREE/site. Each round runs this tree's
``bench/tame.py`` measurements in a fresh ``python -S`` with one tree first
on ``PYTHONPATH``, old and new in alternating order; the table gives medians
and the median of the per-round new/old ratios.
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
    out["cold QD32 O_DIRECT, TameEnv (%s), IOPS" % name] = run(
        bench.tame_qd_iops(path, size, seconds, 32, True))[0]
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
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            results[name].append(measure(trees[name], args.file, args.seconds))
    print(f"old: {args.old_tree}; new: {trees['new']}; {args.rounds} alternating rounds")
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


if __name__ == "__main__":
    main()
