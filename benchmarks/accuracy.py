"""int8 accuracy of MobileNetV2 (trained ImageNet weights) on real photo crops: torch_gie's
calibrators beside PyTorch's own eager post-training quantization, each scored against eager fp32
(TF32 off) on the same crops. There are no labels: a quantized model is judged by how often it
agrees with fp32, not by ImageNet accuracy.

Rows: PyTorch PTQ (torch.ao.quantization, BatchNorm folded by ``fuse_model``, real int8 CPU
kernels; always on CPU) with the x86 default qconfig, and with a histogram observer and per-channel
symmetric weights on the qnnpack engine; one row per torch_gie calibrator; an accuracy-budget row
when ``--accuracy-budget`` is given (e.g. top1_agreement=0.99). Columns: top-1 agreement with
fp32; the same on confident crops (fp32 top-1 probability >= 0.5); fp32's top-1 inside the int8
top-5; mean per-crop logit SQNR.
Protocol (crops, seeds) in ``int8_data.py``. Examples:

    python benchmarks/accuracy.py --device cpu --limit 200              # quick, packages installed
    python benchmarks/accuracy.py --device cuda --bundle .gpu/int8_bundle.pt
    python benchmarks/accuracy.py --fp-stand-in       # torch_gie rows compiled in fp32 (harness check)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable

import torch
import torch.ao.quantization as tq
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import int8_data  # noqa: E402

import torch_gie  # noqa: E402
from torch_gie.quantize.calibrators import MSE, Entropy, MinMax, Percentile  # noqa: E402

CONFIDENT = 0.5  # fp32 top-1 probability from which a crop counts as confident
SQNR_CAP_DB = 300.0  # identical logits would be +inf dB; capped so means and JSON stay finite

# torch_gie's calibrator per row, as passed to compile(calibrator=...); Percentile spelled out so the
# row means 99.99 whatever the default becomes.
CALIBRATORS = {"minmax": MinMax(), "percentile": Percentile(99.99), "entropy": Entropy(), "mse": MSE()}


# ---- metrics: logits [N, classes] of the fp32 reference and of the model under test ----

def top1_agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Fraction of rows whose argmax matches the reference's."""
    return (ref.argmax(1) == out.argmax(1)).double().mean().item()


def confident_mask(ref: torch.Tensor, threshold: float = CONFIDENT) -> torch.Tensor:
    """Rows where the reference's top-1 softmax probability is at least ``threshold``."""
    return ref.double().softmax(1).amax(1) >= threshold


def top5_contains_reference(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Fraction of rows whose reference top-1 class is among ``out``'s five largest logits."""
    return (out.topk(min(5, out.shape[1]), dim=1).indices == ref.argmax(1, keepdim=True)).any(1).double().mean().item()


def logit_sqnr_db(ref: torch.Tensor, out: torch.Tensor, cap_db: float = SQNR_CAP_DB) -> torch.Tensor:
    """Per-row 10 log10(|ref|^2 / |ref - out|^2) in dB (fp64), at most ``cap_db``."""
    ref, out = ref.double(), out.double()
    signal = ref.square().sum(1)
    noise = (ref - out).square().sum(1).clamp_min(signal * 10 ** (-cap_db / 10)).clamp_min(1e-300)
    return (10 * torch.log10(signal / noise)).clamp_max(cap_db)


def compare_logits(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """The table's columns for one row (fractions in [0, 1], SQNR in dB)."""
    if ref.shape != out.shape:
        raise ValueError(f"logits shapes differ: reference {tuple(ref.shape)}, output {tuple(out.shape)}")
    ref, out = ref.float().cpu(), out.float().cpu()
    confident = confident_mask(ref)
    n_conf = int(confident.sum())
    return {"top1_agreement": top1_agreement(ref, out),
            "confident_agreement": top1_agreement(ref[confident], out[confident]) if n_conf else None,
            "confident_crops": n_conf,
            "top5_contains_fp32": top5_contains_reference(ref, out),
            "sqnr_db": logit_sqnr_db(ref, out).mean().item(),
            "crops": ref.shape[0]}


# ---- the models under test ----

@torch.no_grad()
def run_batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int, device,
                pad: bool = False) -> torch.Tensor:
    """fn over ``x`` in batches on ``device``, logits back on the CPU. pad: fill the last batch up
    to ``batch`` with zeros (a compiled module only takes its example shape) and drop those rows."""
    outs = []
    for i in range(0, x.shape[0], batch):
        chunk = x[i:i + batch]
        n = chunk.shape[0]
        if pad and n < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - n, *chunk.shape[1:])])
        outs.append(fn(chunk.to(device))[:n].float().cpu())
    return torch.cat(outs)


def fp32_logits(model: torch.nn.Module, crops: torch.Tensor, device: str, batch: int) -> torch.Tensor:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return run_batched(model.to(device), crops, batch, device)


def _ptq_qconfigs() -> dict[str, tuple[str, tq.QConfig]]:
    """PTQ row name -> (quantized engine, qconfig)."""
    histogram_per_channel = tq.QConfig(
        activation=tq.HistogramObserver.with_args(reduce_range=False),
        weight=tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    return {"PyTorch PTQ x86 default": ("x86", tq.get_default_qconfig("x86")),
            "PyTorch PTQ histogram + per-channel (qnnpack)": ("qnnpack", histogram_per_channel)}


@torch.no_grad()
def ptq_logits(bundle: str | None, engine: str, qconfig: tq.QConfig, calib: torch.Tensor, crops: torch.Tensor,
               batch: int) -> torch.Tensor:
    """PyTorch eager post-training quantization on the CPU: fuse (BN folded), prepare, calibrate,
    convert, evaluate with the int8 kernels of ``engine``."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        model = int8_data.mobilenet_v2_trained(bundle, quantizable=True)
        model.fuse_model(is_qat=False)
        model.qconfig = qconfig
        tq.prepare(model, inplace=True)
        run_batched(model, calib, batch, "cpu")
        tq.convert(model, inplace=True)
        return run_batched(model, crops, batch, "cpu")
    finally:
        torch.backends.quantized.engine = previous


def gie_logits(model: torch.nn.Module, calib: torch.Tensor, crops: torch.Tensor, device: str, backend: str,
               batch: int, options: dict, fp_stand_in: bool, row: dict | None = None) -> torch.Tensor:
    """torch_gie int8 (or, with fp_stand_in, fp32 without the int8 options) compiled for one batch
    shape; calibration batches have that shape too. An accuracy-budget build's search (the
    layers it kept in fp16, what it measured on the calibration crops) goes into ``row``."""
    model = model.to(device)
    example = crops[:batch].to(device)
    if fp_stand_in:
        compiled = torch_gie.compile(model, example, precision="fp32", backend=backend)
    else:
        calibration = [calib[i:i + batch].to(device) for i in range(0, calib.shape[0] - batch + 1, batch)]
        compiled = torch_gie.compile(model, example, precision="int8", calibration_data=calibration,
                                     backend=backend, **options)
        if row is not None and compiled.report().get("int8_search"):
            row["int8_search"] = compiled.report()["int8_search"]
    return run_batched(compiled, crops, batch, device, pad=True)


# ---- the fp32 reference's own picture of the crops ----

def fp32_summary(ref: torch.Tensor) -> dict:
    """How confident fp32 is and what it sees in each photo (no labels, so this is the sanity check)."""
    prob = ref.double().softmax(1)
    top_p, top_c = prob.max(1)
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    per_photo = {}
    for name in int8_data.PHOTO_NAMES:
        idx = [i for i, src in enumerate(int8_data.evaluation_sources(ref.shape[0])) if src == name]
        common = Counter(top_c[idx].tolist()).most_common(3)
        per_photo[name] = [(categories[c], n) for c, n in common]
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    return {"confident_crops": int((top_p >= CONFIDENT).sum()), "crops": ref.shape[0],
            "top1_prob_quantiles": dict(zip(["p10", "p25", "p50", "p75", "p90"], top_p.quantile(q).tolist())),
            "distinct_top1_classes": len(set(top_c.tolist())), "top1_per_photo": per_photo}


# ---- table and driver ----

def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def table(rows: list[dict]) -> str:
    head = ["row", "top-1 agree %", "confident agree %", "fp32 top-1 in top-5 %", "logit SQNR dB", "crops",
            "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r.get("metrics") or {}
        conf = f"{_pct(m.get('confident_agreement'))} (n={m['confident_crops']})" if m else ""
        sqnr = f"{m['sqnr_db']:.1f}" if m else ""
        note = (r.get("error") or r.get("note") or "")[:90].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['row']} | {_pct(m.get('top1_agreement'))} | {conf} | {_pct(m.get('top5_contains_fp32'))}"
                     f" | {sqnr} | {m.get('crops', '')} | {note} |")
    return "\n".join(lines)


def per_photo_agreement(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement over the crops of each photo (calibration photos are every other name)."""
    sources = int8_data.evaluation_sources(ref.shape[0])
    return {name: top1_agreement(ref[idx], out[idx]) for name in int8_data.PHOTO_NAMES
            if (idx := [i for i, src in enumerate(sources) if src == name])}


def _measure(row: dict, ref: torch.Tensor, fn: Callable[[], torch.Tensor]) -> dict:
    """Fill ``row`` with fn's metrics against ``ref``, or with the error that stopped it."""
    t0 = time.perf_counter()
    try:
        out = fn()
        row["metrics"] = compare_logits(ref, out)
        row["per_photo_top1_agreement"] = per_photo_agreement(ref, out)
    except Exception as e:  # one failing row must not cost the others
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    return row


def _gie_rows(args) -> list[tuple[str, dict]]:
    """(row name, torch_gie int8 compile options) per requested row."""
    rows = []
    for name in filter(None, args.calibrators.split(",")):
        if name not in CALIBRATORS:
            raise SystemExit(f"unknown calibrator {name!r}; known: {', '.join(CALIBRATORS)}")
        label = "percentile 99.99" if name == "percentile" else name
        rows.append((f"torch_gie int8 {label}", {"calibrator": CALIBRATORS[name]}))
    if args.accuracy_budget:
        budget = {key: float(value) for key, value in (item.split("=") for item in args.accuracy_budget.split(","))}
        options = {"calibrator": CALIBRATORS[args.budget_calibrator], "accuracy_budget": budget}
        rows.append((f"torch_gie int8 {args.budget_calibrator}, accuracy budget {args.accuracy_budget}", options))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                   help="for fp32 and torch_gie (PyTorch PTQ always runs on the CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--bundle", help="read weights and photos from this bundle (int8_data.py --export) instead of "
                                    f"the packages, e.g. {os.path.normpath(int8_data.DEFAULT_BUNDLE)}")
    p.add_argument("--calibrators", default=",".join(CALIBRATORS), help="torch_gie rows, comma-separated")
    p.add_argument("--accuracy-budget", metavar="KEY=VALUE,...",
                   help="add a torch_gie row compiled with accuracy_budget={KEY: VALUE}, e.g. top1_agreement=0.99 "
                        "or sqnr_db=30 (measured by torch_gie on the calibration crops)")
    p.add_argument("--budget-calibrator", default="entropy", choices=tuple(CALIBRATORS))
    p.add_argument("--no-ptq", action="store_true", help="skip the PyTorch PTQ rows")
    p.add_argument("--fp-stand-in", action="store_true",
                   help="compile the torch_gie rows in fp32 without int8 options (checks the harness, not int8)")
    p.add_argument("--limit", type=int, default=int8_data.EVAL_CROPS,
                   help="evaluation crops (a prefix of the full set)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    torch.manual_seed(0)
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "torchvision": torchvision.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(sys.argv)}
    protocol = {"calibration": {"crops": int8_data.CALIB_CROPS, "seed": int8_data.CALIB_SEED,
                                "photos": list(int8_data.PHOTO_NAMES[::2])},
                "evaluation": {"crops": args.limit, "seed": int8_data.EVAL_SEED, "photos": list(int8_data.PHOTO_NAMES)},
                "crop": {"size": int8_data.CROP_SIZE, "scale": int8_data.CROP_SCALE, "hflip": 0.5},
                "confident": CONFIDENT}
    calib = int8_data.calibration_crops(args.bundle)
    crops = int8_data.evaluation_crops(args.bundle, args.limit)
    model = int8_data.mobilenet_v2_trained(args.bundle)
    ref = fp32_logits(model, crops, args.device, args.batch)
    result = {"env": env, "protocol": protocol, "fp32": fp32_summary(ref), "rows": []}
    print(json.dumps({"fp32": result["fp32"]}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"accuracy-{env['date'].replace(':', '')}")

    def save():  # after every row: an interrupted run keeps what it measured
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)

    if not args.no_ptq:
        # torchvision's quantizable MobileNetV2 swaps ReLU6 for ReLU: this row is that change alone, in fp32
        result["rows"].append(_measure({"row": "PyTorch quantizable model, fp32 (ReLU6 -> ReLU, no int8)",
                                        "device": "cpu"}, ref, lambda: run_batched(
            int8_data.mobilenet_v2_trained(args.bundle, quantizable=True), crops, args.batch, "cpu")))
        for name, (engine, qconfig) in _ptq_qconfigs().items():
            result["rows"].append(_measure({"row": name, "device": "cpu"}, ref, lambda e=engine, q=qconfig:
                                           ptq_logits(args.bundle, e, q, calib, crops, args.batch)))
            save()
    for name, options in _gie_rows(args):
        row = {"row": name + (" (fp32 stand-in)" if args.fp_stand_in else ""), "device": args.device,
               "backend": args.backend, "options": {k: repr(v) for k, v in options.items()}}
        if args.fp_stand_in:
            row["note"] = "compiled in fp32: checks the harness, not int8"
        result["rows"].append(_measure(row, ref, lambda o=options, r=row: gie_logits(
            model, calib, crops, args.device, args.backend, args.batch, o, args.fp_stand_in, r)))
        save()
    save()
    fp = result["fp32"]
    text = (f"MobileNetV2 (trained) int8 vs eager fp32 on {fp['crops']} crops of {len(int8_data.PHOTO_NAMES)} "
            f"photos; {fp['confident_crops']} confident (fp32 top-1 p >= {CONFIDENT}); fp32 on {env['device']}; "
            f"JSON: {stem}.json\n\n{table(result['rows'])}\n")
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
