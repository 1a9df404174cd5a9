"""`list`: the host's manifests, oldest first, as a table or JSON."""

from __future__ import annotations

from typing import Any

from .api import ApiClient

COLUMNS = ("created", "manifest_id", "files", "bytes", "snapshots", "warnings")


def fetch_manifests(api: ApiClient, host: str | None = None) -> list[dict[str, Any]]:
    """Manifest summaries, oldest first."""
    return in_history_order(api.list_manifests(host=host))


def in_history_order(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Oldest first, following parent links.

    Ids sort by server time only to the second (two commits in one second sort by their random
    suffix), but each commit names its parent, so the chain gives the true order. Manifests off the
    chain (their parent was collected) keep id order before it.
    """
    by_id = {str(m.get("manifest_id")): m for m in manifests}
    parents = {str(m.get("parent")) for m in manifests if m.get("parent")}
    tips = sorted(manifest_id for manifest_id in by_id if manifest_id not in parents)
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current = tips[-1] if tips else None
    while current in by_id and current not in seen:  # `seen` guards against a (corrupt) cycle
        seen.add(current)
        chain.append(by_id[current])
        current = str(by_id[current].get("parent"))
    chain.reverse()
    rest = sorted((m for i, m in by_id.items() if i not in seen), key=lambda m: str(m.get("manifest_id")))
    return rest + chain


def newest(manifests: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The host's head: the end of the parent chain."""
    ordered = in_history_order(manifests)
    return ordered[-1] if ordered else None


def summary_row(manifest: dict[str, Any]) -> dict[str, Any]:
    stats = manifest.get("stats") if isinstance(manifest.get("stats"), dict) else {}
    return {
        "created": manifest.get("created", ""),
        "manifest_id": manifest.get("manifest_id", ""),
        "files": stats.get("files", ""),
        "bytes": stats.get("bytes", ""),
        "snapshots": stats.get("snapshots", ""),
        "warnings": stats.get("warnings", ""),
    }


def format_table(manifests: list[dict[str, Any]]) -> str:
    rows = [[str(value) for value in summary_row(m).values()] for m in manifests]
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(COLUMNS)]
    lines = ["  ".join(header.ljust(width) for header, width in zip(COLUMNS, widths, strict=True)).rstrip()]
    lines.extend(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
    return "\n".join(lines)
