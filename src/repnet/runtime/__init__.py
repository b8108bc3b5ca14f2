"""Where training steps run besides eager PyTorch (one sub-package per runtime)."""
