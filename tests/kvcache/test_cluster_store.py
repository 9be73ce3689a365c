"""The Redis Cluster KV store: the store contract on a 3-master cluster started on loopback ports, batches
grouped per node (and per slot, counted on the servers), URL parsing, a slot moved behind the store's back,
and masters killed, hung or failed over while a KVCacheManager runs over it."""

from __future__ import annotations

import atexit
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from redis.crc import key_slot

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.manager import KVCacheManager
from kvrag.rag.kvcache.store import KVStore, RedisClusterStore, TieredStore, open_kv_store, redact_url
from tests.kvcache import test_stores as contract

SERVER = shutil.which("redis-server")
CLI = shutil.which("redis-cli")
CLUSTER_MARKS = [
    pytest.mark.redis,
    pytest.mark.skipif(
        SERVER is None or CLI is None,
        reason="a Redis Cluster needs the redis-server and redis-cli binaries, which are not installed",
    ),
]


def needs_cluster(test: Callable) -> Callable:
    """Mark a test `redis` and skip it where the Redis binaries are missing."""
    for mark in CLUSTER_MARKS:
        test = mark(test)
    return test


# ------------------------------------------------------------------------------------------- the cluster


def _port_pair_free(port: int) -> bool:
    """Whether `port` and its cluster bus port (`port` + 10000) are both free on 127.0.0.1."""
    for p in (port, port + 10000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _free_cluster_ports(n: int) -> list[int]:
    rng = random.Random()
    out: list[int] = []
    while len(out) < n:
        port = rng.randrange(20000, 55000)
        if port not in out and port + 10000 not in out and _port_pair_free(port):
            out.append(port)
    return out


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    assert CLI is not None
    cmd = [CLI, "-h", "127.0.0.1", "-p", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


@dataclass
class Cluster:
    """Redis Cluster nodes (redis-server child processes) on 127.0.0.1; masters first."""

    ports: list[int]
    workdir: Path
    extra: tuple[str, ...] = ()
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def url(self, query: str = "") -> str:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"redis-cluster://{nodes}" + (f"?{query}" if query else "")

    def start_node(self, port: int) -> None:
        assert SERVER is not None
        cmd = [SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
        cmd += ["--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"), "--dir", str(self.workdir)]
        cmd += ["--save", "", "--appendonly", "no", "--daemonize", "no", *self.extra]
        self.procs[port] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while "PONG" not in _cli(port, "ping", timeout=2):
            if self.procs[port].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server (cluster node) did not start on port {port}")
            time.sleep(0.02)

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, its sockets reset."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)

    def info(self, port: int) -> str:
        return _cli(port, "cluster", "info", timeout=2)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
        """Poll until `predicate()` holds; seconds waited."""
        t0 = time.monotonic()
        while not predicate():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"the cluster did not reach: {what} within {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - t0

    def state_ok(self, ports: Sequence[int]) -> bool:
        return all("cluster_state:ok" in self.info(p) for p in ports)

    def replicas_online(self, replicas: int) -> bool:
        """Whether every master has `replicas` replicas online (past the initial sync)."""
        for port in self.masters():
            info = _cli(port, "info", "replication", timeout=2)
            if info.count("state=online") < replicas:
                return False
        return True

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """{port: [(first slot, last slot), ...]} for every master that holds slots, from a live node."""
        live = next(p for p, proc in self.procs.items() if proc.poll() is None)
        out: dict[int, list[tuple[int, int]]] = {}
        for line in _cli(live, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and len(fields) > 8:
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                for part in fields[8:]:
                    if not part.startswith("["):
                        a, _, b = part.partition("-")
                        out.setdefault(port, []).append((int(a), int(b or a)))
        return out

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_cluster(masters: int = 3, replicas: int = 0, extra: Sequence[str] = ()) -> Cluster:
    """`masters` * (1 + `replicas`) nodes joined by ``redis-cli --cluster create``; waits for state ok."""
    n = masters * (1 + replicas)
    cluster = Cluster(_free_cluster_ports(n), Path(tempfile.mkdtemp(prefix="kvrag-cluster-")), tuple(extra))
    atexit.register(cluster.stop)
    try:
        for port in cluster.ports:
            cluster.start_node(port)
        assert CLI is not None
        nodes = [f"127.0.0.1:{p}" for p in cluster.ports]
        cmd = [CLI, "--cluster", "create", *nodes, "--cluster-replicas", str(replicas), "--cluster-yes"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-800:]}{done.stderr[-800:]}")
        cluster.wait(lambda: cluster.state_ok(cluster.ports), "cluster_state:ok on every node")
        if replicas:
            cluster.wait(lambda: cluster.replicas_online(replicas), "every replica in sync with its master")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A healthy 3-master cluster shared by the tests that do not kill nodes."""
    if SERVER is None or CLI is None:
        pytest.skip("a Redis Cluster needs the redis-server and redis-cli binaries")
    c = start_cluster(extra=("--cluster-node-timeout", "2000"))
    yield c
    c.stop()


def _node(port: int):
    """A plain client of one cluster node."""
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def _names_on(port: int, prefix: str) -> list[bytes]:
    node = _node(port)
    try:
        return list(node.scan_iter(match=prefix.encode() + b"*", count=1000))
    finally:
        node.close()


def _delete_prefix(cluster: Cluster, prefix: str) -> None:
    for port in cluster.masters():
        node = _node(port)
        try:
            with node.pipeline(transaction=False) as pipe:
                for name in node.scan_iter(match=prefix.encode() + b"*", count=1000):
                    pipe.delete(name)
                pipe.execute()
        finally:
            node.close()


@pytest.fixture
def cluster_url(cluster: Cluster) -> Iterator[str]:
    """The cluster's URL with a key prefix of this test's own (its keys are deleted afterwards)."""
    prefix = f"kvrag-test-{uuid.uuid4().hex[:12]}:"
    yield cluster.url(f"prefix={prefix}&timeout=2")
    _delete_prefix(cluster, prefix)


# ------------------------------------------------------------------------------------------- contract


@pytest.fixture(
    params=[
        pytest.param("redis-cluster", marks=CLUSTER_MARKS),
        pytest.param("memory+redis-cluster", marks=CLUSTER_MARKS),
    ]
)
def store(request: pytest.FixtureRequest) -> Iterator[KVStore]:
    url = request.getfixturevalue("cluster_url")
    s = open_kv_store(url if request.param == "redis-cluster" else f"memory+{url}&mem_bytes=64M")
    assert isinstance(s, RedisClusterStore if request.param == "redis-cluster" else TieredStore)
    yield s
    s.close()


# The contract suite of test_stores.py, run here against this module's `store` fixture.
test_put_get_exists_delete = contract.test_put_get_exists_delete
test_missing_keys_keep_their_positions = contract.test_missing_keys_keep_their_positions
test_empty_inputs = contract.test_empty_inputs
test_large_and_binary_values = contract.test_large_and_binary_values
test_overwrite_and_buffer_values = contract.test_overwrite_and_buffer_values
test_rejects_wrong_types = contract.test_rejects_wrong_types
test_concurrent_use = contract.test_concurrent_use


# ----------------------------------------------------------------------------------- routing per node


def _slot_owner(cluster: Cluster) -> Callable[[str], int]:
    ranges = [(a, b, port) for port, spans in cluster.masters().items() for a, b in spans]

    def owner(key: str) -> int:
        slot = key_slot(key.encode())
        return next(port for a, b, port in ranges if a <= slot <= b)

    return owner


@needs_cluster
def test_keys_spread_over_every_master(cluster: Cluster, cluster_url: str) -> None:
    s = RedisClusterStore(cluster_url)
    keys = [f"kvrag:kv:p:{i}" for i in range(300)]
    s.put_many({k: k.encode() for k in keys})
    owner = _slot_owner(cluster)
    per_node: dict[int, set[str]] = {}
    for port in cluster.masters():
        found = [name.decode() for name in _names_on(port, s.prefix)]
        per_node[port] = set(found)
        assert all(owner(name) == port for name in found)  # each key sits on its slot's master
    assert len(per_node) == 3 and all(len(found) > 50 for found in per_node.values())
    assert sum(len(found) for found in per_node.values()) == len(keys)
    assert s.stats()["nodes"] == 3 and s.stats()["nodes_down"] == []
    s.close()


@needs_cluster
def test_a_batch_costs_one_round_trip_per_node(
    cluster: Cluster, cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.connection

    writes = {"n": 0}
    send = redis.connection.AbstractConnection.send_packed_command

    def counting(self, *args, **kwargs):
        writes["n"] += 1
        return send(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    s = RedisClusterStore(cluster_url)
    keys = [f"kvrag:kv:{i}" for i in range(64)]
    s.put_many({k: b"v" + k.encode() for k in keys[::2]})  # builds the client and its slot map

    def cost(call: Callable[[], object]) -> tuple[int, int]:
        rt, w = s.stats()["round_trips"], writes["n"]
        call()
        return s.stats()["round_trips"] - rt, writes["n"] - w

    assert cost(lambda: s.get_many(keys)) == (3, 3)
    assert s.get_many(keys) == [b"v" + k.encode() if i % 2 == 0 else None for i, k in enumerate(keys)]
    assert cost(lambda: s.put_many({k: b"x" for k in keys})) == (3, 3)
    assert cost(lambda: s.exists_many(keys)) == (3, 3)
    assert cost(lambda: s.get_many(keys[:1])) == (1, 1)
    tagged = [f"{{doc-7}}:{i}" for i in range(20)]  # one hash tag: one slot, one node, one MGET
    s.put_many({k: b"t" for k in tagged})
    mget_before = sum(_mget_calls(port) for port in cluster.masters())
    assert cost(lambda: s.get_many(tagged)) == (1, 1)
    assert sum(_mget_calls(port) for port in cluster.masters()) - mget_before == 1
    assert cost(lambda: s.delete_many(keys + tagged)) == (3, 3)
    assert s.exists_many(keys[:3] + tagged[:1]) == [False] * 4
    stats = s.stats()
    assert stats["errors"] == 0 and stats["refreshes"] == 1 and stats["redirects"] == 0
    s.close()


def _calls(port: int, command: str) -> int:
    """How many times the node has run `command` (INFO commandstats)."""
    for line in _cli(port, "info", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def _mget_calls(port: int) -> int:
    return _calls(port, "mget")


def _commands_on(ports: Sequence[int]) -> dict[int, tuple[int, int]]:
    """{port: (MGET calls, GET calls)}."""
    return {port: (_calls(port, "mget"), _calls(port, "get")) for port in ports}


def _slots_per_node(cluster: Cluster, names: Sequence[str]) -> dict[int, int]:
    """{master port: how many distinct hash slots of `names` it owns}."""
    owner = _slot_owner(cluster)
    slots: dict[int, set[int]] = {}
    for name in names:
        slots.setdefault(owner(name), set()).add(key_slot(name.encode()))
    return {port: len(found) for port, found in slots.items()}


@needs_cluster
def test_batched_get_is_one_mget_per_slot_in_one_pipeline(
    cluster: Cluster, cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server side of a batch: each master runs one MGET per hash slot of the batch it owns, never a
    GET per key, and the client writes to each master once."""
    import redis.connection

    writes = {"n": 0}
    send = redis.connection.AbstractConnection.send_packed_command

    def counting(self, *args, **kwargs):
        writes["n"] += 1
        return send(self, *args, **kwargs)

    s = RedisClusterStore(cluster_url)
    keys = [f"kvrag:kv:slot:{i}" for i in range(200)] + [f"{{doc-9}}:{i}" for i in range(30)]
    s.put_many({k: k.encode() for k in keys})
    masters = sorted(cluster.masters())
    expected = _slots_per_node(cluster, [s.prefix + k for k in keys])
    assert sum(expected.values()) < len(keys)  # the hash-tagged keys share one slot
    before = _commands_on(masters)
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    rt = s.stats()["round_trips"]
    assert s.get_many(keys) == [k.encode() for k in keys]
    monkeypatch.undo()
    after = _commands_on(masters)
    assert {p: after[p][0] - before[p][0] for p in masters} == expected
    assert all(after[p][1] == before[p][1] for p in masters)  # no GET at all
    assert writes["n"] == 3 and s.stats()["round_trips"] - rt == 3
    s.close()


def test_cluster_connector_uses_the_public_cluster_api_only() -> None:
    """The connector speaks to Redis through `RedisCluster` and its pipelines, not through redis-py's
    connection or slot-map internals."""
    from kvrag.rag.kvcache.connectors import redis_cluster

    source = Path(redis_cluster.__file__).read_text(encoding="utf-8")
    for internal in (
        "nodes_manager",
        "send_packed_command",
        "pack_commands",
        "parse_response",
        "connection_pool",
    ):
        assert internal not in source, internal
    assert "client.pipeline()" in source and "get_node_from_key" in source


@needs_cluster
def test_ttl_and_prefix(cluster: Cluster, cluster_url: str) -> None:
    s = RedisClusterStore(cluster_url + "&ttl=100")
    s.put_many({"kvrag:kv:t": b"v"})
    owner = _slot_owner(cluster)
    name = s.prefix + "kvrag:kv:t"
    assert 0 < int(_cli(owner(name), "ttl", name)) <= 100
    s2 = RedisClusterStore(cluster_url)
    s2.put_many({"kvrag:kv:p": b"v"})
    name = s2.prefix + "kvrag:kv:p"
    assert int(_cli(owner(name), "ttl", name)) == -1  # no ttl: never expires
    assert _cli(owner("kvrag:kv:p"), "exists", "kvrag:kv:p").strip() == "0"  # only under the prefix
    assert s.ping() and s2.ping()
    s.close()
    s2.close()


# ------------------------------------------------------------------------------------------------- URLs


def test_open_cluster_urls_hide_the_password_and_connect_lazily() -> None:
    url = "redis-cluster://:s3cret@127.0.0.1:1,localhost:2,[::1]:3?timeout=0.25&ttl=60&prefix=p:&max_connections=4"
    s = open_kv_store(url)  # nothing listens there: opening does not connect
    assert isinstance(s, RedisClusterStore)
    assert s.nodes == [("127.0.0.1", 1), ("localhost", 2), ("::1", 3)]
    assert (s.timeout, s.ttl, s.prefix, s.retry_after) == (0.25, 60, "p:", 2.0)
    assert "s3cret" not in s.url and "s3cret" not in repr(s) and "s3cret" not in str(s.stats())
    assert s.url.startswith("redis-cluster://:***@127.0.0.1:1,localhost:2,[::1]:3?")
    assert s._client_kwargs["password"] == "s3cret" and s._client_kwargs["max_connections"] == 4
    assert s._client_kwargs["socket_timeout"] == s._client_kwargs["socket_connect_timeout"] == 0.25
    u = open_kv_store("redis-cluster://user:pw@h1:7000/?client_name=kv")
    assert u._client_kwargs["username"] == "user" and u._client_kwargs["client_name"] == "kv"
    assert open_kv_store("redis-cluster://h1/0").nodes == [("h1", 6379)]
    t = open_kv_store("memory+redis-cluster://:pw@h1:7000,h2:7001?mem_bytes=1M&prefix=q:&ttl=5")
    assert isinstance(t, TieredStore) and isinstance(t.back, RedisClusterStore)
    assert t.front.max_bytes == 1 << 20 and (t.back.prefix, t.back.ttl) == ("q:", 5)
    assert t.back.nodes == [("h1", 7000), ("h2", 7001)]
    assert "mem_bytes" not in t.back.url and "pw" not in t.url


@pytest.mark.parametrize(
    "url",
    [
        "redis-cluster://",
        "redis-cluster://?prefix=a",
        "redis-cluster://h1:7000,,h2:7001",
        "redis-cluster://h1:notaport",
        "redis-cluster://h1:70000",
        "redis-cluster://[::1:7000",
        "redis-cluster://h1:7000/2",
        "redis-cluster://h1:7000?db=1",
        "redis-cluster://h1:7000?bogus=1",
        "redis-cluster://h1:7000?ttl=0",
        "redis-cluster://h1:7000?timeout=-1",
        "redis-cluster://h1:7000?max_connections=0",
        "memory+redis-cluster://h1:7000?mem_bytes=big",
    ],
)
def test_bad_cluster_urls_raise_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInputError):
        open_kv_store(url)


def test_redact_cluster_urls() -> None:
    assert (
        redact_url("redis-cluster://:hunter2@h1:1,h2:2?prefix=a") == "redis-cluster://:***@h1:1,h2:2?prefix=a"
    )
    assert redact_url("redis-cluster://u:hunter2@h1:1,h2:2") == "redis-cluster://u:***@h1:1,h2:2"
    assert "hunter2" not in redact_url("redis-cluster://h1:1,h2:2?password=hunter2")
    assert "hunter2" not in redact_url("memory+redis-cluster://:hunter2@h1:1,h2:2?mem_bytes=1G")
    assert redact_url("redis-cluster://h1:1,h2:2") == "redis-cluster://h1:1,h2:2"
    with pytest.raises(InvalidInputError, match="redis-cluster://"):
        open_kv_store("s3://bucket/kv")


def test_unreachable_cluster_degrades_to_misses(caplog: pytest.LogCaptureFixture) -> None:
    ports = _free_cluster_ports(2)
    s = RedisClusterStore(f"redis-cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}?timeout=0.2")
    with caplog.at_level("WARNING", logger="kvrag.kvcache"):
        assert s.get_many(["a", "b"]) == [None, None]
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    t0 = time.perf_counter()
    assert s.get_many(["a"]) == [None]  # inside the back-off: no network at all
    s.put_many({"a": b"1"})
    assert s.exists_many(["a"]) == [False] and s.delete_many(["a"]) == 0
    assert time.perf_counter() - t0 < 0.05
    stats = s.stats()
    assert stats["errors"] == 1 and stats["skipped"] == 4 and stats["available"] == 0
    assert stats["gets"] == 3 and stats["misses"] == 3 and stats["puts"] == 0 and stats["nodes"] == 0
    assert s.ping() is False
    s.close()


# ---------------------------------------------------------------------------------- masters going down

SENTENCES = [
    "The garden is full of roses in the summer.",
    "The old stone bridge crosses the river near the mill.",
    "Mars is the fourth planet from the sun.",
    "Boats come into the harbour at night when the tide is high.",
    "A glacier is a slowly moving mass of ice.",
    "The library opens at nine and closes at six.",
    "Bees carry pollen from flower to flower.",
    "The train to the coast leaves every hour.",
    "Copper conducts heat and electricity well.",
    "The orchestra tuned their instruments before the concert.",
    "Owls hunt at night and sleep during the day.",
    "Bread rises because yeast produces gas.",
    "The lighthouse warns ships away from the rocks.",
    "Volcanoes form where magma reaches the surface.",
    "The market sells fish, cheese and fresh bread.",
    "Snow covered the mountain pass in December.",
    "The museum shows paintings from three centuries.",
    "Wind turbines turn moving air into electricity.",
]
TOL = {"rtol": 2e-3, "atol": 2e-3}  # the fp16 codec against recomputed float caches


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    """Start clusters of this test's own (the test may kill their nodes); all stopped afterwards."""
    if SERVER is None or CLI is None:
        pytest.skip("a Redis Cluster needs the redis-server and redis-cli binaries")
    started: list[Cluster] = []

    def make(replicas: int = 0, extra: Sequence[str] = ()) -> Cluster:
        c = start_cluster(replicas=replicas, extra=("--cluster-node-timeout", "1000", *extra))
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def _fill(tiny_generator, cluster: Cluster) -> tuple[KVCacheManager, list[list[int]], dict[int, list[int]]]:
    """A manager (fp16 codec) over the cluster with every passage's cache stored, and the passages'
    positions per master port."""
    store = open_kv_store(cluster.url("timeout=0.5&retry_after=0.3&prefix=mgr:"))
    assert isinstance(store, RedisClusterStore)
    mgr = KVCacheManager(tiny_generator, store, "fp16")
    passages = [tiny_generator.passage_ids(text, None) for text in SENTENCES]
    assert mgr.ensure(passages)["kv_computed"] == len(passages)
    owner = _slot_owner(cluster)
    on: dict[int, list[int]] = {}
    for i, p in enumerate(passages):
        on.setdefault(owner(store.prefix + mgr.key(p).key), []).append(i)
    assert len(on) == 3, f"the {len(passages)} passages do not reach all 3 masters: {on}"
    return mgr, passages, on


def _assert_same_joined(got, expected) -> None:
    assert got.prefix_tokens == expected.prefix_tokens and got.lengths == expected.lengths
    torch.testing.assert_close(got.kv.keys, expected.kv.keys, **TOL)
    torch.testing.assert_close(got.kv.values, expected.kv.values, **TOL)


def _failed_seen_by(cluster: Cluster, survivors: Sequence[int], victim: int) -> bool:
    for port in survivors:
        line = next(x for x in _cli(port, "cluster", "nodes").splitlines() if f":{victim}@" in x)
        if "fail" not in line.split()[2].split(",") or "master" not in line.split()[2]:
            return False
    return True


@needs_cluster
def test_master_killed_mid_run_full_coverage(tiny_generator, make_cluster) -> None:
    """Default cluster-require-full-coverage: once the dead master is marked failed, the survivors
    refuse every command (CLUSTERDOWN). Answers still come (all recomputed), and when the master comes
    back (empty) the store serves again."""
    cluster = make_cluster()
    mgr, passages, on = _fill(tiny_generator, cluster)
    store = mgr.store
    victim = max(on, key=lambda port: len(on[port]))
    survivors = [p for p in cluster.ports if p != victim]
    lost = sorted(on[victim])
    windows = [passages[i : i + 6] for i in range(0, len(passages), 3)]
    before = [mgr.get_joined(w) for w in windows]
    before_all, _ = mgr.get_joined(passages)
    assert all(report.hits == len(w) for (_, report), w in zip(before, windows, strict=True))

    for n, window in enumerate(windows):  # a run of queries with the master killed in the middle
        if n == 2:
            cluster.kill(victim)
        joined, report = mgr.get_joined(window)
        _assert_same_joined(joined, before[n][0])
        if n >= 2:
            dead = sum(1 for p in window if passages.index(p) in lost)
            assert (report.hits, report.misses) == (len(window) - dead, dead)
    stats = store.stats()
    assert stats["errors"] >= 1 and f"127.0.0.1:{victim}" in stats["nodes_down"]
    assert stats["skipped"] >= 1  # later queries skip the dead node without waiting on it

    waited = cluster.wait(lambda: "cluster_state:fail" in cluster.info(survivors[0]), "CLUSTERDOWN")
    time.sleep(0.35)  # let the store's back-off end: it asks the (refusing) survivors again
    errors = store.stats()["errors"]
    joined, report = mgr.get_joined(passages)
    assert (report.hits, report.misses) == (0, len(passages))
    _assert_same_joined(joined, before_all)
    assert store.stats()["errors"] > errors and store.ping() is False
    print(f"\nfailure detected after {waited:.1f} s; CLUSTERDOWN answered as misses")

    cluster.start_node(victim)  # same port and nodes file: it rejoins with its slots, empty
    cluster.wait(lambda: cluster.state_ok(cluster.ports), "cluster_state:ok after the restart")
    hits = 0
    deadline = time.monotonic() + 10
    while hits < len(passages) and time.monotonic() < deadline:
        time.sleep(0.1)
        joined, report = mgr.get_joined(passages)  # misses are recomputed and written back
        hits = report.hits
    assert hits == len(passages)
    assert store.ping() is True and store.stats()["nodes_down"] == []
    store.close()


@needs_cluster
def test_master_killed_without_full_coverage_survivors_still_hit(tiny_generator, make_cluster) -> None:
    """cluster-require-full-coverage no: the surviving masters keep serving their slots, so only the
    dead master's passages are recomputed."""
    cluster = make_cluster(extra=("--cluster-require-full-coverage", "no"))
    mgr, passages, on = _fill(tiny_generator, cluster)
    store = mgr.store
    before, report = mgr.get_joined(passages)
    assert report.hits == len(passages)
    victim = max(on, key=lambda port: len(on[port]))
    survivors = [p for p in cluster.ports if p != victim]
    cluster.kill(victim)
    dead = len(on[victim])

    joined, report = mgr.get_joined(passages)  # before the cluster notices
    assert (report.hits, report.misses) == (len(passages) - dead, dead)
    _assert_same_joined(joined, before)
    cluster.wait(lambda: _failed_seen_by(cluster, survivors, victim), "the dead master marked failed")
    assert cluster.state_ok(survivors)
    for _attempt in range(3):  # after detection, and across the store's back-off and slot map reloads
        joined, report = mgr.get_joined(passages)
        assert (report.hits, report.misses) == (len(passages) - dead, dead)
        _assert_same_joined(joined, before)
        time.sleep(0.2)
    stats = store.stats()
    assert stats["errors"] >= 2 and stats["skipped"] >= 1 and stats["refreshes"] >= 2
    assert store.ping() is False  # one master does not answer
    store.close()


@needs_cluster
def test_batches_stay_batched_with_a_master_down(make_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead master costs its keys, not the batch: the surviving masters still get one MGET per slot
    (no retry per key), and while the dead one is backed off a batch is one write per survivor."""
    import redis.connection

    cluster = make_cluster(extra=("--cluster-require-full-coverage", "no"))
    store = RedisClusterStore(cluster.url("timeout=0.5&retry_after=30&prefix=down:"))
    keys = [f"kvrag:kv:down:{i}" for i in range(120)]
    store.put_many({k: k.encode() for k in keys})
    owner = _slot_owner(cluster)
    victim = owner(store.prefix + keys[0])
    survivors = [p for p in cluster.masters() if p != victim]
    lost = {k for k in keys if owner(store.prefix + k) == victim}
    expected = _slots_per_node(cluster, [store.prefix + k for k in keys if k not in lost])
    cluster.kill(victim)

    writes = {"n": 0}
    send = redis.connection.AbstractConnection.send_packed_command

    def counting(self, *args, **kwargs):
        writes["n"] += 1
        return send(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    for attempt in range(2):  # the call that finds the master dead, then one inside its back-off
        before, w0, stats0 = _commands_on(survivors), writes["n"], store.stats()
        got = store.get_many(keys)
        after, stats = _commands_on(survivors), store.stats()
        assert got == [None if k in lost else k.encode() for k in keys]
        assert {p: after[p][0] - before[p][0] for p in survivors} == {p: expected[p] for p in survivors}
        assert all(after[p][1] == before[p][1] for p in survivors)
        if attempt == 1:
            assert writes["n"] - w0 == 2 and stats["round_trips"] - stats0["round_trips"] == 2
            assert stats["skipped"] - stats0["skipped"] == 1 and stats["errors"] == stats0["errors"]
    monkeypatch.undo()
    assert store.stats()["errors"] == 1 and store.stats()["nodes_down"] == [f"127.0.0.1:{victim}"]
    store.close()


@needs_cluster
def test_a_hung_master_costs_one_timeout_not_one_per_slot(make_cluster) -> None:
    """A master that stops answering (SIGSTOP: connections are accepted, replies never come) costs the
    batch one timeout: its commands are not sent again one by one."""
    cluster = make_cluster(extra=("--cluster-require-full-coverage", "no", "--cluster-node-timeout", "30000"))
    store = RedisClusterStore(cluster.url("timeout=0.2&retry_after=30&prefix=hang:"))
    keys = [f"kvrag:kv:hang:{i}" for i in range(90)]
    store.put_many({k: k.encode() for k in keys})
    owner = _slot_owner(cluster)
    victim = owner(store.prefix + keys[0])
    lost = {k for k in keys if owner(store.prefix + k) == victim}
    assert _slots_per_node(cluster, [store.prefix + k for k in lost])[victim] >= 15
    cluster.procs[victim].send_signal(signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        got = store.get_many(keys)
        elapsed = time.perf_counter() - t0
    finally:
        cluster.procs[victim].send_signal(signal.SIGCONT)
    assert got == [None if k in lost else k.encode() for k in keys]
    assert elapsed < 1.0, f"{elapsed:.2f} s: a hung master must cost about one 0.2 s timeout"
    stats = store.stats()
    assert stats["errors"] == 1 and stats["nodes_down"] == [f"127.0.0.1:{victim}"]
    store.close()


@needs_cluster
def test_moved_slot_reads_as_missing_then_a_new_slot_map_serves_it(make_cluster) -> None:
    """A slot given to another master behind the store's back: the MOVED reply reads as a miss (no
    error), and the next call loads a new slot map and reaches the new owner."""
    cluster = make_cluster()
    store = RedisClusterStore(cluster.url("timeout=0.5&prefix=mv:"))
    store.put_many({"warm": b"1"})  # the client and its slot map
    key = "kvrag:kv:moved"
    name = store.prefix + key
    slot = key_slot(name.encode())
    target = next(p for p in cluster.masters() if p != _slot_owner(cluster)(name))
    target_id = _cli(target, "cluster", "myid").strip()
    for port in [target, *(p for p in cluster.masters() if p != target)]:
        assert _cli(port, "cluster", "setslot", str(slot), "node", target_id).strip() == "OK"
    cluster.wait(lambda: _slot_owner(cluster)(name) == target, "the slot owned by its new master")
    assert store.get_many([key]) == [None]  # MOVED: a miss, and a new slot map before the next call
    stats = store.stats()
    assert (stats["redirects"], stats["errors"], stats["refreshes"]) == (1, 0, 1)
    store.put_many({key: b"v"})
    assert store.get_many([key]) == [b"v"]
    stats = store.stats()
    assert (stats["redirects"], stats["errors"], stats["refreshes"]) == (1, 0, 2)
    assert _cli(target, "get", name).strip() == "v"
    store.close()


@needs_cluster
def test_failover_promotes_a_replica_and_the_store_follows(tiny_generator, make_cluster) -> None:
    """With a replica per master, the dead master's replica takes over its slots and data; the store
    finds it on its next slot map reload and serves those passages again."""
    cluster = make_cluster(replicas=1)
    masters = sorted(cluster.masters())
    mgr, passages, on = _fill(tiny_generator, cluster)
    for port in masters:
        assert int(_cli(port, "wait", "1", "2000")) == 1  # the writes reached the replica
    victim = max(on, key=lambda port: len(on[port]))
    dead = len(on[victim])
    before, _ = mgr.get_joined(passages)
    cluster.kill(victim)
    joined, report = mgr.get_joined(passages)
    assert (report.hits, report.misses) == (len(passages) - dead, dead)
    survivors = [p for p in cluster.ports if p != victim]
    waited = cluster.wait(
        lambda: victim not in cluster.masters() and cluster.state_ok(survivors), "a replica promoted"
    )
    time.sleep(0.35)
    joined, report = mgr.get_joined(passages)  # the store reloads its slot map and reaches the new master
    assert (report.hits, report.misses) == (len(passages), 0)
    _assert_same_joined(joined, before)
    assert mgr.store.stats()["refreshes"] >= 2 and mgr.store.ping() is True
    print(f"\nreplica promoted {waited:.1f} s after the kill")
    mgr.store.close()
