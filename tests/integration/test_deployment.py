"""The systemd unit in agent/systemd: systemd accepts it, and its hardening keeps the exposure
score systemd-analyze gives it low."""
import re
import shutil
import subprocess

import pytest
from harness import BUILD

UNIT = BUILD.parent / "agent" / "systemd" / "trackd.service"


@pytest.fixture
def unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names the installed binary; point it at the one built here.
    path = tmp_path / "trackd.service"
    path.write_text(UNIT.read_text().replace("/usr/local/bin/trackd", str(BUILD / "trackd")))
    return path


def test_unit_verifies(unit):
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = UNIT.read_text()
    for line in ("User=trackd", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "RuntimeDirectory=trackd", "StateDirectory=trackd", "CapabilityBoundingSet=\n"):
        assert line in text, line


def test_unit_exposure_is_low(unit):
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for trackd.service: ([0-9.]+)", p.stdout + p.stderr)
    assert m, p.stdout[-2000:] + p.stderr[-2000:]
    print(f"\nsystemd-analyze security: exposure {m.group(1)} (0 = fully locked down, 10 = none)")
    assert float(m.group(1)) <= 2.0
