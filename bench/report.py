"""What every bench result file starts with and where it goes, so results from different
commands describe the machine the same way."""
import datetime
import os
import platform
import socket
from pathlib import Path


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; {platform.platform()}; "
            f"Python {platform.python_version()}; PostgreSQL 15 with default settings (fsync on), "
            "Unix socket.")


def write(out_dir: str, kind, text: str) -> Path:
    """Prints text and writes it to <out_dir>/<date>-<host>[-<kind>].md."""
    print(text)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    suffix = f"-{kind}" if kind else ""
    path = Path(out_dir) / f"{datetime.date.today()}-{socket.gethostname()}{suffix}.md"
    path.write_text(text)
    print(f"written to {path}")
    return path
