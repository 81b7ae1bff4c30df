"""Checkpoints of compressed pytrees: safetensors files, orbax directories, expand (see README.md)."""
