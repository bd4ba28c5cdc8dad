"""The group level of ``dlmuse-bids``: tables from participant outputs."""

from __future__ import annotations

import sys

from ..runner import RUN_ERRORS
from ..runner import run_group as run_group_tables
from ..settings import BIDSAppSettings
from .common import EXIT_OK


def _say(message: str) -> None:
    print(f"dlmuse-bids: {message}", file=sys.stderr, flush=True)


def run_group(settings: BIDSAppSettings) -> int:
    """Write ``group/`` tables for the T1w images the same selection would segment."""
    try:
        _say(run_group_tables(settings, _say))
    except RUN_ERRORS as exc:
        _say(str(exc))
        return exc.exit_code
    return EXIT_OK
