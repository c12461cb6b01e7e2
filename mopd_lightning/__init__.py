"""Multi-Rollout On-Policy Distillation on PyTorch Lightning."""
