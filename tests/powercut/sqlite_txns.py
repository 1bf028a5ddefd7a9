"""SQLite on the power-cut filesystem: the known-correct program that proves the model.

    python sqlite_txns.py setup DB      create the table, durably (synchronous=FULL, then
                                        an fsync of the directory)
    python sqlite_txns.py write DB MODE commit one small transaction after another with
                                        PRAGMA synchronous=MODE (FULL or OFF); print each
                                        id once COMMIT has returned, until killed
    python sqlite_txns.py count DB      print {"ids": [...], "integrity": "..."}

WAL mode with locking_mode=EXCLUSIVE: the WAL index then lives in the process's memory
instead of a shared mmap of DB-shm, which the filesystem refuses (direct_io, no page cache).
"""
import json
import os
import sqlite3
import sys


def connect(db, sync):
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA locking_mode=EXCLUSIVE")
    mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    assert mode == "wal", mode
    c.execute(f"PRAGMA synchronous={sync}")
    return c


def main():
    cmd, db = sys.argv[1], sys.argv[2]
    if cmd == "setup":
        c = connect(db, "FULL")
        c.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB)")
        c.close()
        fd = os.open(os.path.dirname(os.path.abspath(db)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elif cmd == "write":
        c = connect(db, sys.argv[3])
        n = c.execute("SELECT COALESCE(MAX(id), 0) FROM t").fetchone()[0]
        while True:
            n += 1
            c.execute("BEGIN")
            c.execute("INSERT INTO t VALUES (?, randomblob(300))", (n,))
            c.execute("COMMIT")
            print(n, flush=True)
    elif cmd == "count":
        c = connect(db, "FULL")
        ids = [r[0] for r in c.execute("SELECT id FROM t ORDER BY id")]
        integrity = c.execute("PRAGMA integrity_check").fetchone()[0]
        print(json.dumps({"ids": ids, "integrity": integrity}))


if __name__ == "__main__":
    main()
