"""``dlmuse run`` and ``dlmuse predict``: T1w files segmented in this process."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from ..bids import Provenance
from ..demographics import Subject
from ..io import InputImageError, load_t1w, nifti_stem
from ..locks import ImageLocks
from ..models import ModelError
from ..settings import NETWORKS, InferenceOptions, NiftiRunSettings
from .core import (
    Outcome,
    OutputError,
    RunReport,
    Say,
    Stopped,
    claim_images,
    model_folders,
    plan_images,
    provenance,
    require_writable,
)

logger = logging.getLogger(__name__)

#: Where a ``dlmuse run`` keeps the provenance of each image's outputs, beside its label map.
NIFTI_SIDECAR = "_DLMUSE.json"


def nifti_outputs(output_dir: Path, source: Path) -> dict[str, Path]:
    """What ``dlmuse run`` writes for ``source``: NiChart's three files and the provenance."""
    name = nifti_stem(source)
    return {
        "icv": output_dir / f"{name}_DLICV.nii.gz",
        "dseg": output_dir / f"{name}_DLMUSE.nii.gz",
        "volumes": output_dir / f"{name}_DLMUSE_Volumes.csv",
        "provenance": output_dir / f"{name}{NIFTI_SIDECAR}",
    }


def nifti_centile_paths(output_dir: Path, source: Path) -> dict[str, Path]:
    """The centile table of ``source`` and its sidecar, beside its other outputs."""
    name = nifti_stem(source)
    return {
        "centiles": output_dir / f"{name}_DLMUSE_centiles.tsv",
        "centiles_json": output_dir / f"{name}_DLMUSE_centiles.json",
    }


def _people(settings: NiftiRunSettings, say: Say) -> dict[str, Subject]:
    """MRID -> age and sex: from ``--demographics``, else ``--age``/``--sex`` for the input."""
    from ..demographics import read_subjects_csv
    from ..labels import nichart_mrid

    if settings.demographics is not None:
        people, notes = read_subjects_csv(settings.demographics)
        for note in notes:
            say(note)
        return people
    one = Subject(settings.age, settings.sex)
    return {nichart_mrid(p): one for p in settings.inputs}


def _write_all_centiles(
    settings: NiftiRunSettings, rows: dict[Path, dict], processed: set[Path], say: Say
) -> None:
    """Each image's normative centiles, from its NiChart volumes row (never fatal); an image
    segmented again whose centiles cannot be made now loses its old table."""
    import pandas as pd

    from ..labels import NICHART_PREFIX, load_label_table, nichart_mrid
    from .centiles import resolve_norms, write_centiles

    norms = resolve_norms(settings.norms, say) if rows else None
    people = _people(settings, say) if norms is not None else {}
    names = load_label_table().set_index("index")["name"]
    for source in [p for p in settings.inputs if p in rows]:
        row = rows[source]
        ids = [int(k.removeprefix(NICHART_PREFIX)) for k in row if k.startswith(NICHART_PREFIX)]
        volumes = pd.DataFrame(
            {
                "index": ids,
                "name": [names[i] for i in ids],
                "volume_mm3": [float(row[f"{NICHART_PREFIX}{i}"]) for i in ids],
            }
        )
        mrid = nichart_mrid(source)
        paths = nifti_centile_paths(settings.output_dir, source)
        made = False
        try:
            made = norms is not None and write_centiles(
                volumes,
                people.get(mrid, Subject()),
                norms,
                paths,
                str(source),
                say,
                where_age=f" (give --age, or MRID {mrid} in --demographics)",
                Sources=[str(source.absolute())],
            )
        except (OSError, ValueError) as exc:
            say(f"{source}: normative centiles not written ({type(exc).__name__}: {exc})")
        if not made and source in processed:  # an old table, of the volumes just replaced
            for path in paths.values():
                path.unlink(missing_ok=True)


def _nifti_current(output_dir: Path, source: Path, prov: Provenance) -> bool:
    import json

    paths = nifti_outputs(output_dir, source)
    if not all(p.is_file() for p in paths.values()):
        return False
    try:
        sidecar = json.loads(paths["provenance"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(sidecar, dict) and prov.matches(sidecar)


def _write_nifti_outputs(result, row: dict, paths: dict[str, Path], meta: dict) -> None:
    from ..bids import write_json_atomic
    from ..io import save_nifti_atomic
    from ..labels import write_nichart_csv

    save_nifti_atomic(result.icv_mask, paths["icv"])
    save_nifti_atomic(result.labels, paths["dseg"])
    write_nichart_csv([row], paths["volumes"])
    write_json_atomic(paths["provenance"], meta)  # last: it marks the outputs complete


def _failed_write(writes: list[tuple[Path, Future]], output_dir: Path) -> OutputError | None:
    """The error of the first finished write that failed (OSError), if any.

    Finished writes are removed from ``writes``, so each is looked at once.
    """
    for path, future in [w for w in writes if w[1].done()]:
        writes.remove((path, future))
        exc = future.exception()
        if isinstance(exc, OSError):
            why = exc.strerror or exc
            return OutputError(f"{output_dir}: cannot write outputs of {path} ({why})")
        if exc is not None:
            raise exc
    return None


def _segmentation_failure(source: Path, exc: Exception) -> str:
    if isinstance(exc, InputImageError):
        return str(exc).removeprefix(f"{source}: ")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"segmentation failed ({type(exc).__name__}: {first})"


def _when_stopped(
    todo: Sequence[Path], outcomes: list[Outcome], writes: list[tuple[Path, Future]]
) -> list[Outcome]:
    """The outcomes of a stopped run: those whose writes failed are failed, the rest stopped."""
    unwritten = {p for p, future in writes if future.exception() is not None}
    seen = {o.source for o in outcomes}
    return [
        Outcome(o.source, "failed", "outputs not written") if o.source in unwritten else o
        for o in outcomes
    ] + [Outcome(p, "stopped", "not finished: the run was stopped") for p in todo if p not in seen]


def _segment_images(
    todo: Sequence[Path],
    pipeline,
    prov: Provenance,
    out: Path,
    rows: dict[Path, dict],
    outcomes: list[Outcome],
    say: Say,
    start: float,
) -> None:
    """Segment ``todo`` in turn, writing each one's outputs while the next is segmented.

    Each image's outcome goes to ``outcomes`` and its volumes row to ``rows``. On
    :class:`Stopped`, the writes under way are finished and the rest are ``stopped``.
    """
    from ..labels import nichart_mrid, nichart_volumes_row

    with (
        ThreadPoolExecutor(1, thread_name_prefix="dlmuse-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="dlmuse-write") as writer,
    ):
        image = reader.submit(load_t1w, todo[0]) if todo else None
        writes: list[tuple[Path, Future]] = []
        try:
            for i, source in enumerate(todo):
                current = image  # only the current and the next image are held
                if i + 1 < len(todo):
                    image = reader.submit(load_t1w, todo[i + 1])
                t0 = time.perf_counter()
                try:
                    result = pipeline.run(current.result())
                except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the rest
                    logger.debug("%s: traceback", source, exc_info=True)
                    outcomes.append(Outcome(source, "failed", _segmentation_failure(source, exc)))
                    say(f"{source}: {outcomes[-1].message}")
                    continue
                logger.info("%s: segmented in %.1f s", source, time.perf_counter() - t0)
                failure = _failed_write(writes, out)
                if failure:
                    raise failure
                rows[source] = nichart_volumes_row(nichart_mrid(source), result.volumes)
                meta = {"Sources": [str(source.absolute())], **prov.metadata()}
                paths = nifti_outputs(out, source)
                job = writer.submit(_write_nifti_outputs, result, rows[source], paths, meta)
                writes.append((source, job))
                outcomes.append(Outcome(source, "processed"))
        except Stopped as stop:  # the writes under way finish as the pools close
            wait([future for _, future in writes])
            outcomes[:] = _when_stopped(todo, outcomes, writes)
            stop.report = RunReport(tuple(outcomes), time.monotonic() - start)
            raise
        wait([future for _, future in writes])
        failure = _failed_write(writes, out)
        if failure:
            raise failure


def run_nifti(settings: NiftiRunSettings, say: Say, progress=None) -> RunReport:
    """``dlmuse run``: segment each input in this process, in NiChart_DLMUSE's layout.

    Images are read one ahead and written one behind on threads (decompression and gzip release
    the GIL), so with the models resident the network is rarely idle. ``DLMUSE_Volumes.csv``
    holds every image that has volumes, in input order.

    Raises
    ------
    ModelError
        A model is missing or unusable.
    OutputError
        The output folder cannot be written.
    """
    import pandas as pd

    from ..labels import write_nichart_csv
    from ..models import load_trained_model
    from ..pipeline import DLMUSEPipeline

    start = time.monotonic()
    out = settings.output_dir
    require_writable(out)
    models = {
        key: load_trained_model(folder)
        for key, folder in model_folders(settings.models, say, progress).items()
    }
    for model in models.values():
        logger.info("loaded %s (folds %s, sha256 %s)", model.folder, model.folds, model.sha256)
    infos = {key: m.info(key) for key, m in models.items()}
    prov = provenance(settings.version, settings.inference, infos)
    try:
        pipeline = DLMUSEPipeline(
            *(models[k].predictor(settings.inference.network(k)) for k in NETWORKS)
        )
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    del models  # the checkpoints' tensors: the networks hold their own copies

    with ImageLocks(out, say) as locks:
        plan = plan_images(
            settings.inputs,
            lambda p: nifti_stem(p),
            lambda p: _nifti_current(out, p, prov),
            settings.overwrite,
            "rename one of them",
        )
        plan = claim_images(
            plan,
            locks,
            lambda p: nifti_outputs(out, p)["dseg"].name,
            lambda p: _nifti_current(out, p, prov),
            settings.overwrite,
        )
        outcomes = list(plan.known)
        for o in plan.known:
            if o.status in ("failed", "busy"):
                say(o.message)
        rows: dict[Path, dict] = {
            o.source: pd.read_csv(nifti_outputs(out, o.source)["volumes"], dtype={"MRID": str})
            .iloc[0]
            .to_dict()
            for o in plan.known
            if o.status == "skipped"
        }
        _segment_images(plan.todo, pipeline, prov, out, rows, outcomes, say, start)
        if any(o.status == "busy" for o in outcomes):
            say("DLMUSE_Volumes.csv not written: the run that holds the other images writes it")
        elif rows:
            try:
                write_nichart_csv(
                    [rows[p] for p in settings.inputs if p in rows], out / "DLMUSE_Volumes.csv"
                )
            except OSError as exc:
                why = exc.strerror or exc
                raise OutputError(f"{out}: cannot write DLMUSE_Volumes.csv ({why})") from exc
        processed = {o.source for o in outcomes if o.status == "processed"}
        _write_all_centiles(settings, rows, processed, say)
        return RunReport(tuple(outcomes), time.monotonic() - start)


def predict_image(
    folder: Path,
    folds: Sequence[int | str] | None,
    source: Path,
    output: Path,
    options: InferenceOptions,
) -> None:
    """``dlmuse predict``: one model on one image with nnU-Net's semantics (no reorientation).

    Raises
    ------
    ModelError
        The model folder is missing or unusable.
    InputImageError
        The image cannot be used.
    OutputError
        ``output`` cannot be written.
    """
    from ..io import make_label_image, save_nifti_atomic
    from ..models import load_trained_model

    model = load_trained_model(folder, folds)
    logger.info("loaded %s (folds %s, sha256 %s)", folder, model.folds, model.sha256)
    predictor = model.predictor(options)
    img = load_t1w(source)
    labels = predictor.predict(img.get_fdata(dtype="float32"), img.header.get_zooms()[:3])
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        save_nifti_atomic(make_label_image(labels, img), output)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from exc
