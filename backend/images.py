"""Fetch and decode a task's image, refusing anything unsafe or unreasonable: the one image fetcher.

The worker decodes images to run the model on them (`load_image`); the export keeps the original bytes and
needs the displayed size (`fetch_image_bytes`, then `decode_image`). Both follow the same rules, so a task
whose image the worker could read is exported, and one it refused is not.

A task's image URL comes from Label Studio task data, which any annotator or import can set, so it is
untrusted (reliability.md §2.4, §3). Where an image may come from:

* Label Studio itself: relative URLs (`/data/upload/...`, `/data/local-files/?d=...`, other `/data/...`),
  fetched from settings.label_studio_url with the API key, as label-studio-sdk sends it: a legacy token as
  `Token <key>`; a personal access token (a JWT refresh token) exchanged by the SDK for a short-lived
  access token sent as `Bearer`, renewed when it expires. The key goes to Label Studio's exact
  origin and its media paths only (backend/url_policy.py decides, on the request as it will be sent),
  never to another host, and is never logged.
* Cloud storage URIs (`s3://`, `gs://`, `azure-blob://`): through Label Studio's presign endpoint, which
  redirects to a signed URL; that URL's host must be allowed like any other.
* Absolute http(s) URLs: only when the host is in settings.image_allowed_hosts (ROI_IMAGE_ALLOWED_HOSTS,
  entries "host" or "host:port", matched exactly); Label Studio's own origin is always allowed. URLs with
  backslashes or user info are refused (backend/url_policy.py).
* Local files (plain paths, relative ones taken from the root, or file:// URLs): only inside
  settings.local_files_root (ROI_LOCAL_FILES_ROOT), after resolving symlinks and `..`.

Limits: at most image_max_bytes, counted while streaming; image_timeout_s for connecting, for each read, and
for the whole download from connect to last byte, redirects included (backend/deadline_http.py: a server
trickling its headers or body is cut off); at most 3 redirects, each checked again; image_max_pixels checked from the header
before decoding, and Pillow's decompression-bomb warning treated as an error; only formats a browser shows
(Label Studio displays the image the boxes were drawn on). The result is the first frame, EXIF orientation
applied (box coordinates refer to the displayed image, DESIGN.md), in RGB; transparency is composited onto
white.

Every refusal raises ImageRejected naming the URL and the problem. ImageUnavailable, a subclass, marks a
failure that may pass (timeout, connection error, HTTP 429/5xx): worth a retry, unlike the others.

`RecentImages` keeps the bytes fetched in the last minute: an annotator drawing several boxes on one image
starts one describe job per box, and each would download the same image again. Only the download is saved;
the bytes are decoded, with every check, on each use.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import requests
from cachetools import LRUCache, TTLCache
from PIL import Image

from backend.deadline_http import Deadline, deadline_session
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.settings import Settings
from backend.url_policy import Target, UrlRefused, check_target, refuse_ambiguous
from roi_contract.images import TooManyPixels, UndecodableImage, decode_displayed

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
LABEL_STUDIO_PREFIXES = ("/data/", "/storage-data/")
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
_CHUNK_BYTES = 64 * 1024


class ImageRejected(ValueError):
    """The image cannot be used; the message names the URL and the problem."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"image {url} refused: {problem}")
        self.url = url
        self.problem = problem


class ImageUnavailable(ImageRejected):
    """The image could not be fetched for a reason that may pass (timeout, connection error, HTTP 429/5xx)."""


class RecentImages:
    """Image bytes fetched in the last `ttl_s` seconds, at most `max_bytes` of them; safe to share by threads.

    An entry is keyed by the URL, the task id and the settings it was fetched under: two tasks never share
    bytes, and a hit returns only what a fetch under the same host, path and size rules returned. An entry
    lives `ttl_s` from its fetch however often it is used, so an image replaced in Label Studio is seen
    again soon. When the bytes would exceed `max_bytes`, the least recently used entries go first (expired
    ones before them); an image larger than that is not kept.
    """

    def __init__(
        self,
        *,
        ttl_s: float = 60.0,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError(
                f"ttl_s and max_bytes must be positive, got ttl_s={ttl_s}, max_bytes={max_bytes}"
            )
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: TTLCache[tuple, bytes] = TTLCache(max_bytes, ttl_s, timer=clock, getsizeof=len)

    def get(self, url: str, task_id: int | None, settings: Settings) -> bytes | None:
        with self._lock:
            return self._entries.get((url, task_id, settings))

    def put(self, url: str, task_id: int | None, settings: Settings, data: bytes) -> None:
        key = (url, task_id, settings)
        with self._lock:
            self._entries.pop(key, None)
            if len(data) <= self.max_bytes:
                self._entries[key] = data

    @property
    def size_bytes(self) -> int:
        """The bytes held now, expired entries included until the next put drops them."""
        with self._lock:
            return int(self._entries.currsize)


def load_image(
    url: str,
    *,
    task_id: int | None,
    settings: Settings,
    session: requests.Session | None = None,
    cache: RecentImages | None = None,
) -> Image.Image:
    """The image at `url` (from the task with `task_id`) as RGB, EXIF orientation applied, first frame only."""
    url = _checked_url(url)
    data = fetch_image_bytes(url, task_id=task_id, settings=settings, session=session, cache=cache)
    return decode_image(data, url=url, settings=settings)


def fetch_image_bytes(
    url: str,
    *,
    task_id: int | None,
    settings: Settings,
    session: requests.Session | None = None,
    cache: RecentImages | None = None,
) -> bytes:
    """The undecoded bytes at `url` (from the task with `task_id`), within the host, byte and time limits.

    `session` (from image_session) lets a caller fetching many images reuse connections; without one, each
    call opens its own. With a `cache`, bytes fetched for the same URL and task shortly before are reused.
    """
    url = _checked_url(url)
    if cache is not None and (data := cache.get(url, task_id, settings)) is not None:
        log.debug("image %s: reusing the bytes fetched recently", url)
        return data
    data = _read_local(url, settings) if _is_local_path(url) else _download(url, task_id, settings, session)
    if cache is not None:
        cache.put(url, task_id, settings, data)
    return data


def decode_image(data: bytes, *, url: str, settings: Settings) -> Image.Image:
    """`data` decoded as displayed (roi_contract.images, the decoder training uses too); `url` names it in errors."""
    try:
        return decode_displayed(data, max_pixels=settings.image_max_pixels)
    except TooManyPixels as error:
        pixels = error.width * error.height
        raise ImageRejected(
            url,
            f"{error.width}x{error.height} is {pixels} pixels, more than ROI_IMAGE_MAX_PIXELS={error.limit}",
        ) from None
    except UndecodableImage as error:
        raise ImageRejected(url, error.problem) from None


def image_session() -> requests.Session:
    """A session for fetch_image_bytes: no proxies or .netrc from the environment, downloads under a deadline."""
    return deadline_session()


# --- where the bytes come from -------------------------------------------------------------------------


def _checked_url(url: object) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ImageRejected(repr(url), "the image URL is empty")
    url = url.strip()
    try:
        urlsplit(url)
    except ValueError as error:  # e.g. an unclosed "[" of an IPv6 host
        raise ImageRejected(url, f"not a valid URL ({error})") from None
    return url


def _is_local_path(url: str) -> bool:
    if url.startswith(LABEL_STUDIO_PREFIXES):
        return False
    scheme = urlsplit(url).scheme.lower()
    return scheme in ("", "file")


def _read_local(url: str, settings: Settings) -> bytes:
    if settings.local_files_root is None:
        raise ImageRejected(url, "local files are disabled (set ROI_LOCAL_FILES_ROOT to allow a directory)")
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageRejected(url, f"file URL names another machine ({parts.netloc!r})")
        path = Path(url2pathname(parts.path))
    else:
        path = Path(url)
    root = Path(settings.local_files_root).resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root; symlinks and `..` are resolved
    except RuntimeError:  # Python 3.11's word for a symlink loop
        raise ImageRejected(url, "the path is a symlink loop") from None
    if not resolved.is_relative_to(root):
        raise ImageRejected(url, "the path leads outside ROI_LOCAL_FILES_ROOT")
    try:
        with open(resolved, "rb") as file:
            data = file.read(settings.image_max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ImageRejected(url, "no such file") from None
    except OSError as error:
        raise ImageRejected(url, f"cannot read the file ({error.strerror})") from None
    if len(data) > settings.image_max_bytes:
        raise ImageRejected(url, f"the file is larger than ROI_IMAGE_MAX_BYTES={settings.image_max_bytes}")
    return data


def _download(url: str, task_id: int | None, settings: Settings, session: requests.Session | None) -> bytes:
    target = _http_target(url, task_id, settings)
    own_session = session is None
    if own_session:
        session = image_session()
    try:
        with Deadline(settings.image_timeout_s) as deadline:
            return _follow(url, target, settings, session, deadline)
    finally:
        if own_session:
            session.close()


def _http_target(url: str, task_id: int | None, settings: Settings) -> str:
    label_studio = settings.label_studio_url.rstrip("/")
    if url.startswith(LABEL_STUDIO_PREFIXES):
        return label_studio + url
    scheme = urlsplit(url).scheme.lower()
    if scheme in CLOUD_SCHEMES:
        if task_id is None:
            raise ImageRejected(
                url, "a cloud storage URI needs the task id (Label Studio presigns it per task)"
            )
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        return f"{label_studio}/tasks/{int(task_id)}/presign/?fileuri={fileuri}"
    if scheme in ("http", "https"):
        return url
    raise ImageRejected(url, f"unsupported URL scheme {scheme!r}")


def _follow(
    url: str, target: str, settings: Settings, session: requests.Session, deadline: Deadline
) -> bytes:
    timeout = settings.image_timeout_s
    for hop in range(MAX_REDIRECTS + 1):
        request, checked = _checked_request(url, target, settings, session, redirected=hop > 0)
        where = f"{checked.origin}{checked.path}"
        if checked.label_studio:
            request.headers.update(_auth_headers(url, settings))
        log.debug("fetching image %s from %s", url, where)
        try:
            response = session.send(request, stream=True, allow_redirects=False, timeout=(timeout, timeout))
        except requests.Timeout:
            raise ImageUnavailable(url, f"{checked.origin} did not answer within {timeout:g} s") from None
        except requests.RequestException as error:
            if deadline.expired:
                raise ImageUnavailable(url, f"{checked.origin} did not answer within {timeout:g} s") from None
            raise ImageUnavailable(
                url, f"cannot connect to {checked.origin} ({type(error).__name__})"
            ) from None
        with response:
            if response.is_redirect:
                target = urljoin(request.url, response.headers["Location"])
                continue
            if response.status_code != 200:
                failure = (
                    ImageUnavailable
                    if response.status_code == 429 or response.status_code >= 500
                    else ImageRejected
                )
                raise failure(url, f"HTTP {response.status_code} from {where}")
            return _read_capped(response, url, settings, deadline)
    raise ImageRejected(url, f"more than {MAX_REDIRECTS} redirects")


def _checked_request(
    url: str, target: str, settings: Settings, session: requests.Session, *, redirected: bool
) -> tuple[requests.PreparedRequest, Target]:
    """The request exactly as it will be sent, and where it goes; ImageRejected unless it may go there."""
    where = f"redirect to {_without_query(target)}: " if redirected else ""
    try:
        refuse_ambiguous(target)
        try:
            request = session.prepare_request(
                requests.Request("GET", target, headers={"Accept-Encoding": "identity"})
            )
        except (requests.RequestException, ValueError) as error:
            raise UrlRefused(f"not a valid URL ({error})") from None
        checked = check_target(request.url, settings.label_studio_url, settings.image_allowed_hosts)
    except UrlRefused as refusal:
        raise ImageRejected(url, f"{where}{refusal}") from None
    return request, checked


def _read_capped(response: requests.Response, url: str, settings: Settings, deadline: Deadline) -> bytes:
    limit = settings.image_max_bytes
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageRejected(url, f"{declared} bytes is more than ROI_IMAGE_MAX_BYTES={limit}")
    body = bytearray()
    try:
        for chunk in response.iter_content(_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                raise ImageRejected(url, f"the body is larger than ROI_IMAGE_MAX_BYTES={limit}")
    except requests.RequestException as error:  # read timeouts surface here as ConnectionError
        if deadline.expired:
            raise ImageUnavailable(
                url, f"the download took longer than {settings.image_timeout_s:g} s"
            ) from None
        raise ImageUnavailable(url, f"the download broke off ({type(error).__name__})") from None
    if deadline.expired:
        # The timer shut the socket between two reads: what arrived may be a cut-off body.
        raise ImageUnavailable(url, f"the download took longer than {settings.image_timeout_s:g} s")
    return bytes(body)


def _without_query(url: str) -> str:
    """A URL fit for messages and logs: signed URLs carry credentials in their query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# --- Label Studio credentials --------------------------------------------------------------------------


_label_studio_clients: LRUCache[tuple[str, str, float], LabelStudioClient] = LRUCache(maxsize=8)
_clients_lock = threading.Lock()


def _auth_headers(url: str, settings: Settings) -> dict[str, str]:
    """Label Studio's credentials, as its SDK sends them: the legacy token, or an access token for a personal
    access token (the SDK exchanges and renews it). Only for requests url_policy found to go to Label Studio."""
    if not settings.label_studio_api_key:
        return {}
    key = (settings.label_studio_url, settings.label_studio_api_key, settings.image_timeout_s)
    try:
        with _clients_lock:
            client = _label_studio_clients.get(key)
            if client is None:
                client = _label_studio_clients[key] = LabelStudioClient(*key)
        return client.auth_header()
    except LabelStudioError as error:
        if error.status_code in (400, 401, 403):
            raise ImageRejected(
                url, f"Label Studio refused LABEL_STUDIO_API_KEY (HTTP {error.status_code})"
            ) from None
        raise ImageUnavailable(url, f"cannot renew the Label Studio access token ({error.message})") from None
