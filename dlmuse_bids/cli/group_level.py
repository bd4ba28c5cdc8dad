"""The group level of ``dlmuse-bids``: tables from participant outputs."""

from __future__ import annotations

import sys

from ..bids import BIDSError
from ..settings import BIDSAppSettings
from .common import EXIT_CANT_CREATE, EXIT_OK, selected_t1w


def run_group(settings: BIDSAppSettings) -> int:
    """Write ``group/`` tables for the T1w images the same selection would segment."""
    from ..group import GROUP_DIR, write_group_tables

    try:
        t1w_files = selected_t1w(settings)
    except BIDSError as exc:
        print(f"dlmuse-bids: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        frame = write_group_tables(t1w_files, settings.bids_dir, settings.output_dir)
    except OSError as exc:
        where = settings.output_dir / GROUP_DIR
        print(f"dlmuse-bids: {where}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_CANT_CREATE
    from ..reports.group import write_group_report

    try:
        report = write_group_report(settings.output_dir)
    except Exception as exc:  # noqa: BLE001 - the tables are written; say so and go on
        print(
            f"dlmuse-bids: group report not written ({type(exc).__name__}: {exc})", file=sys.stderr
        )
    else:
        print(f"dlmuse-bids: group report: {report}", file=sys.stderr)
    counts = frame["status"].value_counts().to_dict()
    print(
        f"dlmuse-bids: group tables of {len(frame)} T1w image(s) in "
        f"{settings.output_dir / GROUP_DIR}: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())),
        file=sys.stderr,
    )
    return EXIT_OK
