"""Peak host memory of one worker loading the base model: to CPU first, or straight to GPU.

Saves random-init weights of a Llama shape (safetensors shards), then loads them in fresh
processes, one per way, and records each process's peak private (anonymous) RSS, the
figure that adds up across the workers of a node, its peak file-backed RSS (pages of the
memory-mapped weight files, shared by all workers through the page cache), and the time:

- `cpu_then_gpu`: `from_pretrained` to host, then `.to("cuda")`: what the training workers
  do (`ray_app.model.loading.load_base`, then the engine moves the model to its GPU);
- `device_map_gpu`: `from_pretrained(device_map={"": "cuda:0"})`, the alternative.

With transformers 5 both keep the weights in the memory-mapped safetensors files until
they are copied to the GPU, so a worker's private memory stays far below the model size
and the workers of a node share one copy through the page cache.

    python bench/load_memory.py --model 8b --out bench/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def save_shape(key: str, folder: Path) -> None:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_throughput import build_model

    model = build_model(key)
    model.save_pretrained(folder, max_shard_size="5GB")
    (folder / "params").write_text(str(sum(p.numel() for p in model.parameters())))
    del model
    torch.cuda.empty_cache()


class RssSampler:
    """Peak RssAnon and RssFile of this process, from /proc/self/status every 20 ms."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def load(way: str, folder: str) -> dict:
    import time

    import torch

    torch.zeros(1, device="cuda")  # CUDA context outside the measured window
    sampler = RssSampler().__enter__()
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM

    if way == "cpu_then_gpu":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                     device_map={"": "cuda:0"})
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sampler.__exit__()
    assert next(model.parameters()).is_cuda
    return {"way": way, "peak_private_rss_gib": sampler.peak["RssAnon"] / 2**30,
            "peak_file_rss_gib": sampler.peak["RssFile"] / 2**30,
            "seconds": seconds, "gpu_gib": torch.cuda.memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8b")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="load_memory_")) / args.model
    save_shape(args.model, folder)
    results = []
    for way in ("cpu_then_gpu", "device_map_gpu"):
        code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'bench')!r}); "
                f"from load_memory import load; print('RESULT ' + json.dumps(load({way!r}, "
                f"{str(folder)!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    import torch

    summary = {"model": args.model, "params": int((folder / "params").read_text()),
               "device": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
               "command": "python bench/load_memory.py " + " ".join(sys.argv[1:]),
               "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
