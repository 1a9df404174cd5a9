"""`verify`: is a manifest restorable? Every blob located, or (--read-data) downloaded and re-hashed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .fetch import LOCATE_BATCH, BlobFetcher, stream_chunks, walk_trees


@dataclass
class VerifyReport:
    manifest_id: str
    trees: int = 0
    blobs: int = 0
    bytes_verified: int = 0
    notes: list[str] = field(default_factory=list)


def verify_manifest(fetcher: BlobFetcher, manifest: dict[str, Any], read_data: bool) -> VerifyReport:
    """Raises MissingBlob / CorruptBlob / InvalidDocument on the first problem; returns figures if none."""
    report = VerifyReport(manifest_id=str(manifest.get("id", "")))
    content: set[str] = set()
    root = manifest.get("root")
    if root:
        report.trees = 1  # the root; walk_trees fetches (and so verifies) every tree blob
        for _, entry in walk_trees(fetcher, root):
            content.update(entry.content)
            report.trees += entry.type == "dir"
    for snapshot in manifest.get("snapshots") or []:
        index = snapshot.get("content")
        if index:
            content.add(index)
            content.update(stream_chunks(fetcher, index))
        if snapshot.get("error"):
            report.notes.append(f"snapshot {snapshot.get('name')}: {snapshot['error']}")
    report.blobs = len(content)
    ordered = sorted(content)
    for start in range(0, len(ordered), LOCATE_BATCH):
        batch = ordered[start : start + LOCATE_BATCH]
        if read_data:
            report.bytes_verified += sum(len(data) for _, data in fetcher.fetch(batch))
        else:
            fetcher.locate(batch)
    return report
