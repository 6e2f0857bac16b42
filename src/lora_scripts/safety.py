"""Guards for files from strangers and for shared output folders.

- `check_safetensors`: a .safetensors header is JSON that names each tensor's dtype, shape and byte
  range; a lying header (ranges past the end of the file, overlapping, or not matching dtype x shape)
  is refused before any library maps the file.
- `RunLock`: one training run per output folder; a lock left by a dead process is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024


class UnsafeFileError(ValueError):
    pass


def check_safetensors(path: Path) -> dict:
    """The parsed header of a well-formed safetensors file, or UnsafeFileError saying what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnsafeFileError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise UnsafeFileError(f"{path}: header length {n} does not fit in the {size}-byte file; corrupt or forged")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise UnsafeFileError(f"{path}: header is not valid JSON; corrupt or forged") from None
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path}: header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise UnsafeFileError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in ITEMSIZE:
            raise UnsafeFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (0 <= begin <= end <= data_len):
            raise UnsafeFileError(f"{path}: tensor {name!r} claims bytes {begin}..{end} but the data is {data_len} "
                                  "bytes; corrupt or forged")
        if end - begin != numel * ITEMSIZE[dtype]:
            raise UnsafeFileError(f"{path}: tensor {name!r} is {dtype}{list(shape)} ({numel * ITEMSIZE[dtype]} bytes) "
                                  f"but claims {end - begin} bytes; corrupt or forged")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise UnsafeFileError(f"{path}: tensors {n1!r} and {n2!r} overlap; corrupt or forged")
    return header


class RunLockedError(RuntimeError):
    pass


class RunLock:
    """`output_dir/.lora-scripts.lock` holding the owner's pid, host and start time."""

    NAME = ".lora-scripts.lock"

    def __init__(self, folder: Path, announce=print):
        self.path = Path(folder) / self.NAME
        self.announce = announce
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and _alive(owner.get("pid", -1)):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another training run (pid {owner['pid']}, started "
                        f"{owner.get('started')}). Wait for it, stop it, or choose another output_dir."
                    ) from None
                if owner and owner.get("host") != me["host"]:
                    raise RunLockedError(
                        f"{self.path.parent} is locked by a run on host {owner.get('host')} (pid {owner.get('pid')}); "
                        f"if that run is gone, delete {self.path}"
                    ) from None
                self.announce(f"taking over {self.path}: its run (pid {owner.get('pid') if owner else '?'}) is gone")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise RunLockedError(f"could not take {self.path}")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
