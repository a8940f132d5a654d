"""`voicecall ...`: serve, check, demo, and call commands that talk to the running server over RPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bridge import __version__
from bridge.client import RpcClient, RpcClientError
from bridge.config import ConfigError, Settings, load_settings
from bridge.logs import setup_logging

log = logging.getLogger("voicecall")


class CliError(Exception):
    pass


# ---------------------------------------------------------------------------- helpers


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _checked_settings(args: argparse.Namespace) -> Settings:
    """The config, and everything `serve` builds from it (without network): one line per problem."""
    from bridge.preflight import preflight

    settings = _settings(args)
    problems = preflight(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def rpc_endpoint(url: str, where: str) -> str:
    """An http(s) URL of the server; a base URL (no path) gets /rpc."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"{where} must be an http(s) URL like http://127.0.0.1:3334/rpc (got {url[:80]!r})")
    path = parts.path if parts.path not in ("", "/") else "/rpc"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _client(args: argparse.Namespace) -> RpcClient:
    where = "--url" if args.url else "VOICECALL_URL"
    url = args.url or os.environ.get("VOICECALL_URL")
    token = args.token or os.environ.get("VOICECALL_RPC_TOKEN")
    if not url or not token:
        try:
            settings = _settings(args)
        except ConfigError:
            settings = None
        if settings is not None:
            if not url:
                url, where = settings.rpc_url, "rpc.url"
            if not token and settings.rpc.token:
                token = settings.rpc.token.get_secret_value()
    return RpcClient(rpc_endpoint(url or "http://127.0.0.1:3334/rpc", where), token)


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def _rpc(args: argparse.Namespace, method: str, params: dict[str, Any]) -> Any:
    return asyncio.run(_client(args).call(method, params))


def _format_call(call: dict[str, Any]) -> str:
    lines = [
        f"call {call['callId']}  {call['direction']}  {call['from']} -> {call['to']}",
        f"  state: {call['state']}" + (f" (ended: {call['endReason']})" if call.get("endReason") else ""),
    ]
    if call.get("answeredAt") and call.get("endedAt"):
        lines.append(f"  duration: {call['endedAt'] - call['answeredAt']:.1f}s")
    for entry in call.get("transcript") or []:
        who = "bot   " if entry["speaker"] == "bot" else "caller"
        lines.append(f"  {who}: {entry['text']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    settings = _checked_settings(args)
    data = settings.masked()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        import yaml

        print(f"# config OK ({args.config or os.environ.get('VOICECALL_CONFIG') or 'built-in default'})")
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    return 0


WORKER_ENV = "VOICECALL_WORKER"
WORKER_POLL_S = 0.2  # how often the supervisor looks for a dead worker
WORKER_RESTART_MIN_S = 1.0


def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.gc_policy import settle_startup_heap
    from bridge.runtime import Runtime

    settings = _checked_settings(args)
    setup_logging(settings.logging.format, os.environ.get("VOICECALL_LOG") or settings.logging.level)
    if settings.serve.worker_count > 1 and WORKER_ENV not in os.environ:
        return _supervise_workers(args, settings)
    worker = os.environ.get(WORKER_ENV)
    if worker is not None and settings.cluster is not None and settings.cluster.nodeId:
        settings.cluster.nodeId = f"{settings.cluster.nodeId}-w{worker}"

    async def main() -> None:
        runtime = Runtime(settings)
        port = await runtime.start()
        settle_startup_heap()
        print(f"voicecall serving {settings.provider} on http://{settings.serve.bind}:{port} "
              f"(webhook {settings.serve.path}, streams {settings.streaming.streamPath}, rpc /rpc, "
              f"{'console /console, ' if settings.console.enabled else ''}metrics /metrics; "
              f"{type(asyncio.get_running_loop()).__module__.split('.')[0]} loop)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runtime.stop()

    with asyncio.Runner(loop_factory=event_loop_factory(settings.serve.eventLoop)) as runner:
        runner.run(main())
    return 0


def _supervise_workers(args: argparse.Namespace, settings: Settings) -> int:
    """`serve.workers: N`: N `serve` processes on one port (SO_REUSEPORT), sharing Redis; signals go to all.
    A worker that dies (a crash, kill -9) is started again under the same index, so it keeps its node id."""
    if settings.serve.port == 0:
        raise CliError("serve.workers > 1 needs a fixed serve.port (the workers share it)")
    count = settings.serve.worker_count
    command = [sys.executable, "-m", "bridge.cli", "serve", *([f"--config={args.config}"] if args.config else [])]

    def spawn(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env={**os.environ, WORKER_ENV: str(index)})

    children = [spawn(i) for i in range(count)]
    started = [time.monotonic()] * count
    print(f"voicecall: {count} workers on port {settings.serve.port} (pids {' '.join(str(c.pid) for c in children)})",
          flush=True)
    stopping: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    while not stopping:
        for index, child in enumerate(children):
            code = child.poll()
            if code is None or stopping:
                continue
            # a worker that keeps dying at start (bad config, port taken) is retried at most once a second
            if time.monotonic() - started[index] < WORKER_RESTART_MIN_S:
                continue
            children[index] = spawn(index)
            started[index] = time.monotonic()
            print(f"voicecall: worker {index} exited with code {code}; started again (pid {children[index].pid})",
                  flush=True)
        time.sleep(WORKER_POLL_S)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def event_loop_factory(choice: str) -> Any:
    """uvloop when asked for, or when installed and the choice is auto; else the stdlib loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise CliError("serve.eventLoop is uvloop but uvloop is not installed (pip install 'voicecall[fast]')") from None
        return None
    return uvloop.new_event_loop


def cmd_call(args: argparse.Namespace) -> int:
    params = {"message": args.message, "mode": args.mode}
    if args.to is not None:
        if not args.to.strip():
            raise CliError("--to is empty: give a number like +15550001234 or a sip: URI (or leave --to out "
                           "to call toNumber from the config)")
        params["to"] = args.to.strip()
    if args.machine_detection:
        params["machineDetection"] = args.machine_detection
    if args.dtmf:
        params["dtmfSequence"] = args.dtmf
    if args.from_number:
        params["from"] = args.from_number
    result = _rpc(args, "voicecall.initiate", params)
    _emit(args, result, f"call {result['callId']} initiated")
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    result = _rpc(args, "voicecall.continue", {"callId": args.call_id, "message": args.message})
    _emit(args, result, f"caller: {result['transcript']}")
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    result = _rpc(args, "voicecall.speak", {"callId": args.call_id, "message": args.message})
    _emit(args, result, "spoken")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"callId": args.call_id, "to": args.to, "mode": args.mode}
    if args.summary:
        params["summary"] = args.summary
    result = _rpc(args, "voicecall.transfer", params)
    _emit(args, result, f"transfer {result['outcome']} (call {result['state']})")
    return 0 if result["success"] else 1


def cmd_end(args: argparse.Namespace) -> int:
    result = _rpc(args, "voicecall.end", {"callId": args.call_id})
    _emit(args, result, "call ended")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    result = _rpc(args, "voicecall.status", {"callId": args.call_id})
    if not result.get("found"):
        if args.json:
            print(json.dumps(result))
        raise CliError(f"call not found: {args.call_id}")
    _emit(args, result, _format_call(result["call"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    result = _rpc(args, "voicecall.list", {"active": args.active})
    human = "\n".join(f"{c['callId']}  {c['state']:<12} {c['direction']:<8} {c['to']}" for c in result["calls"])
    _emit(args, result, human or "no calls")
    return 0


def cmd_dtmf(args: argparse.Namespace) -> int:
    result = _rpc(args, "voicecall.dtmf", {"callId": args.call_id, "digits": args.digits})
    _emit(args, result, "digits sent")
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"from": args.from_number}
    if args.to:
        params["to"] = args.to
    if args.say:
        params["script"] = args.say
    result = _rpc(args, "mock.inject", params)
    human = f"inbound call {result['callId']} accepted" if result["accepted"] else "inbound call rejected by policy"
    _emit(args, result, human)
    return 0


def cmd_callee(args: argparse.Namespace) -> int:
    actions = [(name, value) for name, value in (("say", args.say), ("play", args.play), ("press", args.press))
               if value] + ([("hangup", True)] if args.hangup else [])
    if len(actions) != 1:
        raise CliError("give exactly one of --say, --play, --press, --hangup")
    action, value = actions[0]
    params: dict[str, Any] = {"callId": args.call_id, "action": action}
    if action != "hangup":
        params[{"say": "text", "play": "file", "press": "digits"}[action]] = (
            str(Path(value).resolve()) if action == "play" else value)
    _emit(args, _rpc(args, "mock.callee", params), f"callee: {action}")
    return 0


def _log_path(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    from bridge.store import LOG_NAME

    return _settings(args).store_dir / LOG_NAME


def cmd_tail(args: argparse.Namespace) -> int:
    path = _log_path(args)
    if not path.exists():
        raise CliError(f"no call log at {path} yet")
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
        for line in lines[len(lines) - args.since:] if args.since else []:
            _print_log_line(line, args.json)
        if args.no_follow:
            return 0
        try:
            while True:
                line = fh.readline()
                if line:
                    _print_log_line(line, args.json)
                else:
                    time.sleep(args.poll / 1000)
        except KeyboardInterrupt:
            return 0


def _print_log_line(line: str, raw: bool) -> None:
    line = line.strip()
    if not line:
        return
    if raw:
        print(line, flush=True)
        return
    try:
        rec = json.loads(line)
        last = (rec.get("transcript") or [{}])[-1]
        said = f"  {last.get('speaker')}: {last.get('text')}" if last else ""
        print(f"{rec['callId'][:8]} {rec['state']:<12} {rec['direction']:<8} {rec['to']}{said}", flush=True)
    except (ValueError, KeyError):
        print(f"(unreadable line) {line[:80]}", flush=True)


def cmd_latency(args: argparse.Namespace) -> int:
    from bridge.latency import format_stats, latency_stats

    path = _log_path(args)
    if not path.exists():
        raise CliError(f"no call log at {path}")
    stats = latency_stats(path, last=args.last)
    if stats is None:
        _emit(args, {"turns": 0, "parts": {}},
              f"no timed turns in {path} yet: a turn is timed when the caller speaks and the bot answers "
              "(e.g. `voicecall demo`)")
        return 0
    _emit(args, stats, format_stats(stats))
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """`store import`: copy the JSONL call log into the cluster's Redis (cluster.redisUrl)."""
    settings = _settings(args)
    if settings.cluster is None:
        raise CliError("store import copies the call log into Redis: set cluster.redisUrl in the config")
    path = _log_path(args)
    if not path.exists():
        raise CliError(f"no call log at {path}")
    from bridge.cluster.factory import ClusterUnavailable, check_reachable, shared_log

    async def run() -> tuple[int, int]:
        assert settings.cluster is not None
        target = shared_log(settings.cluster)
        await check_reachable(target, settings.cluster.redisUrl)
        try:
            return await target.store.import_log(path)
        finally:
            await target.store.close()

    try:
        imported, skipped = asyncio.run(run())
    except ClusterUnavailable as exc:
        raise CliError(str(exc)) from None
    _emit(args, {"imported": imported, "skipped": skipped, "file": str(path)},
          f"imported {imported} call(s) from {path} into Redis" + (f" ({skipped} unreadable line(s) skipped)" if skipped else ""))
    return 0


def cmd_expose(args: argparse.Namespace) -> int:
    from bridge.expose import ExposeError, tailscale_expose

    settings = _settings(args)
    try:
        url = asyncio.run(tailscale_expose(args.mode, port=args.port or settings.serve.port,
                                           path=args.path or settings.serve.path,
                                           serve_path=args.serve_path or settings.serve.path))
    except ExposeError as exc:
        raise CliError(str(exc)) from None
    _emit(args, {"mode": args.mode, "url": url}, f"{args.mode}: {url}" if url else f"exposure {args.mode}")
    return 0


def cmd_tool_schema(args: argparse.Namespace) -> int:
    from bridge.tool import TOOL_SCHEMA

    print(json.dumps(TOOL_SCHEMA, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bridge.demo import run_demo

    return asyncio.run(run_demo(_settings(args), to=args.to, message=args.message, as_json=args.json))


# ---------------------------------------------------------------------------- parser


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voicecall", description="Phone calls for an AI agent.")
    parser.add_argument("--version", action="version", version=f"voicecall {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (else $VOICECALL_CONFIG, else the built-in mock default)")
    common.add_argument("--url", help="RPC URL of the running server (else $VOICECALL_URL, else from config)")
    common.add_argument("--token", help="RPC bearer token (else $VOICECALL_RPC_TOKEN or rpc.token)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the bridge server")
    add("check", cmd_check, "validate the config and print it with secrets masked")
    p = add("demo", cmd_demo, "run a complete offline call on the mock carrier and print its transcript")
    p.add_argument("--to", default=None)
    p.add_argument("--message", default="Hi, this is your assistant calling to confirm your appointment. "
                                         "Does Thursday at three still work for you?")
    for name in ("call", "start"):
        p = add(name, cmd_call, "place an outbound call")
        p.add_argument("-t", "--to")
        p.add_argument("-m", "--message", required=True)
        p.add_argument("--mode", choices=["notify", "conversation"], default="conversation")
        p.add_argument("--machine-detection", choices=["off", "detect", "hangup", "leave-message"])
        p.add_argument("--dtmf", help="keys to send after answer, e.g. 1234w# (w = 0.5 s pause)")
        p.add_argument("--from", dest="from_number", help="which of our numbers calls (its `numbers` agent speaks)")
    for name, func in (("continue", cmd_continue), ("speak", cmd_speak)):
        p = add(name, func, f"{name} on a live call")
        p.add_argument("--call-id", required=True)
        p.add_argument("-m", "--message", required=True)
    for name, func in (("end", cmd_end), ("status", cmd_status)):
        p = add(name, func, f"{name} a call")
        p.add_argument("--call-id", required=True)
    p = add("list", cmd_list, "list calls")
    p.add_argument("--active", action="store_true")
    p = add("dtmf", cmd_dtmf, "send DTMF digits on a live call")
    p.add_argument("--call-id", required=True)
    p.add_argument("--digits", required=True)
    p = add("transfer", cmd_transfer, "hand a live call to a person (cold: the carrier connects them; "
                                      "warm: the bridge briefs the person first)")
    p.add_argument("--call-id", required=True)
    p.add_argument("-t", "--to", required=True, help="E.164 number or sip: URI of the person")
    p.add_argument("--mode", choices=["cold", "warm"], default="cold")
    p.add_argument("--summary", help="warm: what to tell the person (default: written from the transcript)")
    p = add("inject", cmd_inject, "mock carrier: simulate an inbound call")
    p.add_argument("--from", dest="from_number", required=True)
    p.add_argument("--to")
    p.add_argument("--say", action="append", help="what the caller says, one per turn (repeatable)")
    p = add("callee", cmd_callee, "mock carrier: make the simulated callee speak, play a WAV, press keys or hang up")
    p.add_argument("--call-id", required=True)
    p.add_argument("--say")
    p.add_argument("--play", help="WAV file")
    p.add_argument("--press", help="DTMF digits")
    p.add_argument("--hangup", action="store_true")
    p = add("tail", cmd_tail, "follow the call log")
    p.add_argument("--file")
    p.add_argument("--since", type=_non_negative, default=25, help="print the last N lines first (0: only new ones)")
    p.add_argument("--poll", type=int, default=250)
    p.add_argument("--no-follow", action="store_true")
    p = add("latency", cmd_latency, "voice-to-voice turn latency and its parts (p50/p95/p99) from the call log")
    p.add_argument("--file")
    p.add_argument("--last", type=int, default=200)
    p = add("store", cmd_store, "call store maintenance: `store import` copies the JSONL log into Redis")
    p.add_argument("action", choices=["import"])
    p.add_argument("--file", help="the JSONL call log (default: <store>/calls.jsonl)")
    p = add("expose", cmd_expose, "expose the webhook with Tailscale serve/funnel")
    p.add_argument("--mode", choices=["funnel", "serve", "off"], required=True)
    p.add_argument("--path")
    p.add_argument("--port", type=int)
    p.add_argument("--serve-path")
    add("tool-schema", cmd_tool_schema, "print the voice_call tool schema")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging(os.environ.get("VOICECALL_LOG_FORMAT", "text"), os.environ.get("VOICECALL_LOG", "WARNING"))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader went away (`voicecall check | head -1`): stop quietly, and let no flush at exit fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ConfigError as exc:
        print("voicecall: invalid config:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        return 2
    except (CliError, RpcClientError) as exc:
        print(f"voicecall: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for an operator
        from bridge.runtime import StartupError

        if isinstance(exc, StartupError):
            print(f"voicecall: {exc}", file=sys.stderr)
            return 1
        if os.environ.get("VOICECALL_DEBUG"):
            raise
        print(f"voicecall: unexpected error ({type(exc).__name__}); rerun with VOICECALL_DEBUG=1 for details",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
