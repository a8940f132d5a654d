"""Summarize py-spy collapsed stacks (`-f raw`): self and inclusive sample shares per function.

    python bench/profile_summary.py bench/results/profiles/bridge-200.folded [--top 30]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter


def summarize(path: str, top: int) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = [fr.split(" (")[0] + " " + fr.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                      if " (" in fr else fr for fr in stack.split(";")]
            own[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    lines = [f"{total} samples", "", "self%   function"]
    lines += [f"{100 * c / total:5.1f}   {fn}" for fn, c in own.most_common(top)]
    lines += ["", "incl%   function"]
    lines += [f"{100 * c / total:5.1f}   {fn}" for fn, c in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(summarize(args.path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
