"""Process memory: figures for telemetry, and handing freed memory back to the OS."""

from __future__ import annotations

import ctypes
import gc
import resource


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
