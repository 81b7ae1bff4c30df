"""Checkpoints of compressed pytrees: safetensors, orbax, expand (see README.md here)."""
