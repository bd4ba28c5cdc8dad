"""BIDS side of the app: finding T1w images with pybids, naming derivatives, dataset metadata.

Every output path is built by pybids from the source T1w's entities and :data:`PATTERNS`; no
name is made by string surgery on another name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import leftover_temporaries, write_bytes_atomic
from .io import nifti_stem
from .labels import dseg_table

logger = logging.getLogger(__name__)

#: Derivative file names: every entity a T1w may carry, then seg/desc, suffix and extension.
PATTERNS = [
    "sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}[_ses-{session}]"
    "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}]"
    "[_part-{part}][_chunk-{chunk}][_seg-{segmentation}][_desc-{desc}]"
    "_{suffix<dseg|mask|volumes|qc|centiles>}{extension<.nii.gz|.json|.tsv>|.nii.gz}",
    "sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}[_ses-{session}]"
    "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}]"
    "[_part-{part}][_chunk-{chunk}]_from-{from}_to-{to}_mode-{mode<image|points>}"
    "_{suffix<xfm>}{extension<.txt|.h5>}",
    "sub-{subject}/{datatype<figures>}/sub-{subject}[_ses-{session}]"
    "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}]"
    "[_part-{part}][_chunk-{chunk}][_seg-{segmentation}]_desc-{desc}_{suffix<dseg>}"
    "{extension<.png|.svg>}",
]
#: Report figures of one T1w (in ``sub-<label>/figures/``, as fMRIPrep lays them out).
FIGURES: dict[str, dict[str, str]] = {
    "mosaic": {
        "datatype": "figures",
        "segmentation": "DLMUSE",
        "desc": "mosaic",
        "suffix": "dseg",
        "extension": ".png",
    },
}
REPORT_PATTERN = "sub-{subject}{extension<.html>}"
#: The template of the orientation check (the name TemplateFlow and BIDS use; must equal
#: :data:`dlmuse_bids.template.TEMPLATE`, which this module does not import to stay torch-free).
TEMPLATE_NAME = "MNI152NLin2009cAsym"
#: The outputs of one T1w: key -> entities that replace the source's suffix/extension.
OUTPUTS: dict[str, dict[str, str]] = {
    "dseg": {"segmentation": "DLMUSE", "suffix": "dseg", "extension": ".nii.gz"},
    "dseg_json": {"segmentation": "DLMUSE", "suffix": "dseg", "extension": ".json"},
    "mask": {"desc": "icv", "suffix": "mask", "extension": ".nii.gz"},
    "mask_json": {"desc": "icv", "suffix": "mask", "extension": ".json"},
    "volumes": {"segmentation": "DLMUSE", "suffix": "volumes", "extension": ".tsv"},
    "qc": {"segmentation": "DLMUSE", "suffix": "qc", "extension": ".tsv"},
    # the affine of the template check; written only when the template was available
    "xfm": {
        "from": "T1w",
        "to": TEMPLATE_NAME,
        "mode": "image",
        "suffix": "xfm",
        "extension": ".txt",
    },
}
#: Outputs that exist only when the template check ran.
OPTIONAL_OUTPUTS = ("xfm",)
#: The normative centiles of one T1w (when the tables and its age are known): made from the
#: volumes after the segmentation, so not part of what decides whether it is re-run.
CENTILE_OUTPUTS: dict[str, dict[str, str]] = {
    "centiles": {"segmentation": "DLMUSE", "suffix": "centiles", "extension": ".tsv"},
    "centiles_json": {"segmentation": "DLMUSE", "suffix": "centiles", "extension": ".json"},
}
DSEG_TSV = "seg-DLMUSE_dseg.tsv"
LOGS_DIR = "logs"
#: Outputs the BIDS schema has no rule for yet (transforms: BIDS-Derivatives, not the validator).
BIDSIGNORE = (
    "*_volumes.tsv",
    "*_qc.tsv",
    "*_centiles.tsv",
    "*_centiles.json",
    "*_xfm.txt",
    "*.html",
    # no trailing slashes: the validator matches the folders themselves
    "sub-*/figures",
    "group",
    "logs",
)
BIDS_VERSION = "1.10.0"
CODE_URL = "https://github.com/dlmuse-bids/dlmuse-bids"
RAW_LINK = "raw"  # the DatasetLinks name of the input dataset in BIDS URIs
#: Folders below a subject (or session) that are not ``anat``: never indexed.
_T1W_DIR_IGNORE = re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?(?!anat(/|$)|ses-)[^/]+(/|$)")


class BIDSError(Exception):
    """A problem with the input dataset; ``exit_code`` is the BIDS-Apps code to exit with."""

    exit_code = 16


class NoT1wError(BIDSError):
    """The filters select no T1w image."""

    exit_code = 18


class FilterError(BIDSError):
    """An unusable ``--bids-filter-file``."""

    exit_code = 64


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` or ``01`` -> ``01``."""
    return label[len(prefix) :] if label.startswith(prefix) else label


def load_bids_filters(path: Path) -> dict[str, Any]:
    """Entity filters for the T1w query from a JSON file.

    Accepts either a plain object of pybids entities (``{"acquisition": "mprage"}``) or
    fMRIPrep's form with a ``"t1w"`` key. ``null`` means "entity absent" and ``"*"`` "any value".
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FilterError(f"{path}: not a readable JSON file ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("t1w"), dict):
        data = data["t1w"]
    if not isinstance(data, dict):
        raise FilterError(f"{path}: must hold a JSON object of entity filters")
    if any(key in data for key in ("suffix", "datatype", "extension")):
        raise FilterError(f"{path}: suffix, datatype and extension are fixed by the app")
    return data


def _query_value(value: Any) -> Any:
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    return value


def _index_ignores(participants: Sequence[str]) -> list[Any]:
    """What pybids need not index: other subjects, other datatypes, hidden and code folders.

    ``derivatives/`` too (pybids leaves it out by default; said here so that it stays so): other
    pipelines' outputs (fMRIPrep's ``desc-preproc_T1w``) and ours, when the output folder is
    ``<bids_dir>/derivatives/dlmuse``, are never taken for raw T1w images.
    """
    ignore: list[Any] = [
        "code",
        "derivatives",
        "sourcedata",
        "stimuli",
        "models",
        re.compile(r"/\."),
    ]
    ignore.append(_T1W_DIR_IGNORE)
    if participants:
        alternatives = "|".join(re.escape(p) for p in sorted(participants))
        ignore.append(re.compile(rf"^/sub-(?!({alternatives})(/|$))[^/]+"))
    return ignore


def index_layout(
    bids_dir: Path, participants: Sequence[str] = (), database_dir: Path | None = None
):
    """A pybids ``BIDSLayout`` of the anatomical files of the requested subjects.

    With ``database_dir``, the index is stored in (and reused from) a subfolder named by a hash
    of the dataset path and what was indexed, so a different selection never reuses a stale
    index.
    """
    from bids.exceptions import BIDSValidationError
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    bids_dir = Path(bids_dir).absolute()
    if not (bids_dir / "dataset_description.json").is_file():
        raise BIDSError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    database_path = None
    if database_dir is not None:
        key = json.dumps([str(bids_dir), sorted(participants)]).encode()
        database_path = Path(database_dir) / hashlib.sha256(key).hexdigest()[:16]
    indexer = BIDSLayoutIndexer(validate=False, ignore=_index_ignores(participants))
    try:
        return BIDSLayout(bids_dir, validate=False, indexer=indexer, database_path=database_path)
    except (BIDSValidationError, ValueError) as exc:
        raise BIDSError(f"{bids_dir}: cannot index the dataset ({exc})") from exc


def collect_t1w(
    layout,
    participants: Sequence[str] = (),
    sessions: Sequence[str] = (),
    filters: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Every T1w image the labels and filters select, sorted by path.

    Raises
    ------
    NoT1wError
        Naming the labels that do not exist and reminding that the dataset must be mounted.
    FilterError
        If a filter names an entity pybids does not know.
    """
    query: dict[str, Any] = {key: _query_value(value) for key, value in (filters or {}).items()}
    if participants:
        query["subject"] = list(participants)
    if sessions:
        query["session"] = list(sessions)
    try:
        files = layout.get(
            return_type="filename",
            datatype="anat",
            suffix="T1w",
            extension=[".nii", ".nii.gz"],
            invalid_filters="error",
            **query,
        )
    except ValueError as exc:
        raise FilterError(f"unusable BIDS filter: {exc}") from exc
    if files:
        return sorted(Path(f) for f in files)
    problems = []
    missing = sorted(set(participants) - set(layout.get_subjects()))
    if missing:
        problems.append(f"participant label(s) not found: {' '.join(missing)}")
    missing = sorted(set(sessions) - set(layout.get_sessions()))
    if missing:
        problems.append(f"session label(s) not found: {' '.join(missing)}")
    if filters:
        problems.append(f"filters {json.dumps(dict(filters))}")
    what = "; ".join(problems) or "the dataset has no anat/*_T1w.nii[.gz] file"
    raise NoT1wError(
        f"{layout.root}: no T1w image selected ({what}). If you run a container, make sure "
        "the dataset is mounted at that path"
    )


def validate_dataset(bids_dir: Path, executable: str = "bids-validator-deno") -> list[str] | None:
    """Run the BIDS validator; its error messages, or None when it is not installed.

    It judges the dataset's structure and metadata, not the NIfTI headers
    (``--ignoreNiftiHeaders``): an image the loader cannot use is refused on its own, with its
    reason, and the others run (:func:`dlmuse_bids.io.load_t1w` checks far more than the
    validator does). A header error would otherwise stop the whole run, and a DataLad dataset
    with some contents not fetched would never run at all (the validator cannot read them).
    """
    command = shutil.which(executable)
    if command is None:
        return None
    flags = ["--format", "json", "--ignoreWarnings", "--ignoreNiftiHeaders"]
    proc = subprocess.run(
        [command, *flags, os.fspath(bids_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        issues = json.loads(proc.stdout)["issues"]["issues"]
    except (ValueError, KeyError, TypeError):
        if proc.returncode == 0:
            return []
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return [f"validator failed (exit {proc.returncode}): {' '.join(tail)}"]
    return [
        f"{issue.get('code')}: {issue.get('location', '')}"
        for issue in issues
        if issue.get("severity") == "error"
    ]


@functools.cache
def _bids_entities() -> tuple[Any, ...]:
    """pybids' entities of its ``bids`` and ``derivatives`` configs, as it merges them.

    Loaded once: ``parse_file_entities`` loads both configs on every call otherwise (about
    2 ms, most of the time of naming one image's outputs; minutes over a 10,000-image study).
    """
    from bids.layout.models import Config

    merged: dict[str, Any] = {}
    for name in ("bids", "derivatives"):
        merged.update(Config.load(name).entities)
    return tuple(merged.values())


def source_entities(source: Path) -> dict[str, Any]:
    """pybids entities of a source file name (zero padding of ``run`` kept)."""
    from bids.layout import parse_file_entities

    return parse_file_entities(os.fspath(source), entities=_bids_entities())


def derivative_path(source: Path, **entities: Any) -> Path:
    """Relative path of a derivative of ``source`` with some entities replaced."""
    from bids.layout.writing import build_path

    values = {**source_entities(source), **entities}
    built = build_path(values, PATTERNS, strict=False)
    if built is None:
        raise ValueError(f"{source}: no derivative name for entities {entities}")
    return Path(built)


def figure_paths(source: Path, output_dir: Path) -> dict[str, Path]:
    """The report figures of one T1w, by :data:`FIGURES` key."""
    return dict(_derivative_paths(os.fspath(source), os.fspath(output_dir), "figures"))


def report_path(output_dir: Path, subject: str) -> Path:
    """``sub-<label>.html`` at the root of the output dataset."""
    from bids.layout.writing import build_path

    return Path(output_dir) / build_path(
        {"subject": subject, "extension": ".html"}, [REPORT_PATTERN], strict=True
    )


def output_paths(source: Path, output_dir: Path) -> dict[str, Path]:
    """The files one T1w produces, by :data:`OUTPUTS` key."""
    return dict(_derivative_paths(os.fspath(source), os.fspath(output_dir), "outputs"))


@functools.lru_cache(maxsize=1 << 16)
def _derivative_paths(source: str, output_dir: str, kind: str) -> tuple[tuple[str, Path], ...]:
    # a run asks for each image's names several times (plan, lock, leftovers, outcome)
    table = OUTPUTS if kind == "outputs" else FIGURES
    return tuple(
        (key, Path(output_dir) / derivative_path(Path(source), **ent))
        for key, ent in table.items()
    )


def centile_paths(source: Path, output_dir: Path) -> dict[str, Path]:
    """The centile table of one T1w and its sidecar, by :data:`CENTILE_OUTPUTS` key."""
    return {
        key: Path(output_dir) / derivative_path(source, **ent)
        for key, ent in CENTILE_OUTPUTS.items()
    }


def remove_leftovers(source: Path, output_dir: Path) -> list[Path]:
    """Remove the hidden temporaries a killed run left beside ``source``'s outputs; the removed.

    Call it only for an image this run is about to segment (see
    :func:`dlmuse_bids.io.leftover_temporaries`).
    """
    removed = []
    finals = [
        *output_paths(source, output_dir).values(),
        *figure_paths(source, output_dir).values(),
    ]
    for final in finals:
        for tmp in leftover_temporaries(final):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def crash_log_name(source: Path, node: str, stamp: str) -> str:
    """Name of a crash file of ``source`` in ``logs/``: ``crash-<stamp>-<stem>-<node>.txt``."""
    return f"crash-{stamp}-{nifti_stem(source)}-{node}.txt"


def crash_log_glob(source: Path) -> str:
    """Glob matching every crash file of ``source`` (see :func:`crash_log_name`)."""
    return f"crash-*-{nifti_stem(source)}-*.txt"


def bids_uri(path: Path, bids_dir: Path) -> str:
    """BIDS URI of a raw-dataset file, ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``."""
    rel = Path(path).absolute().relative_to(Path(bids_dir).absolute())
    return f"bids:{RAW_LINK}:{rel.as_posix()}"


@dataclass(frozen=True)
class Provenance:
    """What decides whether existing outputs can be kept: software, models, how they were run."""

    version: str
    inference: Mapping[str, Mapping[str, Any]]  # network -> runner.network_provenance()
    models: Mapping[str, Mapping[str, Any]]  # name -> ModelInfo.provenance()
    template: str | None = None  # the template of the orientation check, None when skipped
    mode: str = "default"  # the inference mode (settings.MODES) the options came from
    t1w_volume: int | None = None  # the volume segmented in 4-D T1w files (--t1w-volume)

    def metadata(self) -> dict[str, Any]:
        """Sidecar fields (merged into every image's JSON)."""
        return {
            "SoftwareName": "dlmuse-bids",
            "SoftwareVersion": self.version,
            "InferenceMode": self.mode,
            "Inference": {name: dict(info) for name, info in self.inference.items()},
            "Models": {name: dict(info) for name, info in self.models.items()},
            "TemplateCheck": self.template,
            "T1wVolume": self.t1w_volume,
        }

    def matches(self, sidecar: Mapping[str, Any]) -> bool:
        """True when a sidecar was written by the same software and models, run the same way."""
        mine = self.metadata()
        theirs_models = sidecar.get("Models") or {}
        return (
            all(
                sidecar.get(key) == mine[key]
                for key in ("SoftwareVersion", "Inference", "TemplateCheck", "T1wVolume")
            )
            and set(theirs_models) == set(mine["Models"])
            and all(
                theirs_models[name].get("CheckpointSHA256") == info["CheckpointSHA256"]
                for name, info in mine["Models"].items()
            )
        )


def image_sidecar(
    source: Path, bids_dir: Path, provenance: Provenance, **fields: Any
) -> dict[str, Any]:
    """Sidecar of one output image: its sources as BIDS URIs, provenance, and ``fields``."""
    return {"Sources": [bids_uri(source, bids_dir)], **fields, **provenance.metadata()}


def outputs_current(source: Path, output_dir: Path, provenance: Provenance) -> bool:
    """Every output of ``source`` and its report's figures exist, and both sidecars carry the
    same provenance.

    The template check's transform counts only when this run has a template. The mosaic is the
    last file an image gets: a run stopped while it was drawn left the image unfinished.
    """
    paths = output_paths(source, output_dir)
    optional = OPTIONAL_OUTPUTS if provenance.template is None else ()
    if not all(p.is_file() for key, p in paths.items() if key not in optional):
        return False
    if not all(p.is_file() for p in figure_paths(source, output_dir).values()):
        return False
    for key in ("dseg_json", "mask_json"):
        try:
            sidecar = json.loads(paths[key].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(sidecar, dict) or not provenance.matches(sidecar):
            return False
    return True


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write a JSON file atomically (see :func:`dlmuse_bids.io.write_bytes_atomic`)."""
    write_bytes_atomic(path, _json_bytes(data))


def derivative_description(
    bids_dir: Path, version: str, container: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``dataset_description.json`` of the output dataset."""
    bids_dir = Path(bids_dir).absolute()
    generated: dict[str, Any] = {"Name": "dlmuse-bids", "Version": version, "CodeURL": CODE_URL}
    if container:
        generated["Container"] = dict(container)
    source: dict[str, Any] = {"URL": bids_dir.as_uri()}
    try:
        raw = json.loads((bids_dir / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    if isinstance(raw, dict):
        for key in ("DatasetDOI", "Version"):
            if raw.get(key):
                source["DOI" if key == "DatasetDOI" else "Version"] = raw[key]
    name = raw.get("Name") if isinstance(raw, dict) else None
    return {
        "Name": f"DLMUSE segmentation of {name}" if name else "DLMUSE segmentation",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {RAW_LINK: bids_dir.as_uri()},
    }


def write_dataset_files(
    output_dir: Path, bids_dir: Path, version: str, container: Mapping[str, str] | None = None
) -> None:
    """Write the dataset-level files once: description, ``seg-DLMUSE_dseg.tsv``, ``.bidsignore``.

    Safe under parallel jobs sharing ``output_dir``: each file is created atomically and only
    if absent (a hard link of a complete temporary file), so the first writer wins and nobody
    sees a partial file. An existing description from another version is kept, with a warning.
    """
    output_dir = Path(output_dir)
    description = derivative_description(bids_dir, version, container)
    target = output_dir / "dataset_description.json"
    if target.exists():
        try:
            existing = json.loads(target.read_text(encoding="utf-8"))
            old = existing["GeneratedBy"][0].get("Version")
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            old = None
        if old != version:
            logger.warning(
                "%s was written by dlmuse-bids %s; this is %s (file kept)", target, old, version
            )
    _create_once(target, _json_bytes(description))
    table = dseg_table().to_csv(sep="\t", index=False, lineterminator="\n")
    _create_once(output_dir / DSEG_TSV, table.encode("utf-8"))
    ignore = output_dir / ".bidsignore"
    present = ignore.read_text(encoding="utf-8").splitlines() if ignore.exists() else []
    missing = [line for line in BIDSIGNORE if line not in present]
    if missing:  # append what is missing, keeping lines a user added
        write_bytes_atomic(ignore, ("\n".join([*present, *missing]) + "\n").encode("utf-8"))


def _create_once(path: Path, payload: bytes) -> None:
    if path.exists():
        return
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # per writer
    write_bytes_atomic(tmp, payload)
    try:
        os.link(tmp, path)  # fails if another job got there first; then theirs stands
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system: a rename is still atomic
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
