"""backend.images against real HTTP servers on loopback: a stand-in Label Studio and a second image host."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests
from PIL import Image

from backend import deadline_http
from backend.images import (
    ImageRejected,
    ImageUnavailable,
    RecentImages,
    fetch_image_bytes,
    load_image,
)
from backend.settings import Settings
from backend.url_policy import Origin, Target, UrlRefused, check_target

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
REPO_ROOT = Path(__file__).resolve().parents[2]

Reply = tuple[int, dict[str, str], bytes]


# --- test images ---------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def two_halves(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_bomb(side: int = 20000) -> bytes:
    """A real `side` x `side` 1-bit PNG: 400 Mpx that compress to a few tens of KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)  # filter byte + packed pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    stored = two_halves((40, 20), RED, BLUE)  # stored landscape; EXIF says: rotate 90° clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    animated = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(
        animated, "GIF", save_all=True, append_images=[Image.new("RGB", (8, 8), BLUE)]
    )
    return {
        "png": encode(two_halves((64, 48), RED, GREEN), "PNG"),
        "rotated.jpg": encode(stored, "JPEG", exif=exif, quality=95),
        "not-an-image": b"<html><body>login required</body></html>",
        "truncated.png": encode(noise, "PNG")[: len(encode(noise, "PNG")) // 2],
        "bomb.png": png_bomb(),
        "large.png": encode(Image.new("RGB", (300, 300), GREEN), "PNG"),
        "transparent.png": encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"),
        "animated.gif": animated.getvalue(),
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    }


# --- HTTP servers --------------------------------------------------------------------------------------


class RecordingServer:
    """An HTTP server on 127.0.0.1 answering from `routes` (path -> callable) and recording every request."""

    def __init__(self, host_name: str) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], Reply]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.released = threading.Event()  # slow routes wait for this (set at teardown)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.answer()

            def answer(self) -> None:
                server.requests.append((self.command, self.path, dict(self.headers)))
                route = server.routes.get(urlsplit(self.path).path)
                status, headers, body = route(self) if route else (404, {}, b"not found")
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up reading, as it should for refused bodies

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host_name}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.routes[path] = lambda request: (
            status,
            {"Content-Length": str(len(body)), **(headers or {})},
            body,
        )

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.routes[path] = lambda request: (status, {"Location": location, "Content-Length": "0"}, b"")

    def headers_for(self, path: str) -> list[dict[str, str]]:
        return [headers for _, request_path, headers in self.requests if urlsplit(request_path).path == path]

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeLabelStudio(RecordingServer):
    """Serves images only with a valid token; implements /api/token/refresh/ and the presign redirect."""

    def __init__(self, personal_access_token: str) -> None:
        super().__init__("127.0.0.1")
        self.personal_access_token = personal_access_token
        self.issued: list[str] = []
        self.routes["/api/token/refresh/"] = self.refresh

    def refresh(self, request: BaseHTTPRequestHandler) -> Reply:
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        if body.get("refresh") != self.personal_access_token:
            return 401, {"Content-Length": "2"}, b"{}"
        now = int(time.time())
        claims = {"token_type": "access", "iat": now, "exp": now + 300, "n": len(self.issued)}
        access = jwt.encode(claims, SIGNING_KEY)
        self.issued.append(access)
        reply = json.dumps({"access": access}).encode()
        return 200, {"Content-Type": "application/json", "Content-Length": str(len(reply))}, reply

    def authorized(self, request: BaseHTTPRequestHandler) -> bool:
        allowed = {f"Token {LEGACY_KEY}", *(f"Bearer {token}" for token in self.issued)}
        return request.headers.get("Authorization") in allowed

    def serve_protected(self, path: str, body: bytes) -> None:
        def route(request: BaseHTTPRequestHandler) -> Reply:
            if not self.authorized(request):
                return 401, {"Content-Length": "0"}, b""
            return 200, {"Content-Length": str(len(body))}, body

        self.routes[path] = route

    def presign(self, task_id: int, expected_uri: str, location: str) -> None:
        def route(request: BaseHTTPRequestHandler) -> Reply:
            fileuri = parse_qs(urlsplit(request.path).query)["fileuri"][0]
            if not self.authorized(request) or base64.urlsafe_b64decode(fileuri).decode() != expected_uri:
                return 403, {"Content-Length": "0"}, b""
            return 303, {"Location": location, "Content-Length": "0"}, b""

        self.routes[f"/tasks/{task_id}/presign/"] = route


SIGNING_KEY = "signing key of the stand-in Label Studio, 32+ bytes"
PAT = jwt.encode({"token_type": "refresh", "iat": 1, "exp": 4_000_000_000, "jti": "pat"}, SIGNING_KEY)


@pytest.fixture
def label_studio(files) -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio(personal_access_token=PAT)
    server.serve_protected("/data/upload/3/a.png", files["png"])
    yield server
    server.close()


@pytest.fixture
def other_host() -> Iterator[RecordingServer]:
    server = RecordingServer("localhost")  # another host name for the same loopback address
    yield server
    server.close()


@pytest.fixture
def settings(label_studio: FakeLabelStudio, tmp_path: Path) -> Settings:
    return Settings(
        label_studio_url=label_studio.url,
        label_studio_api_key=LEGACY_KEY,
        image_allowed_hosts=("localhost",),
        local_files_root=tmp_path / "root",
        image_timeout_s=2.0,
    )


def assert_color(pixel: tuple, expected: tuple, tolerance: int = 40) -> None:
    assert all(abs(got - want) <= tolerance for got, want in zip(pixel, expected, strict=True)), (
        pixel,
        expected,
    )


# --- Label Studio URLs and credentials -----------------------------------------------------------------


def test_an_upload_comes_from_label_studio_with_the_legacy_token(label_studio, settings):
    image = load_image("/data/upload/3/a.png", task_id=17, settings=settings)

    assert image.mode == "RGB"
    assert image.size == (64, 48)
    assert image.getpixel((5, 5)) == RED
    assert image.getpixel((60, 5)) == GREEN
    assert label_studio.headers_for("/data/upload/3/a.png")[0]["Authorization"] == f"Token {LEGACY_KEY}"


def test_a_local_storage_url_is_fetched_from_label_studio(label_studio, settings, files):
    label_studio.serve_protected("/data/local-files/", files["png"])

    load_image("/data/local-files/?d=imgs/a.png", task_id=None, settings=settings)

    _, path, headers = label_studio.requests[-1]
    assert path == "/data/local-files/?d=imgs/a.png"
    assert headers["Authorization"] == f"Token {LEGACY_KEY}"


def test_exif_orientation_is_applied(label_studio, settings, files):
    label_studio.serve_protected("/data/upload/3/rotated.jpg", files["rotated.jpg"])

    image = load_image("/data/upload/3/rotated.jpg", task_id=17, settings=settings)

    # Stored 40x20 with red left, blue right; turned 90° clockwise the red half is on top.
    assert image.size == (20, 40)
    assert_color(image.getpixel((10, 5)), RED)
    assert_color(image.getpixel((10, 35)), BLUE)


def test_a_personal_access_token_is_exchanged_once_and_sent_as_bearer(label_studio, settings):
    settings = dataclasses.replace(settings, label_studio_api_key=PAT)

    load_image("/data/upload/3/a.png", task_id=17, settings=settings)
    load_image("/data/upload/3/a.png", task_id=17, settings=settings)

    assert len(label_studio.issued) == 1, "the access token must be cached, not refreshed per image"
    sent = [headers["Authorization"] for headers in label_studio.headers_for("/data/upload/3/a.png")]
    assert sent == [f"Bearer {label_studio.issued[0]}"] * 2
    assert all(PAT not in value for value in sent)


def test_a_refused_personal_access_token_is_a_clear_error(label_studio, settings):
    wrong = jwt.encode({"token_type": "refresh", "jti": "someone-else"}, SIGNING_KEY)
    settings = dataclasses.replace(settings, label_studio_api_key=wrong)

    with pytest.raises(ImageRejected, match="Label Studio refused LABEL_STUDIO_API_KEY") as refusal:
        load_image("/data/upload/3/a.png", task_id=17, settings=settings)
    assert wrong not in str(refusal.value)


def test_label_studio_refusing_the_key_is_a_permanent_error(label_studio, settings):
    settings = dataclasses.replace(settings, label_studio_api_key="not-the-key")

    with pytest.raises(ImageRejected, match="HTTP 401") as refusal:
        load_image("/data/upload/3/a.png", task_id=17, settings=settings)
    assert not isinstance(refusal.value, ImageUnavailable)
    assert "not-the-key" not in str(refusal.value)


@pytest.mark.parametrize(
    ("status", "detail", "transient", "problem"),
    [
        *[(status, "Token is invalid or expired", False,
           f"Label Studio refused LABEL_STUDIO_API_KEY (HTTP {status})") for status in (400, 401, 403)],
        *[(status, "the database is down", True,
           "cannot renew the Label Studio access token (the database is down)") for status in (404, 500)],
    ],
)  # fmt: skip
def test_a_failed_renewal_of_a_personal_access_token_is_permanent_only_when_label_studio_refuses_it(
    label_studio, settings, status, detail, transient, problem
):
    body = json.dumps({"detail": detail}).encode()
    label_studio.routes["/api/token/refresh/"] = lambda request: (
        status,
        {"Content-Type": "application/json", "Content-Length": str(len(body))},
        body,
    )
    settings = dataclasses.replace(settings, label_studio_api_key=PAT)

    with pytest.raises(ImageRejected) as refusal:
        load_image("/data/upload/3/a.png", task_id=17, settings=settings)

    assert isinstance(refusal.value, ImageUnavailable) is transient
    assert str(refusal.value) == f"image /data/upload/3/a.png refused: {problem}"
    assert label_studio.headers_for("/data/upload/3/a.png") == []


def test_without_an_api_key_label_studio_is_asked_without_credentials(label_studio, settings, files):
    label_studio.serve("/data/upload/3/public.png", files["png"])
    settings = dataclasses.replace(settings, label_studio_api_key="")

    assert load_image("/data/upload/3/public.png", task_id=17, settings=settings).size == (64, 48)
    assert "Authorization" not in label_studio.headers_for("/data/upload/3/public.png")[0]
    assert label_studio.headers_for("/api/token/refresh/") == []


def test_a_cloud_uri_goes_through_the_presign_redirect_without_the_token(
    label_studio, other_host, settings, files
):
    other_host.serve("/bucket/key.png", files["png"])
    label_studio.presign(17, "s3://bucket/key.png", f"{other_host.url}/bucket/key.png?X-Amz-Signature=secret")

    image = load_image("s3://bucket/key.png", task_id=17, settings=settings)

    assert image.size == (64, 48)
    assert label_studio.headers_for("/tasks/17/presign/")[0]["Authorization"] == f"Token {LEGACY_KEY}"
    assert "Authorization" not in other_host.headers_for("/bucket/key.png")[0]


def test_a_cloud_uri_needs_the_task_id(settings):
    with pytest.raises(ImageRejected, match="needs the task id"):
        load_image("gs://bucket/key.png", task_id=None, settings=settings)


def test_the_token_is_never_logged(label_studio, other_host, settings, files, caplog):
    other_host.serve("/b.png", files["png"])
    caplog.set_level(logging.DEBUG)

    load_image("/data/upload/3/a.png", task_id=17, settings=settings)
    load_image(f"{other_host.url}/b.png", task_id=17, settings=settings)

    assert "a.png" in caplog.text
    assert LEGACY_KEY not in caplog.text


# --- other hosts, redirects, limits --------------------------------------------------------------------


def test_an_allowed_host_gets_no_token(other_host, settings, files):
    other_host.serve("/b.png", files["png"])

    image = load_image(f"{other_host.url}/b.png", task_id=17, settings=settings)

    assert image.size == (64, 48)
    assert "Authorization" not in other_host.headers_for("/b.png")[0]


def test_a_host_not_in_the_allow_list_is_refused_before_any_request(other_host, settings, files):
    other_host.serve("/b.png", files["png"])
    settings = dataclasses.replace(settings, image_allowed_hosts=("images.example.com",))

    with pytest.raises(ImageRejected) as refusal:
        load_image(f"{other_host.url}/b.png", task_id=17, settings=settings)

    assert str(refusal.value) == (
        f"image {other_host.url}/b.png refused: host 'localhost' is not in ROI_IMAGE_ALLOWED_HOSTS"
    )
    assert other_host.requests == []


def test_a_redirect_to_a_disallowed_host_is_refused(label_studio, other_host, settings, files):
    other_host.serve("/b.png", files["png"])
    label_studio.redirect("/data/upload/3/moved.png", f"{other_host.url}/b.png?sig=1")
    settings = dataclasses.replace(settings, image_allowed_hosts=())

    with pytest.raises(
        ImageRejected, match=rf"redirect to {other_host.url}/b.png: host 'localhost' is not in"
    ):
        load_image("/data/upload/3/moved.png", task_id=17, settings=settings)
    assert other_host.requests == []


def test_more_than_three_redirects_are_refused(label_studio, settings):
    label_studio.redirect("/data/upload/loop.png", "/data/upload/loop.png")

    with pytest.raises(ImageRejected, match="more than 3 redirects"):
        load_image("/data/upload/loop.png", task_id=17, settings=settings)
    assert len(label_studio.headers_for("/data/upload/loop.png")) == 4


def test_a_body_over_the_byte_cap_is_refused_from_its_content_length(other_host, settings, files):
    other_host.serve("/big.png", files["large.png"])
    settings = dataclasses.replace(settings, image_max_bytes=len(files["large.png"]) - 1)

    with pytest.raises(ImageRejected, match="more than ROI_IMAGE_MAX_BYTES"):
        load_image(f"{other_host.url}/big.png", task_id=17, settings=settings)


def test_a_body_over_the_byte_cap_is_refused_while_streaming(other_host, settings):
    endless = b"\x89PNG" + b"\x00" * 5_000_000
    other_host.routes["/stream.png"] = lambda request: (200, {}, endless)  # no Content-Length
    settings = dataclasses.replace(settings, image_max_bytes=100_000)

    with pytest.raises(ImageRejected, match="body is larger than ROI_IMAGE_MAX_BYTES=100000"):
        load_image(f"{other_host.url}/stream.png", task_id=17, settings=settings)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_a_body_of_exactly_the_byte_cap_is_accepted_and_one_byte_more_is_not(
    other_host, settings, files, declared
):
    body = files["png"]
    headers = {"Content-Length": str(len(body))} if declared else {}  # streamed: the connection's end ends it
    other_host.routes["/edge.png"] = lambda request: (200, headers, body)
    at_cap = dataclasses.replace(settings, image_max_bytes=len(body))
    below = dataclasses.replace(settings, image_max_bytes=len(body) - 1)

    assert load_image(f"{other_host.url}/edge.png", task_id=17, settings=at_cap).size == (64, 48)
    refusal = (
        f"{len(body)} bytes is more than ROI_IMAGE_MAX_BYTES={len(body) - 1}"
        if declared
        else f"the body is larger than ROI_IMAGE_MAX_BYTES={len(body) - 1}"
    )
    with pytest.raises(ImageRejected) as refused:
        load_image(f"{other_host.url}/edge.png", task_id=17, settings=below)
    assert str(refused.value) == f"image {other_host.url}/edge.png refused: {refusal}"


def test_a_content_length_over_the_cap_is_refused_before_the_body_is_read(other_host, settings, files):
    # The header says one byte more than the cap; the body sent is within it: the header alone refuses.
    body = files["png"]
    other_host.routes["/liar.png"] = lambda request: (200, {"Content-Length": str(len(body) + 1)}, body)
    settings = dataclasses.replace(settings, image_max_bytes=len(body))

    with pytest.raises(ImageRejected) as refused:
        load_image(f"{other_host.url}/liar.png", task_id=17, settings=settings)
    assert refused.value.problem == f"{len(body) + 1} bytes is more than ROI_IMAGE_MAX_BYTES={len(body)}"


def test_an_image_larger_than_one_read_arrives_whole(other_host, settings):
    noise = encode(Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)), "PNG")
    assert len(noise) > 2 * 64 * 1024  # the body is read 64 KiB at a time
    other_host.routes["/noise.png"] = lambda request: (200, {}, noise)

    assert fetch_image_bytes(f"{other_host.url}/noise.png", task_id=17, settings=settings) == noise


def test_a_server_that_sends_more_than_the_cap_and_then_stalls_is_refused_at_once(other_host, settings):
    # The body is read 64 KiB at a time and counted after each read: a read that waited for the whole
    # body would hold all of it in memory (here: until the deadline shuts the connection).
    def oversized_then_stalls(request: BaseHTTPRequestHandler) -> Reply:
        request.send_response(200)
        request.end_headers()
        request.wfile.write(b"\x89PNG" + b"\x00" * (2 * 64 * 1024))
        request.wfile.flush()
        other_host.released.wait(timeout=30)
        return 200, {}, b""

    other_host.routes["/stall.png"] = oversized_then_stalls
    settings = dataclasses.replace(settings, image_max_bytes=100_000, image_timeout_s=3.0)

    started = time.monotonic()
    with pytest.raises(ImageRejected) as refused:
        fetch_image_bytes(f"{other_host.url}/stall.png", task_id=17, settings=settings)
    assert refused.value.problem == "the body is larger than ROI_IMAGE_MAX_BYTES=100000"
    assert time.monotonic() - started < 1.5, "refused only once the deadline shut the connection"


def test_a_body_cut_short_of_its_content_length_is_worth_a_retry(other_host, settings):
    other_host.routes["/short.png"] = lambda request: (
        200,
        {"Content-Length": "1000"},
        b"\x89PNG" + bytes(10),
    )

    with pytest.raises(ImageUnavailable) as failure:
        fetch_image_bytes(f"{other_host.url}/short.png", task_id=17, settings=settings)
    assert str(failure.value) == (
        f"image {other_host.url}/short.png refused: the download broke off (ChunkedEncodingError)"
    )


class ScriptedBody:
    """A response body whose reads are `steps`: bytes, or a callable run at that read (it may raise)."""

    def __init__(self, *steps: bytes | Callable[[], bytes]) -> None:
        self.steps = list(steps)

    def read(self, amount: int | None = None) -> bytes:
        step = self.steps.pop(0) if self.steps else b""
        return step() if callable(step) else step

    def close(self) -> None:
        pass


def session_answering(body: ScriptedBody) -> requests.Session:
    """A session whose every request gets HTTP 200 with `body`, without any network."""

    class Adapter(requests.adapters.HTTPAdapter):
        def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
            response = requests.Response()
            response.status_code, response.raw, response.url, response.request = (
                200,
                body,
                request.url,
                request,
            )
            return response

    session = requests.Session()
    session.mount("http://", Adapter())
    return session


def the_deadline_passes_now() -> None:
    """What the download's timer does when the time is up, done at once instead of waited for."""
    deadline_http._current.deadline._expire()


def test_a_download_cut_off_by_the_deadline_is_worth_a_retry(settings):
    def shut_by_the_timer() -> bytes:
        the_deadline_passes_now()
        raise requests.ConnectionError("the socket was shut down")

    def ended_by_the_timer() -> bytes:
        the_deadline_passes_now()
        return b""  # the shut socket reads as the end of a body without Content-Length

    for body in (ScriptedBody(b"\x89PNG", shut_by_the_timer), ScriptedBody(b"\x89PNG", ended_by_the_timer)):
        with pytest.raises(ImageUnavailable) as failure:
            fetch_image_bytes(
                "http://localhost:1/a.png", task_id=17, settings=settings, session=session_answering(body)
            )
        assert (
            str(failure.value) == "image http://localhost:1/a.png refused: the download took longer than 2 s"
        )


def test_a_slow_server_is_given_up_on_after_the_timeout(other_host, settings, files):
    def slow(request: BaseHTTPRequestHandler) -> Reply:
        other_host.released.wait(timeout=30)
        return 200, {"Content-Length": str(len(files["png"]))}, files["png"]

    other_host.routes["/slow.png"] = slow
    settings = dataclasses.replace(settings, image_timeout_s=0.3)

    started = time.monotonic()
    with pytest.raises(ImageUnavailable, match=r"did not answer within 0\.3 s"):
        load_image(f"{other_host.url}/slow.png", task_id=17, settings=settings)
    assert time.monotonic() - started < 3


def test_http_errors_tell_permanent_from_transient(other_host, settings):
    other_host.serve("/gone.png", b"", status=404)
    other_host.serve("/busy.png", b"", status=503)

    with pytest.raises(ImageRejected, match="HTTP 404") as gone:
        load_image(f"{other_host.url}/gone.png", task_id=17, settings=settings)
    assert not isinstance(gone.value, ImageUnavailable)
    with pytest.raises(ImageUnavailable, match="HTTP 503"):
        load_image(f"{other_host.url}/busy.png", task_id=17, settings=settings)


@pytest.mark.parametrize(
    ("url", "problem"),
    [("ftp://files.example.com/a.png", "unsupported URL scheme 'ftp'"), ("", "the image URL is empty")],
)
def test_unusable_urls_are_refused(settings, url, problem):
    with pytest.raises(ImageRejected, match=problem):
        load_image(url, task_id=17, settings=settings)


# --- decoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("not-an-image", "not an image in a supported format"),
        ("eps", "not an image in a supported format"),
        ("truncated.png", "broken image data"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_bad_image_data_is_refused(other_host, settings, files, name, problem):
    other_host.serve(f"/{name}", files[name])
    settings = dataclasses.replace(settings, image_max_pixels=10**12)  # leave the bomb to Pillow's own check

    with pytest.raises(ImageRejected, match=problem):
        load_image(f"{other_host.url}/{name}", task_id=17, settings=settings)


def test_too_many_pixels_are_refused_from_the_header(other_host, settings, files):
    other_host.serve("/large.png", files["large.png"])
    settings = dataclasses.replace(settings, image_max_pixels=10_000)

    with pytest.raises(ImageRejected) as refused:
        load_image(f"{other_host.url}/large.png", task_id=17, settings=settings)
    assert str(refused.value) == (
        f"image {other_host.url}/large.png refused: 300x300 is 90000 pixels, more than ROI_IMAGE_MAX_PIXELS=10000"
    )


def test_an_animation_gives_its_first_frame(other_host, settings, files):
    other_host.serve("/animated.gif", files["animated.gif"])

    image = load_image(f"{other_host.url}/animated.gif", task_id=17, settings=settings)

    assert image.mode == "RGB"
    assert_color(image.getpixel((4, 4)), RED, tolerance=0)


def test_transparency_is_composited_onto_white(other_host, settings, files):
    other_host.serve("/transparent.png", files["transparent.png"])

    image = load_image(f"{other_host.url}/transparent.png", task_id=17, settings=settings)

    assert image.getpixel((1, 1)) == (255, 255, 255)


def test_only_browser_formats_are_decoded_from_the_first_image_of_a_process():
    """Pillow registers most of its plugins on first use: the allow-list must hold before that too."""
    tiff = encode(Image.new("RGB", (4, 4), RED), "TIFF")
    first_decode = (
        "import sys\n"
        "from backend.images import ImageRejected, decode_image\n"
        "from backend.settings import Settings\n"
        "try:\n"
        "    decode_image(sys.stdin.buffer.read(), url='a.tif', settings=Settings())\n"
        "except ImageRejected as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", first_decode], input=tiff, capture_output=True, cwd=REPO_ROOT, timeout=120
    )

    assert done.returncode == 0, done.stderr.decode()
    assert "image a.tif refused: not an image in a supported format" in done.stdout.decode()


# --- local files ---------------------------------------------------------------------------------------


@pytest.fixture
def local_root(settings: Settings, files: dict[str, bytes]) -> Path:
    root = settings.local_files_root
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(files["png"])
    return root


def test_local_paths_inside_the_root_are_read(settings, local_root):
    for url in (str(local_root / "imgs" / "a.png"), "imgs/a.png", (local_root / "imgs" / "a.png").as_uri()):
        assert load_image(url, task_id=None, settings=settings).size == (64, 48), url


def test_a_dot_dot_escape_is_refused(settings, local_root, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"secret")

    for url in (f"{local_root}/imgs/../../secret.png", "../secret.png"):
        with pytest.raises(ImageRejected, match="outside ROI_LOCAL_FILES_ROOT"):
            load_image(url, task_id=None, settings=settings)


def test_a_symlink_escape_is_refused(settings, local_root, tmp_path, files):
    (tmp_path / "outside.png").write_bytes(files["png"])
    (local_root / "imgs" / "link.png").symlink_to(tmp_path / "outside.png")

    with pytest.raises(ImageRejected, match="outside ROI_LOCAL_FILES_ROOT"):
        load_image(str(local_root / "imgs" / "link.png"), task_id=None, settings=settings)


def test_local_files_are_refused_without_a_root(settings, local_root):
    settings = dataclasses.replace(settings, local_files_root=None)

    with pytest.raises(ImageRejected, match="local files are disabled"):
        load_image(str(local_root / "imgs" / "a.png"), task_id=None, settings=settings)


def test_a_missing_local_file_is_a_clear_error(settings, local_root):
    with pytest.raises(ImageRejected, match="no such file"):
        load_image("imgs/missing.png", task_id=None, settings=settings)


def test_a_local_file_of_exactly_the_byte_cap_is_read_and_one_byte_more_is_not(settings, local_root, files):
    size = len(files["png"])
    at_cap = dataclasses.replace(settings, image_max_bytes=size)
    below = dataclasses.replace(settings, image_max_bytes=size - 1)

    assert load_image("imgs/a.png", task_id=None, settings=at_cap).size == (64, 48)
    with pytest.raises(ImageRejected) as refused:
        load_image("imgs/a.png", task_id=None, settings=below)
    assert refused.value.problem == f"the file is larger than ROI_IMAGE_MAX_BYTES={size - 1}"


# --- recently fetched images ---------------------------------------------------------------------------


class ManualClock:
    """A clock the test moves by hand, so expiry is checked without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_fetch_within_the_ttl_reuses_the_bytes_and_still_decodes(label_studio, settings, files):
    cache = RecentImages(ttl_s=60, max_bytes=1 << 20)

    first = load_image("/data/upload/3/a.png", task_id=17, settings=settings, cache=cache)
    second = load_image("/data/upload/3/a.png", task_id=17, settings=settings, cache=cache)

    assert len(label_studio.headers_for("/data/upload/3/a.png")) == 1
    assert first.tobytes() == second.tobytes()
    assert second is not first  # decoded again: the cache holds bytes, never a decoded image
    assert cache.size_bytes == len(files["png"])


def test_an_entry_expires_after_its_ttl_from_the_fetch(label_studio, settings):
    clock = ManualClock()
    cache = RecentImages(ttl_s=60, max_bytes=1 << 20, clock=clock)

    def fetch() -> bytes:
        return fetch_image_bytes("/data/upload/3/a.png", task_id=17, settings=settings, cache=cache)

    fetch()
    clock.now += 59.0
    fetch()  # a hit does not extend the entry's life
    assert len(label_studio.headers_for("/data/upload/3/a.png")) == 1
    clock.now += 1.0
    fetch()
    assert len(label_studio.headers_for("/data/upload/3/a.png")) == 2


def test_the_cache_keeps_at_most_max_bytes_dropping_the_least_recently_used(settings):
    cache = RecentImages(ttl_s=60, max_bytes=100)

    cache.put("a", 1, settings, b"a" * 40)
    cache.put("b", 1, settings, b"b" * 40)
    assert cache.get("a", 1, settings) == b"a" * 40  # "a" is now the more recently used
    cache.put("c", 1, settings, b"c" * 40)

    assert cache.size_bytes == 80
    assert cache.get("b", 1, settings) is None
    assert (cache.get("a", 1, settings), cache.get("c", 1, settings)) == (b"a" * 40, b"c" * 40)
    cache.put("huge", 1, settings, b"h" * 101)  # larger than the whole cache: not kept, nothing dropped
    assert cache.get("huge", 1, settings) is None and cache.size_bytes == 80
    cache.put("a", 1, settings, b"A" * 10)  # a new fetch replaces the old bytes
    assert cache.get("a", 1, settings) == b"A" * 10 and cache.size_bytes == 50


def test_expired_entries_make_room_before_live_ones_are_dropped(settings):
    clock = ManualClock()
    cache = RecentImages(ttl_s=10, max_bytes=100, clock=clock)
    cache.put("old", 1, settings, b"o" * 50)
    clock.now += 5
    cache.put("live", 1, settings, b"l" * 40)
    clock.now += 5  # "old" expires now
    cache.put("new", 1, settings, b"n" * 50)

    assert cache.size_bytes == 90
    assert cache.get("live", 1, settings) == b"l" * 40


def test_the_same_url_for_another_task_or_label_studio_is_fetched_again(
    label_studio, other_host, settings, files
):
    # One cloud URI, presigned per task: each task must get the bytes Label Studio gives it.
    other_host.serve("/bucket/for-17.png", files["png"])
    other_host.serve("/bucket/for-18.png", files["large.png"])
    label_studio.presign(17, "s3://bucket/key.png", f"{other_host.url}/bucket/for-17.png")
    label_studio.presign(18, "s3://bucket/key.png", f"{other_host.url}/bucket/for-18.png")
    cache = RecentImages()

    def size(task_id: int, settings: Settings = settings) -> tuple[int, int]:
        return load_image("s3://bucket/key.png", task_id=task_id, settings=settings, cache=cache).size

    assert [size(17), size(18), size(17), size(18)] == [(64, 48), (300, 300), (64, 48), (300, 300)]
    assert len(label_studio.headers_for("/tasks/17/presign/")) == 1
    assert len(label_studio.headers_for("/tasks/18/presign/")) == 1

    # The same relative URL under other settings is another Label Studio's file.
    elsewhere = RecordingServer("127.0.0.1")
    try:
        elsewhere.serve("/data/upload/3/a.png", files["large.png"])
        assert load_image("/data/upload/3/a.png", task_id=17, settings=settings, cache=cache).size == (64, 48)
        moved = dataclasses.replace(settings, label_studio_url=elsewhere.url)
        assert load_image("/data/upload/3/a.png", task_id=17, settings=moved, cache=cache).size == (300, 300)
    finally:
        elsewhere.close()


def test_a_failed_fetch_is_not_kept(other_host, settings, files):
    cache = RecentImages()
    url = f"{other_host.url}/flaky.png"
    other_host.serve("/flaky.png", b"", status=503)
    with pytest.raises(ImageUnavailable):
        fetch_image_bytes(url, task_id=17, settings=settings, cache=cache)

    other_host.serve("/flaky.png", files["png"])
    assert fetch_image_bytes(url, task_id=17, settings=settings, cache=cache) == files["png"]
    assert cache.size_bytes == len(files["png"])


def test_bytes_that_fail_to_decode_fail_on_every_use(other_host, settings, files):
    cache = RecentImages()
    other_host.serve("/page.png", files["not-an-image"])
    for _ in range(2):
        with pytest.raises(ImageRejected, match="not an image"):
            load_image(f"{other_host.url}/page.png", task_id=17, settings=settings, cache=cache)
    assert len(other_host.headers_for("/page.png")) == 1


def test_threads_sharing_the_cache_keep_its_byte_count_right(settings):
    cache = RecentImages(ttl_s=60, max_bytes=1000)

    def work(worker: int) -> None:
        for i in range(300):
            key = f"img-{(worker * 7 + i) % 40}"
            if cache.get(key, worker % 3, settings) is None:
                cache.put(key, worker % 3, settings, bytes(10 + (i % 5) * 20))

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    held = [
        len(data)
        for key in range(40)
        for task in range(3)
        if (data := cache.get(f"img-{key}", task, settings)) is not None
    ]
    assert 0 < cache.size_bytes <= 1000
    assert sum(held) == cache.size_bytes


def test_an_entry_lives_sixty_seconds_by_default(settings):
    clock = ManualClock()
    cache = RecentImages(clock=clock)
    cache.put("a", 1, settings, b"a")

    clock.now += 59.9
    assert cache.get("a", 1, settings) == b"a"
    clock.now += 0.1
    assert cache.get("a", 1, settings) is None
    assert (cache.ttl_s, cache.max_bytes) == (60.0, 64 * 1024 * 1024)


def test_the_smallest_cache_keeps_one_byte_for_half_a_second(settings):
    clock = ManualClock()
    cache = RecentImages(ttl_s=0.5, max_bytes=1, clock=clock)
    assert (cache.ttl_s, cache.max_bytes) == (0.5, 1)

    cache.put("a", 1, settings, b"a")  # exactly max_bytes: kept
    assert cache.get("a", 1, settings) == b"a" and cache.size_bytes == 1
    clock.now += 0.5
    assert cache.get("a", 1, settings) is None


def test_a_new_fetch_too_large_to_keep_drops_the_older_bytes_of_its_url(settings):
    cache = RecentImages(ttl_s=60, max_bytes=100)
    cache.put("a", 1, settings, b"a" * 40)
    cache.put("b", 1, settings, b"b" * 10)

    cache.put("a", 1, settings, b"A" * 101)  # the image changed and grew: the old bytes are stale

    assert cache.get("a", 1, settings) is None
    assert cache.get("b", 1, settings) == b"b" * 10 and cache.size_bytes == 10


def test_the_cache_refuses_a_non_positive_size_or_ttl():
    with pytest.raises(ValueError, match="must be positive"):
        RecentImages(ttl_s=0)
    with pytest.raises(ValueError, match="must be positive"):
        RecentImages(max_bytes=0)


# --- attacks: where a request may go, and what it may carry ---------------------------------------------


@pytest.fixture
def canary() -> Iterator[RecordingServer]:
    """A server nothing may ever reach."""
    server = RecordingServer("127.0.0.1")
    yield server
    server.close()


def port_of(server: RecordingServer) -> int:
    return server.httpd.server_address[1]


def test_a_backslash_before_an_at_sign_never_reaches_the_host_before_it(label_studio, canary, settings):
    # urllib.parse reads Label Studio's host after the "@"; requests would connect to the canary before "\".
    url = f"http://127.0.0.1:{port_of(canary)}\\@127.0.0.1:{port_of(label_studio)}/data/upload/3/a.png"

    with pytest.raises(ImageRejected, match="backslash"):
        load_image(url, task_id=17, settings=settings)

    assert canary.requests == []
    assert label_studio.requests == []


def test_a_redirect_through_an_allowed_host_to_a_backslash_url_is_refused(
    label_studio, other_host, canary, settings
):
    attack = f"http://127.0.0.1:{port_of(canary)}\\@127.0.0.1:{port_of(label_studio)}/data/upload/3/a.png"
    other_host.redirect("/bounce.png", attack)

    with pytest.raises(ImageRejected, match=r"redirect to .*backslash"):
        load_image(f"{other_host.url}/bounce.png", task_id=17, settings=settings)

    assert canary.requests == []
    assert label_studio.requests == []


@pytest.mark.parametrize(
    "userinfo",
    ["user@", "user:pass@", "127.0.0.1%3A1@", "localhost:1%5C@"],
    ids=["user", "pass", "enc", "bs"],
)
def test_user_info_is_refused_before_any_request(other_host, settings, files, userinfo):
    other_host.serve("/b.png", files["png"])
    url = f"http://{userinfo}localhost:{port_of(other_host)}/b.png"

    with pytest.raises(ImageRejected, match="user info"):
        load_image(url, task_id=17, settings=settings)
    assert other_host.requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/data/upload/../../api/projects/",
        "/data/../api/current-user/whoami",
        "/data/upload/%2e%2e/%2e%2e/api/projects/",
        "/data/upload/..%2f..%2fapi/projects/",
    ],
)
def test_relative_urls_stay_on_label_studio_media_paths(label_studio, settings, path):
    with pytest.raises(ImageRejected, match="not a Label Studio media path"):
        load_image(path, task_id=17, settings=settings)
    assert label_studio.requests == []


def test_an_absolute_url_to_the_label_studio_api_is_refused(label_studio, settings):
    with pytest.raises(ImageRejected, match="not a Label Studio media path"):
        load_image(f"{label_studio.url}/api/projects/", task_id=17, settings=settings)
    assert label_studio.requests == []


def test_credentials_go_to_label_studios_exact_origin_only(label_studio, canary, settings, files):
    # Same host as Label Studio, another port, allowed as a plain image host: it gets no token.
    canary.serve("/data/upload/3/a.png", files["png"])
    settings = dataclasses.replace(settings, image_allowed_hosts=("127.0.0.1",))

    load_image(f"{canary.url}/data/upload/3/a.png", task_id=17, settings=settings)
    load_image(f"{label_studio.url}/data/upload/3/a.png", task_id=17, settings=settings)

    assert "Authorization" not in canary.headers_for("/data/upload/3/a.png")[0]
    assert label_studio.headers_for("/data/upload/3/a.png")[0]["Authorization"] == f"Token {LEGACY_KEY}"


def test_a_redirect_from_label_studio_to_an_allowed_host_drops_the_token(
    label_studio, other_host, settings, files
):
    other_host.serve("/b.png", files["png"])
    label_studio.redirect("/data/upload/3/elsewhere.png", f"{other_host.url}/b.png")

    load_image("/data/upload/3/elsewhere.png", task_id=17, settings=settings)

    assert label_studio.headers_for("/data/upload/3/elsewhere.png")[0]["Authorization"]
    assert "Authorization" not in other_host.headers_for("/b.png")[0]


@pytest.mark.parametrize(
    "host", ["xlocalhost", "localhost.evil.test", "evil-localhost", "localhos"], ids=lambda h: h
)
def test_look_alike_hosts_are_not_allowed(settings, host):
    # Refused before any name lookup: none of these resolves here, and none may be tried.
    with pytest.raises(ImageRejected, match=f"host '{host}' is not in ROI_IMAGE_ALLOWED_HOSTS"):
        load_image(f"http://{host}:1/b.png", task_id=17, settings=settings)


@pytest.mark.parametrize(
    "url",
    [
        "http://evilexample.com/a.png",
        "http://evil-example.com/a.png",
        "http://images.example.com/a.png",
        "http://example.com.evil.test/a.png",
        "http://example.co/a.png",
        "http://xample.com/a.png",
        "http://evilexample.com:8443/a.png",
    ],
)
def test_the_allow_list_matches_whole_host_names_only(url):
    # check_target decides on the URL alone: nothing is resolved or fetched.
    allowed = ("example.com", "example.com:8443")

    assert (
        check_target("http://example.com/a.png", "http://127.0.0.1:8080", allowed).origin.host
        == "example.com"
    )
    assert (
        check_target("https://EXAMPLE.com:8443/a.png", "http://127.0.0.1:8080", allowed).label_studio is False
    )
    with pytest.raises(UrlRefused, match="is not in ROI_IMAGE_ALLOWED_HOSTS"):
        check_target(url, "http://127.0.0.1:8080", allowed)


@pytest.mark.parametrize("entry", ["example.com:8443", " Example.COM:8443 "])
def test_a_host_port_entry_matches_that_host_and_port_exactly(entry):
    allowed = (entry,)

    assert check_target("http://example.com:8443/a.png", "http://127.0.0.1:8080", allowed).path == "/a.png"
    for url in ("http://example.com/a.png", "http://example.com:8444/a.png", "http://evilexample.com:8443/a"):
        with pytest.raises(UrlRefused, match="is not in ROI_IMAGE_ALLOWED_HOSTS"):
            check_target(url, "http://127.0.0.1:8080", allowed)


LS_URL = "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1/a.png", "not a valid URL (Failed to parse: '[::1' is not a valid host or port)"),
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        ("//example.com/a.png", "unsupported URL scheme None"),
        ("http:///a.png", "the URL has no host"),
        ("http://user@example.com/a.png", "the URL carries user info ('user@host'), which is never sent"),
        ("http://ex ample.com/a.png", "the URL contains whitespace or control characters"),
        ("http://example.com/a\x7f.png", "the URL contains whitespace or control characters"),
        (
            "http://exa\\mple.com/a.png",
            "the URL contains a backslash (URL parsers disagree on where its host ends)",
        ),
        (
            f"{LS_URL}/api/projects/",
            "'/api/projects/' is not a Label Studio media path (/data/..., /storage-data/...)",
        ),
        (
            f"{LS_URL}/tasks/x/presign/",
            "'/tasks/x/presign/' is not a Label Studio media path (/data/..., /storage-data/...)",
        ),
        (
            f"{LS_URL}/data/%2e%2e/x",
            "'/data/%2E%2E/x' is not a Label Studio media path (/data/..., /storage-data/...)",
        ),
        (f"{LS_URL}", "'/' is not a Label Studio media path (/data/..., /storage-data/...)"),
        ("http://example.com./a.png", "host 'example.com.' is not in ROI_IMAGE_ALLOWED_HOSTS"),
        # urllib3 decodes the host (and would connect to example.com); urllib.parse does not
        ("http://%65xample.com/a.png", "URL parsers disagree on its host ('%65xample.com' or 'example.com')"),
    ],
)
def test_each_refusal_names_its_reason(url, reason):
    with pytest.raises(UrlRefused) as refusal:
        check_target(url, LS_URL, ("example.com",))
    assert str(refusal.value) == reason


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (
            f"{LS_URL}/data/upload/3/a.png",
            Target(Origin("http", "127.0.0.1", 8080), "/data/upload/3/a.png", True),
        ),
        (f"{LS_URL}/storage-data/x", Target(Origin("http", "127.0.0.1", 8080), "/storage-data/x", True)),
        (
            f"{LS_URL}/tasks/17/presign/",
            Target(Origin("http", "127.0.0.1", 8080), "/tasks/17/presign/", True),
        ),
        ("http://127.0.0.1:8081/api/x", Target(Origin("http", "127.0.0.1", 8081), "/api/x", False)),
        ("https://Example.com/a.png", Target(Origin("https", "example.com", 443), "/a.png", False)),
        ("http://example.com:/a.png", Target(Origin("http", "example.com", 80), "/a.png", False)),
        ("http://example.com", Target(Origin("http", "example.com", 80), "/", False)),
        ("http://[::1]:8443/a.png", Target(Origin("http", "[::1]", 8443), "/a.png", False)),
        ('http://example.com/a!"b.png', Target(Origin("http", "example.com", 80), "/a!%22b.png", False)),
    ],
)
def test_an_allowed_target_is_where_urllib3_connects(url, target):
    assert check_target(url, LS_URL, ("example.com", "127.0.0.1:8081", "[::1]")) == target
    assert str(target.origin) == f"{target.origin.scheme}://{target.origin.host}:{target.origin.port}"


def test_allowed_hosts_compare_without_letter_case(other_host, settings, files):
    other_host.serve("/b.png", files["png"])

    image = load_image(f"http://LocalHost:{port_of(other_host)}/b.png", task_id=17, settings=settings)

    assert image.size == (64, 48)


def test_a_host_port_entry_allows_that_port_only(other_host, settings, files):
    other_host.serve("/b.png", files["png"])
    settings = dataclasses.replace(settings, image_allowed_hosts=(f"localhost:{port_of(other_host) + 1}",))

    with pytest.raises(ImageRejected, match="not in ROI_IMAGE_ALLOWED_HOSTS"):
        load_image(f"{other_host.url}/b.png", task_id=17, settings=settings)
    assert other_host.requests == []


class TrickleServer:
    """Answers every connection one byte at a time, `interval_s` apart: its headers, or headers then a body."""

    def __init__(self, *, trickle_headers: bool, interval_s: float = 0.05, total_s: float = 120.0) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://localhost:{self.listener.getsockname()[1]}"
        self.trickle_headers = trickle_headers
        self.interval_s = interval_s
        self.total_s = total_s
        self.stopped = threading.Event()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection) -> None:
        length = int(self.total_s / self.interval_s)
        head = b"HTTP/1.1 200 OK\r\n"
        if self.trickle_headers:
            slow, fast = head + b"X-Slow: " + b"a" * length + b"\r\n\r\n", b""
        else:
            fast = head + f"Content-Length: {length}\r\n\r\n".encode()
            slow = b"\x89PNG" + b"\x00" * length
        with connection:
            try:
                connection.recv(65536)
                connection.sendall(fast)
                for byte in slow:
                    if self.stopped.wait(self.interval_s):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:
                return  # the client hung up: what we want

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.mark.parametrize("trickle_headers", [False, True], ids=["body", "headers"])
def test_a_trickling_server_is_cut_off_at_the_timeout(settings, trickle_headers):
    server = TrickleServer(trickle_headers=trickle_headers)  # would take 120 s; every byte within 0.05 s
    settings = dataclasses.replace(settings, image_timeout_s=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(ImageUnavailable, match=r"(took longer than|did not answer within) 1 s"):
            load_image(f"{server.url}/slow.png", task_id=17, settings=settings)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert server.connections == 1
    assert elapsed < 30, f"held {elapsed:.1f} s by a server that sends a byte every 0.05 s"


# --- every refusal, word for word ----------------------------------------------------------------------


def refusal_of(url: object, settings: Settings, task_id: int | None = 17) -> ImageRejected:
    """The ImageRejected that loading `url` raises; it names the URL it was given."""
    with pytest.raises(ImageRejected) as refused:
        load_image(url, task_id=task_id, settings=settings)
    if isinstance(url, str) and url.strip():
        assert refused.value.url == url.strip()
    return refused.value


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "image '' refused: the image URL is empty"),
        ("  \t", "image '  \\t' refused: the image URL is empty"),
        (None, "image None refused: the image URL is empty"),
        ("http://[::1/a.png", "image http://[::1/a.png refused: not a valid URL (Invalid IPv6 URL)"),
        (
            "http://localhost:x/a.png",
            "image http://localhost:x/a.png refused: not a valid URL (Failed to parse: 'localhost:x' is not a "
            "valid host or port)",
        ),
        (
            "ftp://files.example.com/a.png",
            "image ftp://files.example.com/a.png refused: unsupported URL scheme 'ftp'",
        ),
        (
            "https://images.example.com/a.png",
            "image https://images.example.com/a.png refused: host 'images.example.com' is not in "
            "ROI_IMAGE_ALLOWED_HOSTS",
        ),
    ],
)
def test_url_refusals_word_for_word(settings, url, message):
    assert str(refusal_of(url, settings)) == message


def test_a_cloud_uri_without_a_task_id_word_for_word(settings):
    assert str(refusal_of("gs://bucket/key.png", settings, task_id=None)) == (
        "image gs://bucket/key.png refused: a cloud storage URI needs the task id (Label Studio presigns it "
        "per task)"
    )


def test_local_file_refusals_word_for_word(settings, local_root, tmp_path, files):
    (local_root / "imgs" / "loop.png").symlink_to(local_root / "imgs" / "loop.png")
    (local_root / "imgs" / "big.png").write_bytes(files["large.png"])
    small = dataclasses.replace(settings, image_max_bytes=100)
    disabled = dataclasses.replace(settings, local_files_root=None)
    long_name = "a" * 300 + ".png"

    assert [
        str(refusal_of("imgs/a.png", disabled)),
        str(refusal_of("file://files.example.com/imgs/a.png", settings)),
        str(refusal_of("../outside.png", settings)),
        str(refusal_of("imgs/missing.png", settings)),
        str(refusal_of(f"imgs/{long_name}", settings)),
        str(refusal_of("imgs/loop.png", settings)),
        str(refusal_of("imgs/big.png", small)),
    ] == [
        "image imgs/a.png refused: local files are disabled (set ROI_LOCAL_FILES_ROOT to allow a directory)",
        "image file://files.example.com/imgs/a.png refused: file URL names another machine "
        "('files.example.com')",
        "image ../outside.png refused: the path leads outside ROI_LOCAL_FILES_ROOT",
        "image imgs/missing.png refused: no such file",
        f"image imgs/{long_name} refused: cannot read the file (File name too long)",
        "image imgs/loop.png refused: the path is a symlink loop",
        "image imgs/big.png refused: the file is larger than ROI_IMAGE_MAX_BYTES=100",
    ]


def test_file_urls_on_this_machine_are_read_whatever_the_letter_case(settings, local_root):
    path = local_root / "imgs" / "a.png"
    for url in (f"file://localhost{path}", f"FILE://{path}", f"File:{path}"):
        assert load_image(url, task_id=None, settings=settings).size == (64, 48), url


def test_http_refusals_word_for_word(label_studio, other_host, settings, files):
    other_host.serve("/page.png", files["not-an-image"])
    label_studio.redirect("/data/upload/loop.png", "/data/upload/loop.png")
    other_host.serve("/gone.png", b"", status=404)

    assert [
        str(refusal_of(f"{other_host.url}/page.png", settings)),
        str(refusal_of("/data/upload/loop.png", settings)),
        str(refusal_of(f"{other_host.url}/gone.png?sig=secret", settings)),
    ] == [
        f"image {other_host.url}/page.png refused: not an image in a supported format (JPEG, PNG, "
        "WEBP, GIF, BMP, AVIF)",
        "image /data/upload/loop.png refused: more than 3 redirects",
        f"image {other_host.url}/gone.png?sig=secret refused: HTTP 404 from http://localhost:{port_of(other_host)}"
        "/gone.png",
    ]


@pytest.mark.parametrize("status", [429, 500, 502])
def test_too_many_requests_and_server_errors_are_worth_a_retry(other_host, settings, status):
    other_host.serve("/busy.png", b"", status=status)

    with pytest.raises(ImageUnavailable) as failure:
        load_image(f"{other_host.url}/busy.png", task_id=17, settings=settings)
    assert failure.value.problem == f"HTTP {status} from http://localhost:{port_of(other_host)}/busy.png"


def test_a_closed_port_is_worth_a_retry_word_for_word(settings):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once it is closed

    with pytest.raises(ImageUnavailable) as failure:
        load_image(f"http://localhost:{port}/a.png", task_id=17, settings=settings)
    assert str(failure.value) == (
        f"image http://localhost:{port}/a.png refused: cannot connect to http://localhost:{port} (ConnectionError)"
    )


def test_a_host_that_never_accepts_the_connection_is_given_up_on_at_the_timeout(settings):
    # A listener whose queue is full drops further connection attempts, as a firewalled host does.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    waiting = [socket.socket() for _ in range(3)]
    for sock in waiting:
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
    settings = dataclasses.replace(settings, image_timeout_s=0.3)
    refusals: list[ImageRejected] = []

    def fetch() -> None:
        try:
            load_image(f"http://localhost:{port}/a.png", task_id=17, settings=settings)
        except ImageRejected as refusal:
            refusals.append(refusal)

    fetching = threading.Thread(target=fetch, daemon=True)
    fetching.start()
    fetching.join(timeout=3)  # without a connect timeout it would wait for the kernel to give up (minutes)
    for sock in [*waiting, listener]:
        sock.close()
    assert not fetching.is_alive(), "still connecting after 3 s"
    [refusal] = refusals
    assert isinstance(refusal, ImageUnavailable)
    assert str(refusal) == (
        f"image http://localhost:{port}/a.png refused: http://localhost:{port} did not answer within 0.3 s"
    )


@pytest.mark.parametrize("trickle_headers", [False, True], ids=["body", "headers"])
def test_a_trickling_server_is_cut_off_at_the_deadline(settings, trickle_headers):
    server = TrickleServer(
        trickle_headers=trickle_headers, interval_s=0.05, total_s=3.0
    )  # no read waits 0.3 s
    settings = dataclasses.replace(settings, image_timeout_s=0.3)
    url = f"{server.url}/slow.png"
    try:
        with pytest.raises(ImageUnavailable) as failure:
            fetch_image_bytes(url, task_id=17, settings=settings)
    finally:
        server.close()
    if trickle_headers:
        assert str(failure.value) == f"image {url} refused: {server.url} did not answer within 0.3 s"
    else:  # the headers come at once: it is cut off in the body, unless the machine is very slow
        assert re.fullmatch(
            rf"image {url} refused: (the download took longer than|{server.url} did not answer within) 0\.3 s",
            str(failure.value),
        )


def test_the_body_is_asked_for_without_compression(other_host, settings, files):
    other_host.serve("/b.png", files["png"])

    load_image(f"{other_host.url}/b.png", task_id=17, settings=settings)

    [headers] = other_host.headers_for("/b.png")
    assert {name.lower(): value for name, value in headers.items()}["accept-encoding"] == "identity"


def test_a_label_studio_url_with_a_trailing_slash_works(label_studio, settings):
    settings = dataclasses.replace(settings, label_studio_url=label_studio.url + "/")

    assert load_image("/data/upload/3/a.png", task_id=17, settings=settings).size == (64, 48)
    assert [path for _, path, _ in label_studio.requests] == ["/data/upload/3/a.png"]


def test_a_given_session_is_the_one_used(settings, files):
    session = session_answering(ScriptedBody(files["png"]))

    image = load_image("http://localhost:1/a.png", task_id=17, settings=settings, session=session)

    assert image.size == (64, 48)


def test_fetches_and_reuses_are_logged_with_where_the_bytes_came_from(label_studio, settings, caplog):
    caplog.set_level(logging.DEBUG, logger="backend.images")
    cache = RecentImages()

    for _ in range(2):
        fetch_image_bytes("/data/upload/3/a.png", task_id=17, settings=settings, cache=cache)

    assert [record.getMessage() for record in caplog.records if record.name == "backend.images"] == [
        f"fetching image /data/upload/3/a.png from {label_studio.url}/data/upload/3/a.png",
        "image /data/upload/3/a.png: reusing the bytes fetched recently",
    ]
