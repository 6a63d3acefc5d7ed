"""Deployment figures of one engine: throughput when 1, 2, 4 and 8 threads share it (every output
checked against the engine's own single-thread answer for that input), and the time to first
correct output of a saved engine loaded in a fresh process, with Triton's kernel cache warm and
cold. Writes JSON to benchmarks/results/ and prints a table last. Examples:

    python benchmarks/deploy.py --model resnet50 --batch 8                 # GPU, fp16
    python benchmarks/deploy.py --device cpu --model resnet18 --size 64 --seconds 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch_gie  # noqa: E402

_CHILD = r"""
import json, logging, sys, time
t0 = time.perf_counter()
import torch, torch_gie
t_import = time.perf_counter()
notes = []  # torch_gie's own account of the load: reading/decoding vs building, warm-up vs capture
handler = logging.Handler()
handler.emit = lambda record: notes.append(record.getMessage())
logging.getLogger("torch_gie").addHandler(handler)
logging.getLogger("torch_gie").setLevel(logging.INFO)
engine = torch_gie.load(sys.argv[1])
t_load = time.perf_counter()
x, want = torch.load(sys.argv[2], weights_only=True)
out = engine(x.to(sys.argv[3]))
ok = torch.equal(out.cpu(), want)
t_out = time.perf_counter()
print(json.dumps({"total_s": t_out - t0, "import_s": t_import - t0, "load_s": t_load - t_import,
                  "first_call_s": t_out - t_load, "identical": ok, "log": notes}))
"""


def shared_throughput(engine, inputs: list[torch.Tensor], expected: list[torch.Tensor], threads: int,
                      seconds: float) -> dict:
    """Calls/s of ``threads`` threads calling one engine for ``seconds``; every output checked."""
    stop = time.perf_counter() + seconds
    counts, wrong = [0] * threads, [0] * threads

    def worker(i: int) -> None:
        x, want = inputs[i % len(inputs)], expected[i % len(inputs)]
        while time.perf_counter() < stop:
            out = engine(x)
            wrong[i] += int(not torch.equal(out, want))
            counts[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return {"threads": threads, "calls": sum(counts), "calls_per_s": sum(counts) / elapsed,
            "wrong": sum(wrong)}


def fresh_process_load(engine, x: torch.Tensor, cold: bool) -> dict:
    """Save, then time a child process from start to its first output (checked bit-identical);
    ``cold`` points Triton's kernel cache at an empty directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path, data = os.path.join(tmp, "engine.gie"), os.path.join(tmp, "io.pt")
        torch_gie.save(engine, path)
        torch.save((x.cpu(), engine(x).cpu()), data)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                          os.environ.get("PYTHONPATH", "")]))
        if cold:
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _CHILD, path, data, str(x.device)], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            return {"cold": cold, "error": done.stderr.strip().splitlines()[-1][:300]}
        child = json.loads(done.stdout.strip().splitlines()[-1])
        return {"cold": cold, "process_s": wall, "load_to_output_s": child["total_s"] - child["import_s"],
                "identical": child["identical"], "file_mib": os.path.getsize(path) / 2**20,
                "import_s": child["import_s"], "load_s": child["load_s"], "first_call_s": child["first_call_s"],
                "log": child["log"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--precision", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval().to(args.device)
    inputs = [torch.randn(args.batch, 3, args.size, args.size, device=args.device) for _ in range(8)]
    engine = torch_gie.compile(model, inputs[0], precision=precision)
    expected = [engine(x) for x in inputs]  # one at a time: the answer each thread must get
    rows = [shared_throughput(engine, inputs, expected, int(n), args.seconds) for n in args.threads.split(",")]
    loads = [fresh_process_load(engine, inputs[0], cold) for cold in (False, True)]
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"deploy-{env['date'].replace(':', '')}.json"), "w") as f:
        json.dump({"env": env, "threads": rows, "load": loads}, f, indent=1)
    print(f"{args.model} batch {args.batch} {precision} on {env['device']}\n")
    print("| threads | calls/s | calls | wrong |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['calls_per_s']:.1f} | {r['calls']} | {r['wrong']} |")
    print("\n| Triton cache | process start to first output s | load + first call s | import s | load s | "
          "first call s | identical |\n|---|---|---|---|---|---|---|")
    for r in loads:
        if "error" in r:
            print(f"| {'cold' if r['cold'] else 'warm'} | error: {r['error']} | | | | | |")
        else:
            print(f"| {'cold' if r['cold'] else 'warm'} | {r['process_s']:.2f} | {r['load_to_output_s']:.2f} | "
                  f"{r['import_s']:.2f} | {r['load_s']:.2f} | {r['first_call_s']:.2f} | {r['identical']} |")
    for r in loads:  # torch_gie's own breakdown of each load (reading vs building, warm-up vs capture)
        for line in r.get("log", []):
            print(f"{'cold' if r['cold'] else 'warm'}: {line}")


if __name__ == "__main__":
    main()
