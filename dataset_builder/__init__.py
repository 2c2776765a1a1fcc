"""Datasets for MDF-MLLM: FIVES, HRF, StoneRounds, labelled image folders and a synthetic fundus set, in one schema.

    >>> from dataset_builder import load
    >>> data = load("synthetic", num_images=64, image_size=128)      # DatasetDict: train / validation / test
    >>> data = load("all", fives="FIVES", hrf="HRF", stonerounds="StoneRounds")

CLI: `python -m dataset_builder build --dataset all --fives DIR --hrf DIR --stonerounds DIR --output_dir DIR` and
`python -m dataset_builder preview --dataset synthetic --out sheet.png`.
"""

from .builder import (
    CONFIG_NAMES,
    FEATURES,
    MdfFundus,
    MdfFundusConfig,
    assign_splits,
    build,
    config_names,
    export_imagefolder,
    export_parquet,
    load,
    make_builder,
    report_markdown,
    split_report,
    write_report,
)
from .sources import (
    SOURCES,
    Record,
    Skipped,
    Source,
    case_text,
    read_fives,
    read_hrf,
    read_manifest,
    read_stonerounds,
    register,
    resolve_label,
)
from .synthetic import DEFAULT_COMPOSITION, TINY_COMPOSITION, generate, plan, render_fundus


__all__ = [
    "CONFIG_NAMES",
    "DEFAULT_COMPOSITION",
    "FEATURES",
    "MdfFundus",
    "MdfFundusConfig",
    "Record",
    "SOURCES",
    "Skipped",
    "Source",
    "TINY_COMPOSITION",
    "assign_splits",
    "build",
    "case_text",
    "config_names",
    "export_imagefolder",
    "export_parquet",
    "generate",
    "load",
    "make_builder",
    "plan",
    "read_fives",
    "read_hrf",
    "read_manifest",
    "read_stonerounds",
    "register",
    "render_fundus",
    "report_markdown",
    "resolve_label",
    "split_report",
    "write_report",
]
