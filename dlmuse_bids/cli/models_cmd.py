"""``dlmuse models fetch|verify|path``, and fetching on first use when that is allowed."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from ..settings import ModelSources
from .common import EXIT_CANT_CREATE, EXIT_DATA, EXIT_OK


def offline_reason(flag: bool, env: Mapping[str, str]) -> str | None:
    """Why downloading is not allowed here, or None when it is."""
    from ..settings import container_info

    if flag:
        return "--offline"
    for var in ("DLMUSE_OFFLINE", "HF_HUB_OFFLINE"):
        if env.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={env[var]}"
    if container_info(env) is not None:
        return "running in the container image"
    return None


def fetch_destination(env: Mapping[str, str]) -> Path:
    """Where first-use fetches go: ``$DLMUSE_MODEL_DIR``, else the per-user cache."""
    from ..models import model_search_dirs

    return model_search_dirs(None, env)[0]


class ProgressPrinter:
    """Download progress: a line redrawn in place on a terminal, a line per file otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.current: str | None = None
        self.last = 0.0

    def __call__(self, label: str, done: int, total: int | None) -> None:
        finished = total is not None and done >= total
        if self.stream.isatty():
            now = time.monotonic()
            if not finished and now - self.last < 0.2:
                return
            self.last = now
            pct = f"{100 * done / total:5.1f}% " if total else ""
            mb = f"{done / 2**20:.1f}" + (f"/{total / 2**20:.1f}" if total else "")
            self.stream.write(f"\r\033[K  {label}: {pct}{mb} MiB")
            if finished:
                self.stream.write("\n")
        elif label != self.current:
            self.current = label
            print(f"  downloading {label} ...", file=self.stream)
        self.stream.flush()


def fetch(
    dest: Path, env: Mapping[str, str], stream: TextIO | None = None, revision: str | None = None
) -> list[Path]:
    """``dlmuse models fetch``: both official models into ``dest`` (from $HF_ENDPOINT)."""
    from ..fetch import HF_REVISION, fetch_official

    out = stream or sys.stderr
    return fetch_official(
        dest,
        env.get("HF_ENDPOINT"),
        revision or HF_REVISION,
        progress=ProgressPrinter(out),
        say=lambda line: print(f"dlmuse: {line}", file=out, flush=True),
    )


def add_models_parser(sub) -> None:
    """The ``models`` subcommand of ``dlmuse``."""
    models = sub.add_parser(
        "models",
        help="get, check and locate the DLICV/DLMUSE weights",
        description="Get, check and locate the official DLICV and DLMUSE model weights "
        "(CBICA non-commercial licence).",
    )
    actions = models.add_subparsers(dest="models_command", required=True)
    fetch_p = actions.add_parser(
        "fetch",
        help="download both models from HuggingFace (resumable, checksummed)",
        description="Download nichart/DLICV and nichart/DLMUSE (or from $HF_ENDPOINT), "
        "verify each file's size and sha256, and install them atomically.",
    )
    fetch_p.add_argument(
        "--dest",
        type=Path,
        help="models directory (default: $DLMUSE_MODEL_DIR, else the per-user cache)",
    )
    fetch_p.add_argument("--revision", help="repository revision (default: main)")
    verify_p = actions.add_parser("verify", help="re-check an installed models directory")
    verify_p.add_argument(
        "dest", nargs="?", type=Path, help="models directory (default: as for fetch)"
    )
    actions.add_parser("path", help="print where models are looked up, in order")


def run_models(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run ``dlmuse models ...``; returns the exit code."""
    from ..fetch import FetchError, verify_models
    from ..models import ModelNotFoundError, find_model, model_search_dirs

    env = os.environ if env is None else env
    if args.models_command == "path":
        dirs = model_search_dirs(None, env)
        for base in dirs:
            print(base)
        for key in ("DLICV", "DLMUSE"):
            try:
                print(f"{key}: {find_model(key, dirs)}", file=sys.stderr)
            except ModelNotFoundError:
                print(f"{key}: not installed", file=sys.stderr)
        return EXIT_OK
    dest = args.dest or fetch_destination(env)
    if args.models_command == "verify":
        found = verify_models(dest)
        for problem in found:
            print(f"dlmuse: {problem}", file=sys.stderr)
        if not found:
            print(f"dlmuse: {dest}: both models present and verified", file=sys.stderr)
        return EXIT_DATA if found else EXIT_OK
    # An explicit fetch always runs; --offline and friends govern fetching on first use only.
    try:
        fetched = fetch(dest, env, revision=args.revision)
    except FetchError as exc:
        print(f"dlmuse: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"dlmuse: {dest}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_CANT_CREATE
    print(f"dlmuse: {dest}: models ready ({len(fetched)} file(s) downloaded)", file=sys.stderr)
    return EXIT_OK


def _mount_hint(env: Mapping[str, str]) -> str:
    """In the container image: how to give it weights it was built without."""
    from ..settings import container_info

    if container_info(env) is None or not env.get("DLMUSE_MODEL_DIR"):
        return ""
    where = env["DLMUSE_MODEL_DIR"]
    return (
        f" This image has no weights at {where}: mount a folder holding both model folders "
        f"there (docker run -v /path/to/models:{where}:ro ..., "
        f"singularity run -B /path/to/models:{where} ...)."
    )


def model_sources(model_dir: Path | None, offline: bool, env: Mapping[str, str]) -> ModelSources:
    """Where the models are looked up and whether a missing one may be fetched, decided once.

    ``--model-dir`` is searched first and never fetched into; otherwise a missing model is
    fetched into :func:`fetch_destination` unless :func:`offline_reason` forbids it.
    """
    from ..models import model_search_dirs

    return ModelSources(
        search_dirs=tuple(model_search_dirs(model_dir, env)),
        fetch_dir=None if model_dir is not None else fetch_destination(env),
        offline=offline_reason(offline, env),
        endpoint=env.get("HF_ENDPOINT") or None,
        hint=_mount_hint(env),
    )
