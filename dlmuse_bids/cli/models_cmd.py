"""``dlmuse models fetch|verify|path``, and fetching on first use when that is allowed."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from ..settings import ModelSources, NormsSources
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


def _verify(found: list[str], ok: str) -> int:
    """Say what ``verify`` found wrong (or ``ok``); the exit code."""
    for problem in found:
        print(f"dlmuse: {problem}", file=sys.stderr)
    if not found:
        print(f"dlmuse: {ok}", file=sys.stderr)
    return EXIT_DATA if found else EXIT_OK


def _fetch(dest: Path, get, ready: str) -> int:
    """Run an explicit fetch (``get()`` -> files downloaded), saying how it went; the exit code.

    An explicit fetch always runs: --offline and friends govern fetching on first use only.
    """
    from ..fetch import FetchError

    try:
        fetched = get()
    except FetchError as exc:
        print(f"dlmuse: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"dlmuse: {dest}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_CANT_CREATE
    print(f"dlmuse: {dest}: {ready} ({len(fetched)} file(s) downloaded)", file=sys.stderr)
    return EXIT_OK


def _add_actions(
    parser: argparse.ArgumentParser, dest: str, what: str, env_var: str, **fetch_texts: str
) -> argparse.ArgumentParser:
    """The ``fetch``, ``verify`` and ``path`` actions of ``dlmuse models|norms``; returns the
    parser of ``fetch`` (``fetch_texts``: its help and description)."""
    actions = parser.add_subparsers(dest=dest, required=True)
    fetch_p = actions.add_parser("fetch", **fetch_texts)
    default = f"${env_var}, else the per-user cache"
    fetch_p.add_argument("--dest", type=Path, help=f"{what} directory (default: {default})")
    verify_p = actions.add_parser("verify", help=f"re-check an installed {what} directory")
    verify_p.add_argument(
        "dest", nargs="?", type=Path, help=f"{what} directory (default: as for fetch)"
    )
    actions.add_parser("path", help=f"print where the {what} are looked up, in order")
    return fetch_p


def add_models_parser(sub) -> None:
    """The ``models`` subcommand of ``dlmuse``."""
    models = sub.add_parser(
        "models",
        help="get, check and locate the DLICV/DLMUSE weights",
        description="Get, check and locate the official DLICV and DLMUSE model weights "
        "(CBICA non-commercial licence).",
    )
    fetch_p = _add_actions(
        models,
        "models_command",
        "models",
        "DLMUSE_MODEL_DIR",
        help="download both models from HuggingFace (resumable, checksummed)",
        description="Download nichart/DLICV and nichart/DLMUSE (or from $HF_ENDPOINT), "
        "verify each file's size and sha256, and install them atomically.",
    )
    fetch_p.add_argument("--revision", help="repository revision (default: main)")


def run_models(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run ``dlmuse models ...``; returns the exit code."""
    from ..fetch import verify_models
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
        return _verify(verify_models(dest), f"{dest}: both models present and verified")
    return _fetch(dest, lambda: fetch(dest, env, revision=args.revision), "models ready")


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


def norms_sources(norms_dir: Path | None, offline: bool, env: Mapping[str, str]) -> NormsSources:
    """Where NiChart's normative tables are looked up and whether they may be fetched.

    ``--norms-dir`` is searched first and never fetched into; otherwise missing tables are
    fetched into the first other place (``$DLMUSE_NORMS_DIR``, else the per-user cache) unless
    :func:`offline_reason` forbids it. ``$DLMUSE_NORMS_ENDPOINT`` replaces GitHub's raw files.
    """
    from ..norms import norms_search_dirs

    dirs = norms_search_dirs(norms_dir, env)
    return NormsSources(
        search_dirs=tuple(dirs),
        fetch_dir=None if norms_dir is not None else dirs[0],
        offline=offline_reason(offline, env),
        endpoint=env.get("DLMUSE_NORMS_ENDPOINT") or None,
    )


def add_norms_parser(sub) -> None:
    """The ``norms`` subcommand of ``dlmuse``."""
    norms = sub.add_parser(
        "norms",
        help="get, check and locate NiChart's normative centile tables",
        description="Get, check and locate NiChart's normative centile tables of DLMUSE "
        "volumes (CBICA/SBIA non-commercial licence), pinned to one commit of NiChart_Project.",
    )
    _add_actions(
        norms,
        "norms_command",
        "tables",
        "DLMUSE_NORMS_DIR",
        help="download the tables (resumable, checksummed)",
        description="Download NiChart's tables (or from $DLMUSE_NORMS_ENDPOINT), verify each "
        "file's size and sha256, and install them atomically.",
    )


def run_norms(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run ``dlmuse norms ...``; returns the exit code."""
    from ..fetch import fetch_norms, norms_files, verify_models
    from ..norms import find_norms, norms_search_dirs

    env = os.environ if env is None else env
    dirs = norms_search_dirs(None, env)
    if args.norms_command == "path":
        for base in dirs:
            print(base)
        found = find_norms(dirs)
        print(f"tables: {found or 'not installed'}", file=sys.stderr)
        return EXIT_OK
    dest = args.dest or dirs[0]
    if args.norms_command == "verify":
        ok = f"{dest}: the normative tables are present and verified"
        return _verify(verify_models(dest, norms_files()), ok)
    out = sys.stderr
    endpoint = env.get("DLMUSE_NORMS_ENDPOINT") or None
    say = lambda line: print(f"dlmuse: {line}", file=out, flush=True)  # noqa: E731
    return _fetch(
        dest,
        lambda: fetch_norms(dest, endpoint, progress=ProgressPrinter(out), say=say),
        "tables ready",
    )
