"""Training images: reading PNG / JPG / DICOM to grey float32 in [0, 1], and listing a source.

An image table has one row per image: `image_id`, `path`, `source_id`, `subject_id`.
`source_id` is the key of the report the image belongs to, spelled as the corpus readers spell a
prompt's `source_ids` entry, so that re-identification is a string join:

- MIMIC-CXR-JPG `files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg` -> source_id `pNN/pNNNNNNNN/sNNNNNNNN`
  and subject_id `pNNNNNNNN`, exactly `cxrmem.corpus.mimic.report_ids` of the report
  `files/pNN/pNNNNNNNN/sNNNNNNNN.txt`;
- a plain folder: no ids (None);
- a table (CSV / Parquet) of path and study id: the study id as the corpus wrote it, or, with
  `id_format="mimic"`, MIMIC's integer ids (mimic-cxr-2.0.0-metadata.csv) turned into the form above.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from cxrmem.settings import POSITIVE, Settings, knob


@dataclass(frozen=True)
class ImagesConfig(Settings):
    """The `images` config section: the training images that generations are searched against."""

    source: Optional[str] = ""  # training images: folder or s3:// prefix of PNG/JPG/DICOM, or a .csv/.parquet table (empty: no copies stage)
    layout: str = knob("auto", choices=["auto", "mimic", "plain"])  # folder: mimic (files/pNN/pNNNNNNNN/sNNNNNNNN/*.jpg) | plain | auto (mimic if all are)
    path_column: str = "path"  # table source: the column of image paths
    study_column: str = "study_id"  # table source: the column of the report (study) id each image belongs to
    subject_column: Optional[str] = None  # table source: the column of patient ids (None: none)
    id_format: str = knob("as_is", choices=["as_is", "mimic"])  # table: as_is (ids as the corpus spells them) | mimic (integers -> pNN/pNNNNNNNN/sNNNNNNNN)
    root: str = ""  # table source: folder or prefix that relative paths are joined to
    index: Optional[str] = ""  # reusable index prefix; embeddings under <index>/<embedder fingerprint>/ (empty or null: the run's _parts/image_index)
    part_size: int = knob(1024, POSITIVE)  # images per stored embedding part (the unit of resume)

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES
IMAGE_COLUMNS = ["image_id", "path", "source_id", "subject_id"]
_MIMIC_IMAGE = re.compile(r"(?:^|/)p(\d{2})/(p\d+)/(s\d+)/([^/]+)\.(?:jpe?g|png|dcm)$", re.I)


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


# -- reading ----------------------------------------------------------------------------------
def is_dicom(data: bytes, name: str) -> bool:
    """By suffix, or by the `DICM` magic at byte 128 (DICOM files often have no suffix)."""
    return name.lower().endswith(DICOM_SUFFIXES) or data[128:132] == b"DICM"


def read_image(data: bytes, name: str) -> np.ndarray:
    """Grey float32 [H, W] in [0, 1] from the bytes of a PNG, JPG or DICOM file called `name`."""
    try:
        image = read_dicom(data) if is_dicom(data, name) else read_raster(data)
    except ImageReadError as err:
        raise ImageReadError(f"{name}: {err}") from err
    except Exception as err:  # PIL and pydicom raise many kinds
        raise ImageReadError(
            f"{name}: cannot read as an image ({type(err).__name__}: {err}); it must be a PNG, JPG or DICOM file"
        ) from err
    if image.ndim != 2 or min(image.shape) == 0:
        raise ImageReadError(f"{name}: not a single 2-D image (shape {image.shape}); multi-frame DICOM is not supported")
    return image


def read_raster(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I;16") or image.mode == "I":
            return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def read_dicom(data: bytes) -> np.ndarray:
    """The displayed image: modality LUT (rescale), VOI (window or LUT), MONOCHROME1 inverted.

    Without a VOI in the file the values are scaled by their own range.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = pydicom.dcmread(io.BytesIO(data))
    if "PixelData" not in dataset:
        raise ImageReadError("a DICOM file without pixel data")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        raise ImageReadError(f"a {photometric} DICOM image; only greyscale (MONOCHROME1/2) radiographs are supported")
    pixels = apply_modality_lut(dataset.pixel_array, dataset)
    has_voi = "WindowCenter" in dataset or "VOILUTSequence" in dataset
    pixels = apply_voi_lut(pixels, dataset) if has_voi else pixels
    pixels = np.asarray(pixels, dtype=np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    if photometric == "MONOCHROME1":  # high values are dark: invert to the usual display
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


# -- listing a source -------------------------------------------------------------------------
def image_files(paths: Sequence[str]) -> list[str]:
    """The PNG / JPG / DICOM files among `paths` (a listing of a folder or prefix), sorted."""
    return sorted(p for p in paths if p.lower().endswith(IMAGE_SUFFIXES))


def mimic_image_ids(path: str) -> Optional[dict]:
    """{image_id, source_id, subject_id} of a MIMIC-CXR-JPG image path, or None if it is not one."""
    match = _MIMIC_IMAGE.search(path.replace("\\", "/"))
    if match is None:
        return None
    group, subject, study, dicom_id = match.groups()
    return {"image_id": dicom_id, "source_id": f"p{group}/{subject}/{study}", "subject_id": subject}


def folder_table(paths: Sequence[str], layout: str = "auto") -> pd.DataFrame:
    """The image table of a listing: `layout` is "mimic" (every file must be in the MIMIC-CXR-JPG
    layout), "plain" (no ids) or "auto" (mimic when every file is)."""
    if layout not in ("mimic", "plain", "auto"):
        raise ValueError(f"image layout {layout!r}: use mimic, plain or auto")
    files = image_files(paths)
    if not files:
        raise ImageReadError(f"no {'/'.join(IMAGE_SUFFIXES)} files among {len(paths)} listed paths")
    ids = [mimic_image_ids(p) for p in files]
    if layout == "mimic":
        bad = [p for p, i in zip(files, ids) if i is None]
        if bad:
            raise ImageReadError(
                f"{len(bad)} files are not in the MIMIC-CXR-JPG layout files/pNN/pNNNNNNNN/sNNNNNNNN/<id>.jpg, "
                f"e.g. {bad[0]}; point the source at the files/ folder or set the layout to plain"
            )
    use_mimic = layout == "mimic" or (layout == "auto" and all(i is not None for i in ids))
    rows = [
        {"image_id": i["image_id"], "path": p, "source_id": i["source_id"], "subject_id": i["subject_id"]}
        if use_mimic
        else {"image_id": os.path.splitext(os.path.basename(p))[0], "path": p, "source_id": None, "subject_id": None}
        for p, i in zip(files, ids)
    ]
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def read_table_file(path: str, data: Optional[bytes] = None) -> pd.DataFrame:
    """A CSV or Parquet table (from `data` when given, e.g. read from S3), ids read as strings (a leading zero must survive)."""
    lower = path.lower()
    source = io.BytesIO(data) if data is not None else path
    if lower.endswith(".parquet"):
        return pd.read_parquet(source)
    if lower.endswith((".csv", ".csv.gz")):
        return pd.read_csv(source, dtype=str, keep_default_na=False, compression="gzip" if lower.endswith(".gz") else None)
    raise ImageReadError(f"{path}: an image table must be .csv, .csv.gz or .parquet")


def table_images(
    table: pd.DataFrame,
    where: str,
    path_column: str = "path",
    study_column: str = "study_id",
    subject_column: Optional[str] = None,
    id_format: str = "as_is",
    root: str = "",
) -> pd.DataFrame:
    """The image table of a table of image paths and study ids (`where` names it in errors).

    Relative paths are joined to `root`. `id_format="mimic"` turns integer subject and study ids
    (10000032, 50414267) into the MIMIC report key (p10/p10000032/s50414267); it needs `subject_column`.
    """
    for column in (path_column, study_column, subject_column):
        if column is not None and column not in table.columns:
            raise ImageReadError(f"{where}: no column {column!r} (columns: {list(table.columns)}); set the column name")
    if id_format not in ("as_is", "mimic"):
        raise ValueError(f"image id_format {id_format!r}: use as_is or mimic")
    if id_format == "mimic" and subject_column is None:
        raise ImageReadError(f"{where}: id_format mimic needs the subject id column as well as the study id")
    paths = [p if not root or os.path.isabs(p) or "://" in p else os.path.join(root, p) for p in table[path_column].astype(str)]
    studies = [_id_text(v) for v in table[study_column]]
    subjects = [_id_text(v) for v in table[subject_column]] if subject_column else [None] * len(paths)
    if id_format == "mimic":
        studies, subjects = _mimic_keys(studies, subjects, where)
    image_ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return pd.DataFrame({"image_id": image_ids, "path": paths, "source_id": studies, "subject_id": subjects}, columns=IMAGE_COLUMNS)


def _id_text(value) -> Optional[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    return str(int(value)) if isinstance(value, (int, np.integer, float, np.floating)) else str(value)


def _mimic_keys(studies: list, subjects: list, where: str) -> tuple[list[str], list[str]]:
    keys, patients = [], []
    for row, (study, subject) in enumerate(zip(studies, subjects), start=1):
        study_digits, subject_digits = str(study).lstrip("s"), str(subject).lstrip("p")
        if not (study_digits.isdigit() and subject_digits.isdigit()):
            raise ImageReadError(f"{where} row {row}: study {study!r} / subject {subject!r} are not MIMIC integer ids")
        keys.append(f"p{subject_digits[:2]}/p{subject_digits}/s{study_digits}")
        patients.append(f"p{subject_digits}")
    return keys, patients
