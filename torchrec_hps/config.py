"""The project's one config vocabulary: dataclasses used by the storage tiers, the module, the CLI and
TorchX. Config files (YAML/JSON, HugeCTR's ps.json) map onto these."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

OVERFLOW_POLICIES: Tuple[str, ...] = ("evict_lru", "evict_lfu", "evict_random")
STORAGE_DTYPES: Tuple[str, ...] = ("float32", "float16")
KAFKA_SECURITY_PROTOCOLS: Tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS: Tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
KEY_PREFIX = "hps_et"  # HugeCTR HPS names tables hps_et.<model>.<table>; we keep the scheme


_SCALARS = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


def _check_types(obj: Any, owner: str) -> None:
    """Scalar fields hold what their annotation says (a config file can put any YAML value anywhere):
    ValueError naming the field, not a TypeError from a comparison later."""
    for f in fields(obj):
        ann = str(f.type).replace("typing.", "")
        optional = ann.startswith("Optional[")
        kinds = _SCALARS.get(ann[len("Optional["):-1] if optional else ann)
        value = getattr(obj, f.name)
        if kinds is None or (optional and value is None):
            continue
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            want = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "a string"}
            raise ValueError(f"{owner}.{f.name}={value!r} is not {want[ann.removeprefix('Optional[').rstrip(']')]}"
                             + (" (or null)" if optional else ""))


def _check_choice(owner: str, name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not allowed; expected one of {list(allowed)}")


def _check_range(owner: str, name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{owner}.{name}={value!r} is out of range; expected {lo} <= {name} <= {hi}")


def table_key(model: str, table: str) -> str:
    """A table's name in the tiers, '<model>.<table>' (model: the model's name or a served version's
    namespace); the one place it is built."""
    return f"{model}.{table}"


@dataclass(frozen=True)
class TableSpec:
    """One embedding table as the storage tiers see it. `model` namespaces it, so several models (and
    several instances of one model) share a tier."""

    model: str
    name: str
    num_rows: int
    dim: int

    def __post_init__(self) -> None:
        for part in (self.model, self.name):
            if not part or any(c in part for c in " {}\n"):
                raise ValueError(f"table {self.model!r}.{self.name!r}: model and table names must be non-empty "
                                 "and contain no spaces or braces")
        if self.num_rows <= 0 or self.dim <= 0:
            raise ValueError(f"table {self.key}: num_rows and dim must be positive, got {self.num_rows}, {self.dim}")

    @property
    def key(self) -> str:
        """Qualified name used by every tier: '<model>.<table>'."""
        return table_key(self.model, self.name)


@dataclass
class MemoryTierConfig:
    """Host-memory tier: a bounded cache of rows per table (HPS's volatile hash map)."""

    capacity: Optional[int] = None  # rows per table; None = the table's num_rows (holds it whole)
    overflow_policy: str = "evict_lru"
    resolution_target: float = 0.8  # when full, evict down to this share of capacity
    num_partitions: int = 4  # independent locks, so concurrent readers and writers rarely meet
    storage_dtype: str = "float32"
    promote: bool = True  # copy rows found in lower tiers up into this tier
    # a put through the hierarchy (updates from training) overwrites the rows held here and inserts no
    # others: they are read from the tiers below, and promoted when read (an update stream does not evict
    # the hot rows); off: every put is written here too
    update_only_cached: bool = True
    seed: int = 0  # for evict_random

    def __post_init__(self) -> None:
        _check_types(self, "memory")
        _check_choice("memory", "overflow_policy", self.overflow_policy, OVERFLOW_POLICIES)
        _check_choice("memory", "storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        _check_range("memory", "resolution_target", self.resolution_target, 0.0, 1.0)
        if self.capacity is not None and self.capacity <= 0:
            raise ValueError(f"memory.capacity={self.capacity} must be positive (or None for whole tables)")
        if self.num_partitions < 1:
            raise ValueError(f"memory.num_partitions={self.num_partitions} must be >= 1")


@dataclass
class RedisTierConfig:
    """Redis tier, standalone (`url`) or Cluster (`cluster_nodes`). Rows live in one Redis hash per table
    partition, so one request fetches many rows and a table's partitions spread over the cluster."""

    url: Optional[str] = None  # redis://host:port[/db] or rediss:// for TLS (credentials below, not in the URL)
    cluster_nodes: List[str] = field(default_factory=list)  # ["host:port", ...] startup nodes
    # the secret itself, or where to read it: "env:VAR" or "file:/path" (never printed: repr, logs, errors)
    password: Optional[str] = field(default=None, repr=False)
    username: Optional[str] = None
    ssl: bool = False  # TLS (or a rediss:// url)
    ssl_ca_certs: Optional[str] = None  # the CA file that signs the servers' certificates (default: the system's)
    # mutual TLS: this client's certificate and key (PEM), for servers with tls-auth-clients yes
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    socket_timeout: float = 2.0
    socket_connect_timeout: float = 1.0
    num_partitions: int = 16
    max_batch_size: int = 4096  # rows per HMGET/HSET command, bounds how long one command blocks Redis
    retry_interval: float = 0.5  # seconds a failed node is skipped before it is tried again
    # Cluster: re-read the slot map at most this often while a node fails (follows a failover to its replica)
    topology_refresh_interval: float = 1.0
    # Cluster: gets from the slots' replicas (writes still go to primaries and wait, up to replica_wait_ms,
    # for a replica to acknowledge; a replica that did not is not read for retry_interval, so none serves
    # a row older than the last write)
    read_from_replicas: bool = False
    replica_wait_ms: int = 100
    storage_dtype: str = "float32"
    promote: bool = True
    connection_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed through to redis-py

    def __post_init__(self) -> None:
        _check_types(self, "redis")
        if self.url and "@" in self.url.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("redis.url holds credentials; put them in redis.username / redis.password (which may "
                             "name an environment variable, env:VAR, or a file, file:/path), so they are never "
                             "printed")
        if bool(self.url) == bool(self.cluster_nodes):
            raise ValueError("redis: give exactly one of url (standalone) or cluster_nodes (Cluster)")
        _check_choice("redis", "storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        if self.num_partitions < 1 or self.max_batch_size < 1:
            raise ValueError("redis.num_partitions and redis.max_batch_size must be >= 1")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("redis: a client certificate needs both ssl_certfile and ssl_keyfile")


def resolve_secret(value: Optional[str], what: str) -> Optional[str]:
    """A secret given as itself, as env:VAR or as file:/path (the file's first line); the error names where it
    was looked for, never the secret."""
    if value is None:
        return None
    if value.startswith("env:"):
        import os

        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"{what}: environment variable {name!r} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        path = value[5:]
        try:
            with open(path) as f:
                return f.readline().rstrip("\n")
        except OSError as e:
            raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from None
    return value


@dataclass
class RocksDBTierConfig:
    """RocksDB tier on local SSD: one column family per table, the full copy of every table."""

    path: str = ""
    read_only: bool = False  # for a volume shared by several nodes
    block_cache_mb: int = 1024  # grows on demand; 256 -> 1024 gave +13% rows/s on a 256 MB table
    read_threads: int = 2  # multi-gets are split over threads (rocksdict releases the GIL)
    storage_dtype: str = "float32"
    promote: bool = False  # the bottom tier: nothing lower to promote from
    compression: str = "none"  # SST compression: "none", "lz4", "zstd", "snappy" (float rows barely compress)
    write_buffer_mb: int = 64  # per column family memtable before a flush

    def __post_init__(self) -> None:
        _check_types(self, "rocksdb")
        if not self.path:
            raise ValueError("rocksdb.path is required")
        _check_choice("rocksdb", "storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        if self.read_threads < 1:
            raise ValueError("rocksdb.read_threads must be >= 1")
        _check_choice("rocksdb", "compression", self.compression, ("none", "lz4", "zstd", "snappy"))
        if self.write_buffer_mb < 1:
            raise ValueError("rocksdb.write_buffer_mb must be >= 1")


@dataclass
class StorageConfig:
    """The tiers below the module's cache, top to bottom; any may be left out."""

    memory: Optional[MemoryTierConfig] = None
    redis: Optional[RedisTierConfig] = None
    rocksdb: Optional[RocksDBTierConfig] = None


EVICTION_POLICIES: Tuple[str, ...] = ("lru", "lfu")
UNKNOWN_KEY_POLICIES: Tuple[str, ...] = ("error", "default")
CACHE_DTYPES: Tuple[str, ...] = ("fp32", "fp16")
ADMISSION_POLICIES: Tuple[str, ...] = ("always", "second_access", "never")


@dataclass
class CacheConfig:
    """The module's embedding cache, per table. With CUDA two levels: HBM (`cache_ratio`) over a host level
    in host-mapped memory that the GPU reads in place (`host_cache_ratio`); without CUDA one level, in host
    memory (`cache_ratio`)."""

    cache_ratio: float = 0.1  # share of each table's rows the cache holds in HBM (HPS's gpucacheper)
    cache_rows: Optional[int] = None  # or an absolute number of rows per table (wins over cache_ratio)
    host_cache_ratio: float = 1.0  # CUDA: share of each table's rows in the host level (1.0: every row)
    host_cache_rows: Optional[int] = None  # or an absolute number (wins; needed for hashed ids)
    admission: str = "always"  # into HBM: "always", "second_access" (first reads served from host memory), "never"
    hashed_ids: bool = False  # ids are raw 64-bit hashes: any id >= 0 (num_embeddings only sizes the caches)
    min_cache_rows: int = 1024  # small tables are cached whole up to this many rows, whatever the ratio
    hit_rate_threshold: float = 0.9  # below it a lookup waits for missing rows; at or above, default now
    eviction: str = "lru"
    eviction_batch: float = 0.01  # when full, evict at least this share of the slots at once (amortizes the scan)
    default_value: float = 0.0  # the default vector's value, for keys found in no tier (and async misses)
    unknown_keys: str = "error"  # ids outside [0, num_embeddings): "error" or "default" (vector + counter)
    cuda_graphs: bool = True  # on CUDA, replay all-hit lookups as CUDA graphs (one per batch size and id bucket)
    cache_dtype: str = "fp32"  # cached rows: "fp32" or "fp16" (half the HBM per row; pooled output stays fp32)
    refresh_interval: float = 0.0  # seconds between re-reads of every cached row from the tiers (0: never)
    refresh_delay: float = 0.0  # seconds after the module starts before the first periodic re-read

    def __post_init__(self) -> None:
        _check_types(self, "cache")
        _check_range("cache", "cache_ratio", self.cache_ratio, 0.0, 1.0)
        _check_range("cache", "hit_rate_threshold", self.hit_rate_threshold, 0.0, 1.0)
        _check_range("cache", "eviction_batch", self.eviction_batch, 0.0, 0.5)
        _check_choice("cache", "eviction", self.eviction, EVICTION_POLICIES)
        _check_choice("cache", "unknown_keys", self.unknown_keys, UNKNOWN_KEY_POLICIES)
        _check_choice("cache", "cache_dtype", self.cache_dtype, CACHE_DTYPES)
        _check_choice("cache", "admission", self.admission, ADMISSION_POLICIES)
        _check_range("cache", "host_cache_ratio", self.host_cache_ratio, 0.0, 1.0)
        if self.refresh_interval < 0 or self.refresh_delay < 0:
            raise ValueError("cache.refresh_interval and cache.refresh_delay must be >= 0 (seconds)")
        if self.host_cache_rows is not None and self.host_cache_rows <= 0:
            raise ValueError(f"cache.host_cache_rows={self.host_cache_rows} must be positive")
        if self.min_cache_rows < 0:
            raise ValueError(f"cache.min_cache_rows={self.min_cache_rows} must be >= 0")
        if self.cache_rows is not None and self.cache_rows <= 0:
            raise ValueError(f"cache.cache_rows={self.cache_rows} must be positive")
        if self.cache_rows is None and self.cache_ratio <= 0:
            raise ValueError("cache.cache_ratio must be > 0 (or give cache_rows)")

    def rows_for(self, num_embeddings: int) -> int:
        """Rows of a table cached in the device's own memory (HBM, or host memory without CUDA)."""
        return self._rows(self.cache_rows, self.cache_ratio, num_embeddings)

    def host_rows_for(self, num_embeddings: int) -> int:
        """Rows of a table in the host level under HBM (at least as many as HBM holds)."""
        return max(self._rows(self.host_cache_rows, self.host_cache_ratio, num_embeddings),
                   self.rows_for(num_embeddings))

    def _rows(self, absolute: Optional[int], ratio: float, num_embeddings: int) -> int:
        rows = absolute if absolute is not None else max(int(round(ratio * num_embeddings)), self.min_cache_rows)
        return max(1, min(rows, num_embeddings))


@dataclass
class HPSConfig:
    """Everything an HPSEmbeddingBagCollection needs besides its tables: the model's namespace in the
    shared tiers, the cache, and the tiers."""

    model: str
    cache: CacheConfig = field(default_factory=CacheConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def _build(cls, data: Optional[Dict[str, Any]], where: str):
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed keys: {sorted(known)}")
    return cls(**data)


def storage_config_from_dict(data: Dict[str, Any]) -> StorageConfig:
    data = dict(data or {})
    return StorageConfig(
        memory=_build(MemoryTierConfig, data.pop("memory", None), "storage.memory"),
        redis=_build(RedisTierConfig, data.pop("redis", None), "storage.redis"),
        rocksdb=_build(RocksDBTierConfig, data.pop("rocksdb", None), "storage.rocksdb"),
        **_check_empty(data, "storage", ["memory", "redis", "rocksdb"]),
    )


def hps_config_from_dict(data: Dict[str, Any]) -> HPSConfig:
    """The inverse of dataclasses.asdict(HPSConfig): unknown keys are errors that name the key."""
    data = dict(data)
    if "model" not in data:
        raise ValueError("config: 'model' (the model's namespace in the tiers) is required")
    cache = _build(CacheConfig, data.pop("cache", None), "cache") or CacheConfig()
    storage = storage_config_from_dict(data.pop("storage", None) or {})
    model = data.pop("model")
    _check_empty(data, "config", ["model", "cache", "storage"])
    return HPSConfig(model=model, cache=cache, storage=storage)


def _check_empty(rest: Dict[str, Any], where: str, allowed: List[str]) -> Dict[str, Any]:
    if rest:
        raise ValueError(f"{where}: unknown keys {sorted(rest)}; allowed keys: {allowed}")
    return {}


@dataclass
class KafkaConfig:
    """The update stream: one topic per model and table, `<topic_prefix>.<model>.<table>`."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = KEY_PREFIX
    max_message_bytes: int = 900_000  # under the broker's message.max.bytes (1 MB by default)
    publish_every_steps: int = 1
    publish_every_seconds: float = 0.0  # 0: steps alone decide
    num_partitions: int = 4  # for topics this library creates
    replication_factor: int = 1
    group_id: Optional[str] = None  # consumer group; one per node for node-local tiers
    poll_timeout: float = 0.2
    retry_backoff: float = 0.5  # seconds before re-applying a batch whose tier write failed
    # seconds between the consumer's offset commits: applied rows go to RocksDB without its write-ahead log,
    # a flush starts each interval and the offsets applied before it are committed once it has ended, so a
    # crash loses nothing Kafka does not send again (the group resumes at the last commit); 0: commit after
    # every batch, every write logged
    commit_interval: float = 1.0
    connect_timeout: float = 30.0  # seconds a publisher or consumer waits at start for the brokers to answer
    catch_up_timeout: float = 300.0  # a version loaded from Kafka-updated tiers goes live once its consumer caught up
    # rejected update messages (corrupt, or rows no tier may take) are copied here, with their source topic,
    # partition, offset and the reason as headers, before their offsets are committed; None: logged only
    dead_letter_topic: Optional[str] = None
    # authenticated / encrypted brokers: PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL; SASL by SCRAM-SHA-256 or
    # -512 (or PLAIN); the password as itself, env:VAR or file:/path (never printed); the CA of the broker's
    # certificate (default: the system's)
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-256"
    sasl_username: Optional[str] = None
    sasl_password: Optional[str] = field(default=None, repr=False)
    ssl_ca_location: Optional[str] = None
    producer: Dict[str, Any] = field(default_factory=dict)  # extra librdkafka settings
    consumer: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self, "kafka")
        _check_choice("kafka", "security_protocol", self.security_protocol, KAFKA_SECURITY_PROTOCOLS)
        _check_choice("kafka", "sasl_mechanism", self.sasl_mechanism, KAFKA_SASL_MECHANISMS)
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"kafka.security_protocol {self.security_protocol} needs kafka.sasl_username and "
                             "kafka.sasl_password (which may be env:VAR or file:/path)")
        if self.max_message_bytes < 1024:
            raise ValueError(f"kafka.max_message_bytes={self.max_message_bytes} is too small (>= 1024)")
        if self.publish_every_steps < 1:
            raise ValueError("kafka.publish_every_steps must be >= 1")
        if self.catch_up_timeout <= 0:
            raise ValueError(f"kafka.catch_up_timeout={self.catch_up_timeout} must be > 0 (seconds)")

    def topic(self, model: str, table: str) -> str:
        return f"{self.topic_prefix}.{model}.{table}"

    def client_settings(self) -> Dict[str, Any]:
        """librdkafka settings every client of the stream shares: brokers, security, credentials."""
        out: Dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            out.update({"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.sasl_username,
                        "sasl.password": resolve_secret(self.sasl_password, "kafka.sasl_password")})
        if self.ssl_ca_location:
            out["ssl.ca.location"] = self.ssl_ca_location
        return out
