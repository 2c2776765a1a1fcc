"""The main job: `python train_hf.py [options]` runs mdf_mllm.main_job (also `mdf-mllm-train`,
`python -m mdf_mllm.main_job`; `python train_hf.py --help` lists the options)."""

from mdf_mllm.main_job import main

if __name__ == "__main__":
    main()
