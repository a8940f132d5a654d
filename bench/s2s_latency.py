"""Speech-to-speech: the bridge's added latency between the model's first audio delta and the caller.

    python bench/s2s_latency.py --calls 1,100 [--rounds 3] [--peer pipecat] [--json]

The `s2s` mode of bench/voice_to_voice.py (same callers, same processes), reported by the figure of
the issue's target: from the moment the OpenAI Realtime fake hands a reply's first
`response.output_audio.delta` to its WebSocket until the caller's Twilio stream reads the first
media message of that reply (all processes read the same CLOCK_MONOTONIC). That span is the
bridge's whole share: model socket in, JSON + base64 decode, the play queue, frame + pace, Twilio
socket out.

Processes: the bridge alone in this process, pinned to `--cpu`; the callers (N Twilio streams,
each opened through a signed inbound webhook; each caller speaks 1 s, the fake's server VAD ends
the turn and the reply streams `--model-speed` times faster than real time) and the fake model in
two other processes on the other CPU. Each call's realtime session is pre-warmed on the webhook.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import voice_to_voice  # noqa: E402
from bench.common import table, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = voice_to_voice.parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(modes="s2s")
    args = parser.parse_args(argv)
    args.modes = "s2s"
    data = voice_to_voice.run(args)
    data["benchmark"] = "s2s_latency"
    points = data["points"] = [
        {"server": p["mode"], "calls": p["calls"], "replies": p["delta_to_caller_n"], "missed": p["turns"] + p["missed"]
         - p["delta_to_caller_n"], "added_p50_ms": p["delta_to_caller_p50_ms"], "added_p99_ms": p["delta_to_caller_p99_ms"],
         "added_max_ms": p["delta_to_caller_max_ms"], "server_cpu_pct": p["bridge_cpu_pct"], "loadavg": p["loadavg"]}
        for p in data["points"]]
    print(table(["server", "calls", "replies", "missed", "added p50", "added p99", "added max", "server cpu %", "load1"],
                [[p["server"], p["calls"], p["replies"], p["missed"], p["added_p50_ms"], p["added_p99_ms"],
                  p["added_max_ms"], p["server_cpu_pct"], p["loadavg"][0]] for p in points]))
    print("(ms from the model's first audio delta leaving the fake to the caller reading that reply's first frame;"
          " server cpu % = the bridge's (or the peer's) process alone, callers and model run apart)")
    path = write_results("s2s_latency", data, args.out)
    print(f"results: {path}")
    if args.json:
        print(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
