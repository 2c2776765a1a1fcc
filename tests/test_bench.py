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
