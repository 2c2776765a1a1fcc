"""The benchmark scripts that pin numbers rather than time: the 11B layout's counts, and the GPU script's code path."""

import subprocess
import sys

from conftest import ROOT


sys.path.insert(0, str(ROOT / "bench"))


def test_11b_layout_counts_on_the_meta_device():
    import scale_11b

    m = scale_11b.measure()
    # Llama 3.2 11B Vision has 10,670,220,835 parameters (560 px tiles, 40 text layers, vocabulary 128,256 + 8).
    assert m["base_params"] == 10_670_220_835
    assert 0 < m["added_params_pct"] <= 3
    assert 0 < m["added_flops_pct"] <= 5
    assert m["fusion_layers"] == {3: 1, 8: 1, 13: 2, 18: 2, 23: 3, 28: 3, 33: 4, 38: 4}
    assert m["lora_params"] > 0


def test_gpu_script_runs_its_code_path_on_a_tiny_layout():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_11b.py"), "--layout", "tiny"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| MDF-MLLM |", "| Mllama |"))]
    assert len(rows) == 2


def test_phase_report_splits_the_training_loops_from_the_rest_and_sets_the_arms_side_by_side():
    import phase_times

    seconds = {"phases": {"set-up checks": 1.0, "base": 2.0, "stage 1": 40.0, "stage 2: MDF-MLLM": 30.0,
                          "scoring: MDF-MLLM": 3.0, "stage 2: Mllama baseline": 20.0, "probe ladder": 3.0},
               "wall_seconds": 100.0, "other_seconds": 1.0}
    text = phase_times.section(seconds, "`python train_hf.py`", {"wall": 110.0, "peak_gb": 1.5})
    lines = text.splitlines()
    assert lines[0] == phase_times.SECTION
    assert "| stage 1 | 40.0 | 40% |" in lines and "| (outside every phase) | 1.0 | 1% |" in lines
    assert "- training loops (stage 1, the arms): 90.0 s (90%)" in lines  # 40 + 30 + 20; a cached base is no loop
    assert "- everything else: 10.0 s (10%)" in lines and "- MDF-MLLM arm ÷ baseline arm: 1.50×" in lines
    trained = {**seconds, "wall_seconds": 168.0, "phases": {**seconds["phases"], "base": 70.0}}  # minutes: trained
    assert "- training loops (stage 1, the arms, the base): 160.0 s (95%)" in phase_times.section(trained, "", None)


def test_a_bench_section_rewritten_twice_leaves_the_report_as_after_once(tmp_path):
    """Each bench script replaces its own section of bench/REPORT.md; the others keep their text and spacing."""
    from report_sections import write_section

    report = tmp_path / "REPORT.md"
    report.write_text("# Benchmarks\n\nheader\n\n\n## A\n\na text\n\n\n\n## B\n\nb text\n")
    write_section(report, "## A", "## A\n\nnew a\n")
    once = report.read_text()
    assert once == "# Benchmarks\n\nheader\n\n## B\n\nb text\n\n## A\n\nnew a\n"
    write_section(report, "## A", "## A\n\nnew a\n")
    assert report.read_text() == once
    write_section(report, "## C", "## C\n\nc\n")
    assert report.read_text() == once + "\n## C\n\nc\n"
