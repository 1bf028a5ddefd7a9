"""A FUSE filesystem that can lose power: a model of the page cache over a backing directory.

    python powercut_fs.py BACKING MOUNTPOINT

Runs in the foreground until unmounted. Control is by lines on stdin, answered by one JSON
line on stdout:

    cut     power fails now: everything not yet durable is dropped, and from now on every
            operation on the mount fails with EIO until it is unmounted and mounted again
            (a new process on the same BACKING). Answer: what was dropped.
    stats   counters (fsyncs, writes, bytes pending) without changing anything.

Once the mount is up it prints {"ready": true}. Unmount with `fusermount3 -u MOUNTPOINT`.

What it models
--------------
* Every change lives in memory first, as it would in the page cache: file data and size
  (write, truncate, O_TRUNC) and directory entries (create, mknod, mkdir, unlink, rmdir,
  rename). Reads see the changes at once.
* fsync or fdatasync of a file makes that file's data and size durable (the inode's
  content, not its name).
* fsync of a directory makes that directory's entries durable, as they are at that moment:
  the names it holds and which inode each names. This is what POSIX and ext4's
  documentation demand of a program that creates, renames or removes a file. A node whose
  entry becomes durable before its data does comes back empty (as ext4 with delayed
  allocation does).
* sync_file_range, close, flush (FUSE's close), fsync of another file: nothing durable.
  sync_file_range never reaches this process: with direct_io there are no dirty pages in the
  kernel for it to write, which is exactly "it does not make anything durable".
* The kernel caches nothing of this mount: every open file is direct_io (no page cache, so
  writes reach this process at once and no hidden cache can make them durable; shared mmap
  is refused, see below), and entry, attribute and negative-lookup timeouts are zero, so this
  process is asked about every name and size. The model is the only cache.
* `cut`: the durable state is what survives. The backing directory holds exactly that state
  at every moment (updated inside each fsync, before it returns), so a new process mounted
  on it sees what a machine would see after the power came back.

What it does not model
----------------------
* Torn writes and reordering inside one fsync: an fsync is atomic here; a real disk may
  persist part of an unfinished fsync. Nothing is ever made durable *without* an fsync
  (a real kernel writes dirty pages back on its own within ~30 s; here a program that never
  fsyncs loses everything, the worst case that a real machine may also give).
* Journal side effects that make ext4 (data=ordered) more forgiving than POSIX: on ext4 an
  fsync of a new file usually commits its directory entry too, and a rename is atomic
  across a crash. Here only an fsync of the directory makes an entry durable, and two
  directories are two independent fsyncs. The model is stricter than ext4, never looser.
* Metadata other than size and kind: modes, times and owners are kept in memory and not
  modelled for durability (after a remount every node has the mount time).
* Hard links, symlinks, extended attributes, fallocate, shared mmap (refused by direct_io),
  O_DIRECT semantics beyond the above, and disks that lie about flushes.
* Unix sockets and fifos (mknod) exist as nodes; after a cut they come back as inert nodes.
"""

import errno
import json
import os
import stat
import sys
import threading
import time

import mfusepy as fuse

ROOT = 1


class Node:
    __slots__ = ("ino", "kind", "mode", "rdev", "data", "entries", "dirty", "times")

    def __init__(self, ino, kind, mode, rdev=0):
        self.ino = ino
        self.kind = kind  # "dir", "file" or "special"
        self.mode = mode  # full st_mode, type bits included
        self.rdev = rdev
        self.data = bytearray() if kind == "file" else None
        self.entries = {} if kind == "dir" else None
        # File ranges written since the last fsync, and whether the size changed.
        self.dirty = []
        now = time.time_ns()
        self.times = [now, now, now]  # atime, mtime, ctime, in ns


def locked(method):
    """Every operation runs under one lock (the control thread cuts power between two of
    them, never inside one), and fails with EIO once the power is off."""

    def wrapper(self, *args):
        with self.mutex:
            if self.dead:
                raise fuse.FuseOSError(errno.EIO)
            return method(self, *args)

    wrapper.__name__ = method.__name__
    return wrapper


class PowerCutFs(fuse.Operations):
    use_ns = True

    def __init__(self, backing):
        self.backing = backing
        self.mutex = threading.Lock()
        self.dead = False
        self.handles = {}
        self.next_fh = 1
        self.counters = {
            "fsync": 0,
            "fsyncdir": 0,
            "writes": 0,
            "bytes_written": 0,
            "bytes_made_durable": 0,
        }
        os.makedirs(os.path.join(backing, "data"), exist_ok=True)
        self.meta_path = os.path.join(backing, "meta.json")
        self.load()

    # ---- durable state in the backing directory --------------------------------------------

    def load(self):
        """The state a machine finds when the power comes back: the durable directory
        entries, followed from the root, and the durable content of each file they reach."""
        meta = {"next_ino": ROOT + 1, "nodes": {}, "entries": {}}
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                meta = json.load(f)
        self.next_ino = meta["next_ino"]
        # Durable: kind and mode of each node ever named durably, entries of each directory.
        self.d_nodes = {int(k): v for k, v in meta["nodes"].items()}
        self.d_entries = {int(k): dict(v) for k, v in meta["entries"].items()}
        self.d_nodes.setdefault(ROOT, {"kind": "dir", "mode": stat.S_IFDIR | 0o755, "rdev": 0})
        self.nodes = {}
        reachable = [ROOT]
        while reachable:
            ino = reachable.pop()
            if ino in self.nodes:
                continue
            d = self.d_nodes[ino]
            n = Node(ino, d["kind"], d["mode"], d.get("rdev", 0))
            if n.kind == "file":
                p = self.data_path(ino)
                if os.path.exists(p):
                    with open(p, "rb") as f:
                        n.data = bytearray(f.read())
            elif n.kind == "dir":
                n.entries = dict(self.d_entries.get(ino, {}))
                reachable.extend(n.entries.values())
            self.nodes[ino] = n
        # Content of inodes no durable name reaches is gone for good.
        for name in os.listdir(os.path.join(self.backing, "data")):
            if name.isdigit() and int(name) not in self.nodes:
                os.unlink(os.path.join(self.backing, "data", name))

    def data_path(self, ino):
        return os.path.join(self.backing, "data", str(ino))

    def save_meta(self):
        meta = {"next_ino": self.next_ino, "nodes": self.d_nodes, "entries": self.d_entries}
        tmp = self.meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        # The backing filesystem never loses power here; os.replace only keeps a killed
        # daemon from leaving half a file.
        os.replace(tmp, self.meta_path)

    def make_file_durable(self, n):
        p = self.data_path(n.ino)
        mode = "r+b" if os.path.exists(p) else "w+b"
        with open(p, mode) as f:
            size = len(n.data)
            for start, end in merge(n.dirty):
                end = min(end, size)
                if start < end:
                    f.seek(start)
                    f.write(n.data[start:end])
                    self.counters["bytes_made_durable"] += end - start
            f.truncate(size)
        n.dirty = []

    # ---- control ---------------------------------------------------------------------------

    def pending(self):
        """What a cut now would drop."""
        files = [n for n in self.nodes.values() if n.kind == "file" and n.dirty]
        dirs = [
            n
            for n in self.nodes.values()
            if n.kind == "dir" and n.entries != self.d_entries.get(n.ino, {})
        ]
        return {
            "files_with_pending_data": len(files),
            "pending_bytes": sum(sum(e - s for s, e in merge(n.dirty)) for n in files),
            "dirs_with_pending_entries": len(dirs),
        }

    def control(self, line):
        cmd = line.strip()
        with self.mutex:
            if cmd == "cut":
                was_dead = self.dead
                dropped = self.pending() if not was_dead else {}
                self.dead = True
                return {"cut": True, "already_off": was_dead, "dropped": dropped, **self.counters}
            if cmd == "stats":
                return {"dead": self.dead, **(self.pending() if not self.dead else {}), **self.counters}
        return {"error": f"unknown command {cmd!r}"}

    # ---- the tree --------------------------------------------------------------------------

    def lookup(self, path):
        n = self.nodes[ROOT]
        for part in [p for p in path.split("/") if p]:
            if n.kind != "dir":
                raise fuse.FuseOSError(errno.ENOTDIR)
            ino = n.entries.get(part)
            if ino is None:
                raise fuse.FuseOSError(errno.ENOENT)
            n = self.nodes[ino]
        return n

    def parent(self, path):
        head, name = os.path.split(path.rstrip("/"))
        p = self.lookup(head or "/")
        if p.kind != "dir":
            raise fuse.FuseOSError(errno.ENOTDIR)
        return p, name

    def new_node(self, path, kind, mode, rdev=0):
        p, name = self.parent(path)
        if name in p.entries:
            raise fuse.FuseOSError(errno.EEXIST)
        n = Node(self.next_ino, kind, mode, rdev)
        self.next_ino += 1
        self.nodes[n.ino] = n
        p.entries[name] = n.ino
        p.times[1] = p.times[2] = time.time_ns()
        return n

    def node_of(self, path, fh):
        # With raw_fi, mfusepy hands getattr and truncate the fuse_file_info, not its fh.
        fh = getattr(fh, "fh", fh)
        h = self.handles.get(fh) if fh else None
        if h is not None:
            return self.nodes[h[0]]
        if path is None:
            raise fuse.FuseOSError(errno.EBADF)
        return self.lookup(path)

    # ---- operations ------------------------------------------------------------------------

    def init_with_config(self, conn, config):
        # No kernel caching of names or attributes: every lookup and stat comes here.
        config.entry_timeout = 0
        config.attr_timeout = 0
        config.negative_timeout = 0
        config.kernel_cache = 0
        config.auto_cache = 0
        config.direct_io = 1
        # An unlinked open file is served by its handle, not renamed to .fuse_hidden*.
        config.hard_remove = 1
        print(json.dumps({"ready": True}), flush=True)

    @locked
    def getattr(self, path, fh=None):
        n = self.node_of(path, fh)
        size = len(n.data) if n.kind == "file" else 4096
        nlink = 2 + sum(1 for i in n.entries.values() if self.nodes[i].kind == "dir") if n.kind == "dir" else 1
        return {
            "st_mode": n.mode,
            "st_ino": n.ino,
            "st_nlink": nlink,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": 4096,
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
            "st_rdev": n.rdev,
            "st_atime": n.times[0],
            "st_mtime": n.times[1],
            "st_ctime": n.times[2],
        }

    @locked
    def access(self, path, amode):
        self.lookup(path)
        return 0

    @locked
    def statfs(self, path):
        st = os.statvfs(self.backing)
        return {k: getattr(st, k) for k in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
            "f_files", "f_ffree", "f_favail", "f_namemax")}

    @locked
    def readdir(self, path, fh):
        n = self.lookup(path)
        if n.kind != "dir":
            raise fuse.FuseOSError(errno.ENOTDIR)
        return [".", ".."] + list(n.entries)

    @locked
    def opendir(self, path):
        if self.lookup(path).kind != "dir":
            raise fuse.FuseOSError(errno.ENOTDIR)
        return 0

    @locked
    def releasedir(self, path, fh):
        return 0

    @locked
    def mkdir(self, path, mode):
        self.new_node(path, "dir", stat.S_IFDIR | (mode & 0o7777))
        return 0

    @locked
    def mknod(self, path, mode, dev):
        kind = "file" if stat.S_ISREG(mode) else "special"
        self.new_node(path, kind, mode, dev)
        return 0

    @locked
    def rmdir(self, path):
        p, name = self.parent(path)
        ino = p.entries.get(name)
        if ino is None:
            raise fuse.FuseOSError(errno.ENOENT)
        n = self.nodes[ino]
        if n.kind != "dir":
            raise fuse.FuseOSError(errno.ENOTDIR)
        if n.entries:
            raise fuse.FuseOSError(errno.ENOTEMPTY)
        del p.entries[name]
        return 0

    @locked
    def unlink(self, path):
        p, name = self.parent(path)
        ino = p.entries.get(name)
        if ino is None:
            raise fuse.FuseOSError(errno.ENOENT)
        if self.nodes[ino].kind == "dir":
            raise fuse.FuseOSError(errno.EISDIR)
        del p.entries[name]
        return 0

    @locked
    def rename(self, old, new):
        op, oname = self.parent(old)
        ino = op.entries.get(oname)
        if ino is None:
            raise fuse.FuseOSError(errno.ENOENT)
        np_, nname = self.parent(new)
        target = np_.entries.get(nname)
        if target is not None and target != ino:
            t = self.nodes[target]
            if t.kind == "dir" and t.entries:
                raise fuse.FuseOSError(errno.ENOTEMPTY)
        del op.entries[oname]
        np_.entries[nname] = ino
        return 0

    def open_handle(self, n, fi):
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (n.ino, fi.flags)
        fi.fh = fh
        # No page cache for this file: writes come here at once, reads are answered here.
        fi.direct_io = 1
        fi.keep_cache = 0
        if fi.flags & os.O_TRUNC and n.kind == "file" and n.data:
            n.data = bytearray()
            n.dirty.append((0, 0))
        return 0

    @locked
    def create(self, path, mode, fi):
        try:
            n = self.lookup(path)
            if fi.flags & os.O_EXCL:
                raise fuse.FuseOSError(errno.EEXIST)
        except fuse.FuseOSError as e:
            if e.errno != errno.ENOENT:
                raise
            n = self.new_node(path, "file", stat.S_IFREG | (mode & 0o7777))
        return self.open_handle(n, fi)

    @locked
    def open(self, path, fi):
        n = self.lookup(path)
        if n.kind == "dir":
            raise fuse.FuseOSError(errno.EISDIR)
        return self.open_handle(n, fi)

    @locked
    def release(self, path, fi):
        self.handles.pop(fi.fh, None)
        return 0

    @locked
    def flush(self, path, fi):
        # close() makes nothing durable.
        return 0

    @locked
    def read(self, path, size, offset, fi):
        n = self.node_of(path, fi.fh)
        if n.kind != "file":
            raise fuse.FuseOSError(errno.EINVAL)
        return bytes(n.data[offset : offset + size])

    @locked
    def write(self, path, data, offset, fi):
        n = self.node_of(path, fi.fh)
        if n.kind != "file":
            raise fuse.FuseOSError(errno.EINVAL)
        h = self.handles.get(fi.fh)
        if h is not None and h[1] & os.O_APPEND:
            offset = len(n.data)
        end = offset + len(data)
        if offset > len(n.data):
            n.dirty.append((len(n.data), offset))
            n.data.extend(b"\0" * (offset - len(n.data)))
        n.data[offset:end] = data
        n.dirty.append((offset, end))
        n.times[1] = n.times[2] = time.time_ns()
        self.counters["writes"] += 1
        self.counters["bytes_written"] += len(data)
        return len(data)

    @locked
    def truncate(self, path, length, fh=None):
        n = self.node_of(path, fh)
        if n.kind != "file":
            raise fuse.FuseOSError(errno.EINVAL)
        old = len(n.data)
        if length < old:
            del n.data[length:]
            n.dirty.append((length, length))
        elif length > old:
            n.data.extend(b"\0" * (length - old))
            n.dirty.append((old, length))
        return 0

    @locked
    def fsync(self, path, datasync, fi):
        n = self.node_of(path, fi.fh)
        self.counters["fsync"] += 1
        if n.kind == "file":
            self.make_file_durable(n)
        return 0

    @locked
    def fsyncdir(self, path, datasync, fh):
        n = self.lookup(path)
        self.counters["fsyncdir"] += 1
        self.d_entries[n.ino] = dict(n.entries)
        for ino in n.entries.values():
            c = self.nodes[ino]
            self.d_nodes[ino] = {"kind": c.kind, "mode": c.mode, "rdev": c.rdev}
        self.save_meta()
        return 0

    @locked
    def chmod(self, path, mode):
        n = self.lookup(path)
        n.mode = (n.mode & ~0o7777) | (mode & 0o7777)
        return 0

    @locked
    def chown(self, path, uid, gid):
        self.lookup(path)
        return 0

    @locked
    def utimens(self, path, times=None):
        n = self.lookup(path)
        now = time.time_ns()
        a, m = times if times else (now, now)
        n.times = [a, m, now]
        return 0


def merge(ranges):
    """Sorted, coalesced [start, end) ranges."""
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def main():
    backing, mountpoint = sys.argv[1], sys.argv[2]
    ops = PowerCutFs(backing)

    def serve_control():
        for line in sys.stdin:
            print(json.dumps(ops.control(line)), flush=True)

    threading.Thread(target=serve_control, daemon=True).start()
    fuse.FUSE(ops, mountpoint, raw_fi=True, foreground=True, nothreads=True, fsname="powercut")


if __name__ == "__main__":
    main()
