"""DG-Net++ in PyTorch Lightning."""
