"""The installed layout: the wheel adds only the mdf_mllm package, dataset_builder and the four Hub files, works from
any folder, and no module imports one on a higher floor (so there is no import circle)."""

import ast
import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

from conftest import ROOT

HUB_FILES = {"configuration_mdf_mllm", "modeling_mdf_mllm", "image_processing_mdf_mllm", "processing_mdf_mllm",
             "pipeline_mdf_mllm"}

# Lowest first. A module imports only modules before it: those of a lower floor, or earlier on its own floor.
FLOORS = (
    ("configuration_mdf_mllm", "modeling_mdf_mllm", "image_processing_mdf_mllm", "processing_mdf_mllm",
     "pipeline_mdf_mllm"),  # the Hub files
    ("mdf_mllm", "mdf_mllm.messages", "mdf_mllm.handler"),  # helpers
    ("dataset_builder",),  # data: the sources (which the job's options name) and the data sets
    ("mdf_mllm.job",),  # a job's settings
    ("mdf_mllm.model_setup", "mdf_mllm.probe_ladder", "mdf_mllm.explain", "mdf_mllm.real_photos"),  # models, processors
    ("mdf_mllm.metrics", "mdf_mllm.calibration", "mdf_mllm.comparison", "mdf_mllm.tables", "mdf_mllm.plots",
     "mdf_mllm.model_card"),  # reporting
    ("mdf_mllm.training", "mdf_mllm.guards", "mdf_mllm.stage1"),  # data, Trainer, evaluation; stage 1; checks
    ("mdf_mllm.stages", "mdf_mllm.export", "mdf_mllm.ablation"),  # the base, stage 2, references; export; ablation
    ("mdf_mllm.main_job", "mdf_mllm.cli", "mdf_mllm.demo", "mdf_mllm.__main__"),  # entry points
)
RANK = {name: rank for rank, name in enumerate(name for floor in FLOORS for name in floor)}


def module_name(path: Path) -> str:
    """The module a file is, as the floors name it (dataset_builder's files are one unit)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "dataset_builder":
        return "dataset_builder"
    return ".".join(part for part in parts if part != "__init__")


def imported(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in it (at the top or inside a function), as FLOORS names them."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and path.parent == ROOT:  # a Hub file's relative import of another
            names = [node.module]
        else:  # dataset_builder's relative imports stay inside it
            continue
        found |= {name if name in RANK else name.split(".")[0] for name in names}
    return found & set(RANK) - {module_name(path)}


def project_files() -> list[Path]:
    return [*(ROOT / f"{name}.py" for name in HUB_FILES), *ROOT.glob("mdf_mllm/*.py"), *ROOT.glob("dataset_builder/*.py")]


def test_every_package_module_has_a_floor():
    assert {module_name(path) for path in project_files()} == set(RANK)


def test_no_module_imports_a_higher_floor():
    upward = [f"{module_name(path)} imports {name}" for path in project_files() for name in sorted(imported(path))
              if RANK[name] >= RANK[module_name(path)]]
    assert upward == []


def site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def test_the_wheel_adds_only_the_package_dataset_builder_and_the_hub_files(tmp_path):
    # Built from a copy, so that setuptools' build/ and egg-info folders stay out of the repository.
    source, wheels, venv, elsewhere = (tmp_path / name for name in ("source", "wheels", "venv", "elsewhere"))
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", "tests", "bench"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("mdf_mllm-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The fresh venv sees the test venv's packages (torch, transformers, ...) after its own, but not its .pth files
    # (an editable install of this repository among them).
    (site_packages(venv) / "test_venv.pth").write_text(str(site_packages(Path(sys.prefix))) + "\n")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
                    "--no-compile", str(wheel)], check=True, capture_output=True, timeout=300)

    (record,) = site_packages(venv).glob("mdf_mllm-*.dist-info/RECORD")
    paths = [line.split(",")[0] for line in record.read_text().splitlines()]
    top_level = {Path(path).parts[0].removesuffix(".py") for path in paths if not path.startswith("..")}
    assert top_level - {record.parent.name} == {"mdf_mllm", "dataset_builder", *HUB_FILES}

    elsewhere.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"}
    script = textwrap.dedent("""
        import json
        import mdf_mllm, mdf_mllm.ablation, mdf_mllm.main_job
        from mdf_mllm import export, metrics
        from dataset_builder import load
        report = metrics.classification_report([0, 1], [0, 1], ["normal", "amd"], ["normal", "acquired"], n_bootstrap=5)
        print(json.dumps({"package": mdf_mllm.__file__, "handler": export.HANDLER_SOURCE.is_file(),
                          "accuracy": report["disease"]["accuracy"]}))
    """)
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site_packages(venv))
    assert found["handler"] and found["accuracy"] == 1.0  # the metric module and the handler template are shipped
    for command in ("mdf-mllm", "mdf-mllm-train"):
        result = subprocess.run([command, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-3000:]


def test_a_jobs_settings_travel_as_one_object_taken_first():
    """A function of the package that needs a job's settings takes the one `Job`, as its first parameter, or the run
    that holds it (`RunContext`, named `run`, first), or the one part of it that it reads (`ModelArguments` for the
    model's builders, `DataArguments` for the data): never two parts side by side, which could be swapped or drift
    apart."""
    import importlib
    import inspect

    from mdf_mllm.job import DataArguments, Job, MdfTrainingArguments, ModelArguments, RunArguments
    from mdf_mllm.training import RunContext

    parts = {"model_args": ModelArguments, "data_args": DataArguments, "run_args": RunArguments,
             "training_args": MdfTrainingArguments}
    taking_job = []
    for path in ROOT.glob("mdf_mllm/*.py"):
        if path.stem == "__main__":  # importing it runs the command
            continue
        module = importlib.import_module(f"mdf_mllm.{path.stem}" if path.stem != "__init__" else "mdf_mllm")
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if function.__module__ != module.__name__:
                continue
            parameters = inspect.signature(function).parameters
            annotated = {p.name: p.annotation for p in parameters.values()}
            where = f"{module.__name__}.{name}"
            if "job" in parameters or Job in annotated.values():
                taking_job.append(where)
                assert list(parameters)[0] == "job" and annotated["job"] is Job, where
            if RunContext in annotated.values():
                taking_job.append(where)
                assert list(parameters)[0] == "run" and annotated["run"] is RunContext, where
                assert "job" not in parameters, where
            settings = [p for p, annotation in annotated.items() if p in parts or annotation in parts.values()]
            assert len(settings) + ("job" in parameters) <= 1, f"{where}: {settings}"
    assert len(taking_job) >= 20, taking_job
