"""`list`: the host's manifests, oldest first, as a table or JSON, each with its snapshots."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .api import ApiClient

COLUMNS = ("created", "manifest_id", "files", "bytes", "snapshots", "warnings")
SNAPSHOT_FIELDS = ("name", "description", "size", "restore_through", "exit_status", "error")
PARALLEL_MANIFEST_GETS = 8
DESCRIPTION_CHARS_SHOWN = 80


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


def attach_snapshots(api: ApiClient, manifests: list[dict[str, Any]], host: str | None = None) -> None:
    """Add `snapshots` (name, description, size, ...) to each summary that reports any.

    Summaries carry only figures; the snapshots are in the manifest documents, fetched a few at a
    time, and only for manifests whose stats count snapshots.
    """
    wanted = [m for m in manifests if _snapshot_count(m)]

    def details(summary: dict[str, Any]) -> list[dict[str, Any]]:
        document = api.get_manifest(str(summary["manifest_id"]), host=host)
        return [{key: s.get(key) for key in SNAPSHOT_FIELDS} for s in document.get("snapshots") or []]

    with ThreadPoolExecutor(max_workers=PARALLEL_MANIFEST_GETS, thread_name_prefix="list") as pool:
        for summary, snapshots in zip(wanted, pool.map(details, wanted), strict=True):
            summary["snapshots"] = snapshots


def _snapshot_count(summary: dict[str, Any]) -> int:
    stats = summary.get("stats")
    count = stats.get("snapshots") if isinstance(stats, dict) else None
    return count if isinstance(count, int) else 0


def snapshot_line(snapshot: dict[str, Any]) -> str:
    """`  snapshot NAME  SIZE  ok|FAILED (...)  first line of the description`."""
    if snapshot.get("error"):
        state = f"FAILED ({snapshot['error'].splitlines()[0][:DESCRIPTION_CHARS_SHOWN]})"
    else:
        state = "ok"
    description = (snapshot.get("description") or "").strip().splitlines()
    first = description[0][:DESCRIPTION_CHARS_SHOWN] if description else ""
    size = human_bytes(snapshot.get("size") or 0)
    return f"  snapshot {snapshot.get('name')}  {size}  {state}  {first}".rstrip()


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(manifests: list[dict[str, Any]]) -> str:
    rows = [[str(value) for value in summary_row(m).values()] for m in manifests]
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(COLUMNS)]
    lines = ["  ".join(header.ljust(width) for header, width in zip(COLUMNS, widths, strict=True)).rstrip()]
    for manifest, row in zip(manifests, rows, strict=True):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        lines.extend(snapshot_line(snapshot) for snapshot in manifest.get("snapshots") or [])
    return "\n".join(lines)
