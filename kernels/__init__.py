"""Fused distillation kernels (generalized JSD over large vocabularies)."""
