"""What the worker tests share: tiny models in a registry, an image server that can stall or fail on request,
describe requests, and the executions a worker logged.

Workers run as real `python -m worker.main` processes; with LOG_LEVEL=INFO each logs one JSON line
{"msg": "job started", "job": <id>, ...} per execution, which is how the tests count executions.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from roi_model.assembly import save_pretrained
from tests.unit.tiny_models import make_tiny, noise_image

IMAGE = "scene.png"  # in the workers' ROI_LOCAL_FILES_ROOT
BOX = [0.1, 0.2, 0.6, 0.7]


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A tiny random region-LLM; another `seed` gives other weights (and so other scores)."""
    model, processor = make_tiny("clip")
    if seed:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_pretrained(model, processor, directory)
    return directory


def write_scene(files_root: Path) -> Path:
    files_root.mkdir(parents=True, exist_ok=True)
    path = files_root / IMAGE
    noise_image(64, 48, seed=3).save(path)
    return path


def describe_request(url: str = IMAGE, box: list[float] = BOX, question_id: str = "r1:caption") -> dict:
    return {
        "image": {"url": url, "task_id": 7},
        "regions": [{"id": "r1", "box": box}],
        "questions": [{"id": question_id, "text": "Describe <region1> briefly.", "regions": ["r1"]}],
        "max_new_tokens": 4,
    }


def png_bomb(side: int = 20000) -> bytes:
    """A valid `side` x `side` 1-bit PNG: 400 Mpx in a few tens of KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def executions(logs: Iterable[str], job_id: str) -> int:
    """How many times the workers whose logs these are started the job `job_id`."""
    return started_jobs(logs)[job_id]


def started_jobs(logs: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for log in logs:
        for entry in log_entries(log):
            if entry.get("msg") == "job started":
                counts[entry["job"]] += 1
    return counts


def maintenance_passes(log: str, queue: str, after: float) -> int:
    """How often this worker cleaned `queue`'s registries (re-queueing abandoned jobs) since `after` (epoch s)."""
    return sum(
        1
        for entry in log_entries(log)
        if entry.get("msg", "").endswith(f"cleaning registries for queue: {queue}")
        and datetime.fromisoformat(entry["ts"]).timestamp() > after
    )


def log_entries(log: str) -> Iterator[dict]:
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by SIGKILL, or output that is not a log record
        if isinstance(entry, dict):
            yield entry


class ImageServer:
    """PNG images over HTTP on loopback, for the workers' downloads.

    `hold(name)`: requests for `name` wait until `release(name)` (a job stays in progress meanwhile).
    `fail(name, status, times)`: the next `times` requests for `name` get `status`.
    """

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}
        self.requests: Counter = Counter()
        self.waiting: Counter = Counter()
        self._held: dict[str, threading.Event] = {}
        self._failures: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"http://{self.host}/{name}"

    def add(self, name: str, image: Image.Image | bytes) -> str:
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            image = buffer.getvalue()
        self.images[name] = image
        return self.url(name)

    def hold(self, name: str) -> None:
        self._held[name] = threading.Event()

    def release(self, name: str) -> None:
        self._held.pop(name).set()

    def fail(self, name: str, status: int, times: int = 1) -> None:
        self._failures[name] = (status, times)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                with server._lock:
                    server.requests[name] += 1
                    status, times = server._failures.get(name, (200, 0))
                    if times:
                        server._failures[name] = (status, times - 1)
                    held = server._held.get(name)
                if held is not None:
                    server.waiting[name] += 1
                    held.wait(timeout=60)
                if times:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.images.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for event in self._held.values():
            event.set()
        self._server.shutdown()
        self._server.server_close()
