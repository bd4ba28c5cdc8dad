"""Build ``dlmuse_bids/data/muse_labels.tsv`` from NiChart_DLMUSE's MUSE tables.

Run by hand, once, when the source tables change::

    python tools/make_muse_labels.py ../shared/reference/muse dlmuse_bids/data/muse_labels.tsv

Inputs (the facts; never copied into the repository as they are):

- ``MUSE_mapping_consecutive_indices.csv``: nnU-Net class 0..151 -> MUSE id, snake-case names.
- ``MUSE_mapping_derived_rois.csv``: 260 rows ``ID,Name,member ids...`` (no header) in the column
  order of NiChart's volumes CSV; single ROIs appear with themselves as the only member.
- ``MUSE_ROI_complete_list.csv``: ``ID,Name,Full_Name,Consisting_of_ROIS``.

Label 1 is not an nnU-Net class: NiChart sets every DLICV voxel outside all DLMUSE regions to 1
("cortical CSF"), and the derived ROI 600 is that label alone.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import logging
from pathlib import Path

import pandas as pd

logger = logging.getLogger("make_muse_labels")

#: Label written by NiChart for intracranial voxels outside every DLMUSE region.
RESIDUAL_ICV_LABEL = 1
COLUMNS = [
    "index",
    "name",
    "full_name",
    "kind",
    "nnunet_class",
    "members",
    "volume_order",
    "color",
]


def label_colors(ids: list[int]) -> dict[int, str]:
    """Distinct, deterministic ``#rrggbb`` colours: golden-ratio hues, cycled lightness."""
    colors: dict[int, str] = {}
    for i, label in enumerate(sorted(ids)):
        hue = (i * 0.618033988749895) % 1.0
        lightness = (0.45, 0.6, 0.35)[i % 3]
        saturation = (0.85, 0.6)[(i // 3) % 2]
        r, g, b = colorsys.hls_to_rgb(hue, lightness, saturation)
        colors[label] = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
    if len(set(colors.values())) != len(colors):
        raise RuntimeError("generated label colours are not distinct")
    return colors


def read_derived(path: Path) -> list[tuple[int, str, list[int]]]:
    """Rows of the header-less derived-ROI table, in file order."""
    with path.open(newline="") as fobj:
        return [
            (int(row[0]), row[1].strip(), [int(x) for x in row[2:] if x.strip()])
            for row in csv.reader(fobj)
            if row
        ]


def build_table(ref_dir: Path) -> pd.DataFrame:
    """Combine the three MUSE tables into one row per label id."""
    consecutive = pd.read_csv(ref_dir / "MUSE_mapping_consecutive_indices.csv")
    complete = pd.read_csv(ref_dir / "MUSE_ROI_complete_list.csv").set_index("ID")
    derived = read_derived(ref_dir / "MUSE_mapping_derived_rois.csv")
    volume_order = {roi: pos for pos, (roi, _, _) in enumerate(derived, start=1)}

    model = consecutive[consecutive.IndexMUSE != 0]
    singles = {int(i): str(n) for i, n in zip(model.IndexMUSE, model.ROINameMUSE, strict=True)}
    singles[RESIDUAL_ICV_LABEL] = "cortical_csf"
    classes = {
        int(i): int(c) for i, c in zip(model.IndexMUSE, model.IndexConsecutive, strict=True)
    }
    colors = label_colors(list(singles))

    def full_name(roi: int, fallback: str) -> str:
        if roi in complete.index:
            return str(complete.loc[roi, "Full_Name"]).strip()
        return fallback

    rows = [
        {"index": 0, "name": "background", "full_name": "Background", "kind": "background",
         "nnunet_class": 0, "members": "", "volume_order": None, "color": "#000000"}
    ]  # fmt: skip
    for roi, name in sorted(singles.items()):
        fallback = name.replace("_", " ").title()
        if roi == RESIDUAL_ICV_LABEL:
            fallback = "Cortical CSF (intracranial voxels outside every DLMUSE region)"
        rows.append(
            {
                "index": roi,
                "name": name,
                # ids 1, 42, 43, 63, 64, 69 are absent from the complete list
                "full_name": full_name(roi, fallback) if roi != RESIDUAL_ICV_LABEL else fallback,
                "kind": "single",
                "nnunet_class": classes.get(roi),
                "members": str(roi),
                "volume_order": volume_order.get(roi),
                "color": colors[roi],
            }
        )
    for roi, name, members in sorted(derived):
        if members == [roi]:
            continue  # a single ROI listed as its own member
        unknown = set(members) - set(singles)
        if unknown:
            raise ValueError(f"derived ROI {roi} has non-single members {sorted(unknown)}")
        rows.append(
            {
                "index": roi,
                "name": name,
                "full_name": full_name(roi, name),
                "kind": "derived",
                "nnunet_class": None,
                "members": " ".join(map(str, members)),
                "volume_order": volume_order[roi],
                "color": "",
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("nnunet_class", "volume_order"):
        table[col] = table[col].astype("Int64")
    return table


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref_dir", type=Path, help="folder with the NiChart MUSE tables")
    parser.add_argument("out_tsv", type=Path, help="label table to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    table = build_table(args.ref_dir)
    table.to_csv(args.out_tsv, sep="\t", index=False, na_rep="")
    logger.info("wrote %d rows to %s", len(table), args.out_tsv)


if __name__ == "__main__":
    main()
