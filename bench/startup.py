"""Start-up cost of commands that need no model, against importing torch alone.

Usage: python bench/startup.py [--runs 7]

Each command is run as a fresh process, in turn with the others (so a busy machine slows all of
them alike); the table gives the median wall time and its ratio to `python -c "import torch"`.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "zipit --help": [sys.executable, "-m", "zipcli", "--help"],
    "zipit --version": [sys.executable, "-m", "zipcli", "--version"],
    "zipit merge --help": [sys.executable, "-m", "zipcli", "merge", "--help"],
    "zipit specs list": [sys.executable, "-m", "zipcli", "specs", "list"],
    "zipit merge (no arguments)": [sys.executable, "-m", "zipcli", "merge"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7)
    a = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(a.runs):
        for name, cmd in COMMANDS.items():
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            times[name].append(time.perf_counter() - t)
    torch_median = statistics.median(times["import torch"])
    print(f"| command | median wall (s), {a.runs} runs | min – max | / import torch |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        print(f"| `{name}` | {statistics.median(ts):.2f} | {min(ts):.2f} – {max(ts):.2f} | "
              f"{statistics.median(ts) / torch_median:.2f} |")


if __name__ == "__main__":
    main()
