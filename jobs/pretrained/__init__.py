"""Pretrained unimodal weights in and out of mmpt models, in Hugging Face's checkpoint format.

    checkpoint.py  read/write HF model folders (config.json + safetensors / pytorch_model.bin), local or s3://
    mapping.py     name and shape maps: BERT-style text encoders and ViT-style image encoders <-> mmpt towers
    load.py        `model.init`: plan (loaded / skipped / new) and apply to a built model

Used where a run's model is built (jobs/engine.py, before DeepSpeed wraps it), by the driver to
check and report the plan before anything starts, and by `mmpt export`.
"""
