"""
Migration of a ``files`` data directory of the layout before the catalog
(minstore 0.x up to the fourth round): record files made durable by
``records.wal``, a change log under ``changes/`` with ``checkpoints.json``,
and the clock's reservation in ``clock``.

At the first open with the catalog, the log's acknowledged writes are
applied to the record files, every record file is read into the catalog,
and what the change log still owed each peer becomes the end of the new
sequence, each peer's checkpoint moved to match, so replication resumes
where it was.  The old log and change log are set aside, renamed with the
suffix ``.before-catalog``; nothing is deleted but the clock file.
"""

import json
import os

from twisted.logger import Logger

from minstore.storage.sqlite import _run

log = Logger("minstore.storage.migrate")

SET_ASIDE = ".before-catalog"


def has_old_layout(data_dir):
    return any(
        os.path.exists(os.path.join(data_dir, name)) for name in ("records.wal", "changes")
    ) or _has_record_files(os.path.join(data_dir, "records"))


def _has_record_files(root):
    if not os.path.isdir(root):
        return False
    for collection in os.listdir(root):
        directory = os.path.join(root, collection)
        if os.path.isdir(directory) and any(not n.startswith(".") for n in os.listdir(directory)):
            return True
    return False


def _replay_wal(storage):
    """Write the record files of the writes the old log holds (the last of a file wins)."""
    path = os.path.join(storage.data_dir, "records.wal")
    try:
        with open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        return 0
    n = 0
    for line in content.split(b"\n"):
        parts = line.split(b"\t", 3)
        if len(parts) != 4 or not parts[3].endswith(b"}"):
            continue  # the torn tail of a batch never synced, never acknowledged
        _, collection, filename, data = parts
        try:
            json.loads(data)
            collection, filename = collection.decode("utf-8"), filename.decode("ascii")
        except (ValueError, UnicodeDecodeError):
            continue
        if "/" in filename or filename.startswith(".") or "/" in collection or collection.startswith("."):
            continue
        directory = storage._directory(collection)
        from minstore.storage.files import write_file

        write_file(os.path.join(directory, filename), data)
        n += 1
    return n


def _read_record_files(storage):
    """``{(collection, uid): (version, deleted, data)}`` of every sound record file."""
    records = {}
    root = storage.root
    for collection in sorted(os.listdir(root)):
        directory = os.path.join(root, collection)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.startswith("."):
                if name.startswith(".tmp-"):
                    os.unlink(path)
                continue
            with open(path, "rb") as f:
                data = f.read()
            try:
                record = json.loads(data)
                uid, version = record["uid"], record["version"]
                if record["collection"] != collection or not isinstance(uid, str) or not isinstance(version, str):
                    raise ValueError("not this file's record")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                os.replace(path, os.path.join(directory, ".damaged-" + name))
                log.error("set aside damaged record file {path}", path=path)
                continue
            records[(collection, uid)] = (version, bool(record.get("deleted")), data)
    return records


def _read_change_log(data_dir):
    """``(checkpoints, [(old_seq, key)] newest per key, ascending)`` of the old change log."""
    directory = os.path.join(data_dir, "changes")
    if not os.path.isdir(directory):
        return {}, []
    checkpoints = {}
    try:
        with open(os.path.join(directory, "checkpoints.json"), "rb") as f:
            checkpoints = {k: int(v) for k, v in json.loads(f.read()).items()}
    except (FileNotFoundError, ValueError, AttributeError, TypeError):
        checkpoints = {}
    floor = min(checkpoints.values()) if checkpoints else 0
    newest = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            for line in f:
                seq, _, data = line.rstrip(b"\n").partition(b" ")
                try:
                    seq = int(seq)
                    record = json.loads(data)
                    key = (record["collection"], record["uid"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line: never acknowledged
                if seq > floor:
                    newest[key] = max(seq, newest.get(key, 0))
    owed = sorted((seq, key) for key, seq in newest.items())
    return checkpoints, owed


def migrate_files_layout(storage):
    """Fill a fresh catalog from the old layout (called by L{FileStorage.open})."""
    data_dir = storage.data_dir
    replayed = _replay_wal(storage)
    records = _read_record_files(storage)
    checkpoints, owed = _read_change_log(data_dir)
    owed = [(seq, key) for seq, key in owed if key in records]
    owed_keys = set(key for _, key in owed)
    conn = storage._writer
    seq = 0
    max_version = None
    _run(conn, "BEGIN IMMEDIATE")
    try:
        rows = [(key, False) for key in records if key not in owed_keys] + [(key, True) for _, key in owed]
        for (collection, uid), forward in rows:
            version, deleted, data = records[(collection, uid)]
            seq += 1
            _run(
                conn,
                "INSERT INTO records (seq, collection, uid, version, deleted, forward, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, collection, uid, version, int(deleted), int(forward), data),
            )
            if max_version is None or version > max_version:
                max_version = version
        if max_version is not None:
            _run(conn, "INSERT OR REPLACE INTO meta VALUES ('max_version', ?)", (max_version,))
        base = len(records) - len(owed)
        for peer, old in checkpoints.items():
            delivered = sum(1 for old_seq, _ in owed if old_seq <= old)
            _run(conn, "INSERT INTO checkpoints VALUES (?, ?)", (peer, base + delivered))
        _run(
            conn,
            "INSERT OR REPLACE INTO live_counts SELECT collection, COUNT(*) FROM records WHERE deleted = 0 GROUP BY collection",
        )
        _run(conn, "INSERT OR REPLACE INTO meta VALUES ('files_seq', ?)", (seq,))
        _run(conn, "INSERT OR REPLACE INTO meta VALUES ('layout', 'catalog')")
        # The files the old log's replay wrote are durable before the catalog says so.
        from minstore.storage.files import syncfs

        syncfs(storage.root) if syncfs is not None else os.sync()
        _run(conn, "COMMIT")
    except BaseException:
        _run(conn, "ROLLBACK")
        raise
    storage._load_counts(conn)
    for name in ("records.wal", "changes"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            os.replace(path, path + SET_ASIDE)
    try:
        os.unlink(os.path.join(data_dir, "clock"))
    except FileNotFoundError:
        pass
    log.info(
        "migrated {data} to the catalog: {n} records ({replayed} from records.wal), "
        "{owed} writes still owed to {peers} peers; old files renamed *{suffix}",
        data=data_dir,
        n=len(records),
        replayed=replayed,
        owed=len(owed),
        peers=len(checkpoints),
        suffix=SET_ASIDE,
    )
