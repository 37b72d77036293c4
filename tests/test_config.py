"""Typed config: shipped files, overrides, clear errors; the learning-rate schedule."""

from __future__ import annotations

import glob
import os

import pytest

from pipeline import config
from pipeline.imagenet import InputError
from pipeline.train import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = config.load(path)
    from pipeline import tnt

    assert cfg.model.variant in tnt.VARIANTS


def test_paper_recipe_in_tnt_s():
    c = config.load(os.path.join(ROOT, "configs", "tnt_s.yaml"))
    assert (c.optim.lr, c.optim.lr_batch, c.optim.eps, c.optim.weight_decay, c.optim.epochs) == (1e-3, 1024, 1e-8, 0.05, 300)
    assert (c.optim.warmup_epochs, c.optim.warmup_lr, c.optim.min_lr, c.model.drop_path, c.train.ema_decay) == (5, 1e-6, 1e-5, 0.1, 0.99996)
    assert (c.aug.auto_augment, c.aug.mixup, c.aug.cutmix, c.aug.label_smoothing, c.aug.re_prob) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25)
    assert c.aug.mean == c.aug.std == (0.5, 0.5, 0.5)


def test_paper_recipe_in_tnt_b():
    c = config.load(os.path.join(ROOT, "configs", "tnt_b.yaml"))
    s = config.load(os.path.join(ROOT, "configs", "tnt_s.yaml"))
    assert c.model.variant == "tntp_b_patch16_224" and c.model.drop_path == 0.1
    for section in ("optim", "aug"):  # the same recipe as TNT-S (Han et al. 2021, Table 2)
        assert getattr(c, section) == getattr(s, section)
    assert (c.train.ema, c.train.ema_decay, c.data.repeats) == (True, 0.99996, s.data.repeats)


@pytest.mark.parametrize("train,data", [("shards/mnist/train", "mnist"), ("/data/shards/flowers/val", "flowers"),
                                        ("/x/mydata", "mydata"), ("/x/mydata/", "mydata")])
def test_mlflow_names_come_from_the_data_set(train, data):
    c = config.load(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), [f"data.train={train}"])
    assert c.data_name == data
    assert c.named(c.mlflow.register_as) == f"tnt-tiny-{data}" and c.named(c.mlflow.experiment) == f"tntpipe-{data}"


def test_overrides_and_errors():
    c = config.load("", ["train.zero_stage=3", "train.ema=false", "optim.lr=4e-3", "aug.scale=[0.5, 1.0]", "name=x", "train.out=/tmp/{name}"])
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
    for entry in ([sys.executable, "-m", "pipeline.train"], [sys.executable, os.path.join(ROOT, "launch", "local.py"),
                                                             "--nproc", "1", "--"]):
        out = tmp_path / "out"
        proc = subprocess.run([*entry, "--config", str(bad), f"train.out={out}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "line 2" in lines[0], \
            proc.stderr[-2000:]
        assert not out.exists()
