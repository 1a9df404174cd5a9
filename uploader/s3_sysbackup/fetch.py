"""Reading blobs back: locate them in the local index, fetch each pack's ranges once, verify every blob.

Where a blob is comes from the host's local index (docs/PACK_INDEX.md); a blob it does not know, or
a pack the backend no longer serves, makes the fetcher rebuild the index from the backend's pack
list once. URLs come from `POST /downloads {"packs"}`. Blobs of one pack that sit close together are
fetched with one ranged GET (S3 bills per request), read as it arrives: GET threads decompress and
re-hash each blob (`open_blob`) as soon as its bytes are in, and hand the verified plaintext over
through a queue bounded in bytes. Memory holds blobs in flight, not whole ranges, and decoding runs
beside the consumer's writes (zstd and SHA-256 release the GIL).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sysbackup_domain.manifest import decode_stream_index
from sysbackup_domain.packs import PackEntry, open_blob
from sysbackup_domain.tree import Tree, TreeEntry, decode_tree

from .api import ApiClient
from .cache import IndexedBlob
from .index_rebuild import LocalIndex, rebuild_index
from .transfer import Transfer, TransferError

logger = logging.getLogger(__name__)

# Two blobs closer than this are fetched in one GET: a wasted 256 KiB costs less than a request.
MERGE_GAP_BYTES = 256 * 1024
# A range is streamed (memory holds blobs, not ranges), so a GET may cover a whole 16 MiB pack;
# bigger packs are split so that their parts are read in parallel.
MAX_RANGE_BYTES = 16 * 1024 * 1024
PARALLEL_GETS = 2
# Verified plaintext decoded ahead of the consumer (a restore's writes): with the blob each GET
# thread is decoding, this is a restore's memory for data.
DECODED_AHEAD_BYTES = 4 * 1024 * 1024
# Blobs read and handed over together, up to this much plaintext (or one bigger blob).
READ_GROUP_BYTES = 512 * 1024
# Presigned GETs live 300 s (DOWNLOAD_URL_EXPIRY_SECONDS); one is reused for this long, then asked again.
URL_REUSE_S = 240
# An index of at most this many packs gets every URL in the first call: a restore then asks once, not
# once per pack of trees met and once more for the data (each call an API request and an invocation).
ALL_URLS_UP_TO_PACKS = 16
# Trees of one pack sit together (written after the files): the first tree wanted from a pack brings
# every tree the index knows in it, in one GET, up to this many bytes held for the walk to come.
TREE_PREFETCH_BYTES = 64 * 1024 * 1024
# Hashes located per round: bounds memory and keeps presigned URLs (300 s) fresh. A pack whose blobs
# fall in two rounds is read twice (in parts), so rounds are large.
LOCATE_BATCH = 20_000


class MissingBlob(RuntimeError):
    """Neither the local index nor the backend's packs hold a blob."""


@dataclass(frozen=True)
class Span:
    """One ranged GET of a pack covering several blobs."""

    pack_id: str
    start: int
    end: int
    entries: tuple[PackEntry, ...]


def plan_spans(pack_id: str, entries: Sequence[PackEntry]) -> list[Span]:
    """Merge the blobs of one pack into as few ranges as `MERGE_GAP_BYTES`/`MAX_RANGE_BYTES` allow."""
    spans: list[Span] = []
    current: list[PackEntry] = []
    start = end = 0
    for entry in sorted(entries, key=lambda e: e.offset):
        entry_end = entry.offset + entry.length
        if current and entry.offset - end <= MERGE_GAP_BYTES and entry_end - start <= MAX_RANGE_BYTES:
            current.append(entry)
            end = max(end, entry_end)
            continue
        if current:
            spans.append(Span(pack_id, start, end, tuple(current)))
        current, start, end = [entry], entry.offset, entry_end
    if current:
        spans.append(Span(pack_id, start, end, tuple(current)))
    return spans


Located = dict[str, IndexedBlob]


class BlobFetcher:
    def __init__(
        self,
        api: ApiClient,
        transfer: Transfer,
        index: LocalIndex,
        host: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api
        self.transfer = transfer
        self.index = index
        self.host = host
        self.progress = progress
        self.rebuilt = False  # the index was rebuilt from the backend's pack list by this fetcher
        self._urls: dict[str, tuple[str, float]] = {}  # pack_id -> (presigned GET, when it was issued)
        self._trees: dict[str, bytes] = {}  # prefetched tree plaintext, dropped once handed out
        self._asked_ahead: Future[None] | None = None  # see ask_urls_ahead

    def ask_urls_ahead(self) -> None:
        """Ask for a small index's URLs now, in the background, while the caller fetches the manifest: the
        restore function's cold start then overlaps the manifest's request instead of following it."""
        known = set(self.index.known_packs())
        if self._asked_ahead is not None or not 0 < len(known) <= ALL_URLS_UP_TO_PACKS:
            return
        asking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="urls")
        self._asked_ahead = asking.submit(self._ask_ahead, known)
        asking.shutdown(wait=False)

    def _ask_ahead(self, pack_ids: set[str]) -> None:
        issued = time.monotonic()
        downloads = self.api.download_urls(pack_ids, host=self.host)
        self._urls.update((pack_id, (url, issued)) for pack_id, url in downloads.urls.items())

    def rebuild_index(self) -> None:
        """Learn the packs the backend lists that the index does not know (once per fetcher)."""
        rebuild_index(self.api, self.transfer, self.index, host=self.host, progress=self.progress)
        self.rebuilt = True

    def locate(self, hashes: Iterable[str]) -> tuple[Located, dict[str, str]]:
        """({hash: where}, {pack_id: presigned GET url}); MissingBlob if any blob cannot be found."""
        wanted = set(hashes)
        while True:
            located = self.index.locate(wanted)
            unknown = wanted - located.keys()
            if unknown:
                if self.rebuilt:
                    raise MissingBlob(_describe_unknown(unknown))
                self.rebuild_index()
                continue
            urls, refused = self._urls_for({blob.pack_id for blob in located.values()})
            if not refused:
                return located, urls
            # Repacked, collected or refused: forget those packs; the rebuild finds where their blobs went.
            self.index.drop_packs(refused)
            if self.rebuilt:
                raise MissingBlob(_describe_gone(refused))
            self.rebuild_index()

    def _urls_for(self, pack_ids: set[str]) -> tuple[dict[str, str], dict[str, str]]:
        """({pack_id: presigned GET}, {pack_id: why refused}): one POST /downloads for the packs
        without a recent URL (a restore walks level by level; each round used to ask again)."""
        if self._asked_ahead is not None:
            asked, self._asked_ahead = self._asked_ahead, None
            with contextlib.suppress(Exception):  # a failed early ask is only not used: asked again below
                asked.result()
        now = time.monotonic()
        recent = {p: url for p, (url, issued) in self._urls.items() if now - issued < URL_REUSE_S}
        urls = {p: recent[p] for p in pack_ids if p in recent}
        wanted = pack_ids - urls.keys()
        if not wanted:
            return urls, {}
        downloads = self.api.download_urls(wanted | self._packs_worth_asking_too(recent), host=self.host)
        for pack_id, url in downloads.urls.items():
            self._urls[pack_id] = (url, now)
        urls.update({p: url for p, url in downloads.urls.items() if p in wanted})
        for pack_id in downloads.missing:
            self._urls.pop(pack_id, None)
        return urls, {p: why for p, why in downloads.missing.items() if p in wanted}

    def _packs_worth_asking_too(self, recent: dict[str, str]) -> set[str]:
        """Every other pack of a small index (see ALL_URLS_UP_TO_PACKS) without a recent URL."""
        known = self.index.known_packs()
        if len(known) > ALL_URLS_UP_TO_PACKS:
            return set()
        return known.keys() - recent.keys()

    def fetch_trees(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Tree blobs by hash (verified). A pack's first wanted tree brings all its indexed trees."""
        wanted = set(digests)
        needed = wanted - self._trees.keys()
        if needed:
            located, urls = self.locate(needed)
            extra = self.index.trees_in({blob.pack_id for blob in located.values()})
            budget = TREE_PREFETCH_BYTES - sum(len(data) for data in self._trees.values())
            for digest, blob in sorted(extra.items()):
                if digest in located or digest in self._trees or blob.entry.raw_length > budget:
                    continue
                located[digest] = blob
                budget -= blob.entry.raw_length
            self._trees.update(self.fetch_located(located, urls))
        return {digest: self._trees.pop(digest) for digest in wanted}

    def fetch(self, hashes: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (hash, verified plaintext) for every hash, pack by pack. Raises CorruptBlob."""
        ordered = sorted(set(hashes))
        for start in range(0, len(ordered), LOCATE_BATCH):
            located, urls = self.locate(ordered[start : start + LOCATE_BATCH])
            yield from self.fetch_located(located, urls)

    def fetch_all(self, hashes: Iterable[str]) -> dict[str, bytes]:
        return dict(self.fetch(hashes))

    def fetch_located(self, located: Located, urls: dict[str, str]) -> Iterator[tuple[str, bytes]]:
        """Like `fetch`, for blobs already located (the caller needed their sizes first). Blobs come
        in no set order; closing the iterator early stops the GET threads."""
        by_pack: dict[str, list[PackEntry]] = {}
        for blob in located.values():
            by_pack.setdefault(blob.pack_id, []).append(blob.entry)
        pending = deque(span for pack_id, group in by_pack.items() for span in plan_spans(pack_id, group))
        if not pending:
            return
        workers = min(PARALLEL_GETS, len(pending))
        blobs = DecodedBlobs(DECODED_AHEAD_BYTES, producers=workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="get") as pool:
            for _ in range(workers):
                pool.submit(self._read_spans, pending, urls, blobs)
            try:
                yield from blobs
            finally:
                pending.clear()
                blobs.stop()  # wakes GET threads waiting for room; they end

    def _read_spans(self, pending: deque[Span], urls: dict[str, str], blobs: DecodedBlobs) -> None:
        """One GET thread: take spans until none are left, stream each into `blobs`."""
        error: BaseException | None = None
        try:
            while pending:
                try:
                    span = pending.popleft()
                except IndexError:  # another thread took the last one
                    break
                self._read_span(span, urls, blobs)
        except ConsumerGone:
            pass
        except BaseException as failure:  # handed to the consumer, raised there
            error = failure
        finally:
            blobs.producer_done(error)

    def _read_span(self, span: Span, urls: dict[str, str], blobs: DecodedBlobs) -> None:
        """Stream one span's blobs into `blobs`, verified. A GET that fails (an expired URL, a dropped
        connection) is asked again from the first blob not yet handed over, with a fresh URL; a second
        failure in a row without progress gives up."""
        url = urls[span.pack_id]
        done = 0
        failed_at = -1  # `done` when the last GET failed
        while done < len(span.entries):
            start = span.entries[done].offset
            try:
                with self.transfer.open_range(url, start, span.end - start) as body:
                    position = start
                    for group in read_groups(span.entries[done:]):
                        if group[0].offset < position:
                            raise MissingBlob(f"pack {span.pack_id}: the index has overlapping blobs")
                        body.skip(group[0].offset - position)
                        position = group[-1].offset + group[-1].length
                        blobs.put_many(open_group(group, body.read_exact(position - group[0].offset)))
                        done += len(group)
            except TransferError as error:
                if failed_at == done:
                    raise
                failed_at = done
                logger.info("pack %s: %s; asking for a fresh URL", span.pack_id, error)
                self._urls.pop(span.pack_id, None)
                fresh, _ = self._urls_for({span.pack_id})
                if span.pack_id not in fresh:
                    raise MissingBlob(f"pack {span.pack_id} is no longer served") from error
                url = fresh[span.pack_id]


def read_groups(entries: Sequence[PackEntry]) -> Iterator[list[PackEntry]]:
    """Consecutive blobs (in offset order) read, decoded and handed over together: one read and one
    hand-over per `READ_GROUP_BYTES` of plaintext rather than per blob (most blobs are small files)."""
    group: list[PackEntry] = []
    plaintext = 0
    for entry in entries:
        if group and plaintext + entry.raw_length > READ_GROUP_BYTES:
            yield group
            group, plaintext = [], 0
        group.append(entry)
        plaintext += entry.raw_length
    if group:
        yield group


def open_group(group: Sequence[PackEntry], stored: bytes) -> list[tuple[str, bytes]]:
    """(hash, verified plaintext) of each blob of `group`, whose bytes, gaps included, are `stored`."""
    view = memoryview(stored)
    first = group[0].offset
    return [
        (entry.hash, open_blob(entry, view[entry.offset - first : entry.offset - first + entry.length]))
        for entry in group
    ]


class ConsumerGone(Exception):
    """The consumer of a `DecodedBlobs` stopped reading (it failed, or needed no more)."""


class DecodedBlobs:
    """Verified blobs from GET threads to one consumer, at most `limit` bytes waiting (a blob larger
    than that passes alone). Iterating yields them until every producer is done, and raises the
    first producer's error."""

    def __init__(self, limit: int, producers: int) -> None:
        self._limit = limit
        self._producers = producers
        self._ready: deque[list[tuple[str, bytes]]] = deque()
        self._ready_bytes = 0
        self._error: BaseException | None = None
        self._stopped = False
        self._changed = threading.Condition()

    def put(self, digest: str, plaintext: bytes) -> None:
        self.put_many([(digest, plaintext)])

    def put_many(self, batch: list[tuple[str, bytes]]) -> None:
        """Wait for room, then queue the blobs; ConsumerGone once the consumer has stopped."""
        size = sum(len(plaintext) for _, plaintext in batch)
        with self._changed:
            while self._ready_bytes and self._ready_bytes + size > self._limit and not self._stopped:
                self._changed.wait()
            if self._stopped:
                raise ConsumerGone
            self._ready.append(batch)
            self._ready_bytes += size
            self._changed.notify_all()

    def producer_done(self, error: BaseException | None = None) -> None:
        with self._changed:
            self._producers -= 1
            if error is not None and self._error is None:
                self._error = error
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._ready.clear()
            self._ready_bytes = 0
            self._changed.notify_all()

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while True:
            with self._changed:
                while not self._ready and self._producers and self._error is None:
                    self._changed.wait()
                if self._error is not None:
                    raise self._error
                if not self._ready:
                    return
                batch = self._ready.popleft()
                self._ready_bytes -= sum(len(plaintext) for _, plaintext in batch)
                self._changed.notify_all()
            yield from batch


def _describe_unknown(unknown: set[str]) -> str:
    sample = ", ".join(sorted(unknown)[:5])
    return f"{len(unknown)} blobs are in no pack the backend lists for this host (e.g. {sample})"


def _describe_gone(gone: dict[str, str]) -> str:
    sample = ", ".join(f"{pack_id} ({why})" for pack_id, why in sorted(gone.items())[:5])
    return f"{len(gone)} packs holding needed blobs are not served: {sample}"


def fetch_tree(fetcher: BlobFetcher, digest: str) -> Tree:
    return decode_tree(fetcher.fetch_trees([digest])[digest])


def walk_trees(
    fetcher: BlobFetcher,
    root: str,
    wanted: Callable[[tuple[str, ...]], bool] = lambda parts: True,
) -> Iterator[tuple[tuple[str, ...], TreeEntry]]:
    """Every (path parts, entry) under `root`, level by level (one fetch round per depth).

    `wanted(parts)` prunes: an entry it rejects is neither yielded nor descended into.
    """
    level: list[tuple[tuple[str, ...], str]] = [((), root)]
    while level:
        blobs = fetcher.fetch_trees({digest for _, digest in level})
        trees = {digest: decode_tree(data) for digest, data in blobs.items()}
        next_level: list[tuple[tuple[str, ...], str]] = []
        for parts, digest in level:
            for entry in trees[digest].entries:
                path = (*parts, entry.name)
                if not wanted(path):
                    continue
                yield path, entry
                if entry.type == "dir" and entry.subtree is not None:
                    next_level.append((path, entry.subtree))
        level = next_level


def stream_chunks(fetcher: BlobFetcher, index_hash: str) -> list[str]:
    """The chunk hashes of a snapshot stream, from its (verified) stream index blob."""
    return decode_stream_index(fetcher.fetch_all([index_hash])[index_hash])
