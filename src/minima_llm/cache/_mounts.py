"""Which filesystem holds a cache file, read from ``/proc/self/mountinfo``, and whether it is a network one.

SQLite's WAL mode keeps its index in a memory-mapped ``-shm`` file that only the
processes of one host share: "WAL does not work over a network filesystem". A
job array on several nodes writing one cache on NFS, Lustre or GPFS can corrupt it
or lose answers with no error on any side, so the store warns when it opens there.

Linux only: elsewhere (macOS, Windows) there is no mountinfo, and nothing is said.
"""

from __future__ import annotations

import logging
import os
import re
import threading

log = logging.getLogger("minima_llm.cache")

MOUNTINFO = "/proc/self/mountinfo"

# Kernel filesystems whose files other machines mount too. Exact names, as the
# fstype field of mountinfo gives them.
NETWORK_FSTYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "lustre",
        "lustre_lite",
        "gpfs",
        "beegfs",
        "fhgfs",
        "ceph",
        "glusterfs",
        "ocfs2",
        "gfs2",
        "pvfs2",
        "orangefs",
        "panfs",
        "wekafs",
        "davfs",
    }
)
# FUSE filesystems say "fuse.<subtype>"; only these subtypes reach another machine.
# Bare "fuse" (bindfs, fuse-overlayfs of rootless containers) is most often local.
NETWORK_FUSE_SUBTYPES = frozenset(
    {
        "sshfs",
        "s3fs",
        "rclone",
        "gcsfuse",
        "goofys",
        "blobfuse",
        "blobfuse2",
        "glusterfs",
        "ceph",
        "ceph-fuse",
        "cephfs",
        "juicefs",
        "mfs",
        "lizardfs",
        "quobyte",
        "davfs2",
        "curlftpfs",
        "smbnetfs",
        "rozofs",
    }
)

# Mount points escape space, tab, newline and backslash as three octal digits.
_ESCAPE = re.compile(r"\\([0-7]{3})")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def fstype_of(mountinfo: str, path: str, device: tuple[int, int] | None = None) -> str | None:
    """The fstype of the mount holding absolute, resolved ``path`` per ``mountinfo``'s text; None if none covers it.

    The deepest mount point containing ``path`` wins, the last listed on a tie (a
    mount stacked on another hides it). With ``device`` (the path's ``st_dev`` as
    major, minor), a mount of that device wins over deeper ones: a directory mounted
    over a parent's mount point hides the mounts below it, and its device says so.
    """
    best: tuple[bool, int, str] | None = None
    for line in mountinfo.splitlines():
        entry = _parse(line)
        if entry is None:
            continue
        dev, point, fstype = entry
        if not _contains(point, path):
            continue
        rank = (device is not None and dev == device, len(point), fstype)
        if best is None or rank[:2] >= best[:2]:
            best = rank
    return best[2] if best is not None else None


def is_network(fstype: str) -> bool:
    """Whether files of ``fstype`` may be opened from other machines at once."""
    name = fstype.lower()
    if name in NETWORK_FSTYPES:
        return True
    kind, _, subtype = name.partition(".")
    return kind == "fuse" and subtype in NETWORK_FUSE_SUBTYPES


def _parse(line: str) -> tuple[tuple[int, int] | None, str, str] | None:
    """``(device, mount point, fstype)`` of one mountinfo line; None if it is not one."""
    # ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
    fields = line.split(" ")
    try:
        separator = fields.index("-", 6)
        fstype = fields[separator + 1]
    except (ValueError, IndexError):
        return None
    major, _, minor = fields[2].partition(":")
    device = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None
    return device, _unescape(fields[4]), fstype


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _contains(point: str, path: str) -> bool:
    """Whether ``path`` is ``point`` or below it (by whole components: /scratch is not under /scr)."""
    if point == "/":
        return path.startswith("/")
    return path == point or path.startswith(point.rstrip("/") + "/")


def network_fstype(directory: str, mountinfo: str | os.PathLike[str] = MOUNTINFO) -> str | None:
    """The network fstype ``directory`` is on, None if local or unknown (no mountinfo: not Linux)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            text = fh.read()
        resolved = os.path.realpath(directory)  # a symlink to /nfs/... is on NFS
        st = os.stat(resolved)
    except OSError:
        return None
    fstype = fstype_of(text, resolved, (os.major(st.st_dev), os.minor(st.st_dev)))
    return fstype if fstype is not None and is_network(fstype) else None


def warn_if_network(db: str, mountinfo: str | os.PathLike[str] = MOUNTINFO) -> bool:
    """Log, once per process and file, that ``db`` is on a network filesystem; whether it is."""
    fstype = network_fstype(os.path.dirname(db), mountinfo)
    if fstype is None:
        return False
    with _warned_lock:
        if db in _warned:
            return True
        _warned.add(db)
    log.warning(
        "cache: %s is on a network filesystem (%s). SQLite's WAL mode, which the cache uses, "
        "needs every process that opens the file on one host: processes on other nodes (a "
        "SLURM job array, say) writing it at the same time can corrupt it or lose answers "
        "with no error. Give each node its own cache_dir (on node-local scratch, or one "
        "per node or job on this filesystem), list the others in CACHE_LOOKUP_DIRS and merge "
        "them afterwards with `minima-llm cache merge`, or "
        "send every job through one minimallm-proxy gateway. A cache_dir that only this "
        "host writes is not at risk.",
        db,
        fstype,
    )
    return True
