"""The Python package builds like one: `python -m build` makes an sdist and a wheel from the root
project (pyproject.toml, scikit-build-core); each installs into a new virtual environment, away
from the source tree, and the package there has one version (the CMake project's), its C
extension, the MLflow plugin's entry points, the importer and the [mlflow] and [import] extras."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, importlib.metadata as md, importlib.util, trackd, trackd._trackd
print(json.dumps({
    "version": trackd.__version__, "extension": trackd._trackd.__version__,
    "dist": md.version("trackd"), "file": trackd._trackd.__file__,
    "stores": sorted(e.value for e in md.entry_points(group="mlflow.tracking_store")
                     if e.name == "trackd"),
    "extras": md.metadata("trackd").get_all("Provides-Extra"),
    "requires": md.requires("trackd"),
    "run_id": len(trackd.new_run_id()),
    "importer": importlib.util.find_spec("trackd.importer") is not None,
}))
"""


def run(*args, cwd, timeout=600):
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p.stdout


@pytest.mark.skipif(os.environ.get("TRACKD_SUITE") == "sanitizers",
                    reason="packaging does not depend on how the agent is built")
def test_sdist_and_wheel_install_without_the_source_tree(tmp_path):
    version = re.search(r"project\(trackd VERSION ([0-9.]+)",
                        (ROOT / "CMakeLists.txt").read_text()).group(1)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT), cwd=tmp_path)
    sdist = dist / f"trackd-{version}.tar.gz"
    wheels = list(dist.glob(f"trackd-{version}-*.whl"))
    assert sdist.exists() and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"CMakeLists.txt", "pyproject.toml", "proto/proto.c", "client-shim/src/shim.c",
            "client-shim/python/trackd/__init__.py"} <= names
    assert not any(n.startswith(("agent/", "tests/", "bench/")) for n in names)

    away = tmp_path / "away"  # no source tree above it
    away.mkdir()
    for label, artifact in (("wheel", wheels[0]), ("sdist", sdist)):
        env = tmp_path / f"venv-{label}"
        run(sys.executable, "-m", "venv", str(env), cwd=away)
        run(str(env / "bin" / "pip"), "install", "-q", "--no-deps", str(artifact), cwd=away)
        got = json.loads(run(str(env / "bin" / "python"), "-c", PROBE, cwd=away))
        print(f"\nscenario=package-{label} version={got['version']} file={got['file']}")
        assert got["version"] == got["extension"] == got["dist"] == version
        assert got["file"].startswith(str(env)), got["file"]
        assert got["stores"] == ["trackd.mlflow_plugin:tracking_store"]
        assert got["extras"] == ["mlflow", "import"]
        assert got["requires"] == ['mlflow<3.18,>=2.17; extra == "mlflow"',
                                   'psycopg[binary]>=3.1; extra == "import"',
                                   'PyYAML>=5.4; extra == "import"',
                                   'tqdm>=4.60; extra == "import"']
        assert got["importer"]
        assert got["run_id"] == 32
