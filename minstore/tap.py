"""
``twistd minstore``: the options of a node and the service tree they build.
"""

import functools
import ipaddress
import os
import re
import sys
import uuid

from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.python.threadpool import ThreadPool

from minstore import __version__
from minstore.api import DEFAULT_MAX_RECORD_SIZE, RecordAPI, ascii_digits
from minstore.auth import AuthFileError, ClusterKey, Guard, GuardResource, TokensService, read_security_options
from minstore.cache import DEFAULT_SIZE as DEFAULT_CACHE_SIZE
from minstore.cache import CacheFront
from minstore.cluster.lookup import Lookups
from minstore.cluster.peers import PeerClient, make_http_client
from minstore.cluster.replication import Replication
from minstore.cluster.servers import ServerList, ServersFileError, read_servers
from minstore.cluster.service import ClusterService
from minstore.cluster.purge import STATE_FILE, FileState, Purger, PurgeService
from minstore.cluster.sync import Sync, SyncIndex, SyncService
from minstore.node import Node
from minstore.process import DEFAULT as DEFAULT_PROCESSES
from minstore.process import available_processes, make_processes
from minstore.process.schema import SchemaError
from minstore.records import HybridLogicalClock
from minstore.service import NodeRoot, NodeSite, QuietSite, start_failure
from minstore.storage import available_engines, make_storage
from minstore.storage.indexes import parse_declarations
from minstore.tls import TLSConfigError, client_cert_endpoint


#: A sync waits this many times as long as each chunk of its work took, so
#: that clients keep their latency while it runs (bench/sync_bench.py --nodes).
SYNC_PACE = 1.0

log = Logger("minstore")


def _positive_int(name):
    def convert(text):
        # int() takes any Unicode digit (Arabic-Indic, fullwidth): not here.
        if not ascii_digits(text.strip()):
            raise usage.UsageError("--%s: %r is not a whole number" % (name, text))
        value = int(text)
        if value <= 0:
            raise usage.UsageError("--%s: must be above 0, not %d" % (name, value))
        return value

    convert.coerceDoc = "A whole number above 0."
    return convert


def _positive_float(name):
    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise usage.UsageError("--%s: %r is not a number" % (name, text))
        if not value > 0:
            raise usage.UsageError("--%s: must be above 0, not %s" % (name, text))
        return value

    convert.coerceDoc = "Seconds, above 0."
    return convert


def _seconds(name):
    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise usage.UsageError("--%s: %r is not a number" % (name, text))
        if not value >= 0:
            raise usage.UsageError("--%s: must be 0 or more, not %s" % (name, text))
        return value

    convert.coerceDoc = "Seconds, 0 or more."
    return convert


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a minstore node: records over HTTP at /{collection}/{uid}, run "
        "through processes, stored durably and spread to the peers of "
        "--servers. Every bad option stops the start with one line on "
        "stderr and exit status 2."
    )
    optParameters = [
        ["port", "p", "8001", "Port number, or Twisted endpoint string (tcp:8001:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem)."],
        ["servers", "s", None, "The servers.list file of peers (none: a standalone node). Re-read on SIGHUP."],
        ["data", "d", "./minstore-data", "Data directory, created when missing."],
        ["storage", None, "files", "Storage engine: files (one JSON file per record beside a SQLite catalog), sqlite (one SQLite database), memory (lost at stop), or postgresql (with --dsn; several nodes may share its database); packages add more."],
        ["dsn", None, None, "--storage postgresql: the database, as a libpq URL (postgresql://user@host:5432/dbname) or key=value words; default $MINSTORE_DSN (keeps a password out of the process list)."],
        ["db-pool", None, None, "--storage postgresql: most connections this node holds to the database (default: --threads); a storage thread finding them all busy waits for one up to --db-timeout, then answers 503 storage_busy.", _positive_int("db-pool")],
        ["db-timeout", None, 10.0, "--storage postgresql: seconds one SQL statement may run or wait for a lock (the sessions' statement_timeout and lock_timeout) and a call may wait for a free connection of --db-pool; past it, 503 storage_unavailable (storage_busy for the pool).", _positive_float("db-timeout")],
        ["processes", None, DEFAULT_PROCESSES, "Comma-separated processes run on each client write, in order (lang, schema, or one a package adds); empty for none."],
        ["schemas", None, None, "Directory of {collection}.json JSON Schemas for the schema process."],
        ["max-record-size", None, DEFAULT_MAX_RECORD_SIZE, "Largest request body accepted, in bytes (larger: 413).", _positive_int("max-record-size")],
        ["threads", None, 10, "Threads for storage I/O and CPU-heavy processes.", _positive_int("threads")],
        ["read-cache-size", None, 32 * 1024 * 1024, "Bytes of recently read or written records kept in memory to answer GETs without a disk read.", _positive_int("read-cache-size")],
        ["access-log", None, None, "Write an access log line per request to this file (default: none, for speed)."],
        ["lookup-timeout", None, 2.0, "Seconds a GET or DELETE that misses here waits for the peers' lookups.", _positive_float("lookup-timeout")],
        ["replication-timeout", None, 5.0, "Seconds one request sending replicas to a peer may take.", _positive_float("replication-timeout")],
        ["replication-interval", None, 0.01, "Least seconds between two replica requests to one peer: larger batches (less CPU per write, here and on the peer) for up to that much more lag under load; a write after a quiet spell goes at once; 0: send as soon as the previous request returns.", _seconds("replication-interval")],
        ["retry-max", None, 30.0, "Longest wait, in seconds, between retries to a peer that is down (back-off doubles from 0.1 s up to it).", _positive_float("retry-max")],
        ["sync-timeout", None, 5.0, "Seconds a write with sync=1 waits for every peer to store it.", _positive_float("sync-timeout")],
        ["cache-size", None, DEFAULT_CACHE_SIZE, "cache=1 (this node as a front to the dependants of --servers): bytes of records the front's LRU cache holds, counted as their stored JSON.", _positive_int("cache-size")],
        ["cache-ttl", None, 60.0, "cache=1: seconds a cached record is served without asking a dependant; then it is revalidated with If-None-Match.", _seconds("cache-ttl")],
        ["cache-timeout", None, 5.0, "cache=1: seconds a dependant has to answer the front; when none answers, 502.", _positive_float("cache-timeout")],
        ["tokens", None, None, "Bearer tokens file, one NAME SHA256HEX SCOPES a line (make one with python -m minstore.auth new NAME SCOPES); every route but GET /_node/health then needs a token. Re-read on SIGHUP. Without it the node answers loopback clients only (protected mode) unless --insecure."],
        ["cluster-key", None, None, "File holding the cluster's shared secret (python -m minstore.auth cluster-key): every request to a peer is signed with it, and unsigned, badly signed, stale or replayed /_cluster/ requests are refused 401."],
        ["peer-ca", None, None, "PEM CA certificate(s) that https:// peers' certificates must chain to (default: the system's roots)."],
        ["peer-cert", None, None, "PEM client certificate presented to https:// peers (with --peer-key)."],
        ["peer-key", None, None, "PEM private key of --peer-cert."],
        ["client-ca", None, None, "With an ssl: --port: require a client certificate signed by a CA of this PEM file."],
        ["allow-origin", None, None, "Comma-separated browser origins (https://app.example.com) whose pages may change data here, besides the node's own."],
        ["indexes", None, "", "Secondary indexes, COLLECTION:FIELD,... (COLLECTION * for every collection; FIELD a dotted path into the record: lang, value.year, value.author.name): listings filter on them (GET /books/?value.year=1965, min_value.year=1960). One declared over records already held is built in the background at start (503 index_building until done); one no longer declared is dropped."],
        ["index-build-rate", None, 0, "Records a second an index build at start goes through at most (0: as fast as one thread goes).", _seconds("index-build-rate")],
        ["sync-interval", None, 0.0, "Seconds between two syncs with every peer in turn (compare and synchronise: what replication missed, a new peer's full copy); 0: only on POST /_node/sync.", _seconds("sync-interval")],
        ["tombstone-grace", None, 7 * 86400.0, "Least seconds a tombstone is kept: one older is purged once every peer has confirmed holding it (a completed sync, or its replication checkpoint); never while a peer is down. A node that was away longer (or a backup put back) rejoins: its syncs only pull until one has completed with every peer. Never purged with --storage postgresql (a shared database).", _positive_float("tombstone-grace")],
        ["cache-stale-if-error", None, 0.0, "cache=1: seconds past its freshness that a stale record is still served (with a Warning header) while no dependant answers; 0: never.", _seconds("cache-stale-if-error")],
    ]

    optFlags = [
        ["insecure", None, "Without --tokens, answer every client, not only loopback ones (no authentication at all)."],
    ]

    def opt_version(self):
        """Print the version and exit."""
        print("minstore", __version__)
        sys.exit(0)

    def parseOptions(self, options=None):
        # twistd prints the whole usage text above an option error; a node
        # that will not start says why in one line instead.
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            sys.stderr.write("minstore: error: %s\n" % (e,))
            sys.stderr.flush()
            raise SystemExit(2)

    def postOptions(self):
        port = self["port"]
        if ascii_digits(port):
            if not 0 < int(port) < 65536:
                raise usage.UsageError("--port: %s is not a TCP port (1-65535)" % port)
            port = self["port"] = "tcp:" + port
        try:
            from twisted.internet import reactor

            serverFromString(reactor, port)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise usage.UsageError("--port: %r is not a port or endpoint string: %s" % (port, e))

        if self["servers"]:
            try:
                self["server_list"] = read_servers(self["servers"])
            except ServersFileError as e:
                raise usage.UsageError(str(e))
        else:
            self["server_list"] = ServerList()

        # Checked here, created by makeService once the port listens: a
        # start that fails leaves nothing behind.
        data = os.path.abspath(self["data"])
        existing = data
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            if existing == data:
                raise usage.UsageError("--data: %s is not a writable directory" % data)
            raise usage.UsageError("--data: cannot create %s: %s is not a writable directory" % (data, existing))

        if self["storage"] not in available_engines():
            raise usage.UsageError(
                "--storage: no engine %r (known: %s)"
                % (self["storage"], ", ".join(sorted(available_engines())))
            )

        self._check_dsn()
        try:
            self["index_list"] = parse_declarations(self["indexes"])
        except ValueError as e:
            raise usage.UsageError("--indexes: %s" % (e,))

        if self["schemas"] and not os.path.isdir(self["schemas"]):
            raise usage.UsageError("--schemas: %s is not a directory" % self["schemas"])

        names = [n.strip() for n in self["processes"].split(",") if n.strip()]
        known = available_processes()
        for name in names:
            if name not in known:
                raise usage.UsageError(
                    "--processes: no process %r (known: %s)" % (name, ", ".join(sorted(known)))
                )
        try:
            self["process_list"] = make_processes(names, self)
        except SchemaError as e:
            raise usage.UsageError("--schemas: %s" % (e,))

        try:
            self["security"] = read_security_options(self)
        except (AuthFileError, TLSConfigError) as e:
            raise usage.UsageError(str(e))

        if self["access-log"]:
            directory = os.path.dirname(os.path.abspath(self["access-log"]))
            if not os.access(directory, os.W_OK):
                raise usage.UsageError("--access-log: cannot write in %s" % directory)

    def _check_dsn(self):
        if self["storage"] != "postgresql":
            if self["dsn"]:
                raise usage.UsageError("--dsn: only for --storage postgresql, not %s" % self["storage"])
            if self["db-pool"] is not None:
                raise usage.UsageError("--db-pool: only for --storage postgresql, not %s" % self["storage"])
            return
        if self["db-pool"] is None:
            self["db-pool"] = self["threads"]
        dsn = self["dsn"] = self["dsn"] or os.environ.get("MINSTORE_DSN", "")
        if not dsn:
            raise usage.UsageError("--storage postgresql needs --dsn postgresql://user@host:port/dbname (or $MINSTORE_DSN)")
        from minstore.storage.postgresql import load_driver, parse_dsn

        try:
            parse_dsn(dsn)
        except ValueError as e:
            raise usage.UsageError("--dsn: %s" % (e,))
        try:
            load_driver()
        except ImportError as e:
            raise usage.UsageError("--storage postgresql: %s" % (e,))


_NODE_ID = re.compile(rb"[A-Za-z0-9_.]{1,64}")


def _node_id(data_dir):
    """This node's id, made once and kept in the data directory."""
    path = os.path.join(data_dir, "node_id")
    if os.path.exists(path):
        with open(path, "rb") as f:
            content = f.read().strip()
        # A node id goes into every version it issues: refuse a damaged one
        # rather than issue versions that no peer can order.
        if not _NODE_ID.fullmatch(content):
            sys.stderr.write(
                "minstore: cannot start: %s does not hold a node id (1-64 of [A-Za-z0-9_.]); "
                "restore it, or remove it to make a new one\n" % (path,)
            )
            raise SystemExit(1)
        return content.decode("ascii")
    node_id = uuid.uuid4().hex[:12]
    try:
        with open(path + ".tmp", "w") as f:
            f.write(node_id)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:  # a full disk fails the write, which names no file
        raise OSError(e.errno, "cannot write the node id to %s: %s" % (path, e.strerror))
    return node_id


def listens_beyond_loopback(endpoint):
    """Whether a server endpoint string accepts connections from other hosts."""
    # Split on the colons that are not escaped: tcp6:8001:interface=\:\:1
    for part in re.split(r"(?<!\\):", endpoint)[1:]:
        if part.startswith("interface="):
            address = part[len("interface="):].replace("\\", "").strip("[]")
            try:
                return not ipaddress.ip_address(address).is_loopback
            except ValueError:
                return address != "localhost"
    return not endpoint.startswith("unix:")


class ListeningService(Service):
    """
    Owns a port that already listens (bound by makeService before anything
    is created on disk); stops listening when the node stops.
    """

    def __init__(self, port):
        self.port = port

    def stopService(self):
        Service.stopService(self)
        return self.port.stopListening()


def _listen(endpoint, description, factory):
    """
    The listening port of ``endpoint`` (``description``: the --port
    string), bound now; on failure (a port in use, an address not here) one
    line on stderr and exit status 2.
    """
    outcome = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome or isinstance(outcome[0], Failure):
        reason = outcome[0].getErrorMessage() if outcome else "it did not listen at once"
        sys.stderr.write("minstore: error: --port: cannot listen on %s: %s\n" % (description, reason))
        sys.stderr.flush()
        raise SystemExit(2)
    return outcome[0]


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    data_dir = os.path.abspath(config["data"])

    # Listen first: a busy port stops the start before anything is created.
    # The site answers nothing before the reactor runs, by which time its
    # resource is the API's.
    if config["access-log"]:
        site = NodeSite(Resource(), logPath=config["access-log"])
    else:
        site = QuietSite(Resource())
    if config["client-ca"]:
        endpoint = client_cert_endpoint(reactor, config["port"], config["client-ca"])
    else:
        endpoint = serverFromString(reactor, config["port"])
    port = _listen(endpoint, config["port"], site)
    try:
        return _make_node(config, reactor, site, port, data_dir)
    except BaseException as e:
        # Nothing listens after a refused start, and the reason is one
        # line (a full disk, a damaged file), not a traceback.
        port.stopListening()
        if isinstance(e, (SystemExit, KeyboardInterrupt)):
            raise
        sys.stderr.write("minstore: cannot start: %s\n" % (start_failure(e),))
        sys.stderr.flush()
        raise SystemExit(1)


def _make_node(config, reactor, site, port, data_dir):
    """makeService's NodeRoot around the listening ``port``."""
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        port.stopListening()
        sys.stderr.write("minstore: error: --data: cannot create %s: %s\n" % (data_dir, e.strerror or e))
        raise SystemExit(2)

    pool = ThreadPool(minthreads=2, maxthreads=config["threads"], name="minstore-io")
    node_id = _node_id(data_dir)
    in_thread = functools.partial(deferToThreadPool, reactor, pool)
    options = {}
    if config.get("dsn"):
        options = {
            "dsn": config["dsn"],
            "node_id": node_id,
            "pool_size": config["db-pool"],
            "statement_timeout": config["db-timeout"],
        }
    storage = make_storage(config["storage"], data_dir, **options)
    node = Node(
        storage,
        config["process_list"],
        node_id=node_id,
        clock=HybridLogicalClock(node_id),
        in_thread=in_thread,
        # A database other nodes write too: a cached record could be stale.
        read_cache_bytes=0 if getattr(storage, "shared", False) else config["read-cache-size"],
        indexes=config["index_list"],
        index_build_rate=config["index-build-rate"],
        reactor=reactor,
    )

    describe = "storage %s in %s, processes [%s], indexes [%s], %d peers%s" % (
        config["storage"],
        data_dir,
        ", ".join(p.name for p in node.processes),
        ", ".join(str(d) for d in node.indexes),
        len(config["server_list"].peers),
        " (bridge)" if config["server_list"].bridge else "",
    )

    servers = config["server_list"]
    security = config["security"]
    key = ClusterKey(security["cluster_key"], reactor) if security["cluster_key"] else None
    http, http_pool = make_http_client(reactor, tls=security["peer_tls"])
    client = PeerClient(http, node_id, timeout=config["replication-timeout"], signer=key, clock=reactor)
    guard = Guard(security["tokens"], key, config["insecure"], security["allow_origins"])
    guard.peers = client
    guard.attach(node)
    replication = Replication(
        node,
        client,
        reactor,
        in_thread,
        timeout=config["replication-timeout"],
        retry_cap=config["retry-max"],
        send_interval=config["replication-interval"],
    )
    cluster = ClusterService(replication, servers, reactor)
    # Started after the cluster service: its SIGHUP handler is chained, not replaced.
    tokens_service = TokensService(guard, reactor)
    lookups = Lookups(
        node, lambda: cluster.servers.peers, client, reactor, timeout=config["lookup-timeout"]
    )
    node.remote = lookups
    node.status_sections["servers"] = lambda: {
        "file": cluster.servers.path,
        "bridge": cluster.servers.bridge,
        "peers": list(cluster.servers.peers),
    }
    node.status_sections["peers"] = replication.status
    if hasattr(storage, "pool_status"):
        node.status_sections["database"] = storage.pool_status
    node.metrics.registry.register(replication)

    sync_index = SyncIndex(storage)
    purger = Purger(
        node,
        sync_index,
        lambda: cluster.servers.peers,
        lambda: {url: r.checkpoint for url, r in replication.peers.items()},
        lambda: {url: r.last_success for url, r in replication.peers.items()},
        reactor,
        in_thread,
        config["tombstone-grace"],
        FileState(os.path.join(data_dir, STATE_FILE)),
    )
    node_sync = Sync(
        node, sync_index, client, lambda: cluster.servers.peers, reactor, in_thread,
        timeout=config["replication-timeout"], pace=SYNC_PACE, purge=purger,
    )
    node.status_sections["sync"] = node_sync.status
    node.status_sections["purge"] = purger.status
    node.metrics.registry.register(node_sync)
    node.metrics.registry.register(purger)

    front = CacheFront(
        client,
        lambda: cluster.servers.peers,
        reactor,
        size=config["cache-size"],
        ttl=config["cache-ttl"],
        timeout=config["cache-timeout"],
        stale_if_error=config["cache-stale-if-error"],
    )
    front.attach(node)
    api = RecordAPI(
        node,
        max_record_size=config["max-record-size"],
        front=front,
        lookups=lookups,
        replication=replication,
        sync_timeout=config["sync-timeout"],
        node_sync=node_sync,
    )
    node_sync.clients = lambda: api.client_requests
    site.resource = GuardResource(guard, api.resource())
    site.max_body = config["max-record-size"]
    root = NodeRoot(
        pool,
        node,
        cluster,
        ListeningService(port),
        extras=[tokens_service, PurgeService(purger, reactor), SyncService(node_sync, config["sync-interval"], reactor)],
        http_pool=http_pool,
        describe=describe,
    )

    if guard.mode() == "insecure" and listens_beyond_loopback(config["port"]):
        log.warn(
            "listening on {port} beyond loopback WITHOUT authentication (--insecure): any host "
            "that reaches this port can read and write every record",
            port=config["port"],
        )
    if security["tokens"] is not None and servers.peers and key is None:
        log.warn("--tokens without --cluster-key: peers' /_cluster/ requests need an admin token they do not send; give every node the same --cluster-key")
    log.info("security: {mode}", mode=guard.describe())
    log.info("minstore {version} on {port}", version=__version__, port=config["port"])
    return root
