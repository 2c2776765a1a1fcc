"""The main job: `python train_hf.py [options]` runs mdf_mllm.train (also `mdf-mllm-train`, `python -m mdf_mllm.train`;
`python train_hf.py --help` lists the options)."""

from mdf_mllm.train import main

if __name__ == "__main__":
    main()
