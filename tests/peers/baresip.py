"""Headless baresip (Debian `baresip-core` 1.0) driven over its ctrl_tcp netstring-JSON socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BARESIP = shutil.which("baresip")
MODULES = Path("/usr/lib/baresip/modules")


def config_text(
    *,
    sip_port: int,
    ctrl_port: int,
    rtp_start: int,
    source_wav: Path | None,
    rec_dir: Path,
    rate: int = 8000,
    record: bool = True,
) -> str:
    """A baresip config that needs no sound card: source = WAV file (aufile), playback discarded,
    and (with `record`) the sndfile module writing what it hears into `rec_dir`."""
    source = f"aufile,{source_wav}" if source_wav else "ausine,440"
    lines = [
        "poll_method epoll",
        f"sip_listen 127.0.0.1:{sip_port}",
        "net_interface 127.0.0.1",
        f"rtp_ports {rtp_start}-{rtp_start + 40}",
        "audio_player aubridge,nil",
        "audio_alert aubridge,nil",
        f"audio_source {source}",
        f"ausrc_srate {rate}",
        f"auplay_srate {rate}",
        "ausrc_channels 1",
        "auplay_channels 1",
        f"module_path {MODULES}",
        "module g711.so",
        "module g722.so",
        "module aufile.so",
        "module ausine.so",
        "module aubridge.so",
        *(["module sndfile.so"] if record else []),
        "module_app account.so",
        "module_app menu.so",
        "module_app ctrl_tcp.so",
        f"ctrl_tcp_listen 127.0.0.1:{ctrl_port}",
        f"snd_path {rec_dir}",
        "statmode_default off",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Baresip:
    """One baresip process. Use `async with Baresip(...)`; every exit path kills the process."""

    workdir: Path
    sip_port: int
    ctrl_port: int
    rtp_start: int
    source_wav: Path | None = None
    codecs: str = "PCMU/8000/1"  # baresip's names: PCMU/8000/1, PCMA/8000/1, G722/16000/1
    answermode: str = "auto"  # or "manual": the phone rings until hung up or cancelled
    lifetime_s: int = 40
    record: bool = True
    rate: int = 8000  # baresip's source/playback rate (16000 for G.722 wideband)
    events: list[dict[str, Any]] = field(default_factory=list)

    proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _pump: asyncio.Task[None] | None = None
    _responses: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _token: int = 0

    @property
    def uri(self) -> str:
        return f"sip:alice@127.0.0.1:{self.sip_port}"

    @property
    def rec_dir(self) -> Path:
        return self.workdir / "rec"

    async def __aenter__(self) -> Baresip:
        assert BARESIP, "baresip is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rec_dir.mkdir(exist_ok=True)
        (self.workdir / "config").write_text(
            config_text(
                sip_port=self.sip_port,
                ctrl_port=self.ctrl_port,
                rtp_start=self.rtp_start,
                source_wav=self.source_wav,
                rec_dir=self.rec_dir,
                record=self.record,
                rate=self.rate,
            )
        )
        (self.workdir / "accounts").write_text(
            f"<{self.uri}>;regint=0;answermode={self.answermode};audio_codecs={self.codecs}\n"
        )
        (self.workdir / "contacts").write_text("")
        self._log = open(self.workdir / "baresip.log", "wb")  # noqa: SIM115 - closed in __aexit__
        self.proc = await asyncio.create_subprocess_exec(
            BARESIP, "-f", str(self.workdir), "-t", str(self.lifetime_s),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            await self._connect()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._pump = asyncio.create_task(self._read_loop())
        return self

    async def _connect(self) -> None:
        assert self.proc
        for _ in range(100):  # ctrl_tcp comes up within ~100 ms
            try:
                self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.ctrl_port)
                return
            except OSError:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"baresip exited: {self.log_text()[-2000:]}") from None
                await asyncio.sleep(0.05)
        raise RuntimeError("baresip ctrl_tcp did not come up")

    async def __aexit__(self, *exc: object) -> None:
        if self._pump:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
        if self._writer:
            self._writer.close()
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._log.close()

    def log_text(self) -> str:
        return (self.workdir / "baresip.log").read_text(errors="replace")

    async def _read_loop(self) -> None:
        assert self._reader
        while True:
            size = await self._reader.readuntil(b":")
            body = await self._reader.readexactly(int(size[:-1]))
            await self._reader.readexactly(1)  # trailing ','
            msg = json.loads(body)
            if msg.get("response"):
                fut = self._responses.pop(str(msg.get("token")), None)
                if fut and not fut.done():
                    fut.set_result(msg)
            else:
                self.events.append(msg)
                self._changed.set()

    async def command(self, command: str, params: str = "", timeout: float = 5) -> dict[str, Any]:
        assert self._writer
        self._token += 1
        token = str(self._token)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._responses[token] = fut
        body = json.dumps({"command": command, "params": params, "token": token}).encode()
        self._writer.write(str(len(body)).encode() + b":" + body + b",")
        await self._writer.drain()
        return await asyncio.wait_for(fut, timeout)

    async def dial(self, uri: str) -> None:
        await self.command("dial", uri)

    async def hangup(self) -> None:
        await self.command("hangup")

    async def send_digits(self, digits: str, gap_s: float = 0.25) -> None:
        for d in digits:
            await self.command("sndcode", d)
            await asyncio.sleep(gap_s)

    async def wait_event(self, etype: str, timeout: float = 10) -> dict[str, Any]:
        async def seek() -> dict[str, Any]:
            while True:
                for ev in self.events:
                    if ev.get("type") == etype:
                        return ev
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(seek(), timeout)

    def recordings(self, kind: str = "dec") -> list[Path]:
        """sndfile's dumps: `dec` = what baresip heard, `enc` = what it sent."""
        return sorted(self.rec_dir.glob(f"dump-*-{kind}.wav"))
