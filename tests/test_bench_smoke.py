"""The benchmarks still run: each entry point at a tiny size, as a process, writing its JSON.

No performance assertions here (CI machines vary): only that each produces its results with the
expected fields and no errors. The pipecat side-by-side needs a separate venv and is not run here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


# media_streams at smoke size: shorter warm-up and drain than a measurement (echoes come back within ~250 ms idle)
QUICK = ("--warmup", "0.3", "--tail", "0.5", "--drain", "1.0")


def run_bench(script: str, *args: str, out: Path, timeout: float = 60) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "results:" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/system-deps.sh test)")
def test_media_streams_on_two_workers(tmp_path: Path) -> None:
    """`--workers 2`: two `serve` processes on one port with Redis; every stream opens and is echoed
    (a stream that reached the worker that did not take its webhook would be refused: lost frames).
    Delivery only: the latency calibration is covered by the single-process smoke below."""
    data = run_bench("media_streams.py", "--workers", "2", "--streams", "8", "--seconds", "0.5", "--ramp", "40",
                     *QUICK, "--skip-calibration", out=tmp_path / "workers.json", timeout=120)
    (sweep,) = data["sweeps"]
    assert sweep["workers"] == 2
    (point,) = sweep["points"]
    assert (point["n"], point["opened"], point["failed"], point["lost"]) == (8, 8, 0, 0), point["errors"]
    assert point["workers"] == 2 and len(point["worker_cpu_pct"]) == 2
    assert data["scaling"][0]["workers"] == 2


def test_media_streams_two_streams(tmp_path: Path) -> None:
    data = run_bench("media_streams.py", "--streams", "2", "--seconds", "0.5", "--ramp", "20", "--repeat", "2", *QUICK,
                     out=tmp_path / "media.json", timeout=120)
    assert data["generator"] in ("lean (C engine)", "lean-python (no C engine)")
    assert data["benchmark"] == "media_streams" and data["machine"]["nproc"] >= 1
    # what the figures depend on travels with them
    assert data["machine"]["cpu"] is not None and len(data["machine"]["loadavg_end"]) == 3
    assert data["versions"]["bridge"]["aiohttp"] and data["versions"]["bridge"]["soxr"]
    assert [s["repeat"] for s in data["sweeps"]] == [0, 1]
    (spread,) = data["spread"]["bridge"]["points"]
    assert spread["n"] == 2 and spread["runs"] == 2 and spread["lost"] == [0, 0]
    low, mid, high = spread["server_cpu_pct"]
    assert low <= mid <= high
    sweep = data["sweeps"][0]
    assert sweep["loop"] in ("asyncio", "uvloop")
    assert sweep["server"] == "bridge" and "headline_streams" in sweep
    assert sweep["calibration"]["alignment"] is None or sweep["calibration"]["alignment"]["lag_samples"] == 0
    (point,) = sweep["points"]
    for key in ("window_p50_ms", "window_p99_ms", "added_p99_ms", "rtt_p50_ms", "rtt_p99_ms", "lost", "late",
                "server_cpu_pct", "rss_per_stream_kb", "generator_cpu_pct"):
        assert key in point, key
    assert point["n"] == 2 and point["opened"] == 2 and point["failed"] == 0
    assert len(point["loadavg_before"]) == len(point["loadavg_window_start"]) == len(point["loadavg"]) == 3
    assert point["frames"] > 0 and point["lost"] == 0 and point["bad_frames"] == 0
    # 2 streams for 0.5 s can round to 0 CPU ticks (10 ms each): measured, not necessarily > 0
    assert point["generator"] == "lean" and point["generator_window_cpu_pct"] >= 0


def test_turn_overhead_two_calls(tmp_path: Path) -> None:
    data = run_bench("turn_overhead.py", "--calls", "1,2", "--rounds", "1", "--cpu", "-1", out=tmp_path / "turn.json")
    assert [p["calls"] for p in data["points"]] == [1, 2]
    for point in data["points"]:
        assert point["turns"] == point["calls"] and point["missed"] == 0
        for key in ("server_p50_ms", "server_p99_ms", "caller_p50_ms", "caller_p99_ms"):
            assert point[key] >= 0, key


def test_webhook_throughput_one_second(tmp_path: Path) -> None:
    data = run_bench("webhook_throughput.py", "--seconds", "1", "--calls", "10", "--concurrency", "4",
                     out=tmp_path / "webhook.json")
    result = data["result"]
    assert result["ok"] > 0 and result["non_200"] == {} and result["errors_in_server_log"] == 0
    for key in ("per_s", "p50_ms", "p99_ms", "server_cpu_pct", "client_cpu_pct"):
        assert key in result, key


def test_sip_calls_eight_calls(tmp_path: Path) -> None:
    import pytest

    from tests.peers.harness import skip_reason

    reason = skip_reason("sipp", "espeak-ng", "sox")
    if reason:
        pytest.skip(reason)
    data = run_bench("sip_calls.py", "--calls", "8", "--hold", "2", out=tmp_path / "sip.json")
    (row,) = data["rows"]
    assert row["calls"] == 8 and row["workers"] == 2 and row["ok"] and row["ended"] == 8
    assert row["peak_concurrent"] == 8 and row["audio_r_min"] > 0.9
    for key in ("cpu_pct_one_core", "cpu_pct_per_call", "rss_mb", "setup_ms_p50", "setup_ms_max"):
        assert row[key] is not None and row[key] >= 0, key


def test_s2s_latency_one_call(tmp_path: Path) -> None:
    data = run_bench("s2s_latency.py", "--calls", "1", "--rounds", "1", "--cpu", "-1", out=tmp_path / "s2s.json")
    (point,) = data["points"]
    assert point["calls"] == 1 and point["replies"] == 1 and point["missed"] == 0
    assert 0 < point["added_p50_ms"] < 1000


def test_voice_to_voice_two_calls_both_modes(tmp_path: Path) -> None:
    data = run_bench("voice_to_voice.py", "--calls", "2", "--rounds", "1", "--cpu", "-1", "--ttft-ms", "100",
                     "--stt-ms", "100", "--tts-ms", "50", "--tokens-per-s", "200", "--reply-tokens", "8",
                     out=tmp_path / "v2v.json",
                     timeout=120)
    assert [(p["mode"], p["calls"]) for p in data["points"]] == [("batch", 2), ("streaming", 2)]
    batch, streaming = data["points"]
    for point in data["points"]:
        assert point["turns"] == 2 and point["missed"] == 0
        assert point["p50_ms"] >= point["floor_ms"] * 0.9  # nothing arrives before the engines could make it
    assert streaming["floor_ms"] < batch["floor_ms"]
    assert all(p["cpu_ms_per_turn"] > 0 and p["bridge_cpu_s"] > 0 for p in data["points"])
    # every turn's time above the floor split between the bridge's steps and the harness's lateness
    assert streaming["segments_ms"]["bridge"]["n"] == streaming["segments_ms"]["harness"]["n"] == 2
    parts = streaming["turn_parts_ms"]  # the bridge's own record of its turns
    assert parts["total"]["p50"] >= parts["model"]["p50"] > 0 and parts["piece"]["p50"] > 0


def test_amd_accuracy_quick(tmp_path: Path) -> None:
    data = run_bench("amd_accuracy.py", "--quick", out=tmp_path / "amd.json")
    assert data["samples"] == 12 and data["beep"]["with_beep"] == 4
    for row in data["amd"]:
        for label in ("machine", "human"):
            assert row[label]["n"] == 6 and 0 <= row[label]["accuracy"] <= 1
            assert row[label]["decision_p95_ms"] >= row[label]["decision_p50_ms"] > 0


def test_relay_cost_quick(tmp_path: Path) -> None:
    data = run_bench("relay_cost.py", "--seconds", "1", out=tmp_path / "relay.json")
    assert data["benchmark"] == "relay_cost" and data["relay_us"] > 0 and data["inbound_us"] > 0
    assert 0 <= data["delay_ms_p50"] <= data["delay_ms_p95"] <= data["delay_ms_max"]


def test_media_edge_cost_quick(tmp_path: Path) -> None:
    data = run_bench("media_edge_cost.py", "--sockets", "3", "--rounds", "5", "--repeat", "1", out=tmp_path / "edge.json")
    assert data["benchmark"] == "media_edge_cost" and data["frames_per_run"] == 18
    assert all(len(v) == 1 and v[0] > 0 for v in data["us_per_frame"].values())


def test_realtime_cost_quick(tmp_path: Path) -> None:
    data = run_bench("realtime_cost.py", "--sessions", "2", "--messages", "10", "--repeat", "1", "--cpu", "-1",
                     out=tmp_path / "rt.json")
    assert data["benchmark"] == "realtime_cost" and data["delta_us"] > 0 and data["append_us"] > 0
    assert data["audio_complete"] and data["runs"][0]["appends"] == 20 and data["stt_frame_us"] > 0


def test_profile_parts_split_every_sample(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_summary import parts

    folded = tmp_path / "p.folded"
    folded.write_text("a (x.py:1);MediaPipeline._inbound (p.py:2);StreamResampler.process (r.py:3) 3\n"
                      "a (x.py:1);RequestHandler.data_received (w.py:4);_parse (s.py:5) 1\n"
                      "a (x.py:1) 4\n")
    text = parts(str(folded), 80.0)
    assert "37.5      30.0  resampling, caller -> pipeline" in text
    assert "12.5      10.0  frame checks + JSON + base64 in" in text
    assert "50.0      40.0  event loop and the rest" in text
