"""Checkpoint files as named tensors: safetensors, PyTorch `.pth` (read without pickle),
Hugging Face folders and rwkv.cpp's ggml `.bin`, all through `tensorfile`'s TensorSource.

They know bytes and names, not models: `rwkvx.loader` turns the tensors into weights.
"""
