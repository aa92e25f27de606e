"""Packaging: parallel/ installs as lh_cp.parallel, editable and plain; the CLI demo runs."""

import re
import subprocess
import sys
from pathlib import Path

import lh_cp
import lh_cp.parallel
from lh_cp.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_editable_or_source_import_maps_parallel_folder():
    assert Path(lh_cp.parallel.__file__).resolve().parent.name == "parallel"
    assert Path(lh_cp.__file__).resolve().parent.name == "lh_cp"


def test_plain_install_imports_lh_cp_parallel(tmp_path):
    """`pip install .` (no editable) into a fresh target: lh_cp.parallel imports from there and
    nothing called plain `parallel` lands beside it."""
    target = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert (target / "lh_cp" / "parallel" / "__init__.py").is_file()
    assert not (target / "parallel").exists()
    check = subprocess.run(
        [sys.executable, "-c", "import lh_cp.parallel, lh_cp; print(lh_cp.parallel.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(target))


def test_cli_demo_prints_selected_length_speed_and_error(capsys):
    code = main(
        [
            "demo",
            "--n",
            "2048",
            "--heads",
            "2",
            "--dim",
            "16",
            "--topk",
            "32",
            "--tile-budget",
            "8",
            "--repeats",
            "1",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "selected length S = 384 " in text  # 2048/16 + 2*4*32
    error = float(re.search(r"max \|out - float64 reference\| = (\S+)", text).group(1))
    assert 0 < error < 1e-5
    assert re.search(r"speedup \d+\.\d+x", text)


def test_cli_demo_rejects_invalid_configuration(capsys):
    assert main(["demo", "--n", "1001", "--topk", "256", "--tile-budget", "32"]) == 2
    assert "N % T == 0 fails" in capsys.readouterr().err
