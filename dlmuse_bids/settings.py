"""Run settings of the BIDS App: frozen dataclasses built once from the command line.

Nothing here reads ``sys.argv``; :func:`available_cpus` reads the machine's limits from files
and the environment mapping it is given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:  # the template module needs torch; settings stay light
    from .template import TemplateFiles

#: nipype execution plugins that run on this machine or submit jobs to a scheduler.
NIPYPE_PLUGINS = (
    "Linear",
    "MultiProc",
    "LegacyMultiProc",
    "SLURM",
    "SGE",
    "PBS",
    "LSF",
    "OAR",
    "Condor",
    "IPython",
    "SLURMGraph",
    "SGEGraph",
    "PBSGraph",
    "CondorDAGMan",
)
#: Plugins that submit the whole graph to a scheduler and return before it has run.
GRAPH_PLUGINS = ("SLURMGraph", "SGEGraph", "PBSGraph", "CondorDAGMan")
#: Plugins that submit each node as an ``sbatch`` job (each gets the node's resource request).
SLURM_PLUGINS = ("SLURM", "SLURMGraph")


#: Where the networks run; ``auto`` is resolved where they run (a GPU when one is visible there).
DEVICES = ("auto", "cpu", "cuda")
#: Arithmetic of the networks: ``auto`` is nnU-Net's (fp32 on a CPU, fp16 autocast on CUDA);
#: ``fast`` is bf16 on CPUs with native bf16, fp16 on CUDA, fp32 elsewhere (what ``--fast`` uses).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fast")
#: The pipeline's networks, in the order they run.
NETWORKS = ("DLICV", "DLMUSE")
#: Inference modes (:meth:`PipelineInference.preset`): ``exact`` is nnunetv2's computation for
#: both networks; ``default`` runs DLICV in bf16 on channels-last kernels, one thread per network
#: pass (99.98 % of nnunetv2's voxels on a brain-trained DLICV,
#: benchmarks/results/dlicv_agreement.md, and the same labels whatever the thread count) and
#: DLMUSE exactly; ``fast`` also drops mirroring and runs DLMUSE in bf16/channels-last.
MODES = ("default", "exact", "fast")


@dataclass(frozen=True)
class InferenceOptions:
    """How the networks are evaluated (never which model), with nnU-Net's names.

    One value is built from the command line and carried whole to the engine
    (:class:`dlmuse_bids.nnunet.predictor.Predictor`). Everything but ``num_threads`` is
    provenance. ``num_threads`` changes no label where ``threads_per_pass`` is set; elsewhere
    oneDNN's kernels may move a near-tie voxel with it (nnunetv2's too), which is not counted as
    another setting: a re-run on another node keeps the outputs.
    """

    device: str = "auto"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's own setting
    tile_step_size: float = 0.5
    use_mirroring: bool = True
    precision: str = "auto"
    channels_last: bool = False  # channels-last 3-D memory layout (faster oneDNN kernels)
    # None: every network pass uses all threads, one at a time (nnU-Net). k: each pass on k
    # threads, several at once; the labels then depend on k, never on the number of threads
    threads_per_pass: int | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if not 0 < self.tile_step_size <= 1:
            raise ValueError(f"tile step size must be in (0, 1], not {self.tile_step_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, not {self.num_threads}")
        if self.threads_per_pass is not None and self.threads_per_pass < 1:
            raise ValueError(f"threads_per_pass must be at least 1, not {self.threads_per_pass}")

    def hashed(self) -> dict[str, Any]:
        """The fields that can change a result (all but ``num_threads``), for nipype's hash."""
        fields = asdict(self)
        del fields["num_threads"]
        return fields


#: The arithmetic options of the modes' networks (:meth:`PipelineInference.preset`).
_ARITHMETIC: dict[str, dict[str, Any]] = {
    "exact": {"precision": "auto", "channels_last": False},
    # bf16 on channels-last kernels, each pass on one thread, so that the labels do not depend
    # on the node's thread count (those kernels split their sums by thread)
    "quick": {"precision": "fast", "channels_last": True, "threads_per_pass": 1},
    # DLMUSE's 152-class passes are too big to hold several at once: all threads on each (its
    # labels in ``fast`` then move slightly with the thread count; the README says so)
    "quick-shared": {"precision": "fast", "channels_last": True},
}
#: (DLICV, DLMUSE) arithmetic of each mode.
_MODE_ARITHMETIC = {
    "exact": ("exact", "exact"),
    "default": ("quick", "exact"),
    "fast": ("quick", "quick-shared"),
}


@dataclass(frozen=True)
class PipelineInference:
    """How each network of the pipeline is evaluated: one :class:`InferenceOptions` per network.

    Both networks run in one process, so they share the device and thread count. ``mode`` names
    the preset the options came from (:data:`MODES`), as the sidecars record it.
    """

    dlicv: InferenceOptions = field(
        default_factory=lambda: InferenceOptions(**_ARITHMETIC[_MODE_ARITHMETIC["default"][0]])
    )
    dlmuse: InferenceOptions = field(
        default_factory=lambda: InferenceOptions(**_ARITHMETIC[_MODE_ARITHMETIC["default"][1]])
    )
    mode: str = "default"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if (self.dlicv.device, self.dlicv.num_threads) != (
            self.dlmuse.device,
            self.dlmuse.num_threads,
        ):
            raise ValueError("both networks must have the same device and thread count")

    @classmethod
    def preset(
        cls,
        mode: str = "default",
        *,
        device: str = "auto",
        num_threads: int | None = None,
        tile_step_size: float = 0.5,
        use_mirroring: bool | None = None,
        precision: str | None = None,
    ) -> PipelineInference:
        """The options of ``mode``; ``use_mirroring`` and ``precision``, when given, override it
        for both networks (``--no-tta``, ``--precision``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        dlicv, dlmuse = (_ARITHMETIC[name] for name in _MODE_ARITHMETIC[mode])
        mirroring = mode != "fast" if use_mirroring is None else use_mirroring
        common = {
            "device": device,
            "num_threads": num_threads,
            "tile_step_size": tile_step_size,
            "use_mirroring": mirroring,
        }

        def options(base: dict) -> InferenceOptions:
            return InferenceOptions(
                **common, **{**base, **({"precision": precision} if precision else {})}
            )

        return cls(dlicv=options(dlicv), dlmuse=options(dlmuse), mode=mode)

    def network(self, name: str) -> InferenceOptions:
        """The options of network ``name`` (:data:`NETWORKS`)."""
        if name not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {name!r}")
        return self.dlicv if name == "DLICV" else self.dlmuse

    @property
    def device(self) -> str:
        return self.dlicv.device

    @property
    def num_threads(self) -> int | None:
        return self.dlicv.num_threads


@dataclass(frozen=True)
class ModelSources:
    """Where the DLICV and DLMUSE folders are looked up, and whether a missing one is fetched.

    Resolved once by the command line from ``--model-dir``, ``--offline`` and the environment.
    """

    search_dirs: tuple[Path, ...]
    fetch_dir: Path | None = None  # where a first-use fetch goes; None: never fetch
    offline: str | None = None  # why downloading is not allowed (e.g. "--offline"); None: it is
    endpoint: str | None = None  # the model hub to fetch from (None: HuggingFace)
    hint: str = ""  # said after a "not found" (how to mount weights into the image)


@dataclass(frozen=True)
class NormsSources:
    """Where NiChart's normative tables are looked up, and whether missing ones are fetched.

    Resolved once by the command line from ``--norms-dir``, ``--offline`` and the environment.
    """

    search_dirs: tuple[Path, ...] = ()
    fetch_dir: Path | None = None  # where a first-use fetch goes; None: never fetch
    offline: str | None = None  # why downloading is not allowed; None: it is
    endpoint: str | None = None  # where the raw files are served (None: GitHub)


@dataclass(frozen=True)
class ModelInfo:
    """A model folder and the identity of its checkpoints (for provenance and re-run checks)."""

    name: str  # "DLICV" or "DLMUSE"
    folder: Path
    folds: tuple[int | str, ...]
    sha256: Mapping[str, str]  # "fold_0" -> hex digest

    def provenance(self) -> dict[str, Any]:
        """JSON-ready description for sidecars."""
        return {
            "Name": self.name,
            "Folder": self.folder.name,
            "Dataset": self.folder.parent.name,
            "Folds": list(self.folds),
            "CheckpointSHA256": dict(self.sha256),
        }


@dataclass(frozen=True)
class BIDSAppSettings:
    """Everything a ``dlmuse-bids`` run needs, validated once by the command line."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filters: Mapping[str, Any] = field(default_factory=dict)
    work_dir: Path | None = None
    nprocs: int = 1
    inference: PipelineInference = field(default_factory=PipelineInference)
    models: ModelSources = field(default_factory=lambda: ModelSources(()))
    skip_validation: bool = False
    database_dir: Path | None = None
    overwrite: bool = False
    stop_on_first_crash: bool = False
    plugin: str = "MultiProc"
    plugin_args: Mapping[str, Any] = field(default_factory=dict)
    verbosity: int = 0
    container: Mapping[str, str] | None = None
    template: TemplateFiles | None = None  # the orientation check's template, when available
    template_note: str = "no template given"  # why there is no template
    t1w_volume: int | None = None  # which volume of 4-D T1w files to segment (None: refuse them)
    norms: NormsSources = field(default_factory=NormsSources)  # the centiles' tables
    version: str = __version__


@dataclass(frozen=True)
class NiftiRunSettings:
    """Everything a ``dlmuse run`` needs: T1w files in, NiChart_DLMUSE's layout out."""

    inputs: tuple[Path, ...]
    output_dir: Path
    models: ModelSources
    inference: PipelineInference = field(default_factory=PipelineInference)
    overwrite: bool = False
    norms: NormsSources = field(default_factory=NormsSources)  # the centiles' tables
    demographics: Path | None = None  # NiChart's CSV of MRID, Age, Sex
    age: float | None = None  # of the one input (--age)
    sex: str | None = None  # of the one input (--sex): "M", "F" or None
    version: str = __version__


def _cgroup_cpu_limit(cgroup_root: Path) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` or v1 CFS quota, if one is set."""
    candidates = [
        (cgroup_root / "cpu.max", None),
        (cgroup_root / "cpu" / "cpu.cfs_quota_us", cgroup_root / "cpu" / "cpu.cfs_period_us"),
        (cgroup_root / "cpu.cfs_quota_us", cgroup_root / "cpu.cfs_period_us"),
    ]
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return max(1, math.ceil(int(quota) / int(period)))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def available_cpus(
    env: Mapping[str, str] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int:
    """CPUs this process may use: the smallest of its affinity mask, the cgroup CPU quota and
    ``SLURM_CPUS_PER_TASK`` (never ``os.cpu_count()``, which counts the whole node)."""
    try:
        limits = [len(os.sched_getaffinity(0))]
    except AttributeError:  # pragma: no cover - not Linux
        limits = [os.cpu_count() or 1]
    quota = _cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        limits.append(quota)
    slurm = (env or {}).get("SLURM_CPUS_PER_TASK", "")
    if slurm.strip().isdigit() and int(slurm) > 0:
        limits.append(int(slurm))
    return max(1, min(limits))


def container_info(env: Mapping[str, str]) -> dict[str, str] | None:
    """``GeneratedBy.Container`` when running in our Docker or Singularity/Apptainer image."""
    for var, kind in (
        ("APPTAINER_CONTAINER", "apptainer"),
        ("SINGULARITY_CONTAINER", "singularity"),
    ):
        if env.get(var):
            return {"Type": kind, "URI": env[var]}
    if env.get("DLMUSE_BIDS_CONTAINER"):  # set in our Dockerfile: "docker:<image>:<tag>"
        kind, _, tag = env["DLMUSE_BIDS_CONTAINER"].partition(":")
        return {"Type": kind, "Tag": tag} if tag else {"Type": kind}
    return None
