"""``dlmuse-bids bids_dir output_dir participant|group``: the BIDS App.

Exit codes follow the BIDS execution spec: 0 success, 1 some images failed, 16 invalid BIDS
input, 17 unknown analysis level, 18 no T1w selected, 64 usage, 66 missing input or model,
73 output not writable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import __version__
from ..settings import (
    GRAPH_PLUGINS,
    NIPYPE_PLUGINS,
    BIDSAppSettings,
    available_cpus,
)
from .common import (
    EXIT_NO_INPUT,
    EXIT_USAGE,
    Parser,
    add_inference_options,
    inference_options,
    non_negative_int,
    positive_int,
    setup_logging,
    third_party_environment,
)
from .models_cmd import model_sources, norms_sources

logger = logging.getLogger("dlmuse_bids")

EXIT_UNKNOWN_LEVEL = 17
ANALYSIS_LEVELS = ("participant", "group")


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``dlmuse-bids``."""
    p = Parser(
        prog="dlmuse-bids",
        description="DLMUSE brain segmentation (DLICV + DLMUSE) of every T1w image of a BIDS "
        "dataset, written as a BIDS-Derivatives dataset, plus group tables of ROI volumes.",
    )
    p.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset (never written)")
    p.add_argument("output_dir", type=Path, help="root of the output derivative dataset")
    p.add_argument(
        "analysis_level",
        metavar="{participant,group}",
        help="participant: segment T1w images; group: tables from participant outputs",
    )
    sel = p.add_argument_group("selecting images")
    sel.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="subjects to process, with or without 'sub-' (default: all)",
    )
    sel.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    sel.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON of pybids entity filters for the T1w query, e.g. {"acquisition": "mprage"} '
        '(fMRIPrep\'s {"t1w": {...}} also works; null: entity absent)',
    )
    sel.add_argument(
        "--t1w-volume",
        type=non_negative_int,
        metavar="N",
        help="segment volume N (from 0) of 4-D T1w files (default: refuse a 4-D file with "
        "several volumes); recorded in the sidecars",
    )
    sel.add_argument(
        "--list-participants",
        action="store_true",
        help="print the labels of the participants with T1w images the options above select, "
        "one per line, and exit without writing anything (for SLURM job arrays)",
    )
    sel.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        action="store_true",
        help="do not run bids-validator-deno on the input",
    )
    sel.add_argument(
        "--bids-database-dir",
        type=Path,
        metavar="DIR",
        help="store the pybids index here and reuse it in later runs",
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        help="nipype working directory, kept so an interrupted run resumes "
        "(default: a temporary one, removed at the end)",
    )
    run.add_argument(
        "--nprocs",
        "--n_cpus",
        "--n-cpus",
        type=positive_int,
        help="CPUs for the whole run (default: CPU affinity, cgroup quota or "
        "SLURM_CPUS_PER_TASK, whichever is smallest)",
    )
    run.add_argument(
        "--omp-nthreads",
        type=positive_int,
        help="torch threads per network (default: --nprocs)",
    )
    run.add_argument(
        "--model-dir",
        type=Path,
        help="directory holding the DLICV and DLMUSE model folders "
        "(default: $DLMUSE_MODEL_DIR, then the per-user cache)",
    )
    run.add_argument(
        "--norms-dir",
        type=Path,
        metavar="DIR",
        help="directory holding NiChart's normative centile tables (dlmuse_centiles_CN.csv, ..., "
        "list_MUSE_all.csv) (default: $DLMUSE_NORMS_DIR, then the per-user cache)",
    )
    run.add_argument(
        "--offline",
        action="store_true",
        help="never download the model weights or the normative tables (also: DLMUSE_OFFLINE=1 "
        "or HF_HUB_OFFLINE=1; always so inside the container images, which have them built in)",
    )
    add_inference_options(run, device_default="auto")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute images whose outputs exist with the same provenance (default: skip)",
    )
    run.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop at the first failing image (default: go on with the others)",
    )
    run.add_argument(
        "--nipype-plugin",
        choices=NIPYPE_PLUGINS,
        default="MultiProc",
        help="nipype execution plugin (default: MultiProc)",
    )
    run.add_argument(
        "--nipype-plugin-args",
        metavar="JSON",
        help='plugin arguments as JSON, e.g. \'{"sbatch_args": "--mem=8G"}\' for SLURM',
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more messages (repeatable)")
    p.add_argument("--version", action="version", version=f"dlmuse-bids {__version__}")
    return p


class UsageError(ValueError):
    """Arguments that parse but cannot be used together."""


def _check_places(args: argparse.Namespace) -> None:
    """Refuse an output inside the input, and a graph plugin without a lasting work dir."""
    bids_dir, output_dir = args.bids_dir.absolute(), args.output_dir.absolute()
    if (
        output_dir == bids_dir
        or bids_dir in output_dir.parents
        and (output_dir.relative_to(bids_dir).parts[0] != "derivatives")
    ):
        raise UsageError(
            f"{output_dir}: the output must not be the input dataset or inside it "
            "(except under its derivatives/ folder)"
        )
    if args.nipype_plugin in GRAPH_PLUGINS and args.work_dir is None:
        raise UsageError(
            f"--nipype-plugin {args.nipype_plugin} submits jobs that outlive this command: "
            "give them a --work-dir"
        )


def _plugin_args(text: str | None) -> dict:
    """``--nipype-plugin-args``: a JSON object."""
    if not text:
        return {}
    try:
        plugin_args = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--nipype-plugin-args is not valid JSON ({exc})") from exc
    if not isinstance(plugin_args, dict):
        raise UsageError("--nipype-plugin-args must be a JSON object")
    return plugin_args


def make_settings(args: argparse.Namespace, env: Mapping[str, str]) -> BIDSAppSettings:
    """Validate the parsed arguments once and freeze them."""
    from ..bids import load_bids_filters, strip_prefix
    from ..settings import container_info

    _check_places(args)
    nprocs = args.nprocs or available_cpus(env)
    threads = min(args.omp_nthreads or nprocs, nprocs)
    template, template_note = None, "only the participant level aligns to a template"
    if args.analysis_level == "participant":
        from ..template import find_template

        template, template_note = find_template(templateflow_home(env))
    return BIDSAppSettings(
        bids_dir=args.bids_dir.absolute(),
        output_dir=args.output_dir.absolute(),
        analysis_level=args.analysis_level,
        participant_labels=tuple(strip_prefix(x, "sub-") for x in args.participant_label),
        session_labels=tuple(strip_prefix(x, "ses-") for x in args.session_label),
        bids_filters=load_bids_filters(args.bids_filter_file) if args.bids_filter_file else {},
        work_dir=args.work_dir.absolute() if args.work_dir else None,
        nprocs=nprocs,
        inference=inference_options(args, threads),
        models=model_sources(args.model_dir, args.offline, env),
        norms=norms_sources(args.norms_dir, args.offline, env),
        skip_validation=args.skip_bids_validation,
        database_dir=args.bids_database_dir.absolute() if args.bids_database_dir else None,
        overwrite=args.overwrite,
        stop_on_first_crash=args.stop_on_first_crash,
        plugin=args.nipype_plugin,
        plugin_args=_plugin_args(args.nipype_plugin_args),
        verbosity=args.verbose,
        container=container_info(env),
        template=template,
        template_note=template_note,
        t1w_volume=args.t1w_volume,
    )


def templateflow_home(env: Mapping[str, str]) -> Path | None:
    """Where TemplateFlow keeps templates: ``TEMPLATEFLOW_HOME``, else its default cache."""
    if env.get("TEMPLATEFLOW_HOME"):
        return Path(env["TEMPLATEFLOW_HOME"])
    if env.get("HOME"):
        return Path(env["HOME"]) / ".cache" / "templateflow"
    return None


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``dlmuse-bids``; returns the exit code."""
    with third_party_environment():
        return _main(argv, os.environ if env is None else env)


def _main(argv: Sequence[str] | None, env: Mapping[str, str]) -> int:
    args = build_parser().parse_args(argv)
    if args.analysis_level not in ANALYSIS_LEVELS:
        print(
            f"dlmuse-bids: unknown analysis level {args.analysis_level!r} "
            f"(use one of: {', '.join(ANALYSIS_LEVELS)})",
            file=sys.stderr,
        )
        return EXIT_UNKNOWN_LEVEL
    setup_logging(args.verbose)
    from ..bids import FilterError

    try:
        settings = make_settings(args, env)
    except (UsageError, FilterError) as exc:
        print(f"dlmuse-bids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not settings.bids_dir.is_dir():
        print(f"dlmuse-bids: {settings.bids_dir}: input dataset not found", file=sys.stderr)
        return EXIT_NO_INPUT
    if args.list_participants:
        from .participant import list_participants

        return list_participants(settings)
    if settings.analysis_level == "group":
        from .group_level import run_group

        return run_group(settings)
    from .participant import run_participant

    return run_participant(settings, env)
