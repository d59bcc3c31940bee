"""The U²-Net networks, their weights, the engines that run them and the pipeline around them.

Importing it loads nothing heavy: PyTorch only where the torch engine or the network's module
(:mod:`model.u2net`) is asked for.
"""
