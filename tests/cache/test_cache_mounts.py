"""A cache on a network filesystem is named once: SQLite's WAL does not work across hosts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from minima_llm.cache import SqliteStore
from minima_llm.cache._mounts import fstype_of, is_network, network_fstype

# Lines as the kernel writes them. The sshfs, fuse (bindfs), overlay, tmpfs and ext4
# ones were read on a Debian 12 VM; the others are the same format with the fstype and
# source those filesystems report (nfs4 and lustre from HPC login nodes, a Docker bind).
ROOT = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard"
HOME_NFS = (
    "312 27 0:51 / /home rw,relatime shared:170 - nfs4 nas01:/export/home "
    "rw,vers=4.2,rsize=1048576,wsize=1048576,hard,proto=tcp,sec=sys,local_lock=none"
)
NFS3 = "313 27 0:52 / /proj rw,relatime shared:171 - nfs 10.0.0.5:/vol/proj rw,vers=3,hard"
LUSTRE = (
    "98 27 0:44 / /lustre/scratch rw,relatime shared:50 - lustre "
    "10.10.0.1@o2ib:10.10.0.2@o2ib:/scratch rw,flock,lazystatfs"
)
GPFS = "120 27 0:48 / /gpfs/projects rw,relatime shared:60 - gpfs gpfs0 rw"
BEEGFS = "130 27 0:49 / /mnt/beegfs rw,relatime shared:61 - beegfs beegfs_nodev rw,cfgFile=/etc/beegfs/beegfs-client.conf"
CEPH = "140 27 0:50 / /cephfs rw,relatime shared:62 - ceph 10.0.0.1:6789:/ rw,name=lab,acl"
CIFS = r"150 27 0:53 / /mnt/lab\040share rw,relatime - cifs //fs/lab\040share rw,vers=3.1.1"
SSHFS = (
    "45 27 0:40 / /mnt/nodeA rw,nosuid,nodev,relatime - fuse.sshfs "
    "root@127.0.0.1:/srv/export rw,user_id=0,group_id=0"
)
BINDFS = (
    "47 27 0:42 / /mnt/bind rw,nosuid,nodev,relatime - fuse /srv/export "
    "rw,user_id=0,group_id=0,default_permissions,allow_other"
)
SCRATCH = "170 27 259:3 / /scratch rw,relatime shared:66 - xfs /dev/nvme0n1p1 rw,attr2,inode64"
SCR_NFS = "171 27 0:56 / /scr rw,relatime - nfs4 nas01:/scr rw,vers=4.2"
TMP = "180 27 0:55 / /tmp rw,nosuid,nodev shared:67 master:3 propagate_from:2 - tmpfs tmpfs rw"
AUTOFS = "160 27 0:57 / /net rw,relatime shared:64 - autofs /etc/auto.net rw,fd=7,indirect"
AUTOFS_NFS = "161 160 0:58 / /net/nas/data rw,relatime shared:65 - nfs4 nas:/data rw,vers=4.2"
# A container: overlay root, a cache directory bound in from the host's NFS home (its
# root field is the subdirectory bound), then the same over-mounted by a tmpfs.
OVERLAY = (
    "600 550 0:120 / / rw,relatime master:1 - overlay overlay "
    "rw,lowerdir=/var/lib/docker/overlay2/l/A:/var/lib/docker/overlay2/l/B,"
    "upperdir=/var/lib/docker/overlay2/c/diff,workdir=/var/lib/docker/overlay2/c/work"
)
BOUND_NFS = "610 600 0:51 /alice/cache /cache rw,relatime - nfs4 nas01:/export/home rw,vers=4.2"
OVER_TMPFS = "620 600 0:43 / /cache rw,relatime - tmpfs t rw"
HIDDEN_NFS = (
    "74 50 0:40 /sub /tmp/om/x rw,nosuid,nodev,relatime - fuse.sshfs root@127.0.0.1:/srv/export rw"
)
HIDING_TMPFS = "75 50 0:43 / /tmp/om rw,relatime - tmpfs t rw"

HPC_NODE = "\n".join([ROOT, HOME_NFS, NFS3, LUSTRE, GPFS, BEEGFS, CEPH, CIFS, SCRATCH, TMP])


@pytest.mark.parametrize(
    ("lines", "path", "device", "fstype"),
    [
        (HPC_NODE, "/home/alice/cache", None, "nfs4"),
        (HPC_NODE, "/home", None, "nfs4"),
        (HPC_NODE, "/proj/llm/cache", None, "nfs"),
        (HPC_NODE, "/lustre/scratch/alice/cache", None, "lustre"),
        (HPC_NODE, "/gpfs/projects/x", None, "gpfs"),
        (HPC_NODE, "/mnt/beegfs/c", None, "beegfs"),
        (HPC_NODE, "/cephfs/c", None, "ceph"),
        (HPC_NODE, "/mnt/lab share/cache", None, "cifs"),  # \040 is a space
        (HPC_NODE, "/mnt/lab", None, "ext4"),
        (HPC_NODE, "/scratch/job123/cache", None, "xfs"),
        (HPC_NODE, "/tmp/job123", None, "tmpfs"),  # several optional fields
        (HPC_NODE, "/homework/cache", None, "ext4"),  # /home is not a prefix of /homework
        ("\n".join([ROOT, SCR_NFS, SCRATCH]), "/scratch/c", None, "xfs"),
        ("\n".join([ROOT, SSHFS, BINDFS]), "/mnt/nodeA/cache", None, "fuse.sshfs"),
        ("\n".join([ROOT, SSHFS, BINDFS]), "/mnt/bind/cache", None, "fuse"),
        ("\n".join([ROOT, AUTOFS, AUTOFS_NFS]), "/net/nas/data/c", None, "nfs4"),
        ("\n".join([ROOT, AUTOFS, AUTOFS_NFS]), "/net/other", None, "autofs"),
        ("\n".join([OVERLAY, BOUND_NFS]), "/cache", None, "nfs4"),
        ("\n".join([OVERLAY, BOUND_NFS]), "/work/cache", None, "overlay"),
        # Two mounts on one point: the one listed last is on top.
        ("\n".join([OVERLAY, BOUND_NFS, OVER_TMPFS]), "/cache/c", None, "tmpfs"),
        # A parent mounted over a deeper mount hides it; only the device tells.
        ("\n".join([ROOT, HIDDEN_NFS, HIDING_TMPFS]), "/tmp/om/x", (0, 43), "tmpfs"),
        ("\n".join([ROOT, HIDDEN_NFS, HIDING_TMPFS]), "/tmp/om/x", None, "fuse.sshfs"),
        # A device no line names (a btrfs subvolume's): the deepest mount point.
        ("\n".join([ROOT, HOME_NFS]), "/home/a", (0, 999), "nfs4"),
        ("", "/home/a", None, None),
        ("not a mountinfo line\n\n1 2 3", "/home/a", None, None),
        (HOME_NFS, "/var/cache", None, None),  # no line covers it
    ],
)
def test_the_mount_holding_a_path_gives_its_fstype(
    lines: str, path: str, device: tuple[int, int] | None, fstype: str | None
) -> None:
    assert fstype_of(lines, path, device) == fstype


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("lustre", True),
        ("gpfs", True),
        ("beegfs", True),
        ("ceph", True),
        ("cifs", True),
        ("smb3", True),
        ("glusterfs", True),
        ("fuse.sshfs", True),
        ("fuse.glusterfs", True),
        ("fuse.ceph-fuse", True),
        ("fuse.rclone", True),
        ("fuse.s3fs", True),
        ("fuse.juicefs", True),
        ("NFS4", True),
        ("ext4", False),
        ("xfs", False),
        ("btrfs", False),
        ("zfs", False),
        ("tmpfs", False),
        ("overlay", False),
        ("fuse", False),  # bindfs and most bare FUSE mounts are local
        ("fuse.fuse-overlayfs", False),  # rootless podman's storage
        ("fuse.bindfs", False),
        ("fuseblk", False),
        ("autofs", False),  # the real mount appears once the path is reached
        ("squashfs", False),
        ("9p", False),
    ],
)
def test_network_filesystems_are_told_from_local_ones(fstype: str, network: bool) -> None:
    assert is_network(fstype) is network


def _mountinfo(tmp_path: Path, directory: Path, fstype: str) -> Path:
    """A mountinfo file that mounts ``directory`` (made now) from a filesystem of ``fstype``."""
    directory.mkdir(exist_ok=True)
    # Its real device, as a mount there would show: the device decides between mounts.
    dev = directory.stat().st_dev
    line = f"900 27 {os.major(dev)}:{os.minor(dev)} / {directory} rw,relatime - {fstype} srv:/x rw"
    path = tmp_path / f"mountinfo-{fstype}"
    path.write_text(f"{ROOT}\n{line}\n")
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_cache_on_nfs_is_named_once_with_the_remedies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "shared"
    mounts = _mountinfo(tmp_path, cache_dir, "nfs4")
    caplog.set_level(logging.WARNING, logger="minima_llm.cache")
    for _ in range(2):  # a backend built per item must not say it every time
        SqliteStore.in_dir(cache_dir, mountinfo=mounts).close()
    [said] = _warnings(caplog)
    assert str(cache_dir / "minima_llm.db") in said
    assert "(nfs4)" in said
    assert "corrupt" in said
    assert "CACHE_LOOKUP_DIRS" in said
    assert "minimallm-proxy" in said


def test_a_cache_reached_through_a_symlink_is_judged_where_it_lives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "lustre-dir"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    mounts = _mountinfo(tmp_path, real, "lustre")
    caplog.set_level(logging.WARNING, logger="minima_llm.cache")
    SqliteStore.in_dir(tmp_path / "link", mountinfo=mounts).close()
    [said] = _warnings(caplog)
    assert "(lustre)" in said


def test_local_disks_lookup_caches_and_a_missing_mountinfo_say_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "scratch"
    caplog.set_level(logging.WARNING, logger="minima_llm.cache")
    SqliteStore.in_dir(local, mountinfo=_mountinfo(tmp_path, local, "xfs")).close()
    # A lookup cache on a shared dataset mount is the normal case, and read only.
    SqliteStore.in_dir(local, readonly=True, mountinfo=_mountinfo(tmp_path, local, "nfs")).close()
    # macOS, or a container without /proc: the store opens as ever.
    store = SqliteStore.in_dir(tmp_path / "other", mountinfo=tmp_path / "no-such-file")
    store.close()
    assert _warnings(caplog) == []
    assert network_fstype(str(local), tmp_path / "no-such-file") is None
