"""Exports of the served model, made where the model is (GET /admin/export in the embedded
deployment, /internal/export in the split one): one at a time, written by service.export into a
temporary folder, streamed as a tar and deleted once the stream is done or its reader has gone.

The tar is built here rather than with `tarfile` writing into a buffer: `tarfile` copies a whole
member in one call, which would hold a model-sized file in memory; here each chunk is read from disk
when the client is ready for it. Its size is known before the first byte (Content-Length).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tarfile
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.editor import Editor
from service.errors import KnowpatchError, Overloaded, Unavailable
from service.export import Sessions, export_served
from service.inference import ExportFormat, ExportStream, check_export, export_name

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # what one read from disk sends: large enough to keep the network busy, small in memory


@dataclass(frozen=True)
class Member:
    """One entry of the tar: its header block(s), and the file whose bytes follow (None: a folder)."""

    header: bytes
    path: Path | None
    size: int


def _padded(size: int, unit: int = tarfile.BLOCKSIZE) -> int:
    return -(-size // unit) * unit


def _member(path: Path, name: str) -> Member:
    info = tarfile.TarInfo(name)
    stat = path.stat()
    info.mtime = int(stat.st_mtime)
    if path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        return Member(info.tobuf(tarfile.PAX_FORMAT), None, 0)
    info.mode, info.size = 0o644, stat.st_size
    return Member(info.tobuf(tarfile.PAX_FORMAT), path, stat.st_size)


def tar_members(folder: Path, name: str) -> list[Member]:
    """`folder` as the tar's one top-level folder `name`, its files in sorted order."""
    return [_member(folder, name)] + [_member(path, f"{name}/{path.relative_to(folder).as_posix()}")
                                      for path in sorted(folder.rglob("*"))]


def tar_size(members: list[Member]) -> int:
    """Bytes of the whole tar: the members, two zero blocks, padded to a record as `tar` writes it."""
    body = sum(len(m.header) + _padded(m.size) for m in members)
    return _padded(body + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    # Opened per chunk: a suspended stream then holds no file open, whenever and however it is dropped.
    for offset in range(0, size, CHUNK_BYTES):
        with path.open("rb") as file:
            file.seek(offset)
            chunk = file.read(min(CHUNK_BYTES, size - offset))
        if not chunk:
            raise KnowpatchError(f"{path.name} shrank while it was streamed")
        yield chunk


def tar_chunks(members: list[Member]) -> Iterator[bytes]:
    """The tar of `members`, in chunks of at most CHUNK_BYTES (plus a header)."""
    sent = 0
    for member in members:
        yield member.header
        if member.path is not None:
            yield from _file_chunks(member.path, member.size)
        if _padded(member.size) > member.size:
            yield bytes(_padded(member.size) - member.size)
        sent += len(member.header) + _padded(member.size)
    yield bytes(tar_size(members) - sent)


async def _in_threads(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Each chunk read in a worker thread: disk reads must not stall the event loop that serves the API."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk


@dataclass
class Held:
    """What one export holds until its stream is done: its temporary folder and the export slot."""

    root: Path
    release_slot: Callable[[], None]
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        """Delete the folder and free the slot, once (the stream's end and a cancelled write may both call)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        shutil.rmtree(self.root, ignore_errors=True)
        self.release_slot()

    async def aclose(self) -> None:
        self.close()


class Exports:
    """Exports of `editor`'s served model, with the ledger at `ledger`, in temporary folders under
    `tmp_dir` (default: the system's, TMPDIR). One at a time: a second gets Overloaded (429) at once,
    rather than waiting, because each writes the whole model to disk and a download can take minutes."""

    def __init__(self, editor: Editor, ledger: Sessions | None, not_ready: Callable[[], str | None],
                 tmp_dir: Path | None = None) -> None:
        self.editor = editor
        self.ledger = ledger
        self.not_ready = not_ready
        self.tmp_dir = tmp_dir
        self._slot = threading.Lock()

    def _admit(self, export_format: str, rank: int | None) -> None:
        check_export(export_format, rank)
        if self.ledger is None:
            raise Unavailable("this backend was built without the ledger, so it cannot export")
        reason = self.not_ready()
        if reason is not None:
            raise Unavailable(f"the model is not ready to export: {reason}")
        if not self._slot.acquire(blocking=False):
            raise Overloaded("another export is being written or downloaded (one at a time: each writes the "
                             "whole model to disk); retry when it is done")

    def _write(self, folder: Path, export_format: ExportFormat, rank: int | None) -> tuple[int, list[Member]]:
        assert self.ledger is not None  # checked by _admit
        info = export_served(self.editor, self.ledger, export_format, folder, rank)
        version = int(info["ledger_head_seq"])
        return version, tar_members(folder, export_name(export_format, version))

    async def start(self, export_format: ExportFormat, rank: int | None = None) -> ExportStream:
        """Write the export (in a thread), then return its tar stream; the stream's `close` deletes it."""
        self._admit(export_format, rank)
        try:
            held = Held(Path(tempfile.mkdtemp(prefix="knowpatch-export-", dir=self.tmp_dir)), self._slot.release)
        except BaseException:
            self._slot.release()
            raise
        job = asyncio.ensure_future(asyncio.to_thread(self._write, held.root / "export", export_format, rank))
        try:
            version, members = await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda done: _after_abandoned(done, held))  # a thread cannot be stopped
            raise
        except BaseException:
            held.close()
            raise
        log.info("export %s of version %d: %d bytes to stream", export_format, version, tar_size(members))
        return ExportStream(version, export_format, _in_threads(tar_chunks(members)), held.aclose, tar_size(members))


def _after_abandoned(job: asyncio.Future[tuple[int, list[Member]]], held: Held) -> None:
    """The caller went away while the export was written: delete it once the writing thread is done."""
    held.close()
    if not job.cancelled() and job.exception() is not None:
        log.warning("an abandoned export failed: %s", job.exception())
