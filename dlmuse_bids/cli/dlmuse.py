"""The ``dlmuse`` command: DLMUSE on plain NIfTI files.

* ``dlmuse predict --model DIR IN OUT``: one nnU-Net model on one image (nnU-Net semantics);
* ``dlmuse run T1w.nii.gz ... -o OUTDIR``: the whole DLMUSE pipeline, NiChart-compatible outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import __version__
from ..runner import RUN_ERRORS, Stopped, predict_image, run_nifti
from ..settings import NiftiRunSettings, available_cpus
from .common import (
    EXIT_DATA,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    add_inference_options,
    exit_code,
    inference_options,
    positive_int,
    said_stopped,
    setup_logging,
    stop_on_signals,
    third_party_environment,
)
from .models_cmd import (
    ProgressPrinter,
    add_models_parser,
    add_norms_parser,
    model_sources,
    norms_sources,
    run_models,
    run_norms,
)

logger = logging.getLogger("dlmuse_bids")


def _fold(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _age(text: str) -> float:
    from ..demographics import parse_age

    try:
        age = parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if age is None:
        raise argparse.ArgumentTypeError(f"age {text!r} is not a number of years")
    return age


def _sex(text: str) -> str | None:
    from ..demographics import parse_sex

    try:
        return parse_sex(text, {})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (use M or F)") from exc


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: the CPUs this process may use)",
    )
    add_inference_options(p, device_default="cpu")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more messages (repeat for debug output)",
    )


def build_dlmuse_parser() -> argparse.ArgumentParser:
    """Parser of the ``dlmuse`` command."""
    parser = Parser(prog="dlmuse", description="DLMUSE brain segmentation on NIfTI files.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    pred = sub.add_parser(
        "predict",
        help="run one nnU-Net v2 model on one image",
        description="Run one nnU-Net v2 trained-model folder on one image with "
        "nnU-Net's semantics (no reorientation); labels are the model's classes.",
    )
    pred.add_argument("input", type=Path, help="input NIfTI image")
    pred.add_argument("output", type=Path, help="output label map (.nii.gz)")
    pred.add_argument(
        "--model",
        type=Path,
        required=True,
        help="trained-model folder (holding plans.json, dataset.json, fold_K/)",
    )
    pred.add_argument(
        "--folds",
        nargs="+",
        type=_fold,
        default=None,
        help="folds to average (default: every fold present)",
    )
    _add_run_options(pred)

    run = sub.add_parser(
        "run",
        help="the whole DLMUSE pipeline on T1w images",
        description="DLICV + DLMUSE on T1w NIfTI files. Writes <name>_DLICV.nii.gz, "
        "<name>_DLMUSE.nii.gz and <name>_DLMUSE_Volumes.csv per input and "
        "DLMUSE_Volumes.csv for all, in NiChart_DLMUSE's layout.",
    )
    run.add_argument("inputs", nargs="+", type=Path, help="T1w images (.nii or .nii.gz)")
    run.add_argument("-o", "--output-dir", type=Path, required=True, help="output directory")
    run.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="directory holding the DLICV and DLMUSE model folders "
        "(default: $DLMUSE_MODEL_DIR, then the per-user cache)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute images whose outputs already exist (default: keep them)",
    )
    run.add_argument(
        "--offline",
        action="store_true",
        help="never download missing models or normative tables (also: DLMUSE_OFFLINE=1 or "
        "HF_HUB_OFFLINE=1)",
    )
    norms = run.add_argument_group(
        "normative centiles",
        "Each image's ROI volumes against NiChart's centiles of cognitively normal people of "
        "the same age and sex (<name>_DLMUSE_centiles.tsv); skipped without an age.",
    )
    norms.add_argument(
        "--norms-dir",
        type=Path,
        metavar="DIR",
        help="directory holding NiChart's tables (default: $DLMUSE_NORMS_DIR, then the per-user "
        "cache, fetched there on first use)",
    )
    norms.add_argument("--age", type=_age, help="age in years at the scan (one input only)")
    norms.add_argument("--sex", type=_sex, help="M or F (one input only; default: unknown)")
    norms.add_argument(
        "--demographics",
        type=Path,
        metavar="CSV",
        help="NiChart's demographics CSV: MRID (the file name without _T1w and extension), "
        "Age, Sex",
    )
    _add_run_options(run)
    add_models_parser(sub)
    add_norms_parser(sub)
    return parser


def _say(message: str) -> None:
    print(f"dlmuse: {message}", file=sys.stderr, flush=True)


def _cmd_predict(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ..io import InputImageError

    # one model of any kind: evaluated as DLMUSE is in the chosen mode (exact unless --fast)
    options = inference_options(args, args.threads or available_cpus(env)).dlmuse
    try:
        predict_image(args.model, args.folds, args.input, args.output, options)
    except InputImageError as exc:
        _say(str(exc))
        return EXIT_DATA if args.input.exists() else EXIT_NO_INPUT
    except RUN_ERRORS as exc:
        _say(str(exc))
        return exc.exit_code
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    one_scan = args.age is not None or args.sex is not None
    if one_scan and (len(args.inputs) > 1 or args.demographics):
        _say("--age and --sex describe one scan: give one input, or a --demographics CSV")
        return EXIT_USAGE
    settings = NiftiRunSettings(
        inputs=tuple(args.inputs),
        output_dir=args.output_dir,
        models=model_sources(args.model_dir, args.offline, env),
        inference=inference_options(args, args.threads or available_cpus(env)),
        overwrite=args.overwrite,
        norms=norms_sources(args.norms_dir, args.offline, env),
        demographics=args.demographics,
        age=args.age,
        sex=args.sex,
    )
    try:
        with stop_on_signals():
            report = run_nifti(settings, _say, ProgressPrinter())
    except RUN_ERRORS as exc:
        _say(str(exc))
        return exc.exit_code
    except Stopped as stop:
        return said_stopped(stop, _say)
    for line in report.summary():
        _say(line)
    return exit_code(report)


def dlmuse_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlmuse``; returns the exit code."""
    parser = build_dlmuse_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    with third_party_environment():
        if args.command == "predict":
            return _cmd_predict(args, os.environ)
        if args.command == "models":
            return run_models(args)
        if args.command == "norms":
            return run_norms(args)
        return _cmd_run(args, os.environ)
