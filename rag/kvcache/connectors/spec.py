"""KV store URLs, parsed once into a `StoreSpec`: a frozen dataclass whose fields are checked and typed, so
a connector's factory takes values, never strings. `redact_url` hides passwords in anything printed.

Each connector has a parser here (`memory_spec`, `file_spec`, `redis_spec`, `cluster_spec`) that takes a
`UrlParts` (the URL split once, its query parameters in a dict, duplicates refused) and raises
`InvalidInputError` naming the parameter and what it must be. `split_tier` takes the memory tier off a
``memory+...`` URL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from kvrag.errors import InvalidInputError

DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_TIMEOUT = 0.5
DEFAULT_RETRY_AFTER = 2.0
REDIS_PORT = 6379
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class StoreSpec:
    """One KV store URL, parsed and checked. Which fields matter depends on `scheme`:

    - ``memory``: `max_bytes`.
    - ``file``: `path` (the folder, absolute), `max_bytes` (the byte budget of its files: the least recently
      used go past it; None, what `file_spec` sets without ``max_bytes=``: unbounded).
    - ``redis`` / ``rediss`` (TLS): `hosts` (one ``(host, port)``), `db`; ``unix``: `path` (the socket), `db`.
    - ``redis-cluster``: `hosts` (the startup nodes; any reachable one finds the others).
    - all Redis kinds: `username`, `password`, `timeout`, `ttl`, `prefix`, `retry_after`, and `options`:
      redis-py client settings, typed (``(("max_connections", 4),)``).

    `front_bytes` is set for ``memory+...`` URLs: an in-process LRU of that many bytes goes in front.
    `url` is the printable form (password as ``***``, without the tier's parameter); `password` is left
    out of the repr.
    """

    scheme: str
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    max_bytes: int | None = None  # memory: its LRU size (None: the default); file: its budget (None: none)
    timeout: float = DEFAULT_TIMEOUT
    ttl: int | None = None
    prefix: str = ""
    retry_after: float = DEFAULT_RETRY_AFTER
    options: tuple[tuple[str, Any], ...] = ()
    front_bytes: int | None = None

    def option(self, name: str, default: Any = None) -> Any:
        """One of `options` by name."""
        return dict(self.options).get(name, default)


# ------------------------------------------------------------------------------------------ URL helpers


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512M", "2G", "1.5GiB" (binary units)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidInputError(f"bad size {text!r}; write e.g. 1073741824, 512M or 2G")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if n <= 0:
        raise InvalidInputError(f"size {text!r} must be positive")
    return n


def unsplit(parts: Any) -> str:
    """urlunsplit that keeps "scheme://" even when the netloc is empty (memory://?.., unix:///..)."""
    out = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if parts.query:
        out += f"?{parts.query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out


def redact_url(url: str) -> str:
    """`url` with any password (in the user info or a ``password=`` parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        if sep:
            netloc = f"{user}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe=":/*")
    parts = parts._replace(netloc=netloc, query=query)
    return unsplit(parts) if "://" in url else urlunsplit(parts)


@dataclass(frozen=True, eq=False)
class UrlParts:
    """A URL split once: its parts, its query parameters (each at most once), and its printable form."""

    raw: str = field(repr=False)
    parts: SplitResult = field(repr=False)
    params: Mapping[str, str] = field(repr=False)
    printable: str

    @classmethod
    def split(cls, url: str) -> UrlParts:
        printable = redact_url(url)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise InvalidInputError(f"bad KV store URL {printable!r}: {exc}") from None
        params: dict[str, str] = {}
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k in params:
                raise InvalidInputError(f"parameter {k!r} given twice in {printable!r}")
            params[k] = v
        return cls(url, parts, params, printable)

    def only(self, allowed: Iterable[str]) -> None:
        """Refuse parameters not in `allowed`."""
        allowed = list(allowed)
        extra = sorted(set(self.params) - set(allowed))
        if extra:
            accepted = ", ".join(allowed) or "none"
            raise InvalidInputError(
                f"unknown parameter(s) {extra} in {self.printable!r}; accepted: {accepted}"
            )


def split_tier(url: str, tierable: Iterable[str]) -> tuple[UrlParts, int]:
    """(the back store's URL, the memory tier's size) from ``memory+<scheme>://...?mem_bytes=...``."""
    scheme, _, rest = url.partition("://")
    front_kind, _, back_scheme = scheme.lower().partition("+")
    tierable = list(tierable)
    if front_kind != "memory" or back_scheme not in tierable:
        forms = [f"memory+{s}://..." for s in tierable]
        raise InvalidInputError(
            f"bad tiered KV store URL {redact_url(url)!r}: write {', '.join(forms[:-1])} or {forms[-1]}"
        )
    whole = UrlParts.split(f"{back_scheme}://{rest}")
    mem = whole.params.get("mem_bytes")
    size = parse_size(mem) if mem is not None else DEFAULT_MEMORY_BYTES
    kept = [p for p in whole.parts.query.split("&") if p and unquote(p.partition("=")[0]) != "mem_bytes"]
    raw = unsplit(whole.parts._replace(query="&".join(kept)))
    params = {k: v for k, v in whole.params.items() if k != "mem_bytes"}
    return UrlParts(raw, urlsplit(raw), params, redact_url(raw)), size


# -------------------------------------------------------------------------------------- memory and file


def memory_spec(u: UrlParts) -> StoreSpec:
    """``memory://?max_bytes=2G``: an in-process LRU (default 1 GiB)."""
    if u.parts.netloc or u.parts.path not in ("", "/"):
        raise InvalidInputError(f"bad memory KV store URL {u.printable!r}; write memory://?max_bytes=1G")
    u.only(["max_bytes"])
    size = parse_size(u.params["max_bytes"]) if "max_bytes" in u.params else DEFAULT_MEMORY_BYTES
    return StoreSpec("memory", u.printable, max_bytes=size)


def file_spec(u: UrlParts) -> StoreSpec:
    """``file:///abs/path?max_bytes=20G``: one file per key under the folder; with ``max_bytes`` (K/M/G/T
    suffixes), the least recently used files are deleted to keep their total within it (default: no limit)."""
    u.only(["max_bytes"])
    path = unquote(u.parts.path)
    if u.parts.netloc not in ("", "localhost") or not path.startswith("/"):
        raise InvalidInputError(
            f"file KV store URLs need an absolute path, like file:///var/cache/kvrag; got {u.printable!r}"
        )
    size = None
    if "max_bytes" in u.params:
        try:
            size = parse_size(u.params["max_bytes"])
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"file KV store URL parameter max_bytes in {u.printable!r}: {exc} (leave it out for no limit)"
            ) from None
    return StoreSpec("file", u.printable, path=path, max_bytes=size)


# ------------------------------------------------------------------------------------------------ Redis


def _number(minimum: float, *, strict: bool) -> Callable[[str, str], float]:
    def parse(name: str, value: str) -> float:
        try:
            out = float(value)
        except ValueError:
            out = float("nan")
        if not (out > minimum if strict else out >= minimum):
            sign = ">" if strict else ">="
            raise InvalidInputError(f"Redis URL parameter {name}={value!r} must be a number {sign} {minimum}")
        return out

    return parse


def _integer(minimum: int, *choices: int) -> Callable[[str, str], int]:
    def parse(name: str, value: str) -> int:
        try:
            out = int(value)
        except ValueError:
            out = minimum - 1
        if out < minimum or (choices and out not in choices):
            what = " or ".join(map(str, choices)) if choices else f"an integer >= {minimum}"
            raise InvalidInputError(f"Redis URL parameter {name}={value!r} must be {what}")
        return out

    return parse


def _flag(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "y", "t", "on"):
        return True
    if text in ("0", "false", "no", "n", "f", "off"):
        return False
    raise InvalidInputError(f"Redis URL parameter {name}={value!r} must be true or false")


def _text(name: str, value: str) -> str:
    return value


def _ttl(name: str, value: str) -> int:
    try:
        out = int(value)
    except ValueError:
        out = 0
    if out <= 0:
        raise InvalidInputError(f"Redis URL parameter ttl={value!r} must be a positive integer")
    return out


# the store's own parameters: spec field -> parser
_OWN: dict[str, Callable[[str, str], Any]] = {
    "timeout": _number(0.0, strict=True),
    "ttl": _ttl,
    "prefix": _text,
    "retry_after": _number(0.0, strict=False),
}
# identity: spec fields
_IDENTITY: dict[str, Callable[[str, str], Any]] = {"username": _text, "password": _text, "db": _integer(0)}
# redis-py client settings passed through (typed), and the schemes that take them
_SSL = ("rediss",)
_TCP = ("redis", "rediss")
_OPTIONS: dict[str, tuple[Callable[[str, str], Any], tuple[str, ...]]] = {
    "client_name": (_text, ()),
    "max_connections": (_integer(1), ()),
    "health_check_interval": (_integer(0), ()),
    "socket_timeout": (_number(0.0, strict=True), ()),
    "socket_connect_timeout": (_number(0.0, strict=True), ()),
    "socket_keepalive": (_flag, _TCP),
    "socket_read_size": (_integer(1), ()),
    "protocol": (_integer(2, 2, 3), ()),
    "ssl_cert_reqs": (_text, _SSL),
    "ssl_ca_certs": (_text, _SSL),
    "ssl_ca_path": (_text, _SSL),
    "ssl_certfile": (_text, _SSL),
    "ssl_keyfile": (_text, _SSL),
    "ssl_check_hostname": (_flag, _SSL),
    "ssl_min_version": (_integer(0), _SSL),
}
_CLUSTER_OPTIONS = ("client_name", "max_connections")


def _redis_params(
    u: UrlParts, scheme: str, identity: Iterable[str], options: Iterable[str]
) -> dict[str, Any]:
    """The typed spec fields (own and identity) and ``options`` from a Redis URL's parameters."""
    identity, options = list(identity), list(options)
    what = "Redis Cluster" if scheme == "redis-cluster" else "Redis"
    out: dict[str, Any] = {}
    passed: list[tuple[str, Any]] = []
    for name, value in u.params.items():
        if name in _OWN:
            out[name] = _OWN[name](name, value)
        elif name in identity:
            out[name] = _IDENTITY[name](name, value)
        elif name in options:
            parse, schemes = _OPTIONS[name]
            if schemes and scheme not in schemes:
                raise InvalidInputError(
                    f"{what} URL parameter {name!r} needs a {' or '.join(s + '://' for s in schemes)} URL"
                )
            passed.append((name, parse(name, value)))
        else:
            allowed = ", ".join(sorted((*_OWN, *identity, *options)))
            raise InvalidInputError(f"unknown {what} URL parameter {name!r}; accepted: {allowed}")
    out["options"] = tuple(passed)
    return out


def _userinfo(parts: SplitResult, fields: dict[str, Any]) -> None:
    """The user name and password of the URL's user info (they win over ``username=`` / ``password=``)."""
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at:
        return
    user, sep, password = userinfo.partition(":")
    if user:
        fields["username"] = unquote(user)
    if sep and password:
        fields["password"] = unquote(password)


def redis_spec(u: UrlParts) -> StoreSpec:
    """``redis://[:password@]host:port/db?...``, ``rediss://...`` (TLS), ``unix:///path.sock?db=0&...``."""
    parts, scheme = u.parts, u.parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise InvalidInputError(f"not a Redis URL: {u.printable!r} (use redis://, rediss:// or unix://)")
    fields = _redis_params(u, scheme, _IDENTITY, _OPTIONS)
    _userinfo(parts, fields)
    if scheme == "unix":
        path = unquote(parts.path)
        if not path:
            raise InvalidInputError(f"Redis unix socket URL {u.printable!r} needs a path: unix:///path.sock")
        return StoreSpec(scheme, u.printable, path=path, **fields)
    try:
        port = parts.port or REDIS_PORT
    except ValueError:
        raise InvalidInputError(f"bad port in Redis URL {u.printable!r}") from None
    path = unquote(parts.path).strip("/")
    if "db" not in fields and path:
        if not path.isdigit():
            raise InvalidInputError(
                f"the path of Redis URL {u.printable!r} must be a database number, like /0"
            )
        fields["db"] = int(path)
    host = unquote(parts.hostname) if parts.hostname else "localhost"
    return StoreSpec(scheme, u.printable, hosts=((host, port),), **fields)


def _cluster_nodes(u: UrlParts, hosts: str) -> tuple[tuple[str, int], ...]:
    """((host, port), ...) from "h1:p1,h2:p2,[::1]:p3" (port 6379 where none is given)."""
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if item.startswith("["):
            host, close, rest = item[1:].partition("]")
            if not close or (rest and not rest.startswith(":")):
                raise InvalidInputError(f"bad node {item!r} in {u.printable!r}")
            port_text = rest[1:]
        else:
            host, sep, port_text = item.rpartition(":")
            if not sep:
                host, port_text = item, ""
        if not host:
            raise InvalidInputError(f"Redis Cluster URL {u.printable!r} needs host:port[,host:port...] nodes")
        try:
            port = int(port_text) if port_text else REDIS_PORT
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise InvalidInputError(f"bad port {port_text!r} for node {host!r} in {u.printable!r}")
        nodes.append((host, port))
    return tuple(nodes)


def cluster_spec(u: UrlParts) -> StoreSpec:
    """``redis-cluster://[:password@]host:port[,host:port...]?timeout=&ttl=&prefix=&retry_after=``."""
    parts = u.parts
    if parts.scheme.lower() != "redis-cluster":
        raise InvalidInputError(
            f"not a Redis Cluster URL: {u.printable!r} (use redis-cluster://host:port,...)"
        )
    if parts.path not in ("", "/", "/0"):
        raise InvalidInputError(
            f"Redis Cluster has one database (0); drop the path {parts.path!r} from {u.printable!r}"
        )
    hosts = _cluster_nodes(u, parts.netloc.rpartition("@")[2])
    fields = _redis_params(u, "redis-cluster", ("username", "password"), _CLUSTER_OPTIONS)
    _userinfo(parts, fields)
    return StoreSpec("redis-cluster", u.printable, hosts=hosts, **fields)
