"""Shipped checkpoints as package data: safetensors files and manifest.json (see README.md here). Code finds this
folder with ``importlib.resources.files("pretrained")`` (bench.adapters.checkpoints.pretrained_dir), or the folder
named by $SAMPLERBENCH_PRETRAINED instead."""
