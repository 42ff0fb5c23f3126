"""``headwater log check [--repair]``: verify every frame of an embedded log, and move damaged
frames aside so that a partition can be used again, losing only the records they held.

**Checking** walks each partition file frame by frame, as a reader does (see
:mod:`pipelines.log._partition_file`), holding a shared ``flock`` on the file so that no writer
appends meanwhile (an append takes the lock exclusively). Bytes past the acknowledged end
(``<p>.end``) that are not whole, valid frames are a torn write: harmless, the next writer cuts
them. A frame that is incomplete or fails its checksum below that end is damage. The walk then
looks for the next intact frame: first where the damaged frame's length field says it ends,
then byte by byte, at each position where a header parses with known flags, a base offset at
least the offset the damage starts at, and a checksum that holds over the whole frame (a frame
that passes its CRC at a wrong position is vanishingly unlikely). The offsets lost run from the
end of the last intact frame before the damage to the base offset of that next intact frame.

When no intact frame follows (damage at the end, or a file shorter than its acknowledged end),
how many records were lost cannot be known. The range is then made as large as the evidence
says it must be: up to the end the damaged frame's own header gives, when its length agrees with
the acknowledged end, and up to the highest offset any consumer group committed on the partition
(those records existed: the group read them). New records then never reuse an offset a consumer
has already gone past.

**Repairing** keeps every intact frame at its offsets (committed offsets refer to them) and
puts a *hole* in place of each damaged byte range: a frame flagged ``HOLE`` whose count is the
number of offsets lost, with no records, padded with zeros to the size of the range it replaces,
so that every kept frame stays at its byte position. Readers skip a hole: a read stops before it,
and a read that starts in it returns no records and the offset after it. The damaged bytes go to
``<p>.quarantine.<unix-time>`` next to the partition, described by a ``.json`` file beside it
(byte ranges in both files, offsets lost). A torn tail of a repaired partition goes there too.

The rewrite is atomic: the new file is written beside the old one, fsync-ed and renamed over it.
It holds only intact frames and reaches at least the old acknowledged end, so the old ``<p>.end``
is right for it whatever happens next; ``<p>.end`` is then set to its exact size. A process that
has the old file open would go on using it after the rename, so a repair refuses to start while
a runner or a consumer-group member uses the data directory, and a writer that finds its file
replaced stops with an error rather than append to the old one.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import orjson

from pipelines.errors import LogError, PipelineError
from pipelines.log._locks import held
from pipelines.log._offsets_file import parse as parse_offset
from pipelines.log._partition_file import (
    _ABORT,
    _COMMIT,
    _CRC_FROM,
    _END,
    _HEADER,
    _HEADERS,
    _HOLE,
    _NO_KEYS,
    _PENDING,
    _SEAL,
    _SHARED,
    _SPARSE,
    _TXN,
    _TXN_MARK,
    hole_header,
    segment_paths,
)
from pipelines.log._transactions import fsync_directory

__all__ = ["Damage", "LogCheck", "PartitionCheck", "check_log", "users"]

_KNOWN_FLAGS = (
    _NO_KEYS | _HEADERS | _TXN | _HOLE | _SEAL | _SPARSE | _SHARED | _PENDING | _COMMIT | _ABORT
)
_MAX_COUNT = 0xFFFFFFFF  # the count field of a frame header
_CHUNK = 1 << 24  # bytes copied at a time

Buffer = bytes | mmap.mmap


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged byte range of a partition file and the offsets whose records it held."""

    start: int
    """The first damaged byte."""
    end: int
    """Where intact frames resume (the end of the file when none do)."""
    what: str
    """What is wrong there, for people."""
    first_lost: int
    """The offset of the first record lost: the end of the last intact frame before."""
    next_offset: int | None
    """The base offset of the next intact frame; None when no intact frame follows."""
    at_least: int = 0
    """When ``next_offset`` is None: the lost offsets reach at least this one (exclusive)."""
    evidence: str = ""
    """Why ``at_least`` is what it is."""

    @property
    def lost_end(self) -> int:
        """The offset after the last one lost (as far as is known)."""
        return self.next_offset if self.next_offset is not None else self.at_least

    def lost(self) -> str:
        """The offsets lost, in words."""
        if self.next_offset == self.first_lost:
            return "no records lost (the damaged bytes lie between intact frames)"
        if self.next_offset is not None:
            return _lost(self.first_lost, self.next_offset)
        if self.at_least > self.first_lost:
            count = self.at_least - self.first_lost
            return (
                f"{_offsets(self.first_lost, self.at_least)} lost at least ({count:,} "
                f"record{_s(count)}, by {self.evidence}); no intact frame follows, so whether "
                "more were lost cannot be known"
            )
        return (
            f"the records from offset {self.first_lost:,} on are lost; no intact frame "
            "follows, so how many cannot be known"
        )


@dataclass(slots=True)
class PartitionCheck:
    """What checking (and perhaps repairing) one partition file found."""

    topic: str
    partition: int
    path: Path
    base: int = 0
    """The first offset of the segment file checked (the partition's first file: 0)."""
    size: int = 0
    acknowledged: int = 0
    frames: int = 0
    records: int = 0
    end_offset: int = 0
    holes: list[tuple[int, int]] = field(default_factory=list)
    """Offset ranges ``[start, end)`` lost in earlier repairs."""
    damage: list[Damage] = field(default_factory=list)
    torn: int | None = None
    """Where a torn tail past the acknowledged end starts."""
    quarantine: Path | None = None
    """Set by a repair: the file the damaged bytes were moved to."""

    @property
    def name(self) -> str:
        segment = f" from offset {self.base:,}" if self.path.stem != str(self.partition) else ""
        return f"{self.topic}[{self.partition}]{segment}"

    def line(self) -> str:
        """One line saying how the partition is."""
        if self.quarantine is not None:
            lost = "; ".join(d.lost() for d in self.damage)
            if self.damage[-1].next_offset is None:
                lost += f"; new records get offsets from {self.damage[-1].lost_end:,} on"
            return (
                f"{self.name}: REPAIRED, {lost}; the damaged bytes are in "
                f"{self.quarantine} (described in {self.quarantine}.json)"
            )
        state = "DAMAGED" if self.damage else "OK"
        text = (
            f"{self.name}: {state}, {self.frames:,} frames, {self.records:,} records, "
            f"{self.size:,} bytes (acknowledged to byte {self.acknowledged:,})"
        )
        for damage in self.damage:
            resume = "" if damage.next_offset is None else f", frames resume at byte {damage.end:,}"
            text += f"; {damage.what}: {damage.lost()}{resume}"
        if self.torn is not None:
            text += (
                f"; a torn write of {self.size - self.torn:,} bytes past the acknowledged end "
                "(harmless: the next writer cuts it off)"
            )
        for start, end in self.holes:
            text += f"; {_lost(start, end)} in an earlier repair"
        return text


@dataclass(slots=True)
class LogCheck:
    """What ``headwater log check`` found on a data directory."""

    data_dir: Path
    partitions: list[PartitionCheck]
    repaired: bool = False

    @property
    def damaged(self) -> list[PartitionCheck]:
        return [p for p in self.partitions if p.damage]

    @property
    def exit_code(self) -> int:
        """0 when every partition is intact or was repaired, 1 when damage is left."""
        return 1 if self.damaged and not self.repaired else 0

    def summary(self) -> str:
        topics = len({p.topic for p in self.partitions})
        checked = (
            f"{len(self.partitions):,} partition{_s(len(self.partitions))} of "
            f"{topics:,} topic{_s(topics)} in {self.data_dir}"
        )
        damaged = self.damaged
        if not damaged:
            return f"{checked}: every acknowledged record is intact"
        lost = "; ".join(f"{p.name} {'; '.join(d.lost() for d in p.damage)}" for p in damaged)
        partitions = f"{len(damaged):,} partition{_s(len(damaged))}"
        if self.repaired:
            files = ", ".join(str(p.quarantine) for p in damaged)
            return (
                f"{checked}: repaired {partitions}, every other record kept at its offset. "
                f"Lost: {lost}. The damaged bytes are in {files}"
            )
        return (
            f"{checked}: {partitions} damaged: {lost}. Writers and readers of a damaged "
            "partition stop with an error. Stop every process using the data directory, then "
            "run `headwater log check --repair` to move the damaged bytes to a quarantine file "
            "and go on, losing only those records (every other record keeps its offset)"
        )


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _offsets(start: int, end: int) -> str:
    """Offsets ``[start, end)`` in words."""
    return f"offset {start:,}" if end - start == 1 else f"offsets {start:,} to {end - 1:,}"


def _lost(start: int, end: int) -> str:
    count = end - start
    return f"{_offsets(start, end)} lost ({count:,} record{_s(count)})"


# -- checking ---------------------------------------------------------------------------------


def check_log(data_dir: Path, topics: Sequence[str] = (), *, repair: bool = False) -> LogCheck:
    """Check every partition of ``topics`` (all of them when empty) in ``data_dir``; with
    ``repair``, then repair each damaged one (see the module docstring)."""
    found = [
        check_segment(data_dir, topic, partition, base)
        for topic, count in _topics(data_dir, topics).items()
        for partition in range(count)
        for base in _segment_bases(data_dir, topic, partition)
    ]
    result = LogCheck(data_dir, found)
    if repair and result.damaged:
        _refuse_if_in_use(data_dir)
        result.partitions = [
            check_segment(data_dir, p.topic, p.partition, p.base, repair=True) if p.damage else p
            for p in found
        ]
        result.repaired = True
    return result


def _topics(data_dir: Path, wanted: Sequence[str]) -> dict[str, int]:
    """Topic name -> partition count, of ``wanted`` (every topic when empty)."""
    topics_dir = data_dir / "topics"
    if not topics_dir.is_dir():
        raise PipelineError(
            f"no embedded log at {data_dir}: give the data directory of the log to check with "
            "--data-dir"
        )
    counts = {meta.parent.name: _partition_count(meta) for meta in topics_dir.glob("*/topic.json")}
    missing = [name for name in wanted if name not in counts]
    if missing:
        raise PipelineError(
            f"no topic {', '.join(map(repr, missing))} in {data_dir}; "
            "`headwater topics list` shows the topics there"
        )
    return {name: counts[name] for name in (wanted or sorted(counts))}


def _partition_count(meta: Path) -> int:
    try:
        return int(orjson.loads(meta.read_bytes())["partitions"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f"cannot read the partition count of topic {meta.parent.name!r} from {meta} "
            f'({error}); write it back as {{"partitions": N, "compacted": false, '
            '"retention_ms": null}, with N the number of <p>.log files next to it, then run '
            "the check again"
        ) from None


def _segment_bases(data_dir: Path, topic: str, partition: int) -> list[int]:
    """The base offsets of the partition's segment files (``[0]`` when it has none yet)."""
    listed = segment_paths(data_dir / "topics" / topic / f"{partition}.log")
    return [base for base, _ in listed] or [0]


def check_segment(
    data_dir: Path, topic: str, partition: int, base: int = 0, *, repair: bool = False
) -> PartitionCheck:
    """Check one segment file of a partition under its ``flock`` (exclusive with ``repair``,
    which then rewrites the file if it is damaged)."""
    first = data_dir / "topics" / topic / f"{partition}.log"
    path = first if base == 0 else first.with_name(f"{partition}-{base:020d}.log")
    found = PartitionCheck(topic, partition, path, base, acknowledged=_acknowledged_end(path))
    try:
        with _locked(path, exclusive=repair) as view:
            found.size = len(view)
            _walk(view, found, _committed(data_dir, topic, partition))
            if repair and found.damage:
                _repair(view, found)
    except OSError as error:
        doing = "repair" if repair else "check"
        raise LogError(
            f"cannot {doing} {path}: {error.strerror or error}. Check that the user running "
            "Headwater can read and write the data directory and that the disk has room, "
            "then run the check again"
        ) from error
    return found


def _acknowledged_end(path: Path) -> int:
    try:
        raw = path.with_suffix(".end").read_bytes()[: _END.size]
    except FileNotFoundError:
        return 0
    return int(_END.unpack(raw)[0]) if len(raw) == _END.size else 0


def _committed(data_dir: Path, topic: str, partition: int) -> int:
    """The highest offset a consumer group committed on the partition (0 if none did)."""
    highest = 0
    for path in data_dir.glob(f"groups/*/offsets/{topic}.{partition}"):
        with contextlib.suppress(OSError):
            offset = parse_offset(path.read_bytes())
            highest = max(highest, offset or 0)
    return highest


@contextlib.contextmanager
def _locked(path: Path, *, exclusive: bool) -> Iterator[Buffer]:
    """The bytes of ``path`` (empty if it does not exist), under its ``flock``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = -1
    if fd < 0:
        yield b""
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        if not size:
            yield b""
            return
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            yield view
    finally:
        os.close(fd)  # releases the lock


def _walk(view: Buffer, found: PartitionCheck, committed: int) -> None:
    """Note every frame of ``view`` in ``found``, and what is torn or damaged."""
    size, position, offset = found.size, 0, found.base
    while position < size:
        end = _frame_end(view, position, size)
        if end is not None:
            offset = _note_frame(view, position, found)
            position = end
            continue
        if position >= found.acknowledged:
            found.torn = position
            return
        resume = _resume(view, position, size, offset)
        found.damage.append(_damage(view, found, position, resume, offset, committed))
        if resume is None:
            return
        position = resume
    if size < found.acknowledged:  # ends on a frame boundary, but before the acknowledged end
        found.damage.append(_damage(view, found, size, None, offset, committed))


def _frame_end(view: Buffer, position: int, size: int) -> int | None:
    """Where the frame at ``position`` ends if it is whole and passes its checksum (as a reader
    decides), else None."""
    if size - position < _HEADER.size:
        return None
    length: int
    crc: int
    length, crc = struct.unpack_from("<II", view, position)
    end = position + _HEADER.size + length
    if end > size or zlib.crc32(view[position + _CRC_FROM : end]) != crc:
        return None
    return end


def _note_frame(view: Buffer, position: int, found: PartitionCheck) -> int:
    """Count the valid frame at ``position``; returns the offset after it."""
    _, _, base, count, flags = _HEADER.unpack_from(view, position)
    found.frames += 1
    if flags & _HOLE:
        if count:
            found.holes.append((base, base + count))
    else:
        found.records += count
    span = count
    if flags & _SPARSE and count:  # a compacted frame: up to its last record's offset
        at = position + _HEADER.size + (_TXN_MARK.size if flags & _TXN else 0) + 4 * (count - 1)
        span = struct.unpack_from("<I", view, at)[0] + 1
    found.end_offset = base + span
    return found.end_offset


def _resume(view: Buffer, start: int, size: int, offset: int) -> int | None:
    """The position of the next intact frame after the damage at ``start`` whose base offset is
    at least ``offset``: where the damaged frame's length says, else the first found byte by
    byte."""
    if size - start >= _HEADER.size:
        hinted: int = start + _HEADER.size + struct.unpack_from("<I", view, start)[0]
        if _plausible(view, hinted, size, offset):
            return hinted
    for position in range(start + 1, size - _HEADER.size + 1):
        if _plausible(view, position, size, offset):
            return position
    return None


def _plausible(view: Buffer, position: int, size: int, offset: int) -> bool:
    """Whether a whole, checksum-valid frame with known flags and a base offset of at least
    ``offset`` starts at ``position``."""
    if size - position < _HEADER.size:
        return False
    length: int
    crc: int
    length, crc, base, count, flags = _HEADER.unpack_from(view, position)
    if flags & ~_KNOWN_FLAGS or base < offset:
        return False
    if not flags & _HOLE:
        per_record = 12 if flags & _NO_KEYS else 16  # timestamp, value length (, key length)
        if length < count * per_record:
            return False
    end = position + _HEADER.size + length
    return end <= size and zlib.crc32(view[position + _CRC_FROM : end]) == crc


def _damage(
    view: Buffer,
    found: PartitionCheck,
    start: int,
    resume: int | None,
    offset: int,
    committed: int,
) -> Damage:
    """The damage from ``start`` to ``resume`` (the end of the file when None)."""
    what = _what(view, start, found)
    if resume is not None:
        next_offset = _HEADER.unpack_from(view, resume)[2]
        return Damage(start, resume, what, offset, next_offset)
    claimed = _claimed_end(view, start, found, offset)
    at_least, evidence = max(
        (claimed, "the damaged frame's header"),
        (committed, "the offsets consumer groups committed"),
        (offset, ""),
    )
    return Damage(start, found.size, what, offset, None, at_least, evidence)


def _what(view: Buffer, start: int, found: PartitionCheck) -> str:
    size, acknowledged = found.size, found.acknowledged
    if start >= size:
        return f"the file ends at byte {size:,}, before its acknowledged end ({acknowledged:,})"
    if size - start >= _HEADER.size:
        length = struct.unpack_from("<I", view, start)[0]
        if start + _HEADER.size + length <= size:
            return f"the frame at byte {start:,} fails its checksum"
    if size < acknowledged:
        return (
            f"the file ends at byte {size:,}, inside the frame at byte {start:,} and before its "
            f"acknowledged end at byte {acknowledged:,}"
        )
    return f"the frame at byte {start:,} is damaged (its length is wrong)"


def _claimed_end(view: Buffer, start: int, found: PartitionCheck, offset: int) -> int:
    """The offset after the damaged frame at ``start`` as its header says, when the header looks
    intact (its base offset follows on and its length ends it at the acknowledged end)."""
    if found.size - start < _HEADER.size:
        return offset
    length, _, base, count, flags = _HEADER.unpack_from(view, start)
    ends_at = start + _HEADER.size + length
    if base != offset or flags & ~_KNOWN_FLAGS or ends_at != found.acknowledged:
        return offset
    return int(base + count)


# -- repairing --------------------------------------------------------------------------------


def users(data_dir: Path) -> list[str]:
    """The processes using ``data_dir`` now, as far as their locks tell: runners (which hold
    ``runs/<pipeline>.lock``) and consumer-group members (which hold their member file)."""
    found = []
    for lock in sorted(data_dir.glob("runs/*.lock")):
        if held(lock):
            pid = lock.read_text(errors="replace").strip() or "unknown"
            found.append(f"the runner of pipeline {lock.stem!r} (pid {pid})")
    for member in sorted(data_dir.glob("groups/*/members/*")):
        if not member.name.startswith(".") and held(member):
            found.append(f"a member of consumer group {member.parent.parent.name!r}")
    return found


def _refuse_if_in_use(data_dir: Path) -> None:
    busy = users(data_dir)
    if busy:
        raise PipelineError(
            f"cannot repair the log in {data_dir} while it is in use, by {', '.join(busy)}: a "
            "process that has a partition file open would go on using the old file. Stop them "
            "(their records stay on the log), then run `headwater log check --repair` again"
        )


def _repair(view: Buffer, found: PartitionCheck) -> None:
    """Under the exclusive lock: quarantine the damaged bytes, then replace the file by one
    with a hole in place of each damaged range."""
    quarantine = _quarantine(view, found)
    _rewrite(view, found)
    found.quarantine = quarantine


def _quarantine(view: Buffer, found: PartitionCheck) -> Path:
    """Write the damaged (and torn) bytes and their description next to the partition."""
    stamp = int(time.time())
    while True:
        path = found.path.with_name(f"{found.partition}.quarantine.{stamp}")
        try:
            out = path.open("xb")
        except FileExistsError:
            stamp += 1
            continue
        break
    ranges = []
    with out:
        for damage in found.damage:
            ranges.append(_moved(damage.start, damage.end, out.tell(), damage))
            _copy(view, damage.start, damage.end, out)
        if found.torn is not None:
            ranges.append(_moved(found.torn, found.size, out.tell(), None))
            _copy(view, found.torn, found.size, out)
        _sync(out)
    about = {
        "about": f"bytes moved out of {found.path.name} by `headwater log check --repair`",
        "topic": found.topic,
        "partition": found.partition,
        "repaired_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "partition_file_size": found.size,
        "acknowledged_end": found.acknowledged,
        "ranges": ranges,
    }
    with path.with_name(path.name + ".json").open("xb") as sidecar:
        sidecar.write(orjson.dumps(about, option=orjson.OPT_INDENT_2) + b"\n")
        _sync(sidecar)
    fsync_directory(path.parent)
    return path


def _moved(start: int, end: int, at: int, damage: Damage | None) -> dict[str, object]:
    """The description of one range of the quarantine file."""
    entry: dict[str, object] = {
        "partition_file_bytes": [start, end],
        "quarantine_file_bytes": [at, at + end - start],
    }
    if damage is None:
        entry["what"] = "a torn write past the acknowledged end (never acknowledged)"
        return entry
    entry["what"] = damage.what
    entry["first_lost_offset"] = damage.first_lost
    entry["last_lost_offset"] = damage.lost_end - 1 if damage.lost_end > damage.first_lost else None
    entry["lost_count_known"] = damage.next_offset is not None
    return entry


def _rewrite(view: Buffer, found: PartitionCheck) -> None:
    """Replace the partition file by its intact frames and a hole for each damaged range."""
    temporary = found.path.with_name(f".{found.path.name}.{os.getpid()}.repair")
    with temporary.open("wb") as out:
        kept_from = 0
        for damage in found.damage:
            _copy(view, kept_from, damage.start, out)
            _write_hole(out, damage, found.acknowledged)
            kept_from = damage.end
        _copy(view, kept_from, found.size if found.torn is None else found.torn, out)
        _sync(out)
        size = out.tell()
    _verify(temporary, found)
    os.replace(temporary, found.path)
    fsync_directory(found.path.parent)
    end_fd = os.open(found.path.with_suffix(".end"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(end_fd, _END.pack(size), 0)
        os.fsync(end_fd)
    finally:
        os.close(end_fd)


def _write_hole(out: BinaryIO, damage: Damage, acknowledged: int) -> None:
    """Hole frames for the offsets ``damage`` lost, filling its byte range (when it ends the
    file: up to the acknowledged end), so that the file stays as long as before."""
    room = (damage.end if damage.next_offset is not None else acknowledged) - damage.start
    base, count = damage.first_lost, max(0, damage.lost_end - damage.first_lost)
    while count > _MAX_COUNT:  # more than one header can say: minimal holes first
        out.write(hole_header(base, _MAX_COUNT, 0))
        base, count, room = base + _MAX_COUNT, count - _MAX_COUNT, room - _HEADER.size
    padding = max(0, room - _HEADER.size)
    out.write(hole_header(base, count, padding))
    zeros = bytes(min(padding, _CHUNK))
    for start in range(0, padding, _CHUNK):
        out.write(zeros[: padding - start])


def _verify(path: Path, repaired: PartitionCheck) -> None:
    """Check the rewritten file before it replaces the damaged one."""
    again = PartitionCheck(repaired.topic, repaired.partition, path, acknowledged=0)
    with _locked(path, exclusive=False) as view:
        again.size = len(view)
        _walk(view, again, 0)
    lost_end = max(d.lost_end for d in repaired.damage)
    expected_end = max(repaired.end_offset, lost_end)
    if again.damage or again.torn is not None or again.end_offset != expected_end:
        path.unlink()
        raise LogError(
            f"the repaired copy of {repaired.path} does not check out (it ends at offset "
            f"{again.end_offset:,}, not {expected_end:,}); the file is left as it was. Please "
            "report this, with the output of `headwater log check`"
        )


def _copy(view: Buffer, start: int, end: int, out: BinaryIO) -> None:
    for at in range(start, end, _CHUNK):
        out.write(view[at : min(end, at + _CHUNK)])


def _sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
