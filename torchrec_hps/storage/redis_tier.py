"""Redis tier (redis-py), standalone or Redis Cluster.

Layout: table `<model>.<table>` is split into `num_partitions` hashes named
`hps_et.<model>.<table>.p<i>{<tag_i>}`; row id k lives in partition hash(k) % num_partitions under an
8-byte field. Each hash is one key, so it lives on one Cluster node; the hash tags are chosen so that
partition i maps to slot range i/num_partitions of the 16384 slots, which spreads a table's partitions
evenly over the nodes (Cluster nodes own contiguous slot ranges). A batched get groups the unique ids
by partition and sends one HMGET per partition chunk, pipelined per node (the RESP commands are built with
numpy, not argument by argument), with the nodes served in parallel threads. (Server-side Lua that packs rows into one reply was tried first: Redis 7's Lua spent
about 4 us per row on it, 4x HMGET's cost, so plain HMGET/HSET/HDEL it is.) A node that fails is skipped for `retry_interval` seconds (its keys
count as misses and errors, so the hierarchy falls through to the tier below) and used again afterwards.
On a Cluster, commands follow the slot map of redis_topology.py: MOVED (and a failing node, at most once a
`topology_refresh_interval`) re-reads it, so a failover to a replica is followed; ASK (a slot migrating)
sends the command to the importing node after ASKING; `read_from_replicas` sends gets to replicas.
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_hps.config import KEY_PREFIX, RedisTierConfig, TableSpec, resolve_secret
from torchrec_hps.storage.interface import StorageTier, TierError, TierWriteError, group_by_partition
from torchrec_hps.storage.redis_topology import NUM_SLOTS as _NUM_SLOTS
from torchrec_hps.storage.redis_topology import ClusterTopology
from torchrec_hps.warnings_log import limited

logger = logging.getLogger(__name__)
_warnings = limited(logger)

_READONLY = b"*1\r\n$8\r\nREADONLY\r\n"  # lets a replica's connection serve reads of its primary's slots
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_JOIN_BYTES = 1 << 20  # pipelined commands up to this size go out in one sendall (a syscall each costs more)


@functools.lru_cache(maxsize=None)
def _partition_tags(num_partitions: int) -> Tuple[str, ...]:
    """For each partition a short hash tag whose slot lies in its 1/num_partitions share of the slots."""
    from redis.crc import key_slot

    tags: List[Optional[str]] = [None] * num_partitions
    left, i = num_partitions, 0
    while left:
        tag = format(i, "x")
        share = key_slot(tag.encode()) * num_partitions // _NUM_SLOTS
        if tags[share] is None:
            tags[share] = tag
            left -= 1
        i += 1
    return tuple(tags)


@dataclass
class _Call:
    """One command on one hash, already in RESP form (its header and its arguments: bytes-like pieces sent
    back to back): the positions (into the request's unique ids) it covers."""

    hash_name: str
    packed: Tuple[bytes, memoryview]
    positions: np.ndarray


def _resp_bulk(items: np.ndarray) -> np.ndarray:
    """RESP bulk strings `$<len>\r\n<bytes>\r\n` for the rows of a uint8 [n, len] array, as [n, k] uint8."""
    n, width = items.shape
    head = np.frombuffer(f"${width}\r\n".encode(), dtype=np.uint8)
    out = np.empty((n, len(head) + width + 2), dtype=np.uint8)
    out[:, :len(head)] = head
    out[:, len(head):len(head) + width] = items
    out[:, -2:] = np.frombuffer(b"\r\n", dtype=np.uint8)
    return out


def _header(command: str, hash_name: str, n_args: int) -> bytes:
    """A RESP command's header up to its arguments (built by hand: redis-py's packer walks every argument
    in Python; the arguments are built in one numpy pass, see RedisTier._calls)."""
    name = hash_name.encode()
    return f"*{2 + n_args}\r\n${len(command)}\r\n{command}\r\n${len(name)}\r\n".encode() + name + b"\r\n"


_NO_POSITIONS = np.empty(0, dtype=np.int64)


def _id_bytes(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype="<i8").view(np.uint8).reshape(len(ids), 8)


class _Node:
    def __init__(self, addr: str, client) -> None:
        self.addr = addr
        self.client = client
        self.down_until = 0.0


class RedisTier(StorageTier):
    name = "redis"

    def __init__(self, config: RedisTierConfig) -> None:
        super().__init__(config.storage_dtype, config.promote)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.config = config
        self._redis = redis
        # Fail fast: a dead node must cost one refused connection, not seconds of backoff; the circuit
        # breaker below decides when to try it again.
        self._client_kwargs = dict(
            socket_timeout=config.socket_timeout, socket_connect_timeout=config.socket_connect_timeout,
            password=resolve_secret(config.password, "redis.password"), username=config.username,
            retry=Retry(NoBackoff(), 0),
            **({"ssl": True} if config.ssl else {}),
            **({"ssl_ca_certs": config.ssl_ca_certs} if config.ssl_ca_certs else {}),
            **({"ssl_certfile": config.ssl_certfile, "ssl_keyfile": config.ssl_keyfile} if config.ssl_certfile else {}),
            **config.connection_kwargs)
        self._nodes: Dict[str, _Node] = {}
        self._names: Dict[str, List[str]] = {}  # per table: its partition hashes' names
        self._nodes_lock = threading.Lock()
        self._topology: Optional[ClusterTopology] = None
        if config.url:
            client = redis.Redis.from_url(config.url, **self._client_kwargs)
            self._nodes[config.url] = _Node(config.url, client)
            self._check_reachable()
        else:
            self._topology = ClusterTopology(config.cluster_nodes, self._cluster_slots,
                                             config.topology_refresh_interval)
            self._topology.refresh()
        self._pool = ThreadPoolExecutor(max(4, 2 * len(self._topology.known if self._topology else self._nodes)),
                                        thread_name_prefix="hps-redis")

    # ---- topology ----
    @property
    def is_cluster(self) -> bool:
        return not self.config.url

    def _check_reachable(self) -> None:
        node = next(iter(self._nodes.values()))
        try:
            node.client.ping()
        except self._redis.AuthenticationError as e:
            raise TierError(f"redis at {self.config.url}: authentication failed for user "
                            f"{self.config.username or 'default'!r} ({e}); check redis.username / redis.password") from None
        except self._redis.RedisError as e:
            raise TierError(f"redis: cannot reach {self.config.url}: {e}") from e

    def _node(self, addr: str) -> _Node:
        node = self._nodes.get(addr)
        if node is None:
            with self._nodes_lock:
                node = self._nodes.get(addr)
                if node is None:
                    host, port = addr.rsplit(":", 1)
                    node = self._nodes[addr] = _Node(addr, self._redis.Redis(host=host, port=int(port),
                                                                            **self._client_kwargs))
        return node

    def _cluster_slots(self, addr: str) -> list:
        return self._node(addr).client.execute_command("CLUSTER SLOTS")

    def _owner(self, hash_name: str) -> str:
        if self._topology is None:
            return self.config.url
        from redis.crc import key_slot

        return self._topology.owner[key_slot(hash_name.encode())]

    def _usable(self, addr: str) -> bool:
        node = self._nodes.get(addr)
        return node is None or node.down_until <= time.monotonic()

    def hash_names(self, spec: TableSpec) -> List[str]:
        tags = _partition_tags(self.config.num_partitions)
        return [f"{KEY_PREFIX}.{spec.key}.p{p}{{{tags[p]}}}" for p in range(self.config.num_partitions)]

    def _hash_names(self, spec: TableSpec) -> List[str]:
        names = self._names.get(spec.key)
        if names is None:
            names = self._names[spec.key] = self.hash_names(spec)
        return names

    # ---- request plumbing ----
    def _calls(self, spec: TableSpec, ids: np.ndarray, command: str, rows: Optional[np.ndarray] = None) -> List[_Call]:
        """Group ids (unique) by partition, chunked to max_batch_size, as packed HMGET/HDEL (fields) or
        HSET (field, row pairs) commands. Every command's arguments come from one gather into partition
        order and one bytes object; a command is its header and a view of its part (no copy per command)."""
        names = self._hash_names(spec)
        args = _resp_bulk(_id_bytes(ids))
        per_id = 1
        if rows is not None:
            args = np.concatenate([args, _resp_bulk(rows.reshape(len(rows), -1).view(np.uint8))], axis=1)
            per_id = 2
        groups = group_by_partition(ids, self.config.num_partitions)
        if not groups or not len(ids):
            return []
        order = groups[0][1] if len(groups) == 1 else np.concatenate([pos for _, pos in groups])
        body = memoryview(args[order].tobytes())
        width = args.shape[1]
        calls, at, step = [], 0, self.config.max_batch_size
        for p, positions in groups:
            for a in range(0, len(positions), step):
                pos = positions[a:a + step]
                calls.append(_Call(names[p], (_header(command, names[p], per_id * len(pos)),
                                              body[at * width:(at + len(pos)) * width]), pos))
                at += len(pos)
        return calls

    def _run_on_node(self, node: _Node, calls: Sequence[_Call], readonly: bool = False, asking: bool = False,
                     wait_replicas: int = 0, breaker: bool = True) -> Tuple[list, Optional[int]]:
        """The calls' replies (or exceptions) in order, pipelined on one connection; `readonly` first (a
        replica), `asking` before each call (ASK), `wait_replicas`: WAIT for that many replicas after the
        writes, whose reply (replicas that acknowledged) comes second. `breaker` off: a node marked down is
        tried anyway (administrative commands, which must not be refused for a lookup's failure)."""
        if breaker and time.monotonic() < node.down_until:
            return [TierError(f"redis node {node.addr} is marked down")] * len(calls), None
        pool = node.client.connection_pool
        try:
            conn = pool.get_connection()
        except (self._redis.ConnectionError, self._redis.TimeoutError) as e:
            return self._node_failed(node, e, len(calls)), None
        try:
            # one write of every command, then the replies in order: a pipeline without per-argument packing
            packed = [_READONLY] if readonly else []
            for c in calls:
                packed += [_ASKING, *c.packed] if asking else c.packed
            if wait_replicas:
                packed.append(self._wait_command(wait_replicas))
            if len(packed) > 1 and sum(map(len, packed)) <= _JOIN_BYTES:  # small commands: one sendall
                packed = [b"".join(packed)]
            conn.send_packed_command(packed, check_health=False)
            if readonly:
                conn.read_response()
            out: list = []
            for _ in calls:
                try:
                    if asking:
                        conn.read_response()
                    out.append(conn.read_response())
                except self._redis.ResponseError as e:  # an error reply to one command (e.g. MOVED)
                    out.append(e)
            acked = int(conn.read_response()) if wait_replicas else None
            return out, acked
        except (self._redis.ConnectionError, self._redis.TimeoutError) as e:
            conn.disconnect()
            return self._node_failed(node, e, len(calls)), None
        except self._redis.RedisError as e:
            conn.disconnect()
            return [e] * len(calls), None
        finally:
            pool.release(conn)

    def _wait_command(self, replicas: int) -> bytes:
        n, ms = str(replicas), str(self.config.replica_wait_ms)
        return f"*3\r\n$4\r\nWAIT\r\n${len(n)}\r\n{n}\r\n${len(ms)}\r\n{ms}\r\n".encode()

    def nodes_down(self) -> int:
        now = time.monotonic()
        return sum(1 for node in self._nodes.values() if node.down_until > now)

    def _node_failed(self, node: _Node, error: Exception, n: int) -> list:
        node.down_until = time.monotonic() + self.config.retry_interval
        _warnings.warn(("redis.node", node.addr, type(error).__name__), "redis node %s failed (%s); skipping it for %.1fs",
                       node.addr, error, self.config.retry_interval)
        return [error] * n

    def _execute(self, calls: List[_Call], retry_moved: bool = True, read: bool = False,
                 replicas: bool = True, breaker: bool = True) -> list:
        """Run calls grouped by node, nodes in parallel; results (or exceptions) in call order. `read`: gets
        (to replicas with read_from_replicas, unless `replicas` is off: a retry on the primaries)."""
        topo = self._topology
        if topo is not None and self.nodes_down() and topo.refresh_due():  # follow a failover
            try:
                topo.refresh(prefer_last=[a for a, n in self._nodes.items() if not self._usable(a)])
            except TierError:
                pass  # no node answers: the calls fail below and the hierarchy falls through
        from_replicas = topo is not None and read and replicas and self.config.read_from_replicas
        write_wait = topo is not None and not read and self.config.read_from_replicas
        by_node: Dict[str, List[int]] = {}
        for i, c in enumerate(calls):
            owner = self._owner(c.hash_name)
            by_node.setdefault(topo.read_node(owner, self._usable) if from_replicas else owner, []).append(i)
        results: list = [None] * len(calls)

        def run(job):
            addr, idx = job
            primary = topo is None or addr in topo.replicas
            wait = topo.replica_count(addr) if (write_wait and primary) else 0
            return self._run_on_node(self._node(addr), [calls[i] for i in idx], readonly=not primary,
                                     wait_replicas=wait, breaker=breaker)

        jobs = list(by_node.items())
        outs = [run(jobs[0])] if len(jobs) == 1 else list(self._pool.map(run, jobs))
        for (addr, idx), (out, acked) in zip(jobs, outs):
            for i, r in zip(idx, out):
                results[i] = r
            if acked is not None and acked < topo.replica_count(addr):
                topo.mark_stale(addr, self.config.retry_interval)
                _warnings.warn(("redis.replica_wait", addr), "redis: %d of %d replicas of %s acknowledged a write "
                               "within %d ms; reading from the primary for %.1fs", acked, topo.replica_count(addr),
                               addr, self.config.replica_wait_ms, self.config.retry_interval)
        if topo is None:
            return results
        # redis-py parses the redirections into MovedError / AskError ("<slot> <host:port>")
        exc = self._redis.exceptions
        moved = [i for i, r in enumerate(results) if isinstance(r, exc.MovedError)]
        if moved and retry_moved:  # resharded or failed over: re-read the slot map once and retry
            topo.refresh()
            for i, r in zip(moved, self._execute([calls[i] for i in moved], retry_moved=False, read=read,
                                                             breaker=breaker)):
                results[i] = r
        # still redirected: ASK (a slot migrating), or MOVED where the re-read map lags (the node it came from
        # has not heard of a SETSLOT yet): go where the reply says. MovedError is an AskError in redis-py; a
        # MOVED target owns the slot from now on.
        asked = [i for i, r in enumerate(results) if isinstance(r, exc.AskError)]
        for target, idx in self._group_by(asked, lambda i: str(results[i]).split()[-1]).items():
            for i in idx:
                if isinstance(results[i], exc.MovedError):
                    topo.owner[int(str(results[i]).split()[0])] = target
            out, _ = self._run_on_node(self._node(target), [calls[i] for i in idx], asking=True, breaker=breaker)
            for i, r in zip(idx, out):
                results[i] = r
        if from_replicas:  # a replica that failed: its reads once more from the primaries
            failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
            if failed:
                for i, r in zip(failed, self._execute([calls[i] for i in failed], read=True, replicas=False)):
                    results[i] = r
        return results

    @staticmethod
    def _group_by(items: List[int], key) -> Dict[str, List[int]]:
        out: Dict[str, List[int]] = {}
        for i in items:
            out.setdefault(key(i), []).append(i)
        return out

    # ---- tier hooks ----
    def _create_table(self, spec: TableSpec) -> None:
        pass  # hashes come into being with their first row

    def _get(self, spec: TableSpec, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        uniq, inverse = np.unique(keys, return_inverse=True)
        calls = self._calls(spec, uniq, "HMGET")
        replies = self._execute(calls, read=True)
        answered = [(c, v) for c, v in zip(calls, replies) if not isinstance(v, Exception)]
        failed = len(uniq) - sum(len(c.positions) for c, _ in answered)
        if failed:
            self._count(spec.key, errors=failed)
        if not answered:
            return np.zeros((len(keys), spec.dim), dtype=np.float32), np.zeros(len(keys), dtype=bool)
        # every call's reply in one pass, no per-call numpy
        positions = np.concatenate([c.positions for c, _ in answered])
        values = list(itertools.chain.from_iterable(v for _, v in answered))
        return self._rows_of_values(values, positions, len(uniq), inverse, spec.dim)

    def _write(self, spec: TableSpec, calls: List[_Call], keys: np.ndarray) -> None:
        failures = [(c, r) for c, r in zip(calls, self._execute(calls)) if isinstance(r, Exception)]
        if failures:
            bad = np.concatenate([keys[c.positions] for c, _ in failures])
            self._count(spec.key, write_errors=len(bad))
            raise TierWriteError(self.name, spec.key, bad, failures[0][1])

    def _put(self, spec: TableSpec, keys: np.ndarray, rows: np.ndarray) -> None:
        self._write(spec, self._calls(spec, keys, "HSET", np.ascontiguousarray(rows)), keys)

    def _delete(self, spec: TableSpec, keys: np.ndarray) -> None:
        self._write(spec, self._calls(spec, keys, "HDEL"), keys)

    def _on_each_hash(self, spec: TableSpec, command: str, what: str) -> list:
        """`command <hash>` on every partition hash of a table, routed (and redirected) like row commands;
        the replies, or TierError ("cannot <what>") for the first that failed."""
        names = self._hash_names(spec)
        replies = self._execute([_Call(n, (_header(command, n, 0),), _NO_POSITIONS) for n in names], breaker=False)
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            raise TierError(f"redis: cannot {what}: {failed}") from failed
        return replies

    def _num_rows(self, spec: TableSpec) -> int:
        return int(sum(self._on_each_hash(spec, "HLEN", f"count rows of {spec.key}")))

    def drop_table(self, table: str) -> None:
        """Remove every row of `table` from Redis (all its partition hashes)."""
        self._on_each_hash(self.spec(table), "DEL", f"drop table {table}")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for node in self._nodes.values():
            node.client.close()
