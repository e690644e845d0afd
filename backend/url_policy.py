"""Which hosts an image request may go to, and which request may carry Label Studio's credentials.

Every decision is taken on the URL exactly as the HTTP client will use it: the prepared request's URL,
parsed by urllib3, the parser urllib3's connection pools connect with. Parsers disagree on odd URLs
(`http://a\\@b/` is host b to urllib.parse and host a to urllib3), so the odd ones are refused outright:
backslashes, user info, and any URL whose host or port two parsers read differently.

* A request may go to Label Studio's exact origin (scheme, host and port of LABEL_STUDIO_URL), and there
  only to its media paths (`/data/...`, `/storage-data/...`, `/tasks/<id>/presign/`), after dot segments
  are resolved; only such a request carries the API key.
* Any other origin must be in ROI_IMAGE_ALLOWED_HOSTS: an entry "host" allows that host on every port,
  "host:port" that port only; hosts compare exactly, letter case aside (no suffix or look-alike matches).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
_MEDIA_PATH = re.compile(r"/(data|storage-data)/.*|/tasks/\d+/presign/", re.DOTALL)
# Encoded dots, slashes and backslashes: a server that decodes them could leave the media paths.
_ENCODED_SEPARATORS = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


class UrlRefused(ValueError):
    """The URL may not be fetched; the message says why."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    origin: Origin
    path: str
    label_studio: bool  # Label Studio's own origin: the request carries its credentials


def origin_of(url: str) -> Origin:
    """Where urllib3 connects for `url`; UrlRefused for a URL it cannot parse or with no http(s) host."""
    try:
        parts = parse_url(url)
    except LocationParseError as error:
        raise UrlRefused(f"not a valid URL ({error})") from None
    scheme = (parts.scheme or "").lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused(f"unsupported URL scheme {parts.scheme!r}")
    if not parts.host:
        raise UrlRefused("the URL has no host")
    return Origin(scheme, parts.host.lower(), parts.port or DEFAULT_PORTS[scheme])


def check_target(
    prepared_url: str, label_studio_url: str, allowed_hosts: tuple[str, ...] | frozenset[str]
) -> Target:
    """The target of a prepared request URL if it may be fetched; UrlRefused naming the reason if not."""
    refuse_ambiguous(prepared_url)
    origin = origin_of(prepared_url)
    parts = parse_url(prepared_url)
    if parts.auth is not None:
        raise UrlRefused("the URL carries user info ('user@host'), which is never sent")
    _check_parsers_agree(prepared_url, origin)
    path = parts.path or "/"
    if origin == origin_of(label_studio_url):
        if not _MEDIA_PATH.fullmatch(path) or _ENCODED_SEPARATORS.search(path):
            raise UrlRefused(f"{path!r} is not a Label Studio media path (/data/..., /storage-data/...)")
        return Target(origin, path, label_studio=True)
    allowed = {entry.strip().lower() for entry in allowed_hosts}
    if origin.host in allowed or f"{origin.host}:{origin.port}" in allowed:
        return Target(origin, path, label_studio=False)
    raise UrlRefused(f"host {origin.host!r} is not in ROI_IMAGE_ALLOWED_HOSTS")


def refuse_ambiguous(url: str) -> None:
    """Refuse what HTTP clients and URL parsers read differently, before anything else looks at the URL."""
    if "\\" in url:
        raise UrlRefused("the URL contains a backslash (URL parsers disagree on where its host ends)")
    if any(ord(character) < 0x21 or ord(character) == 0x7F for character in url):
        raise UrlRefused("the URL contains whitespace or control characters")


def _check_parsers_agree(url: str, origin: Origin) -> None:
    split = urlsplit(url)
    try:
        port = split.port or DEFAULT_PORTS.get(split.scheme.lower())
    except ValueError:
        port = None
    host = (split.hostname or "").lower()
    if (host, port) != (origin.host.strip("[]"), origin.port):
        raise UrlRefused(f"URL parsers disagree on its host ({host!r} or {origin.host!r})")
