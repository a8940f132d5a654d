"""Accuracy and time to decision of the local answering-machine and beep detectors.

The labeled set is generated (tests/fakes/amd_set.py: espeak-ng greetings of 2-12 s with and
without beeps, human openers of 0.3-1.5 s, clean and with line noise at 20 and 10 dB SNR), fed in
20 ms frames as a call's inbound audio would be. Each parameter set gets per-class accuracy and
time to decision (audio ms from answer to verdict) p50/p95; the beep detector gets recall, false
positives and the error of the beep's end. Pure CPU, no I/O: the figures do not depend on load.

    python bench/amd_accuracy.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, table, write_results  # noqa: E402
from bridge.latency import percentile  # noqa: E402
from media.amd import AmdParams, AnsweringMachineDetector, GreetingEnd  # noqa: E402
from media.beep import BeepDetector  # noqa: E402
from tests.fakes.amd_set import RATE, Sample, full_set, quick_set  # noqa: E402

FRAME_BYTES = RATE * 20 // 1000 * 2

VARIANTS: dict[str, AmdParams] = {
    "asterisk-defaults": AmdParams(noiseAdaptive=False),
    "defaults+noise-floor": AmdParams(),
    "noise-floor, 4 words": replace(AmdParams(), maximumNumberOfWords=4),
}


def classify(sample: Sample, params: AmdParams) -> tuple[str, int, str]:
    detector = AnsweringMachineDetector(RATE, params)
    for offset in range(0, len(sample.pcm), FRAME_BYTES):
        verdict = detector.feed(sample.pcm[offset:offset + FRAME_BYTES])
        if verdict is not None:
            return verdict.answered_by, verdict.at_ms, verdict.cause.split("-")[0]
    detector.feed_silence(params.totalAnalysisTime)  # the line stays quiet after the sample
    verdict = detector.verdict
    assert verdict is not None
    return verdict.answered_by, verdict.at_ms, verdict.cause.split("-")[0]


def amd_row(name: str, params: AmdParams, samples: list[Sample]) -> dict[str, Any]:
    per_class: dict[str, dict[str, Any]] = {}
    for label in ("machine", "human"):
        subset = [s for s in samples if s.label == label]
        results = [classify(s, params) for s in subset]
        times = sorted(float(t) for _, t, _ in results)
        causes: dict[str, int] = {}
        for _, _, cause in results:
            causes[cause] = causes.get(cause, 0) + 1
        per_class[label] = {
            "n": len(subset),
            "correct": sum(1 for verdict, _, _ in results if verdict == label),
            "unknown": sum(1 for verdict, _, _ in results if verdict == "unknown"),
            "decision_p50_ms": percentile(times, 50) if times else 0.0,
            "decision_p95_ms": percentile(times, 95) if times else 0.0,
            "causes": causes,
        }
        per_class[label]["accuracy"] = per_class[label]["correct"] / max(1, len(subset))
    return {"variant": name, "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
            **per_class}


def beep_row(samples: list[Sample]) -> dict[str, Any]:
    found = missed = false = 0
    errors: list[float] = []
    for s in samples:
        detector = BeepDetector(RATE)
        for offset in range(0, len(s.pcm), FRAME_BYTES):
            detector.process(s.pcm[offset:offset + FRAME_BYTES])
        if s.has_beep and detector.beeps:
            found += 1
            errors.append(abs(detector.beeps[0][1] - float(s.beep_end_ms or 0)))
        elif s.has_beep:
            missed += 1
        elif detector.beeps:
            false += 1
    errors.sort()
    return {"with_beep": found + missed, "found": found, "missed": missed,
            "without_beep": sum(1 for s in samples if not s.has_beep), "false_positives": false,
            "end_error_p50_ms": percentile(errors, 50) if errors else 0.0,
            "end_error_p95_ms": percentile(errors, 95) if errors else 0.0}


def message_point_row(samples: list[Sample]) -> dict[str, Any]:
    """leave-message: where the message would start, against where the greeting really ended (the
    beep's end, else the end of speech); early = the message would talk over the greeting."""
    delays: dict[str, list[float]] = {"beep": [], "silence": []}
    early = timeout = 0
    for s in samples:
        if s.label != "machine":
            continue
        end = GreetingEnd(RATE)
        for offset in range(0, len(s.pcm), FRAME_BYTES):
            if end.feed(s.pcm[offset:offset + FRAME_BYTES]):
                break
        if end.reason is None:
            end.feed_silence(end.params.maxWaitMs)
        truth = s.beep_end_ms if s.has_beep else s.lead_ms + s.speech_ms
        if end.reason == "timeout":
            timeout += 1
            continue
        delay = end.elapsed_ms - float(truth or 0)
        early += delay < -100
        delays["beep" if s.has_beep else "silence"].append(delay)
    out: dict[str, Any] = {"early": early, "timeout": timeout}
    for kind, values in delays.items():
        values.sort()
        out[kind] = {"n": len(values), "p50_ms": percentile(values, 50) if values else 0.0,
                     "p95_ms": percentile(values, 95) if values else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the dozen samples of the test, not the full set")
    parser.add_argument("--out", help="results JSON (default bench/results/amd_accuracy.json)")
    args = parser.parse_args()
    started = time.perf_counter()
    samples = quick_set() if args.quick else full_set()
    generated_s = time.perf_counter() - started
    rows = [amd_row(name, params, samples) for name, params in VARIANTS.items()]
    beeps = beep_row(samples)
    message = message_point_row(samples)
    print(f"{len(samples)} samples ({sum(s.label == 'machine' for s in samples)} machine, "
          f"{sum(s.label == 'human' for s in samples)} human), generated in {generated_s:.1f} s")
    print(table(["parameters", "machine acc %", "human acc %", "machine p50/p95 ms", "human p50/p95 ms",
                 "unknown"],
                [[r["variant"], 100 * r["machine"]["accuracy"], 100 * r["human"]["accuracy"],
                  f"{r['machine']['decision_p50_ms']:.0f}/{r['machine']['decision_p95_ms']:.0f}",
                  f"{r['human']['decision_p50_ms']:.0f}/{r['human']['decision_p95_ms']:.0f}",
                  r["machine"]["unknown"] + r["human"]["unknown"]] for r in rows]))
    print(table(["beeps found", "missed", "false positives (of no-beep samples)", "end error p50/p95 ms"],
                [[f"{beeps['found']}/{beeps['with_beep']}", beeps["missed"],
                  f"{beeps['false_positives']}/{beeps['without_beep']}",
                  f"{beeps['end_error_p50_ms']:.0f}/{beeps['end_error_p95_ms']:.0f}"]]))
    print(table(["voicemail message starts after", "greetings", "p50 ms", "p95 ms", "over the greeting", "timeouts"],
                [["end of the beep", message["beep"]["n"], message["beep"]["p50_ms"], message["beep"]["p95_ms"],
                  message["early"], message["timeout"]],
                 ["end of speech (no beep)", message["silence"]["n"], message["silence"]["p50_ms"],
                  message["silence"]["p95_ms"], "", ""]]))
    data = {"benchmark": "amd_accuracy", "machine": machine(), "samples": len(samples), "amd": rows,
            "beep": beeps, "message_point": message, "seconds": round(time.perf_counter() - started, 1)}
    path = write_results("amd_accuracy", data, args.out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
