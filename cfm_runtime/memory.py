"""Process memory: figures for telemetry, handing freed memory back to the OS, and the memory a process may
still take (its cgroup's limit or the RAM available), which `--ram-budget auto` spends."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path


def release_freed_memory() -> None:
    """Hand memory freed by dequantization temporaries back to the OS (glibc keeps it otherwise:
    ~450 MB of RSS on the embedded model)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def peak_rss_mb() -> float:
    """Peak resident set of this process (ru_maxrss), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_high_water_mb() -> float:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it excludes a forking parent's pages)."""
    return rss_parts_mb().get("hwm", 0.0)


def rss_parts_mb() -> dict[str, float]:
    """This process's resident memory now, by kind (MB): `anon` (heap, caches: not reclaimable without swap),
    `file` (mapped file pages, such as a model file read in place: the kernel may drop and re-read them),
    `shmem`; and `hwm`, the peak of their sum (VmHWM)."""
    keys = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem", "VmHWM:": "hwm"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in keys:
                    out[keys[key]] = round(int(line.split()[1]) / 1024, 1)
    except OSError:  # not Linux
        pass
    return out


# ---------------------------------------------------------------- the memory this process may use

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _cgroup_dir(root: Path, path: str) -> Path | None:
    """The folder of cgroup `path` under a mount: the path as /proc/self/cgroup gives it may be relative to
    another namespace's root, so its trailing components are tried, longest first, then the mount's root."""
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts) + 1):
        folder = root.joinpath(*parts[i:])
        if folder.is_dir():
            return folder
    return None


def _stat(file: Path) -> dict[str, int]:
    out = {}
    with open(file) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    return out


def cgroup_memory(membership: Path = Path("/proc/self/cgroup"), root: Path = _CGROUP_ROOT
                  ) -> tuple[float, float, str] | None:
    """(limit MB, unreclaimable use MB, description) of the memory cgroup in `membership` (this process's),
    if it has a limit; `root` is where the cgroup file systems are mounted."""
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            folder = _cgroup_dir(root / "memory", path)
            if folder is None or not (folder / "memory.stat").is_file():
                return None
            stat = _stat(folder / "memory.stat")
            limit = stat.get("hierarchical_memory_limit", _NO_LIMIT)
            if limit >= _NO_LIMIT:
                return None
            used = stat.get("total_rss", 0) + stat.get("total_shmem", 0)
            return limit / 2**20, used / 2**20, "cgroup v1 memory limit"
    for line in lines:
        if line.startswith("0::"):  # v2: the lowest memory.max on the way up
            folder = _cgroup_dir(root, line[3:])
            limit, at = _NO_LIMIT, folder
            while at is not None and (at / "memory.max").is_file():
                value = (at / "memory.max").read_text().strip()
                if value != "max":
                    limit = min(limit, int(value))
                at = at.parent if at != root else None
            if folder is None or limit >= _NO_LIMIT:
                return None
            stat = _stat(folder / "memory.stat") if (folder / "memory.stat").is_file() else {}
            used = stat.get("anon", 0) + stat.get("shmem", 0)
            return limit / 2**20, used / 2**20, "cgroup v2 memory.max"
    return None


def _available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_room_mb() -> tuple[float | None, str]:
    """(MB this process can still take, what bounds it): its memory cgroup's limit less the cgroup's
    unreclaimable use (anonymous and shared memory; page cache is reclaimable), or the RAM available now
    (MemAvailable), whichever is less. (None, reason) where neither is known."""
    rooms = []
    cgroup = cgroup_memory()
    if cgroup is not None:
        limit, used, what = cgroup
        rooms.append((limit - used, f"{what} {limit:.0f} MB, {used:.0f} MB of it in use"))
    available = _available_mb()
    if available is not None:
        rooms.append((available, f"{available:.0f} MB of RAM available"))
    if not rooms:
        return None, "no memory limit or available RAM could be read"
    return min(rooms)
