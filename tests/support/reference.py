"""Run the reference engines: nnunetv2's predictor and the NiChart_DLMUSE pipeline.

Both are imported or called lazily so that this module imports without them; tests that need
them skip with ``pytest.importorskip`` / :func:`nichart_available`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from .paths import DLICV_DATASET, DLMUSE_DATASET, TRAINED_MODEL_SUBDIR

LOGGER = logging.getLogger(__name__)

NIFTI_ENDING = ".nii.gz"
# The reference tools, their packages and the dataset each one looks up beside its __init__.py.
_TOOL_PACKAGES = {"DLICV": DLICV_DATASET, "DLMUSE": DLMUSE_DATASET}
# Overrides ``multiprocessing.cpu_count`` in the NiChart subprocess tree: DLICV and DLMUSE set
# ``torch.set_num_threads(multiprocessing.cpu_count() // 2)`` and nothing else in that tree calls
# it, so this is how a caller chooses their torch thread count without editing their code.
# (This environment has no other sitecustomize for it to shadow.)
_SITECUSTOMIZE = """\
import multiprocessing
import os

_threads = os.environ.get("DLMUSE_BIDS_REFERENCE_TORCH_THREADS")
if _threads:
    multiprocessing.cpu_count = lambda: 2 * int(_threads)
"""


def _case_name(image: Path) -> str:
    name = image.name
    for ending in (NIFTI_ENDING, ".nii"):
        if name.endswith(ending):
            return name[: -len(ending)]
    raise ValueError(f"not a NIfTI file name: {image}")


def nnunet_predict(
    model_folder: Path,
    image: Path,
    out: Path,
    *,
    folds: Sequence[int] = (0,),
    use_mirroring: bool = True,
    step_size: float = 0.5,
    threads: int = 2,
) -> Path:
    """Segment one NIfTI image with nnunetv2's ``nnUNetPredictor`` on the CPU.

    Uses ``predict_from_files_sequential`` (no worker processes), Gaussian tile weighting and
    ``perform_everything_on_device=True`` (which nnU-Net itself turns off on the CPU).

    Parameters
    ----------
    model_folder
        A trained-model folder (``.../nnUNetTrainer__nnUNetPlans__3d_fullres``).
    image
        Input ``.nii.gz``/``.nii``; any file name (nnU-Net's ``_0000`` suffix is not needed).
    out
        Output label file if it ends with ``.nii.gz``; otherwise a folder that receives
        ``<image name>.nii.gz``.  nnU-Net also writes ``dataset.json``, ``plans.json`` and
        ``predict_from_raw_data_args.json`` beside it.
    folds
        Folds to ensemble (logits are averaged).
    use_mirroring
        Mirroring test-time augmentation over the model's allowed axes.
    step_size
        Sliding-window step as a fraction of the patch size.
    threads
        ``torch.set_num_threads`` for the prediction (restored afterwards).  nnU-Net caps it at
        ``nnUNet_def_n_proc`` (default 8) inside ``predict_logits_from_preprocessed_data``.

    Returns
    -------
    Path
        The label file written.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out = Path(out)
    if out.name.endswith(NIFTI_ENDING):
        label_file = out
    else:
        label_file = out / f"{_case_name(Path(image))}{NIFTI_ENDING}"
    label_file.parent.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = nnUNetPredictor(
            tile_step_size=step_size,
            use_gaussian=True,
            use_mirroring=use_mirroring,
            perform_everything_on_device=True,
            device=torch.device("cpu"),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(
            str(model_folder), tuple(folds), checkpoint_name="checkpoint_final.pth"
        )
        ending = predictor.dataset_json["file_ending"]
        if not label_file.name.endswith(ending):
            raise ValueError(f"the model writes {ending} files, not {label_file.name}")
        predictor.predict_from_files_sequential(
            [[str(image)]],
            [str(label_file)[: -len(ending)]],
            save_probabilities=False,
            overwrite=True,
        )
    finally:
        torch.set_num_threads(previous_threads)
    if not label_file.is_file():
        raise RuntimeError(f"nnU-Net did not write {label_file}")
    return label_file


def nichart_available() -> bool:
    """Whether the NiChart_DLMUSE, DLICV and DLMUSE console scripts and packages are installed."""
    bin_dir = Path(sys.executable).parent
    scripts = all((bin_dir / name).exists() for name in ("NiChart_DLMUSE", "DLICV", "DLMUSE"))
    if not scripts:
        return False
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in ("DLICV", "DLMUSE"))


def _shadow_packages(models_dir: Path, shadow_root: Path) -> None:
    """Copy DLICV and DLMUSE under ``shadow_root`` with ``nnunet_results`` linked to our models."""
    import importlib.util

    for package, dataset in _TOOL_PACKAGES.items():
        model_dataset = (Path(models_dir) / dataset).resolve()
        if not (model_dataset / TRAINED_MODEL_SUBDIR / "plans.json").is_file():
            raise FileNotFoundError(f"no {dataset} model under {models_dir}")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"{package} is not installed")
        installed = Path(spec.origin).parent
        shadow = shadow_root / package
        if shadow.exists():
            shutil.rmtree(shadow)
        shutil.copytree(
            installed,
            shadow,
            ignore=shutil.ignore_patterns("__pycache__", "nnunet_results", ".cache"),
        )
        (shadow / "nnunet_results").mkdir()
        (shadow / "nnunet_results" / dataset).symlink_to(model_dataset, target_is_directory=True)
    (shadow_root / "sitecustomize.py").write_text(_SITECUSTOMIZE)


def _link_inputs(inputs: Iterable[Path], in_dir: Path) -> list[str]:
    """Symlink the inputs into one folder (NiChart names outputs after the file names)."""
    if in_dir.exists():
        shutil.rmtree(in_dir)
    in_dir.mkdir(parents=True)
    names = []
    for image in inputs:
        image = Path(image).resolve()
        name = _case_name(image)
        if name in names:
            raise ValueError(f"two inputs are named {name}")
        names.append(name)
        (in_dir / image.name).symlink_to(image)
    if not names:
        raise ValueError("no inputs")
    return names


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path.name} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_nichart(
    models_dir: Path,
    inputs: list[Path],
    work: Path,
    *,
    disable_tta: bool = False,
    threads: int | None = 2,
    timeout: float | None = None,
) -> Path:
    """Run the real ``NiChart_DLMUSE -i IN -o OUT -d cpu`` offline on our model folders.

    NiChart shells out to the ``DLICV`` and ``DLMUSE`` console scripts, which load their models
    from ``Path(<package>.__file__).parent / "nnunet_results/<dataset>/..."``.  Rather than write
    into site-packages, the two packages are copied to ``work/shadow`` with ``nnunet_results``
    symlinked to ``models_dir`` and that folder is put first on ``PYTHONPATH``.

    Parameters
    ----------
    models_dir
        Folder from :func:`tests.support.models.build_models_dir` (both official dataset names).
    inputs
        T1w NIfTI files; their names (without extension) name the outputs and must be unique.
    work
        Scratch folder: ``shadow/``, ``in/`` (links to the inputs), ``out/``, and ``run/``, the
        working directory where NiChart writes ``pipeline.log``.
    disable_tta
        Pass ``--disable_tta`` to both DLICV and DLMUSE (no mirroring).
    threads
        Torch threads inside DLICV/DLMUSE (they use ``multiprocessing.cpu_count() // 2``, which
        a ``sitecustomize`` in ``work/shadow`` overrides) and OMP/MKL threads of the whole run.
        None leaves the tools' own choice.
    timeout
        Seconds before the run is killed.

    Returns
    -------
    Path
        ``work/out`` with ``<name>_DLMUSE.nii.gz``, ``<name>_DLMUSE_Volumes.csv``,
        ``DLMUSE_Volumes.csv`` and ``temp_working_dir/`` (``s2_dlicv/<name>_DLICV.nii.gz`` holds
        the ICV masks, in LPS orientation, after DLICV's connected-component step).

    Raises
    ------
    RuntimeError
        If NiChart fails or an expected output is missing (NiChart ignores the exit status of
        the tools it calls), with the tail of ``pipeline.log`` and stderr.
    """
    work = Path(work).resolve()
    shadow, in_dir, out_dir, run_dir = (work / n for n in ("shadow", "in", "out", "run"))
    shadow.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    _shadow_packages(Path(models_dir), shadow)
    names = _link_inputs(inputs, in_dir)

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shadow), env.get("PYTHONPATH")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("nnUNet_compile", None)
    if threads is not None:
        env["DLMUSE_BIDS_REFERENCE_TORCH_THREADS"] = str(threads)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    command = [str(bin_dir / "NiChart_DLMUSE"), "-i", str(in_dir), "-o", str(out_dir)]
    command += ["-d", "cpu"]
    if disable_tta:
        command += ["--dlicv_args=--disable_tta", "--dlmuse_args=--disable_tta"]

    LOGGER.info("running %s", " ".join(command))
    proc = subprocess.run(
        command,
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    (run_dir / "stdout.txt").write_text(proc.stdout)
    (run_dir / "stderr.txt").write_text(proc.stderr)

    expected = [out_dir / "DLMUSE_Volumes.csv"]
    for name in names:
        expected += [
            out_dir / f"{name}_DLMUSE.nii.gz",
            out_dir / f"{name}_DLMUSE_Volumes.csv",
            out_dir / "temp_working_dir" / "s2_dlicv" / f"{name}_DLICV.nii.gz",
        ]
    missing = [str(p.relative_to(out_dir)) for p in expected if not p.is_file()]
    if proc.returncode != 0 or missing:
        raise RuntimeError(
            f"NiChart_DLMUSE failed (exit {proc.returncode}; missing: {missing or 'none'})\n"
            f"--- pipeline.log ---\n{_tail(run_dir / 'pipeline.log')}\n"
            f"--- stderr ---\n{_tail(run_dir / 'stderr.txt')}"
        )
    return out_dir


def mirror_average(network, x, mirror_axes):
    """nnU-Net's mirroring of one tile, as nnunetv2 writes it: the plain output plus each flipped
    pass (in ``mirror_combinations`` order), summed in fp32, divided by the number of passes."""
    import torch

    from dlmuse_bids.nnunet.sliding_window import mirror_combinations

    passes = [(), *mirror_combinations(mirror_axes)]
    total = network(x).float()
    for dims in passes[1:]:
        total = total + torch.flip(network(torch.flip(x, dims)), dims).float()
    return total / len(passes)
