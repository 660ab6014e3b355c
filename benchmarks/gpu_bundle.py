"""What travels to a lent GPU machine for ``benchmarks/gpu_check.py``, and its unpacking there.

The device tool sends the working tree and at most 64 MiB beside it, and the machine reaches no
package index or model hub: the packaged weights (SmolLM2-135M-Instruct's GGUF 93 MB,
all-MiniLM-L6-v2 91 MB) and Fashion-MNIST (30 MB) do not fit beside the wheels. So ``pack``
writes into ``.gpu/`` (ignored by git; name it in the run's ``carry``):

* ``whl/``: wheels of the Python packages that machine lacks (pydantic, datasets, TRL, ...),
  for CPython 3.12 on manylinux x86-64;
* ``cache/<model>/``: each packaged model's config and tokenizer files, without its weights;
* ``fmnist/``: the first ``--images`` images of each Fashion-MNIST split (same IDX format);
* ``fortunes/``: the fortune files.

There, ``unpack`` gives every model folder random weights of its exact architecture (seed 0),
so the tests and benchmarks load the same shapes through the same loaders
(``POTSTILL_CACHE=.gpu/cache``). Speed and memory do not depend on the weights' values; no
quality figure of such a run is one of the real models. ``env`` prints the shell settings.

    .venv/bin/python benchmarks/gpu_bundle.py pack          # here
    python3 benchmarks/gpu_bundle.py unpack                 # there (after the wheels install)
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpu"
# what the GPU image lacks (its own torch, transformers, accelerate, peft, typer, ... stay)
WHEELS = [
    "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing_extensions==4.16.0", "datasets==5.2.0", "dill==0.4.1",
    "multiprocess==0.70.19", "trl==1.16.0", "nltk==3.10.4", "defusedxml==0.7.1",
]  # fmt: skip
# published as source archives only: pure-Python wheels built here
SOURCE_ONLY = ["rouge_score==0.1.2"]
STAND_IN = "STAND-IN.txt"  # marks a model folder whose weights unpack made up
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip
WEIGHTS = (".safetensors", ".bin", ".gguf", ".onnx", ".h5", ".msgpack", ".ot")


def _copy_without_weights(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=lambda d, names: [
        n for n in names if n.endswith(WEIGHTS) or n in ("onnx", "openvino", ".git")
    ])  # fmt: skip


def _truncate_idx(source: Path, target: Path, n: int) -> None:
    """The first ``n`` items of an IDX file (header kept, its count rewritten)."""
    data = gzip.decompress(source.read_bytes())
    dims = data[3]
    header = 4 + 4 * dims
    count = int.from_bytes(data[4:8], "big")
    item = 1
    for d in range(1, dims):
        item *= int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big")
    n = min(n, count)
    out = data[:4] + n.to_bytes(4, "big") + data[8:header] + data[header : header + n * item]
    target.write_bytes(gzip.compress(out, mtime=0))


def pack(images: int) -> None:
    from potstill import assets
    from potstill.data.fortunes import FORTUNES_DIR
    from potstill.data.images import FASHION_MNIST_DIR

    wheels = BUNDLE / "whl"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS),
                    "-d", str(wheels), *WHEELS], check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), *SOURCE_ONLY],
                   check=True)  # fmt: skip
    models = {"SmolLM2-135M-Instruct": assets.smollm2_instruct(),
              "all-MiniLM-L6-v2": assets.minilm_l6()}  # fmt: skip
    for name, folder in models.items():
        if folder is None:
            raise SystemExit(f"{name} is not packaged here (make .venv/.potstill-installed)")
        _copy_without_weights(folder, BUNDLE / "cache" / name)
    fmnist = BUNDLE / "fmnist"
    fmnist.mkdir(exist_ok=True)
    for f in sorted(FASHION_MNIST_DIR.glob("*-ubyte.gz")):
        _truncate_idx(f, fmnist / f.name, images)
    shutil.rmtree(BUNDLE / "fortunes", ignore_errors=True)
    shutil.copytree(FORTUNES_DIR, BUNDLE / "fortunes", symlinks=False)
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    print(f"{BUNDLE}: {size / 2**20:.1f} MiB")


def unpack(seed: int = 0) -> None:
    """Random weights (seed ``seed``) for every model folder of the bundle that has none."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for folder in sorted((BUNDLE / "cache").iterdir()):
        if any(p.name.endswith(WEIGHTS) for p in folder.iterdir()):
            continue
        config = AutoConfig.from_pretrained(folder)
        torch.manual_seed(seed)
        causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
        model.save_pretrained(folder)
        (folder / STAND_IN).write_text(
            f"random weights (seed {seed}) of {folder.name}'s architecture: see {__file__}\n"
        )
        print(f"{folder.name}: random weights of its architecture ({type(model).__name__}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["pack", "unpack"])
    p.add_argument("--images", type=int, default=2000, help="Fashion-MNIST images per split")
    a = p.parse_args()
    pack(a.images) if a.what == "pack" else unpack()


if __name__ == "__main__":
    main()
