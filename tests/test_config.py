"""Typed config: shipped files, overrides, clear errors; the learning-rate schedule."""

from __future__ import annotations

import glob
import os

import pytest

from pipeline import config
from pipeline.build import lr_at
from pipeline.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = config.load(path)
    from pipeline import tnt

    assert cfg.model.variant in tnt.VARIANTS


def test_paper_recipe_in_tnt_s():
    c = config.load(os.path.join(ROOT, "configs", "tnt_s.yaml"))
    assert (c.optim.lr, c.optim.lr_batch, c.optim.eps, c.optim.weight_decay, c.optim.epochs) == (
        1e-3,
        1024,
        1e-8,
        0.05,
        300,
    )
    assert (c.optim.warmup_epochs, c.optim.warmup_lr, c.optim.min_lr, c.model.drop_path, c.train.ema_decay) == (
        5,
        1e-6,
        1e-5,
        0.1,
        0.99996,
    )
    assert (c.aug.auto_augment, c.aug.mixup, c.aug.cutmix, c.aug.label_smoothing, c.aug.re_prob) == (
        "rand-m9-mstd0.5-inc1",
        0.8,
        1.0,
        0.1,
        0.25,
    )
    assert c.aug.mean == c.aug.std == (0.5, 0.5, 0.5)


def test_paper_recipe_in_tnt_b():
    c = config.load(os.path.join(ROOT, "configs", "tnt_b.yaml"))
    s = config.load(os.path.join(ROOT, "configs", "tnt_s.yaml"))
    assert c.model.variant == "tntp_b_patch16_224" and c.model.drop_path == 0.1
    for section in ("optim", "aug"):  # the same recipe as TNT-S (Han et al. 2021, Table 2)
        assert getattr(c, section) == getattr(s, section)
    assert (c.train.ema, c.train.ema_decay, c.data.repeats) == (True, 0.99996, s.data.repeats)


@pytest.mark.parametrize(
    "train,data",
    [
        ("shards/mnist/train", "mnist"),
        ("/data/shards/flowers/val", "flowers"),
        ("/x/mydata", "mydata"),
        ("/x/mydata/", "mydata"),
    ],
)
def test_mlflow_names_come_from_the_data_set(train, data):
    c = config.load(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), [f"data.train={train}"])
    assert c.data_name == data
    assert c.named(c.mlflow.register_as) == f"tnt-tiny-{data}" and c.named(c.mlflow.experiment) == f"tntpipe-{data}"


@pytest.mark.parametrize(
    "variant,model",
    [
        ("tntp_s_patch16_224", "tnt-s"),
        ("tntp_b_se_patch16_224", "tnt-b-se"),
        ("tntp_digits_imgconv_patch8_32", "tnt-digits-imgconv"),
    ],
)
def test_the_registered_name_is_the_model_trained_not_the_parent(variant, model):
    """configs/finetune.yaml registered a fine-tuned digits model as tnt-s-mnist (its
    register_as was tnt-s-{data}); {model} is the variant actually trained."""
    c = config.load(
        os.path.join(ROOT, "configs", "finetune.yaml"), [f"model.variant={variant}", "data.train=shards/mnist/train"]
    )
    assert c.named(c.mlflow.register_as) == f"{model}-mnist"
    c = config.load("", [f"model.variant={variant}", "train.out=runs/{model}-{data}", "data.train=shards/pets/train"])
    assert c.out_dir == f"runs/{model}-pets"
    with pytest.raises(InputError, match=r"mlflow.register_as='\{modl\}-x': not a name template \(KeyError: 'modl'"):
        config.load("", ["mlflow.register_as='{modl}-x'"])


def test_overrides_and_errors():
    c = config.load(
        "",
        [
            "train.zero_stage=3",
            "train.ema=false",
            "optim.lr=4e-3",
            "aug.scale=[0.5, 1.0]",
            "name=x",
            "train.out=/tmp/{name}",
        ],
    )
    assert c.train.zero_stage == 3 and c.optim.lr == 4e-3 and c.aug.scale == (0.5, 1.0) and c.out_dir == "/tmp/x"
    with pytest.raises(InputError, match=r"unknown config key train.zero \(valid: .*zero_stage"):
        config.load("", ["train.zero=1"])
    with pytest.raises(InputError, match="wants a value of type int"):
        config.load("", ["train.micro_batch=big"])
    with pytest.raises(InputError, match="no config file"):
        config.load("/nonexistent.yaml")
    assert "train.zero_stage = 1" in config.describe()


def test_schedule_warmup_then_cosine():
    o = config.OptimCfg(warmup_lr=1e-6, min_lr=1e-5)
    lrs = [lr_at(s, o, 1e-3, 10, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx((1e-3 + 1e-5) / 2) and lrs[110] == pytest.approx(1e-5)


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    """A broken --config (or override) is one line naming the file, line and column: not
    yaml's multi-line report, through the trainer's and the launcher's entry points too."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch: 4: 5\n")
    with pytest.raises(InputError) as e:
        config.load(str(bad))
    assert str(e.value).startswith(f"{bad}: line 2, column ") and "\n" not in str(e.value), str(e.value)
    with pytest.raises(InputError, match=r"^override 'train.seed=\[1': line 1, column \d+: not valid YAML"):
        config.load("", ["train.seed=[1"])
    assert config.load("", ["train.seed=0"]).train.seed == 0  # a falsy value stays itself
    with pytest.raises(InputError, match="mapping of sections"):
        (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
        config.load(str(tmp_path / "list.yaml"))
    for entry in (
        [sys.executable, "-m", "pipeline.train"],
        [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--nproc", "1", "--"],
    ):
        out = tmp_path / "out"
        proc = subprocess.run(
            [*entry, "--config", str(bad), f"train.out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "line 2" in lines[0], (
            proc.stderr[-2000:]
        )
        assert not out.exists()


def _bad_values(key: str, default) -> list[str]:
    """Override values of the wrong type for ``key`` (YAML text)."""
    if isinstance(default, bool) or default is None:
        return ["maybe", "[1]", "2"]
    if isinstance(default, (int, float)):
        return ["x", "[1]", "true", "{a: 1}"]
    if isinstance(default, tuple):
        return ["x", "1", "[]", "[x, y, z, w]", "[" + ", ".join(["true"] * len(default)) + "]"]
    return ["[1]", "{a: 1}", "5"]


# keys where 0 means "off" or "none" (accepted), and those where any size goes (no upper bound)
ZERO_OK = {
    "model.drop_path",
    "data.workers",
    "data.shuffle_buffer",
    "data.eval_batch",
    "data.timeout_s",
    "data.backoff_s",
    "data.cache_limit",
    "optim.min_lr",
    "optim.warmup_lr",
    "optim.warmup_epochs",
    "optim.weight_decay",
    "optim.clip_grad",
    "optim.betas",
    "train.zero_stage",
    "train.ema_decay",
    "train.seed",
    "train.max_steps",
    "train.eval_every",
    "mlflow.figures",
    "train.ckpt_every",
    "train.ckpt_every_min",
    "train.device_peak_tflops",
    "train.lock_wait_s",
    "train.heartbeat_timeout_s",
    "aug.hflip",
    "aug.color_jitter",
    "aug.mean",
    "aug.re_prob",
    "aug.mixup",
    "aug.cutmix",
    "aug.mixup_prob",
    "aug.mixup_switch_prob",
    "aug.label_smoothing",
}
UNBOUNDED = {
    "data.timeout_s",
    "data.read_timeout_s",
    "data.cache_limit",
    "optim.clip_grad",
    "train.ckpt_every",
    "train.ckpt_every_min",
    "train.eval_every",
    "train.log_every",
    "train.max_nonfinite",
    "train.device_peak_tflops",
    "train.dist_timeout_s",
    "train.lock_wait_s",
    "train.heartbeat_timeout_s",
    "aug.color_jitter",
    "aug.mixup",
    "aug.cutmix",
}


def test_every_key_refuses_a_wrong_type_and_an_out_of_range_value_in_one_line():
    """A fuzz over every config key: values of the wrong type, and 0, -1, a huge value,
    NaN, infinity and an empty value for every numeric one (0 where 0 means nothing),
    an empty string where a name or path is needed: each an InputError of one line
    naming the key. The zeros that mean "off" and the huge values where any size goes
    still load (the ranges do not refuse what the README documents)."""
    flat = config.Config().flat()
    refused = accepted = 0

    def refuses(key: str, text: str) -> bool:
        try:
            config.load("", [f"{key}={text}"])
        except InputError as e:
            assert "\n" not in str(e) and key.split(".")[-1] in str(e), (key, text, str(e))
            return True
        return False

    for key, default in flat.items():
        for text in _bad_values(key, default):
            assert refuses(key, text), (key, text)
            refused += 1
        numeric = isinstance(default, (int, float, tuple)) and not isinstance(default, bool) and default is not None
        if numeric:
            n = len(default) if isinstance(default, tuple) else 0

            def value(x: str) -> str:
                return f"[{', '.join([x] * n)}]" if n else x

            bad = ["-1", ".nan", ".inf", "''"] if key != "aug.mean" else [".nan", ".inf", "-1e9", "''"]
            if key not in UNBOUNDED:
                bad.append("1e300" if isinstance(default, float) or n else str(10**30))
            for text in bad:
                assert refuses(key, value(text) if text != "''" else text), (key, text)
                refused += 1
            if key in UNBOUNDED:
                assert not refuses(key, value("1e300" if isinstance(default, float) else str(10**30))), key
                accepted += 1
            if key in ZERO_OK:
                assert not refuses(key, value("0")), key
                accepted += 1
            else:
                assert refuses(key, value("0")), key
                refused += 1
    for key in (
        "name",
        "model.variant",
        "data.train",
        "train.out",
        "mlflow.experiment",
        "aug.interpolation",
        "aug.re_mode",
    ):
        assert refuses(key, "''") and refuses(key, "' '" if key != "aug.re_mode" else "x"), key
    for key in ("data.val", "mlflow.register_as", "model.init_from", "data.url_base"):  # "" is "none" there
        assert not refuses(key, ""), key
    assert refuses("model.variant", "tntp_huge") and refuses("aug.scale", "[1.0, 0.5]")
    assert refused > 250 and accepted > 40, (refused, accepted)


@pytest.mark.parametrize("launcher", ["trainer", "local", "slurm"])
def test_a_bad_value_is_one_line_exit_2_and_nothing_written(tmp_path, launcher):
    """train.micro_batch=0 was a ZeroDivisionError traceback, exit 1 and a failure record
    (which Slurm's companion treats as a fault and resubmits); -4 a ValueError after
    train.out was made. Now: one line, exit 2, nothing on disk, nothing submitted
    (launch/slurm.py checks the config before it asks Slurm for anything)."""
    import subprocess
    import sys

    entry = {
        "trainer": [sys.executable, "-m", "pipeline.train"],
        "local": [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--nproc", "1", "--"],
        "slurm": [sys.executable, os.path.join(ROOT, "launch", "slurm.py"), "--dry-run", "--"],
    }[launcher]
    for value in ("0", "-4"):
        out = tmp_path / f"out{value}"
        proc = subprocess.run(
            [
                *entry,
                "--config",
                os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
                f"train.out={out}",
                f"train.micro_batch={value}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines == [f"error: train.micro_batch must be in [1, 1048576], not {value}"], (
            proc.returncode,
            proc.stderr[-2000:],
        )
        assert not out.exists() and os.listdir(tmp_path) == [] and "#SBATCH" not in proc.stdout


def test_the_slurm_launchers_help_and_dry_run_import_neither_torch_nor_pil():
    """A login node without a GPU stack: `launch/slurm.py --help` and `--dry-run` load the
    configuration (and its augmentation settings) without torch or PIL."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = (
        "import runpy, sys; sys.argv = ['launch/slurm.py'] + sys.argv[1:]\n"
        "try:\n    runpy.run_path('launch/slurm.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('loaded:', sorted({'torch', 'PIL', 'timm'} & set(sys.modules)))"
    )
    for args in (["--help"], ["--nodes", "2", "--dry-run", "--", "--config", "configs/tiny_cpu.yaml"]):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args], cwd=root, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.splitlines()[-1] == "loaded: []", (args, proc.stdout[-500:])
        assert "--nodes" in proc.stdout or "sbatch" in proc.stdout or "#SBATCH" in proc.stdout
