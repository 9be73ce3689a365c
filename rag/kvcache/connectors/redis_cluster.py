"""The Redis Cluster connector (``redis-cluster://host:port[,host:port...]``), through redis-py's public
cluster API: a `redis.cluster.RedisCluster` holds the slot map, and every batch is one of its pipelines
(`RedisCluster.pipeline()`).

A batch is one command per hash slot (an MGET or DEL of that slot's keys) or per key (SET, EXISTS), all in
one cluster pipeline. redis-py groups the pipeline by node, writes every node's commands before reading any
reply, and reads them node by node: one round trip per node touched, the nodes working at the same time.
The store routes the batch too (`RedisCluster.get_node_from_key`), to leave out nodes it has backed off and
to know which node a failure belongs to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.connectors.backoff import Backoff, redis_errors
from kvrag.rag.kvcache.connectors.base import KVStore, StoreStats, check_items, check_keys, log
from kvrag.rag.kvcache.connectors.spec import StoreSpec, UrlParts, cluster_spec

# A unit is what one pipelined command covers: the positions of its keys in the batch (or, for ping,
# the node it asks). `Groups` maps a node name to the units it is sent.
Groups = dict[str, list[Any]]
Command = Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cluster_ok(reply: Any) -> bool:
    """Whether a CLUSTER INFO reply (parsed to a dict, or the raw text) says ``cluster_state:ok``."""
    if isinstance(reply, Exception):
        return False
    if isinstance(reply, Mapping):
        return _text(reply.get("cluster_state", reply.get(b"cluster_state"))) == "ok"
    return "cluster_state:ok" in _text(reply)


class RedisClusterStore(KVStore):
    """Redis Cluster via redis-py's `RedisCluster` and its pipelines.

    A batch is one cluster pipeline (an MGET per slot for reads, a SET per key for writes): one round trip
    per node touched, the nodes working at the same time. ``round_trips`` counts those per-node exchanges.

    A node that fails (connection refused, timeout, CLUSTERDOWN) costs an error and is skipped for
    `retry_after` seconds: its keys read as missing, its writes are dropped (``skipped`` counts the skipped
    node batches), while keys on the other nodes are served as usual; a node that hangs costs one timeout.
    When a node cannot be reached the pipeline stops before sending; redis-py then reloads its slot map,
    and the store routes the batch again and sends it node by node, so the other nodes answer in the same
    call and a replica promoted in a dead master's place serves its keys at once. A MOVED or ASK reply
    reads as missing and makes the store load a new slot map (a new client) before the next call
    (``redirects``); so do keys in slots no node serves. ``refreshes`` counts slot map loads: the client
    built, rebuilt, or reloaded by redis-py after a node could not be reached. If no node at all answers
    for the slot map, the whole store answers as unavailable for `retry_after` seconds, like `RedisStore`.

    Takes a spec from `parse_store_url` (or a ``redis-cluster://`` URL, parsed here).
    """

    kind = "redis-cluster"
    _EXTRA_COUNTERS = ("skipped", "round_trips", "refreshes", "redirects")

    def __init__(self, spec: StoreSpec | str) -> None:
        from redis import exceptions

        if isinstance(spec, str):
            spec = cluster_spec(UrlParts.split(spec.strip()))
        if spec.scheme != "redis-cluster" or spec.front_bytes is not None:
            raise InvalidInputError(
                f"not a Redis Cluster URL: {spec.url!r} (use redis-cluster://host:port,...)"
            )
        super().__init__(spec.url)
        self.spec = spec
        self.nodes = list(spec.hosts)
        self.timeout, self.retry_after, self.ttl, self.prefix = (
            spec.timeout,
            spec.retry_after,
            spec.ttl,
            spec.prefix,
        )
        kwargs: dict[str, Any] = {
            k: v for k, v in (("username", spec.username), ("password", spec.password)) if v
        }
        kwargs.update(spec.options)
        kwargs.update(socket_timeout=spec.timeout, socket_connect_timeout=spec.timeout)
        self._client_kwargs = kwargs
        self._errors, down = redis_errors()
        self._backoff = Backoff(self, "Redis Cluster", spec.retry_after, down)
        self._redirect: tuple[type[BaseException], ...] = (exceptions.AskError,)  # MovedError is one too
        self._uncovered: type[BaseException] = exceptions.SlotNotCoveredError
        self._client: Any = None
        self._stale = False  # a new slot map is to be loaded before the next call
        self._lock = threading.Lock()  # guards the client and its users
        self._build_lock = threading.Lock()  # one call builds a client at a time
        self._users: dict[int, int] = {}  # id(client) -> calls using it

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> RedisClusterStore:
        return cls(spec)

    # ------------------------------------------------------------------------------------------ client

    def _build(self) -> Any:
        """A client with its slot map, from the URL's nodes and those the current client knows (nodes
        backed off last)."""
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        known = [(n.host, n.port) for n in self._client.get_nodes()] if self._client is not None else []
        down = set(self._backoff.backed_off())
        startup = list(dict.fromkeys([*self.nodes, *known]))
        startup.sort(key=lambda hp: f"{hp[0]}:{hp[1]}" in down)
        self._count(refreshes=1)
        # One retry while starting, so that the command table is read from another node when the first
        # master is down; none afterwards: a batch never waits on retries, the back-off decides.
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in startup],
            require_full_coverage=False,
            retry=Retry(NoBackoff(), 1),
            **self._client_kwargs,
        )
        client.set_retry(Retry(NoBackoff(), 0))
        return client

    @contextmanager
    def _session(self, *, force: bool = False) -> Iterator[Any]:
        """The client for one call (built, or rebuilt when stale, first), or None while the cluster is
        unavailable (`force`: build it even then). A client replaced meanwhile is closed after its last
        call."""
        client = self._acquire(force)
        try:
            yield client
        finally:
            if client is not None:
                self._release(client)

    def _acquire(self, force: bool) -> Any:
        if not force and not self._backoff.allow():
            return None
        if self._client is None or self._stale:
            with self._build_lock:
                if self._client is None or self._stale:
                    if not force and self._backoff.blocked():  # another call failed to build it meanwhile
                        self._count(skipped=1)
                        return None
                    try:
                        client = self._build()
                    except self._errors as exc:
                        self._stale = self._client is not None
                        self._backoff.failed("slot map", exc, down=True)
                        return None
                    with self._lock:
                        retired, self._client, self._stale = self._client, client, False
                        busy = retired is not None and bool(self._users.get(id(retired)))
                    if retired is not None and not busy:  # else its last call closes it
                        self._close_client(retired)
        with self._lock:
            client = self._client
            if client is not None:
                self._users[id(client)] = self._users.get(id(client), 0) + 1
        return client

    def _release(self, client: Any) -> None:
        with self._lock:
            users = self._users.pop(id(client)) - 1
            if users:
                self._users[id(client)] = users
                return
            retired = client is not self._client
        if retired:
            self._close_client(client)

    def _close_client(self, client: Any) -> None:
        try:
            client.close()
        except self._errors as exc:
            log.debug("closing Redis Cluster KV store %s: %s", self.url, exc)

    # --------------------------------------------------------------------------------------- exchanges

    def _names(self, keys: Sequence[str]) -> list[bytes]:
        return [(self.prefix + k).encode("utf-8", "surrogatepass") for k in keys]

    def _router(self, client: Any, names: list[bytes], units: list[list[int]]) -> Callable[[bool], Groups]:
        """Route `units` (lists of key positions, each within one slot) by the current slot map: node name
        -> units. Units of nodes backed off are left out (``skipped``, once per node) and so are units in
        slots no node serves (an error, and a new slot map before the next call)."""

        def route(first: bool) -> Groups:
            groups: Groups = {}
            skipped: set[str] = set()
            uncovered = 0
            for unit in units:
                try:
                    node = client.get_node_from_key(names[unit[0]])
                except self._uncovered:
                    uncovered += 1
                    continue
                if self._backoff.blocked(node.name):
                    skipped.add(node.name)
                else:
                    groups.setdefault(node.name, []).append(unit)
            if first and skipped:
                self._count(skipped=len(skipped))
            if first and uncovered:
                self._stale = True
                self._count(errors=1)
                log.warning(
                    "Redis Cluster KV store %s: %d unit(s) in slots no node serves", self.url, uncovered
                )
            return groups

        return route

    def _by_slot(self, client: Any, names: list[bytes]) -> list[list[int]]:
        """Key positions grouped by hash slot (a multi-key command must stay within one slot)."""
        slots: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            slots.setdefault(client.keyslot(name), []).append(i)
        return list(slots.values())

    def _exchange(
        self, client: Any, op: str, route: Callable[[bool], Groups], command: Command
    ) -> list[tuple[Any, Any]]:
        """Send every routed unit its command (``command(unit)`` -> args, kwargs) in one cluster pipeline;
        ``(unit, reply)`` for the units whose node answered, a reply being an exception for an error
        reply. When the pipeline stops before sending (a node could not be reached), route again on the
        slot map redis-py has reloaded and send node by node, to serve the others and back off the one
        that fails."""
        groups = route(True)
        if not groups:
            return []
        try:
            return self._send(client, op, groups, command)
        except self._errors as exc:
            failure = exc
        if isinstance(failure, self._backoff.down_errors):
            self._count(refreshes=1)
        again = route(False)
        if len(groups) == 1 and again.keys() == groups.keys():  # the one node asked is the one failing
            self._backoff.failed(op, failure, next(iter(groups)))
            return []
        out: list[tuple[Any, Any]] = []
        for name, units in again.items():
            try:
                out += self._send(client, op, {name: units}, command)
            except self._errors as exc:
                self._backoff.failed(op, exc, name)
        return out

    def _send(self, client: Any, op: str, groups: Groups, command: Command) -> list[tuple[Any, Any]]:
        """One cluster pipeline for `groups`; raises when it cannot start (a node not reachable).

        The commands go through `ClusterPipeline.send_cluster_commands` with redirections off rather than
        `execute()`, which would send every command that failed (a node timing out, a redirect) again on
        its own: one more timeout per slot for a node that hangs. Here a failure stays in the replies."""
        from redis.cluster import PipelineCommand

        stack = []
        for units in groups.values():
            for unit in units:
                args, options = command(unit)
                stack.append(PipelineCommand(args, options, len(stack)))
        self._count(round_trips=len(groups))
        with client.pipeline() as pipe:
            replies = pipe.send_cluster_commands(stack, raise_on_error=False, allow_redirections=False)
        out: list[tuple[Any, Any]] = []
        start = 0
        for name, units in groups.items():
            mine = replies[start : start + len(units)]
            start += len(units)
            self._settle(op, name, mine)
            out += zip(units, mine, strict=True)
        return out

    def _settle(self, op: str, node: str, replies: Sequence[Any]) -> None:
        """Account for the error replies of one node: its first failure (an error, and a back-off if the
        node is down or refusing) and every redirect (a new slot map before the next call)."""
        failure = next(
            (r for r in replies if isinstance(r, Exception) and not isinstance(r, self._redirect)), None
        )
        if failure is not None:
            self._backoff.failed(op, failure, node)
        redirects = sum(isinstance(r, self._redirect) for r in replies)
        if redirects:
            self._count(redirects=redirects)
            self._stale = True
            log.info(
                "Redis Cluster KV store %s: %d redirect(s) from %s; loading a new slot map",
                self.url,
                redirects,
                node,
            )

    # ------------------------------------------------------------------------------------------- store

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = check_keys(keys)
        if not keys:
            return []
        out: list[bytes | None] = [None] * len(keys)
        with self._session() as client:
            if client is not None:
                names = self._names(keys)
                route = self._router(client, names, self._by_slot(client, names))
                for unit, reply in self._exchange(
                    client, "MGET", route, lambda unit: (("MGET", *(names[i] for i in unit)), {})
                ):
                    if not isinstance(reply, Exception):
                        for i, value in zip(unit, reply, strict=True):
                            out[i] = value
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = check_items(items)
        if not pairs:
            return
        expire = ("EX", self.ttl) if self.ttl is not None else ()
        stored = written = 0
        with self._session() as client:
            if client is None:
                return
            names = self._names([k for k, _ in pairs])
            route = self._router(client, names, [[i] for i in range(len(names))])

            def command(unit: list[int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
                return ("SET", names[unit[0]], pairs[unit[0]][1], *expire), {}

            for unit, reply in self._exchange(client, "SET", route, command):
                if not isinstance(reply, Exception):
                    stored += 1
                    written += len(pairs[unit[0]][1])
        self._count(puts=stored, bytes_written=written)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = check_keys(keys)
        out = [False] * len(keys)
        if not keys:
            return out
        with self._session() as client:
            if client is not None:
                names = self._names(keys)
                route = self._router(client, names, [[i] for i in range(len(names))])
                for unit, reply in self._exchange(
                    client, "EXISTS", route, lambda unit: (("EXISTS", names[unit[0]]), {})
                ):
                    out[unit[0]] = not isinstance(reply, Exception) and bool(reply)
        return out

    def delete_many(self, keys: Sequence[str]) -> int:
        keys = check_keys(keys)
        if not keys:
            return 0
        removed = 0
        with self._session() as client:
            if client is not None:
                names = self._names(keys)
                route = self._router(client, names, self._by_slot(client, names))
                for _, reply in self._exchange(
                    client, "DEL", route, lambda unit: (("DEL", *(names[i] for i in unit)), {})
                ):
                    removed += 0 if isinstance(reply, Exception) else int(reply)
        return removed

    def ping(self) -> bool:
        """Whether every master in the slot map answers and reports ``cluster_state:ok``. Always asks
        (even during a back-off), and ends the back-off of each node that answers well (and the store's,
        when they all do)."""
        with self._session(force=True) as client:
            if client is None:
                return False

            def route(first: bool) -> Groups:
                return {node.name: [node] for node in client.get_primaries()}

            replies = self._exchange(
                client, "CLUSTER INFO", route, lambda node: (("CLUSTER INFO",), {"target_nodes": node})
            )
            healthy = [node.name for node, reply in replies if _cluster_ok(reply)]
            for name in healthy:
                self._backoff.succeeded(name)
            if healthy and len(healthy) == len(client.get_primaries()):
                self._backoff.succeeded()
                return True
            return False

    def stats(self) -> StoreStats:
        out = super().stats()
        out["available"] = int(not self._backoff.blocked())
        out["nodes_down"] = self._backoff.backed_off()
        client = self._client
        out["nodes"] = len(client.get_primaries()) if client is not None else 0
        return out

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            busy = client is not None and bool(self._users.get(id(client)))
        if client is not None and not busy:
            self._close_client(client)
