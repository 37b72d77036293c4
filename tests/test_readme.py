"""README.md's code blocks run: every ``python`` block is executed as written in a
fresh process (the installed environment, the current directory elsewhere); every
``launch/slurm.py`` command of the ``bash`` blocks is run with ``--dry-run``, which
loads and checks the trainer's config as the job would; every other command's script
exists and its ``--help`` works (for ``mlflow``: the subcommand and the options given)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(lang: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)


def commands() -> list[str]:
    """The bash blocks' commands, continuation lines joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block_runs(index, tmp_path):
    code = blocks("python")[index]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, f"README python block {index}:\n{code}\n{proc.stderr[-3000:]}"


def test_readme_has_blocks_to_run():
    assert len(blocks("python")) >= 1 and len(commands()) >= 10


@pytest.mark.parametrize("line", [c for c in commands() if "launch/slurm.py" in c])
def test_readme_slurm_command_is_valid(line, tmp_path):
    argv = shlex.split(line)
    argv = argv[argv.index("launch/slurm.py") :]
    argv = [sys.executable, os.path.join(ROOT, argv[0]), "--dry-run", "--folder", str(tmp_path), *argv[1:]]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
    assert "#SBATCH" in proc.stdout


@pytest.mark.parametrize("line", sorted({c for c in commands() if "launch/slurm.py" not in c}))
def test_readme_command_exists_and_explains_itself(line):
    argv = shlex.split(line)
    if argv[0] in ("export",):
        return
    if argv[0] == "bash":
        assert os.path.isfile(os.path.join(ROOT, argv[1])), line
        return
    if os.path.basename(argv[0]) == "mlflow":  # MLflow's CLI (serving): the subcommand and its options exist
        sub = [a for a in argv[1:] if not a.startswith("-")][:2]
        proc = subprocess.run(
            [sys.executable, "-m", "mlflow", *sub, "--help"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
        assert all(opt in proc.stdout for opt in argv[1:] if opt.startswith("--")), f"{line}\n{proc.stdout[-2000:]}"
        return
    assert os.path.basename(argv[0]) == "python", line
    argv[0] = "python"  # .venv/bin/python: the venv's, as the README writes it where no venv is active
    target = ["-m", argv[2]] if argv[1] == "-m" else [os.path.join(ROOT, argv[1])]
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, f"{line}\n{proc.stderr[-2000:]}"
    # the usage line names the command as the README writes it
    assert proc.stdout.startswith(f"usage: {' '.join(argv[:3] if argv[1] == '-m' else argv[:2])}"), proc.stdout[:200]
    # and every flag the README gives it exists; after "--", the trainer's flags and config keys
    own, rest = (argv[2:], []) if "--" not in argv else (argv[2 : argv.index("--")], argv[argv.index("--") + 1 :])
    flags = [a.split("=")[0] for a in own if a.startswith("--")]
    assert all(f in proc.stdout for f in flags), (line, [f for f in flags if f not in proc.stdout])
    if rest:
        trainer = subprocess.run(
            [sys.executable, "-m", "pipeline.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout
        assert all(a in trainer for a in rest if a.startswith("--")), line
    from pipeline import config

    keys = set(config.Config().flat())
    overrides = [
        a.split("=")[0] for a in (rest or own) if "=" in a and not a.startswith("-") and "." in a.split("=")[0]
    ]
    assert all(k in keys for k in overrides), (line, [k for k in overrides if k not in keys])
