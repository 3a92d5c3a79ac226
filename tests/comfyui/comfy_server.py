"""A throwaway headless ComfyUI for the end-to-end tests: start, HTTP (urllib), a minimal websocket reader, stop.

Standard library only, so the tests run in any Python that has pytest (ComfyUI itself runs in its own venv).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfyui_version(comfy_dir: Path) -> tuple[int, ...] | None:
    """ComfyUI's version from comfyui_version.py (`__version__ = "0.29.0"`), or None when absent."""
    path = Path(comfy_dir) / "comfyui_version.py"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("__version__"):
            return tuple(int(p) for p in line.split("=", 1)[1].strip().strip("\"'").split(".")[:3])
    return None


class ComfyServer:
    """`main.py --cpu` on a free loopback port with its own base directory; stopped by its own PID."""

    def __init__(self, comfy_dir: Path, python: str, base_dir: Path, extra_args=()):
        self.comfy_dir, self.python, self.base_dir = Path(comfy_dir), python, Path(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.extra_args = list(extra_args)
        self.process = None

    def start(self, timeout=120.0):
        command = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
                   "--disable-api-nodes", *self.extra_args]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines=40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # HTTP

    def request(self, path, body=None, timeout=30):
        """(status, parsed JSON or raw bytes, content type); HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, payload, kind = response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            status, payload, kind = error.code, error.read(), error.headers.get_content_type()
        return status, (json.loads(payload) if kind == "application/json" else payload), kind

    def get(self, path):
        status, payload, _ = self.request(path)
        if status != 200:
            raise AssertionError(f"GET {path}: HTTP {status}: {payload!r}"[:2000])
        return payload

    def queue(self, prompt: dict, client_id: str):
        """POST /prompt -> (HTTP status, response JSON)."""
        status, payload, _ = self.request("/prompt", {"prompt": prompt, "client_id": client_id})
        return status, payload

    def wait_history(self, prompt_id: str, timeout=180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")


class WebSocket:
    """Just enough of RFC 6455 to follow ComfyUI's /ws events: text frames as JSON, binary frames (previews)
    counted by their event type."""

    def __init__(self, port: int, client_id: str, timeout=180.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        header = b""
        while b"\r\n\r\n" not in header:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            header += chunk
        if b" 101 " not in header.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {header[:200]!r}")
        self.binary_events: list[int] = []

    def _read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)  # client frames must be masked
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def next_message(self) -> dict:
        """The next JSON event; binary frames on the way are recorded in `binary_events`."""
        message, kind = b"", None
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(length)
            if opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            elif opcode in (0x0, 0x1, 0x2):
                kind = kind if opcode == 0x0 else opcode  # a continuation frame keeps the first frame's type
                message += payload
                if not first & 0x80:
                    continue
                if kind == 0x1:
                    return json.loads(message)
                self.binary_events.append(struct.unpack(">I", message[:4])[0])
                message, kind = b"", None

    def until(self, predicate, on_event=None) -> list[dict]:
        """Events up to and including the first one for which `predicate(event)` is true."""
        events = []
        while True:
            event = self.next_message()
            events.append(event)
            if on_event is not None:
                on_event(event)
            if predicate(event):
                return events

    def close(self):
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()
