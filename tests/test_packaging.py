"""Packaging guardrails: one import root, light `import deltahub`, plugins through entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/").stdout


def test_import_deltahub_stays_light() -> None:
    out = _run("import sys, deltahub; print(sorted(m for m in ('torch', 'triton', 'fsspec', 's3fs', 'huggingface_hub', "
               "'safetensors', 'transformers') if m in sys.modules))")
    assert out.strip() == "[]"


def test_kernels_import_no_triton() -> None:
    out = _run("import sys, deltahub.kernels; print('triton' in sys.modules)")
    assert out.strip() == "False"


def test_cli_help_does_not_import_torch() -> None:
    out = _run("import sys\nfrom deltahub.cli import cli\ntry:\n    cli.main(['--help'], standalone_mode=False)\n"
               "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'triton' in sys.modules)")
    assert out.strip().endswith("False False")


def test_no_bare_top_level_packages() -> None:
    out = _run("import importlib.util as u; print([n for n in ('kernels', 'plugins', 'registry') if u.find_spec(n)])")
    assert out.strip() == "[]"


def test_builtin_codecs_register_through_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="deltahub.codecs") if ep.dist and ep.dist.name == "deltahub"}
    assert names["dense"] == "deltahub.plugins.dense:DenseCodec"
    assert names["compeft"] == "deltahub.plugins.compeft:CompeftCodec"


@pytest.mark.slow
def test_wheel_holds_only_deltahub(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("deltahub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"deltahub", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for sub in ("plugins/compeft.py", "kernels/apply.py", "kernels/cpu_kernels.c", "registry/api.py", "cli/core.py",
                "serving/pool.py", "integrations/vllm.py"):
        assert f"deltahub/{sub}" in names
