"""Waking a consumer of the embedded log as soon as another process appends to its topics.

Why: the writers of the embedded log are other processes (the runner's sources, other
workers), so a consumer that found nothing to read used to look again every 5 ms. A record then
waited ~2.5 ms on average before a worker saw it, half of the end-to-end p50 at 50k records/s,
and an idle worker looked at its files 200 times a second. Polling faster costs idle CPU; being
woken costs neither.

How: every append writes its frame to the partition's segment file (``topics/<topic>/<p>.log``,
``<p>-<base>.log`` after a roll) and then writes the acknowledged end into the segment's
``.end`` file, all in the topic's directory. A consumer's :class:`TopicWatch` holds an inotify
instance (``inotify_init1`` through :mod:`ctypes` on libc: no dependency) with a watch on the
directory of each topic it owns partitions of, for ``IN_MODIFY | IN_CREATE | IN_MOVED_TO``:
appends, ``.end`` updates, new segments, files renamed into place. While the consumer waits,
the inotify fd is registered with the event loop (``loop.add_reader``): the first event ends the
wait, and the timeout (the consumer's next membership check) is the backstop. The events are
then read and thrown away unparsed: the consumer looks at the end of each of its partitions
anyway, so which file changed does not matter.

- One inotify instance per consumer, not one per log: the consumers of an in-process run share
  a log, and one that drained a shared queue would swallow the wake-ups of the others.
- The fd is registered only during a wait: events for a busy consumer queue in the kernel (up
  to ``fs.inotify.max_queued_events``, then one overflow event) instead of waking its loop at
  every turn, and end its next wait at once, which costs one spare look at its partitions.
- A watch per topic directory, not per file: segment files come and go with rolls and
  retention, and the directory's watch covers them all. An append to a partition that another
  member owns wakes this consumer too; it finds nothing and waits again. So may the second of
  the two events each append makes (the segment, then its ``.end``).

No wake-up is missed between a read that found nothing and the wait: the watches are in place
before the consumer first reads a partition (:meth:`TopicWatch.follow` runs on an assignment
change, before the next read), and the queue is drained only when a wait ends, before the next
read. So an append after a read leaves an event in the queue, and the wait that follows returns
at once. A followed topic whose directory does not exist (yet) is waited for through a watch on
``topics/``: once the directory appears, the next wait watches it and returns at once, so that
the consumer reads what may have been appended before. A wait that times out adds every watch
again, which re-attaches one whose directory was deleted and created again.

Fallback: where inotify is unavailable (another OS than Linux; ``inotify_init1`` failing, e.g.
at the per-user limit ``fs.inotify.max_user_instances``; a watch failing, e.g. at
``fs.inotify.max_user_watches``) the consumer polls as it did before, through
:meth:`~pipelines.log.embedded.EmbeddedLog.wait_for_append` (every 5 ms), for the rest of its
life. Unless there is no inotify at all, a warning says why, and which limit to raise if one
was reached.

Measured (``docs/benchmarks.md``, "Latency with wake-ups", 2 cores): at 50k records/s the
stateless benchmark's p50 went from 4.3-5.3 to 1.9-2.0 ms and its p99 from 7-9 to 2.5-5 ms; p50
is 2.5-3.5 ms lower at every load measured; an idle worker uses 0.7-0.8% of a core instead of
1.4-1.8%; throughput and CPU per record are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pipelines.log._local import AppendWaiter, LocalLog
from pipelines.log.base import TopicPartition

__all__ = ["TopicWatch"]

logger = logging.getLogger(__name__)

# from <sys/inotify.h>
_IN_MODIFY = 0x2
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_ONLYDIR = 0x1000000
_TOPIC_EVENTS = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR
"""A topic directory: a segment or ``.end`` file written, a segment created, a file renamed in."""
_NEW_DIRECTORY = _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR
"""``topics/``, while a followed topic has no directory: the directory appearing."""
_READ_BYTES = 64 * 1024
_LARGEST_EVENT = 16 + 256  # struct inotify_event, then a name of up to NAME_MAX + 1 bytes

_FIXES = {
    errno.EMFILE: "raise fs.inotify.max_user_instances (or the open files limit, ulimit -n)",
    errno.ENFILE: "raise the system's open files limit, fs.file-max",
    errno.ENOSPC: "raise fs.inotify.max_user_watches",
}
"""What to do when inotify fails with these errors: a limit was reached."""


@dataclass(frozen=True, slots=True)
class _Inotify:
    """libc's inotify calls: each returns -1 and sets ``errno`` on failure."""

    init1: Callable[[int], int]
    add_watch: Callable[[int, bytes, int], int]
    rm_watch: Callable[[int, int], int]


@cache
def _inotify() -> _Inotify:
    """libc's inotify calls (:class:`OSError` where there are none)."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, f"inotify is Linux's, not {sys.platform}'s")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        init1, add_watch, rm_watch = (
            libc.inotify_init1,
            libc.inotify_add_watch,
            libc.inotify_rm_watch,
        )
    except AttributeError as error:
        raise OSError(errno.ENOSYS, f"the C library has no inotify ({error})") from None
    init1.argtypes = [ctypes.c_int]
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return _Inotify(init1, add_watch, rm_watch)


def _failed(call: str, path: Path | None = None) -> OSError:
    """The :class:`OSError` of the libc ``call`` that just failed (a subclass by errno, e.g.
    :class:`FileNotFoundError`), naming ``path``."""
    number = ctypes.get_errno()
    return OSError(number, f"{call}: {os.strerror(number)}", None if path is None else str(path))


def _open_inotify() -> int:
    """A new inotify instance: a non-blocking fd, closed on exec."""
    fd = _inotify().init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise _failed("inotify_init1")
    return fd


def _settle(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


class TopicWatch(AppendWaiter):
    """Ends a consumer's wait when a file of a topic it owns partitions of changes (see the
    module docstring); polls through ``log`` where inotify is unavailable."""

    def __init__(self, log: LocalLog, topics_dir: Path) -> None:
        super().__init__(log)
        self._topics_dir = topics_dir
        self._fd = -1  # the inotify instance, opened once there is a topic to follow
        self._polling = False  # inotify failed: the log's poll, for good
        self._topics: frozenset[str] = frozenset()
        self._watches: dict[str, int] = {}  # topic -> watch descriptor of its directory
        self._missing = False  # a followed topic has no directory (then topics/ is watched)
        self._parent = -1  # the watch descriptor on topics/, while one is missing
        self._waiting: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def follow(self, partitions: Collection[TopicPartition]) -> None:
        topics = frozenset(tp.topic for tp in partitions)
        if topics == self._topics:
            return
        self._topics = topics
        if self._polling:
            return
        for topic in self._watches.keys() - topics:
            # -1 (EINVAL) if the watch went with its directory: nothing left to remove
            _inotify().rm_watch(self._fd, self._watches.pop(topic))
        self._arm()

    async def wait(self, timeout: float) -> None:
        if self._missing and self._arm():
            return  # a directory that appeared: read what may be in it before waiting
        if self._polling:
            await super().wait(timeout)
            return
        if self._fd < 0:  # nothing followed: nothing to wait for but the timeout
            await asyncio.sleep(timeout)
            return
        fd = self._fd
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _settle, woken)
        timer = loop.call_later(timeout, _settle, woken)
        self._waiting = (loop, woken)
        try:
            await woken
        finally:
            self._waiting = None
            timer.cancel()
            if self._fd == fd:  # (not closed meanwhile)
                loop.remove_reader(fd)
        if self._fd == fd and not self._drain():
            self._arm()  # timed out: re-attach a watch whose directory was created again

    def close(self) -> None:
        if self._waiting is not None:
            loop, woken = self._waiting
            loop.remove_reader(self._fd)
            _settle(woken)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._watches.clear()
        self._topics = frozenset()
        self._missing = False
        self._parent = -1

    def _drain(self) -> bool:
        """Read and drop every queued event; whether there was any."""
        try:
            read = os.read(self._fd, _READ_BYTES)
        except BlockingIOError:
            return False  # woken by the timeout
        with contextlib.suppress(BlockingIOError):
            while len(read) > _READ_BYTES - _LARGEST_EVENT:  # the buffer may have been full
                read = os.read(self._fd, _READ_BYTES)
        return True

    def _arm(self) -> bool:
        """Watch the directory of every topic followed (again: a directory deleted and created
        again needs a new watch), and ``topics/`` while one is missing; whether a directory is
        watched now that was not before. Falls back to polling if inotify fails."""
        try:
            if self._fd < 0:
                self._fd = _open_inotify()
            added = False
            for topic in sorted(self._topics):
                path = self._topics_dir / topic
                try:
                    watch = self._add(path, _TOPIC_EVENTS)
                except (FileNotFoundError, NotADirectoryError):
                    self._watches.pop(topic, None)
                    continue
                added |= self._watches.get(topic) != watch
                self._watches[topic] = watch
            self._missing = len(self._watches) < len(self._topics)
            if self._missing and self._parent < 0:
                self._parent = self._add(self._topics_dir, _NEW_DIRECTORY)
            elif not self._missing and self._parent >= 0:
                _inotify().rm_watch(self._fd, self._parent)
                self._parent = -1
        except OSError as error:
            self._fall_back(error)
            return False
        return added

    def _add(self, path: Path, events: int) -> int:
        watch = _inotify().add_watch(self._fd, os.fsencode(path), events)
        if watch < 0:
            raise _failed("inotify_add_watch", path)
        return watch

    def _fall_back(self, error: OSError) -> None:
        """Poll from now on; say why, unless there is no inotify here at all."""
        self.close()
        self._polling = True
        if error.errno == errno.ENOSYS:
            return  # not Linux: polling is what there is
        fix = _FIXES.get(error.errno or 0)
        logger.warning(
            "a consumer of the embedded log in %s cannot be woken when records are appended "
            "(%s)%s; it looks for them every few ms instead, which adds latency and idle CPU",
            self._topics_dir.parent,
            error,
            f": {fix}" if fix else "",
        )
