"""Summarize py-spy collapsed stacks (`-f raw`): self and inclusive sample shares per function.

    python bench/profile_summary.py bench/results/profiles/bridge-200.folded [--top 30]
    python bench/profile_summary.py FILE --parts --us-per-frame 45   # the media path's parts, in us per frame
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator


def stacks(path: str) -> Iterator[tuple[list[str], int]]:
    """Each collapsed stack's frames (outermost first) and its sample count."""
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack:
                yield stack.split(";"), int(count)


def summarize(path: str, top: int) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for stack, n in stacks(path):
        total += n
        frames = [fr.split(" (")[0] + " " + fr.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  if " (" in fr else fr for fr in stack]
        own[frames[-1]] += n
        for fr in set(frames):
            incl[fr] += n
    lines = [f"{total} samples", "", "self%   function"]
    lines += [f"{100 * c / total:5.1f}   {fn}" for fn, c in own.most_common(top)]
    lines += ["", "incl%   function"]
    lines += [f"{100 * c / total:5.1f}   {fn}" for fn, c in incl.most_common(top)]
    return "\n".join(lines)


# The media path's parts: a sample belongs to the first part whose functions are all on its stack
# (a part may have several entries: any of them).
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("resampling, caller -> pipeline (8k -> 16k)", ("MediaPipeline._inbound", "StreamResampler.process")),
    ("resampling, play-out (16k -> 8k)", ("MediaPipeline._run_play", "StreamResampler.process")),
    ("frame checks + JSON + base64 in (depth gate, codec)", ("_parse",)),
    ("rest of MediaPipeline.receive (u-law decode, echo queue)", ("MediaPipeline.receive",)),
    ("send: message build + WebSocket frame + send()", ("WebSocketTransport.send_media",)),
    ("send: message build + WebSocket frame + send()", ("WebSocketTransport.send_media_now",)),
    ("pacing: timer, wake-up, outbox", ("Pacer.wait_turn",)),  # before the pacing wheel
    ("pacing: timer, wake-up, outbox", ("PacingWheel._fire",)),  # media/wheel.py
    ("pacing: timer, wake-up, outbox", ("PacedOutbox._pump",)),
    ("rest of play-out (framer, u-law encode, echo queue)", ("MediaPipeline._run_play",)),
    ("aiohttp read: frame parse, dispatch", ("RequestHandler.data_received",)),
]


def parts(path: str, us_per_frame: float | None) -> str:
    counts: Counter[str] = Counter()
    total = 0
    for stack, n in stacks(path):
        total += n
        names = {fr.split(" (")[0] for fr in stack}
        part = next((name for name, needs in PARTS if all(x in names for x in needs)),
                    "event loop and the rest (epoll, recv/send syscalls, task steps, timers)")
        counts[part] += n
    lines = [f"{total} samples", "", "share   us/frame  part"]
    for name, c in counts.most_common():
        us = f"{us_per_frame * c / total:8.1f}" if us_per_frame else "       -"
        lines.append(f"{100 * c / total:5.1f}  {us}  {name}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--parts", action="store_true", help="group by the media path's parts instead")
    parser.add_argument("--us-per-frame", type=float, help="server CPU per inbound frame, to split into parts")
    args = parser.parse_args()
    print(parts(args.path, args.us_per_frame) if args.parts else summarize(args.path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
