"""Reading blobs back: locate them in the local index, fetch each pack's ranges once, verify every blob.

Where a blob is comes from the host's local index (docs/PACK_INDEX.md); a blob it does not know, or
a pack the backend no longer serves, makes the fetcher rebuild the index from the backend's pack
list once. URLs come from `POST /downloads {"packs"}`. Blobs of one pack that sit close together are
fetched with one ranged GET (S3 bills per request); every blob is decompressed and re-hashed
(`open_blob`) before anyone sees a byte of it.
"""

from __future__ import annotations

import itertools
import logging
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
# Half a pack per GET: a restore's memory is what is fetched but not yet written (SPANS_AHEAD spans,
# 24 MiB), at the price of one more GET per 16 MiB pack (0.4 µUSD).
MAX_RANGE_BYTES = 8 * 1024 * 1024
PARALLEL_GETS = 3
SPANS_AHEAD = PARALLEL_GETS
# Presigned GETs live 300 s (DOWNLOAD_URL_EXPIRY_SECONDS); one is reused for this long, then asked again.
URL_REUSE_S = 240
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
        now = time.monotonic()
        recent = {p: url for p, (url, issued) in self._urls.items() if now - issued < URL_REUSE_S}
        urls = {p: recent[p] for p in pack_ids if p in recent}
        wanted = pack_ids - urls.keys()
        if not wanted:
            return urls, {}
        downloads = self.api.download_urls(wanted, host=self.host)
        for pack_id, url in downloads.urls.items():
            self._urls[pack_id] = (url, now)
        urls.update({p: url for p, url in downloads.urls.items() if p in wanted})
        for pack_id in downloads.missing:
            self._urls.pop(pack_id, None)
        return urls, dict(downloads.missing)

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
        """Like `fetch`, for blobs already located (the caller needed their sizes first)."""
        by_pack: dict[str, list[PackEntry]] = {}
        for blob in located.values():
            by_pack.setdefault(blob.pack_id, []).append(blob.entry)
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
            self._urls.pop(span.pack_id, None)
            fresh, _ = self._urls_for({span.pack_id})
            if span.pack_id not in fresh:
                raise MissingBlob(f"pack {span.pack_id} is no longer served") from error
            return self.transfer.get_range(fresh[span.pack_id], span.start, span.end - span.start)


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
