"""`list`: the host's manifests, oldest first, as a table or JSON."""

from __future__ import annotations

from typing import Any

from .api import ApiClient

COLUMNS = ("created", "manifest_id", "files", "bytes", "snapshots", "warnings")


def fetch_manifests(api: ApiClient, host: str | None = None) -> list[dict[str, Any]]:
    """Manifest summaries sorted by id (ids sort by server time)."""
    return sorted(api.list_manifests(host=host), key=lambda m: str(m.get("manifest_id", "")))


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
