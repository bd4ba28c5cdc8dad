"""The ``dlmuse`` command: DLMUSE on plain NIfTI files.

* ``dlmuse predict --model DIR IN OUT``: one nnU-Net model on one image (nnU-Net semantics);
* ``dlmuse run T1w.nii.gz ... -o OUTDIR``: the whole DLMUSE pipeline, NiChart-compatible outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..settings import available_cpus
from .common import (
    EXIT_CANT_CREATE,
    EXIT_DATA,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_SOME_FAILED,
    Parser,
    add_speed_options,
    positive_int,
    setup_logging,
    speed_settings,
    third_party_environment,
    unwritable,
)
from .models_cmd import add_models_parser, ensure_models, run_models

logger = logging.getLogger("dlmuse_bids")


def _fold(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _step(value: str) -> float:
    step = float(value)
    if not 0 < step <= 1:
        raise argparse.ArgumentTypeError(f"step size must be in (0, 1], got {value}")
    return step


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the networks run (default: cpu)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: the CPUs this process may use)",
    )
    p.add_argument(
        "--no-tta",
        action="store_true",
        help="disable mirroring test-time augmentation (about 8x faster, less exact)",
    )
    add_speed_options(p)
    p.add_argument(
        "--step-size",
        type=_step,
        default=0.5,
        help="sliding-window step as a fraction of the tile (default: 0.5)",
    )
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
    _add_inference_options(pred)

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
        help="never download missing models (also: DLMUSE_OFFLINE=1 or HF_HUB_OFFLINE=1)",
    )
    _add_inference_options(run)
    add_models_parser(sub)
    return parser


def _options(args: argparse.Namespace):
    from ..nnunet.predictor import InferenceOptions

    precision, channels_last, tta = speed_settings(args, args.device)
    return InferenceOptions(
        device=args.device,
        threads=args.threads or available_cpus(os.environ),
        tile_step_size=args.step_size,
        use_mirroring=tta,
        precision=precision,
        channels_last=channels_last,
    )


def _predictor(folder: Path, folds, options):
    from ..models import load_trained_model

    model = load_trained_model(folder, folds)
    logger.info("loaded %s (folds %s, sha256 %s)", folder, model.folds, model.sha256)
    return model.predictor(options)


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..io import InputImageError, load_t1w, make_label_image, save_nifti_atomic
    from ..models import ModelError

    try:
        predictor = _predictor(args.model, args.folds, _options(args))
    except ModelError as exc:
        print(f"dlmuse: {exc}", file=sys.stderr)
        return EXIT_NO_INPUT
    try:
        img = load_t1w(args.input)
    except InputImageError as exc:
        print(f"dlmuse: {exc}", file=sys.stderr)
        return EXIT_DATA if args.input.exists() else EXIT_NO_INPUT
    labels = predictor.predict(img.get_fdata(dtype="float32"), img.header.get_zooms()[:3])
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        save_nifti_atomic(make_label_image(labels, img), args.output)
    except OSError as exc:
        print(f"dlmuse: {args.output}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_CANT_CREATE
    return EXIT_OK


_EXT = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


def image_name(path: Path) -> str:
    """File name without ``.nii``/``.nii.gz`` (the prefix of every output of this image)."""
    return _EXT.sub("", path.name)


def subject_id(path: Path) -> str:
    """NiChart's MRID of an input (:func:`dlmuse_bids.labels.nichart_mrid`)."""
    from ..labels import nichart_mrid

    return nichart_mrid(path)


@dataclass
class _Outcome:
    path: Path
    mrid: str
    ok: bool
    message: str = ""


def _run_outputs(out_dir: Path, path: Path) -> tuple[Path, Path, Path]:
    """The ICV mask, label map and volumes CSV that ``dlmuse run`` writes for ``path``."""
    name = image_name(path)
    return (
        out_dir / f"{name}_DLICV.nii.gz",
        out_dir / f"{name}_DLMUSE.nii.gz",
        out_dir / f"{name}_DLMUSE_Volumes.csv",
    )


def _write_run_outputs(result, row: dict, outputs: tuple[Path, Path, Path]) -> None:
    from ..io import save_nifti_atomic
    from ..labels import write_nichart_csv

    icv_path, seg_path, csv_path = outputs
    save_nifti_atomic(result.icv_mask, icv_path)
    save_nifti_atomic(result.labels, seg_path)
    write_nichart_csv([row], csv_path)


def _first_failed_write(writes: list[tuple[Path, Future]], out_dir: Path) -> str | None:
    """The error line of the first finished write that failed (OSError), if any.

    Finished writes are removed from ``writes``, so each is looked at once.
    """
    for path, future in [w for w in writes if w[1].done()]:
        writes.remove((path, future))
        exc = future.exception()
        if isinstance(exc, OSError):
            return f"dlmuse: {out_dir}: cannot write outputs of {path} ({exc.strerror or exc})"
        if exc is not None:
            raise exc
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    from ..io import InputImageError, load_t1w
    from ..labels import nichart_volumes_row, write_nichart_csv
    from ..models import ModelError, find_model
    from ..pipeline import DLMUSEPipeline

    out_dir: Path = args.output_dir
    problem = unwritable(out_dir)
    if problem:
        print(f"dlmuse: {out_dir}: {problem}", file=sys.stderr)
        return EXIT_CANT_CREATE

    names: dict[str, Path] = {}
    todo: list[Path] = []
    outcomes: list[_Outcome] = []
    for path in args.inputs:
        name = image_name(path)
        if name in names:
            msg = f"{path}: same output name {name!r} as {names[name]}; rename one of them"
            outcomes.append(_Outcome(path, subject_id(path), False, msg))
            print(f"dlmuse: {msg}", file=sys.stderr)
            continue
        names[name] = path
        todo.append(path)

    options = _options(args)
    try:
        dirs = ensure_models(args.model_dir, args.offline, os.environ)
        pipeline = DLMUSEPipeline(
            _predictor(find_model("DLICV", dirs), None, options),
            _predictor(find_model("DLMUSE", dirs), None, options),
        )
    except ModelError as exc:
        print(f"dlmuse: {exc}", file=sys.stderr)
        return EXIT_NO_INPUT

    # Images are read one ahead and written one behind on threads (decompression and gzip
    # release the GIL), so with the models resident the network is rarely idle.
    rows: dict[Path, dict] = {}
    compute: list[Path] = []
    for path in todo:
        paths = _run_outputs(out_dir, path)
        if not args.overwrite and all(p.exists() for p in paths):
            import pandas as pd

            logger.warning("%s: outputs exist, kept (use --overwrite to recompute)", path)
            rows[path] = pd.read_csv(paths[2], dtype={"MRID": str}).iloc[0].to_dict()
            outcomes.append(_Outcome(path, subject_id(path), True, "kept existing outputs"))
        else:
            compute.append(path)

    with (
        ThreadPoolExecutor(1, thread_name_prefix="dlmuse-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="dlmuse-write") as writer,
    ):
        image = reader.submit(load_t1w, compute[0]) if compute else None
        writes: list[tuple[Path, Future]] = []
        for i, path in enumerate(compute):
            # only the current and the next image are held, however many there are
            current = image
            if i + 1 < len(compute):
                image = reader.submit(load_t1w, compute[i + 1])
            mrid = subject_id(path)
            start = time.perf_counter()
            try:
                result = pipeline.run(current.result())
            except InputImageError as exc:
                outcomes.append(_Outcome(path, mrid, False, str(exc)))
                print(f"dlmuse: {exc}", file=sys.stderr)
                continue
            except Exception as exc:  # one image's failure must not stop the others
                logger.debug("%s: traceback", path, exc_info=True)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                msg = f"{path}: segmentation failed ({type(exc).__name__}: {first})"
                outcomes.append(_Outcome(path, mrid, False, msg))
                print(f"dlmuse: {msg}", file=sys.stderr)
                continue
            logger.info("%s: segmented in %.1f s", path, time.perf_counter() - start)
            row = nichart_volumes_row(mrid, result.volumes)
            failed_write = _first_failed_write(writes, out_dir)
            if failed_write:
                print(failed_write, file=sys.stderr)
                return EXIT_CANT_CREATE
            outputs = _run_outputs(out_dir, path)
            writes.append((path, writer.submit(_write_run_outputs, result, row, outputs)))
            rows[path] = row
            outcomes.append(_Outcome(path, mrid, True))
        wait([future for _, future in writes])
        failed_write = _first_failed_write(writes, out_dir)
        if failed_write:
            print(failed_write, file=sys.stderr)
            return EXIT_CANT_CREATE

    if rows:
        try:
            write_nichart_csv([rows[p] for p in todo if p in rows], out_dir / "DLMUSE_Volumes.csv")
        except OSError as exc:
            print(
                f"dlmuse: {out_dir}: cannot write DLMUSE_Volumes.csv ({exc.strerror or exc})",
                file=sys.stderr,
            )
            return EXIT_CANT_CREATE
    failed = [o for o in outcomes if not o.ok]
    print(
        f"dlmuse: {len(outcomes) - len(failed)} of {len(outcomes)} images segmented"
        + (f"; failed: {', '.join(str(o.path) for o in failed)}" if failed else ""),
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if failed else EXIT_OK


def dlmuse_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlmuse``; returns the exit code."""
    parser = build_dlmuse_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    with third_party_environment():
        if args.command == "predict":
            return _cmd_predict(args)
        if args.command == "models":
            return run_models(args)
        return _cmd_run(args)
