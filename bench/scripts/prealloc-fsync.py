#!/usr/bin/env python3
"""How a log's zero-filled preallocation changes the latency of write + fdatasync.

    python3 bench/scripts/prealloc-fsync.py DIR [SECONDS]

Writes KiB-sized records one after another into a new file in DIR, each followed by
fdatasync (as one group commit of carebus's log does), timing each write + fdatasync,
for 1, 16 and 128 KiB per sync and three ways of preparing the space ahead:

  ahead        1 MiB of zeros written through the page cache when the data reaches the
               end of what is allocated, just before the data write (what carebus-log's
               writer does today): the next fdatasync also writes that 1 MiB.
  idle         zeros written 128 KiB at a time ahead of the data, each pushed to the disk
               with sync_file_range (WAIT_BEFORE | WRITE | WAIT_AFTER) outside the timed
               part (as if done while the writer is idle), staying 2 MiB ahead.
  idle-synced  as idle, with an fdatasync after each fill (the blocks' allocation is
               then durable too, so a data fdatasync has no metadata to write).

Linux only (sync_file_range through ctypes); no other dependency. The file is removed.
"""
import ctypes
import os
import statistics
import sys
import time

SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
MIB = 1 << 20
CHUNK = 128 << 10


def run(libc, directory, seconds, kib, mode):
    path = os.path.join(directory, "prealloc-fsync.test")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = b"x" * (kib * 1024)
        zeros_mib, zeros_chunk = b"\0" * MIB, b"\0" * CHUNK
        pos = alloc = 0
        lat = []
        end = time.monotonic() + seconds
        while time.monotonic() < end and pos + len(data) < 120 * MIB:
            if mode.startswith("idle"):
                while alloc < pos + 2 * MIB:
                    os.pwrite(fd, zeros_chunk, alloc)
                    libc.sync_file_range(fd, ctypes.c_longlong(alloc),
                                         ctypes.c_longlong(CHUNK), SYNC_FILE_RANGE_ALL)
                    alloc += CHUNK
                    if mode == "idle-synced":
                        os.fdatasync(fd)
            t0 = time.perf_counter()
            if mode == "ahead" and pos + len(data) > alloc:
                os.pwrite(fd, zeros_mib, alloc)
                alloc += MIB
            os.pwrite(fd, data, pos)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
            pos += len(data)
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()

    def q(p):
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1e3

    print(f"{kib:4d} KiB per sync, {mode:11s}: n={len(lat):6d}  p50 {q(0.5):.3f}  "
          f"p99 {q(0.99):.3f}  p999 {q(0.999):.3f}  mean {statistics.mean(lat) * 1e3:.3f} ms")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    directory = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for kib in (1, 16, 128):
        for _ in range(2):  # alternate the modes, twice: the disk's speed drifts
            for mode in ("ahead", "idle", "idle-synced"):
                run(libc, directory, seconds, kib, mode)


if __name__ == "__main__":
    main()
