"""`make check-gpu-deps`: read pip's --dry-run report of the GPU stack and say whether it fits.

    python ops/gpu_deps.py REPORT.json

Fails (exit 1) when the resolution has tensorflow-cpu in it, a TensorFlow other than the pinned
one, a package of requirements/base.txt at another version than its pin, or — when this venv
already holds the CPU stack (`make setup`) — any package at another version than installed
here, apart from TensorFlow itself and NVIDIA's CUDA wheels (which only a GPU node adds).
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_ONLY = re.compile(r"^(tensorflow|tensorflow-cpu|nvidia-.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name.split("[", 1)[0])] = version.strip()
    return pins


def main(report_path: str) -> int:
    report = json.loads(Path(report_path).read_text())
    resolved = {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    gpu_pins = _pins(ROOT / "requirements" / "gpu.txt")
    base_pins = {k: v for k, v in _pins(ROOT / "requirements" / "base.txt").items()
                 if k != "tensorflow-cpu"}
    problems = []
    if "tensorflow-cpu" in resolved:
        problems.append("tensorflow-cpu is in the resolution (it would overwrite the CUDA build)")
    for name, version in {**base_pins, **gpu_pins}.items():
        if resolved.get(name) != version:
            problems.append(f"{name}: pinned {version}, resolved {resolved.get(name)}")
    nvidia = {k: v for k, v in sorted(resolved.items()) if k.startswith("nvidia-")}
    print(f"resolved {len(resolved)} packages: tensorflow {resolved.get('tensorflow')}, "
          f"keras {resolved.get('keras')}, numpy {resolved.get('numpy')}, "
          f"pyarrow {resolved.get('pyarrow')}")
    print("CUDA wheels (pinned by tensorflow[and-cuda]): " +
          ", ".join(f"{k} {v}" for k, v in nvidia.items()))
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    if "tensorflow-cpu" in installed or "tensorflow" in installed:
        moved = {k: (installed.get(k), v) for k, v in resolved.items()
                 if installed.get(k) != v and not GPU_ONLY.match(k)}
        problems += [f"{k}: {a} in this venv, {b} in the GPU resolution"
                     for k, (a, b) in sorted(moved.items())]
        if not moved:
            print(f"every other package stays at this venv's version ({len(resolved)} "
                  f"resolved, {len(nvidia) + 1} added or replaced: tensorflow and CUDA wheels)")
    else:
        print("(this venv has no TensorFlow yet: compared with the pins only)")
    for p in problems:
        print("PROBLEM:", p)
    print("GPU pins: " + ("do not fit" if problems else "resolve with the others"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
