"""bench/age_probe.py: which photos' histories write an age, and its bin."""

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("age_probe", ROOT / "bench" / "age_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_age_bins_reads_the_written_age_into_the_comparisons_bins():
    texts = ["12-year-old male. Central blur.", "", None, "66-year-old woman", "30-year-old; IOP 16 mmHg",
             "Onset at 17 years", "16-year-old"]
    rows, bins = load_bench().age_bins(texts)
    # AGE_BINS = (17, 30, 50, 66): bins [0, 17), [17, 30), [30, 50), [50, 66), [66, ...)
    assert rows.tolist() == [0, 3, 4, 6]
    assert bins.tolist() == [0, 4, 2, 0]
    assert np.issubdtype(bins.dtype, np.integer)
