"""Reading blobs back: locate them (POST /downloads), fetch each pack's ranges once, verify every blob.

Blobs of one pack that sit close together are fetched with one ranged GET (S3 bills per request);
every blob is decompressed and re-hashed (`open_blob`) before anyone sees a byte of it.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.manifest import decode_stream_index
from sysbackup_domain.packs import PackEntry, open_blob
from sysbackup_domain.tree import Tree, TreeEntry, decode_tree

from .api import ApiClient
from .transfer import Transfer, TransferError

logger = logging.getLogger(__name__)

# Two blobs closer than this are fetched in one GET: a wasted 256 KiB costs less than a request.
MERGE_GAP_BYTES = 256 * 1024
MAX_RANGE_BYTES = 32 * 1024 * 1024
PARALLEL_GETS = 4
# Fetched or being fetched, not yet consumed: every GET stays busy while memory holds at most
# 4 x MAX_RANGE_BYTES (spans rarely exceed a 16 MiB pack: ~64 MiB).
SPANS_AHEAD = PARALLEL_GETS
# Hashes located per round: bounds memory and keeps presigned URLs fresh. A pack whose blobs fall in
# two rounds is read twice (in parts), so rounds are large: 20 POST /downloads calls, 4 at a time.
LOCATE_BATCH = 20_000
ENTRY_FIELDS = ("kind", "codec", "offset", "length", "raw_length")


class MissingBlob(RuntimeError):
    """The backend does not know where a blob is."""


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


class BlobFetcher:
    def __init__(self, api: ApiClient, transfer: Transfer, host: str | None = None) -> None:
        self.api = api
        self.transfer = transfer
        self.host = host

    def locate(self, hashes: Iterable[str]) -> tuple[dict[str, tuple[str, PackEntry]], dict[str, str]]:
        """({hash: (pack_id, entry in that pack)}, {pack_id: url}); MissingBlob if any is unknown."""
        wanted = set(hashes)
        locations, urls = self.api.locate_blobs(wanted, host=self.host)
        missing = wanted - set(locations)
        if missing:
            sample = ", ".join(sorted(missing)[:5])
            raise MissingBlob(f"{len(missing)} blobs are not stored in the backend (e.g. {sample})")
        located: dict[str, tuple[str, PackEntry]] = {}
        for digest in wanted:
            location = locations[digest]
            try:
                pack_id = location["pack_id"]
                entry = PackEntry.from_json({key: location[key] for key in ENTRY_FIELDS} | {"hash": digest})
            except (InvalidDocument, TypeError, KeyError) as error:
                raise InvalidDocument(f"POST /downloads: bad location for {digest}: {error}") from error
            if pack_id not in urls:
                raise MissingBlob(f"POST /downloads gave no URL for pack {pack_id}")
            located[digest] = (pack_id, entry)
        return located, urls

    def fetch(self, hashes: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (hash, verified plaintext) for every hash, pack by pack. Raises CorruptBlob."""
        ordered = sorted(set(hashes))
        for start in range(0, len(ordered), LOCATE_BATCH):
            located, urls = self.locate(ordered[start : start + LOCATE_BATCH])
            yield from self.fetch_located(located, urls)

    def fetch_all(self, hashes: Iterable[str]) -> dict[str, bytes]:
        return dict(self.fetch(hashes))

    def fetch_located(
        self, located: dict[str, tuple[str, PackEntry]], urls: dict[str, str]
    ) -> Iterator[tuple[str, bytes]]:
        """Like `fetch`, for blobs already located (the caller needed their sizes first)."""
        by_pack: dict[str, list[PackEntry]] = {}
        for pack_id, entry in located.values():
            by_pack.setdefault(pack_id, []).append(entry)
        spans = iter([span for pack_id, group in by_pack.items() for span in plan_spans(pack_id, group)])
        with ThreadPoolExecutor(max_workers=PARALLEL_GETS, thread_name_prefix="get") as pool:
            # A sliding window, not pool.map: map would fetch everything at once and hold it all
            # in memory while the consumer writes; this keeps SPANS_AHEAD spans at most.
            window: deque[tuple[Span, Future[bytes]]] = deque(
                (span, pool.submit(self._get_span, span, urls))
                for span in itertools.islice(spans, SPANS_AHEAD)
            )
            while window:
                span, future = window.popleft()
                data = future.result()
                following = next(spans, None)
                if following is not None:
                    window.append((following, pool.submit(self._get_span, following, urls)))
                for entry in span.entries:
                    stored = data[entry.offset - span.start : entry.offset - span.start + entry.length]
                    yield entry.hash, open_blob(entry, stored)

    def _get_span(self, span: Span, urls: dict[str, str]) -> bytes:
        try:
            return self.transfer.get_range(urls[span.pack_id], span.start, span.end - span.start)
        except TransferError as error:
            # Presigned GETs expire quickly; one fresh URL, then give up.
            logger.info("pack %s: %s; asking for a fresh URL", span.pack_id, error)
            _, fresh = self.api.locate_blobs([span.entries[0].hash], host=self.host)
            return self.transfer.get_range(fresh[span.pack_id], span.start, span.end - span.start)


def fetch_tree(fetcher: BlobFetcher, digest: str) -> Tree:
    return decode_tree(fetcher.fetch_all([digest])[digest])


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
        blobs = fetcher.fetch_all({digest for _, digest in level})
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
