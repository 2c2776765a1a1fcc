"""MDF-MLLM: multi-depth U-Net features fused into Llama 3.2 Vision (Mllama) for retinal disease classification.

The model, processor and pipeline are the five Hub files beside this package (`configuration_mdf_mllm`,
`modeling_mdf_mllm`, `image_processing_mdf_mllm`, `processing_mdf_mllm`, `pipeline_mdf_mllm`), which every export
ships as remote code. This package trains, evaluates, exports and serves them; its modules stand on floors, each
importing only those below:

    messages, handler                              plain helpers; the Inference Endpoints handler template
    job                                            a job's settings: the argument groups and the `Job`
    model_setup, probe_ladder, explain,            models and processors: set-up, probes, explanation maps,
      real_photos                                  answers on the real photos available offline
    metrics, comparison, tables, plots,            reporting: one module per job
      model_card
    training, stage1                               data, the Trainer, evaluation; stage 1 (the U-Net alone)
    stages, export                                 the base, a stage-2 model, the references; the Hub export
    ablation                                       the ablation table
    train, cli, demo, __main__                     entry points: the job, `mdf-mllm`, the Gradio demo

Importing the package imports none of them.
"""

import logging

# transformers' Trainer imports peft whenever it is installed, and peft imports bitsandbytes, whose import logs that
# it could not fetch an optional CPU 4-bit kernel from the Hub ("kernels-community"): noise for every command that uses
# no 4-bit weights (and offline it can never succeed; 4-bit steps run on bitsandbytes' own CPU kernels all the same).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
