"""The U²-Net networks, their weights and the inference pipeline on tensors."""

from model.u2net import U2Net, fuse_batchnorm, u2net, u2netp
from model.weights import SPECS, WeightsError, WeightsSpec, default_weights_path, load_state_dict

__all__ = [
    "SPECS",
    "U2Net",
    "WeightsError",
    "WeightsSpec",
    "default_weights_path",
    "fuse_batchnorm",
    "load_state_dict",
    "u2net",
    "u2netp",
]
