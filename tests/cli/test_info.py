"""``cryodeploy info`` with and without optional packages, and the import-weight rule."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from click.testing import CliRunner

from cryodeploy.cli import cli

HEAVY = ("torch", "onnxruntime", "tensorrt")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_info_text() -> None:
    res = CliRunner().invoke(cli, ["info"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "versions:" and "devices:" in lines and "backends:" in lines
    assert any(line.split() == ["python", platform.python_version()] for line in lines)
    assert any(line.split()[:2] == ["torch", "available"] for line in lines)
    assert any(line.split()[0] == "cpu" and f"threads={os.cpu_count()}" in line for line in lines)


def test_info_json() -> None:
    res = CliRunner().invoke(cli, ["info", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert set(data) == {"versions", "devices", "backends"}
    import numpy
    import torch

    assert data["versions"]["python"] == platform.python_version()
    assert data["versions"]["numpy"] == numpy.__version__
    assert data["versions"]["torch"] == torch.__version__
    assert data["devices"][0]["device"] == "cpu" and data["devices"][0]["threads"] == os.cpu_count()
    cuda = [d for d in data["devices"] if d["device"].startswith("cuda")]
    assert len(cuda) == torch.cuda.device_count()
    for dev in cuda:
        assert {"name", "memory_gib", "compute_capability"} <= set(dev)
    assert data["backends"]["torch"] == {"available": True, "reason": "available"}
    for entry in data["backends"].values():
        assert isinstance(entry["available"], bool) and entry["reason"] and "\n" not in entry["reason"]


def test_info_runs_without_optional_packages() -> None:
    res = _python(
        "import sys; sys.modules['onnxruntime'] = None; sys.modules['tensorrt'] = None\n"
        "from cryodeploy.cli import main\n"
        "main(['info'])"
    )
    assert res.returncode == 0, res.stderr
    lines = [line.split(maxsplit=1) for line in res.stdout.splitlines() if line.strip()]
    versions = {k: v for k, *rest in lines for v in rest}
    assert versions["onnxruntime"] == "not installed"
    assert versions["tensorrt"] == "not installed"
    assert versions["ort"].startswith("unavailable: onnxruntime: not installed")
    assert versions["torch"] == "available"


def test_import_and_help_do_not_import_heavy_packages() -> None:
    res = _python(
        "import sys, contextlib, io\n"
        "import cryodeploy\n"
        f"after_import = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "from cryodeploy.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        f"after_help = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(after_import, after_help, 'synth' in out.getvalue())"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]", "[]", "True"]
