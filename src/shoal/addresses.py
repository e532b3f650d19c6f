"""Engine URLs: one string names a standalone server, a Cluster or a Sentinel group.

| form                                                          | engine                        |
|---------------------------------------------------------------|-------------------------------|
| ``redis://[[user]:password@]host:port/db``                    | one server (``rediss``: TLS)  |
| ``unix://[[user]:password@]/path/to.sock?db=0``               | one server on a unix socket   |
| ``redis+cluster://[[user]:password@]host:port[,host:port…]``  | a Cluster, from seed nodes    |
| ``redis+sentinel://[[user]:password@]host:port[,…]/service[/db]`` | the primary a Sentinel    |
|                                                               | group names ``service``       |

``rediss+cluster`` and ``rediss+sentinel`` use TLS. The password in a Cluster or
Sentinel URL is the data nodes' password; Sentinels with a password of their own
take it as ``?sentinel_password=…``. redis-py parses the plain forms; the other two
are parsed here because redis-py has no URL form for a list of hosts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from shoal.errors import ConfigurationError

Kind = Literal["standalone", "cluster", "sentinel"]

_PLAIN = ("redis", "rediss", "unix")
_MULTI: dict[str, tuple[Kind, bool]] = {
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_PASSWORD = re.compile(r"(?P<head>^[a-z+]+://[^:@/]*:)(?P<password>[^@]*)(?P<tail>@)")
_EXAMPLES = (
    "redis://:password@127.0.0.1:6379/0, "
    "redis+cluster://:password@10.0.0.1:7000,10.0.0.2:7000 or "
    "redis+sentinel://:password@10.0.0.1:26379,10.0.0.2:26379/mymaster"
)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for messages and logs)."""
    return _PASSWORD.sub(r"\g<head>***\g<tail>", url, count=1)


@dataclass(frozen=True)
class EngineAddress:
    """What an engine URL names, parsed once."""

    url: str = field(repr=False)  # may hold passwords: reprs never show them
    kind: Kind
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    service: str = ""
    db: int = 0
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def masked(self) -> str:
        return mask_url(self.url)


def parse(url: str) -> EngineAddress:
    """Parse and check an engine URL, with a message naming the accepted forms."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"engine URL {url!r} is not a URL: use {_EXAMPLES}")
    scheme = url.split("://", 1)[0].lower()
    if scheme in _PLAIN:
        return EngineAddress(url, "standalone")
    if scheme not in _MULTI:
        raise ConfigurationError(
            f"engine URL {mask_url(url)!r} has scheme {scheme!r}: use redis://, rediss://, "
            f"unix://, redis+cluster:// or redis+sentinel:// (for example {_EXAMPLES})"
        )
    kind, tls = _MULTI[scheme]
    rest = url.split("://", 1)[1]
    location, _, query = rest.partition("?")
    netloc, _, path = location.partition("/")
    credentials, _, host_list = netloc.rpartition("@")
    username, password = _credentials(credentials)
    hosts = _hosts(host_list, url)
    options = parse_qs(query)
    service, db = _service_and_db(kind, path, url)
    sentinel_password = options.get("sentinel_password", [None])[0]
    return EngineAddress(url, kind, hosts, username, password, tls, service, db, sentinel_password)


def _credentials(text: str) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    user, sep, password = text.partition(":")
    return (unquote(user) or None), (unquote(password) if sep else None)


def _hosts(text: str, url: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in text.split(","):
        parts = urlsplit(f"//{item.strip()}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigurationError(
                f"engine URL {mask_url(url)!r}: {item.strip()!r} is not host:port "
                f"(list seed nodes or sentinels as host:port,host:port; e.g. {_EXAMPLES})"
            )
        hosts.append((parts.hostname, port))
    return tuple(hosts)


def _service_and_db(kind: Kind, path: str, url: str) -> tuple[str, int]:
    segments = [unquote(s) for s in path.split("/") if s]
    if kind == "cluster":
        if segments not in ([], ["0"]):
            raise ConfigurationError(
                f"engine URL {mask_url(url)!r}: a Cluster has only database 0; "
                "drop the path (redis+cluster://host:port,host:port)"
            )
        return "", 0
    if not segments or len(segments) > 2:
        raise ConfigurationError(
            f"engine URL {mask_url(url)!r}: name the Sentinel service, as in "
            "redis+sentinel://host:26379,host:26380/mymaster (or …/mymaster/0 for a database)"
        )
    db = segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise ConfigurationError(f"engine URL {mask_url(url)!r}: database {db!r} is not a number")
    return segments[0], int(db)
