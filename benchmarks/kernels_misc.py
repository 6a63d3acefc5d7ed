"""Micro-benchmark of the memory-bound kernels real networks need beside convs: global average
pooling, the squeeze-and-excitation excitation and multiply, and LayerNorm, on the layer shapes
of efficientnet_b0, mobilenet_v3_large, regnet_y_400mf, convnext_tiny and vit_b_16 (224x224), and
int8 max pooling on GoogLeNet's and ResNet's shapes (there "torch us" is our own kernel that
compares one code at a time, the path channel rows that are not whole 4-byte words take).

Each case is checked against PyTorch (our output poisoned with NaN first), then timed as a compiled
forward runs it (``timing.time_in_cuda_graph``: calls captured in a CUDA graph), next to the PyTorch
equivalent in fp16 channels_last eager timed the same way, and against its memory floor (bytes read
and written / 3.0 TB/s, H100 HBM3). The table is printed last; ``--out`` writes JSON.

    python benchmarks/kernels_misc.py --batches 32,1 --out misc.json
    python benchmarks/kernels_misc.py --sweep   # also time every SqueezeExcitation config
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from torch_gie.activations import apply_activation  # noqa: E402
from torch_gie.kernels import pool2d  # noqa: E402
from torch_gie.kernels.elementwise import ChannelScale  # noqa: E402
from torch_gie.kernels.global_pool import GlobalPool2d  # noqa: E402
from torch_gie.kernels.layer_norm import LayerNorm  # noqa: E402
from torch_gie.kernels.squeeze_excitation import SqueezeExcitation  # noqa: E402
from torch_gie.quantize.arith import LayerQuant, QParams  # noqa: E402
from torch_gie.testing import rel_err  # noqa: E402
from torch_gie.timing import time_in_cuda_graph  # noqa: E402

HBM_BYTES_PER_S = 3.0e12
DTYPE = torch.float16
DEVICE = "cuda"  # a CPU smoke test of the cases (Triton interpreter) may set "cpu"
TOL = 1e-2

# Squeeze-and-excitation blocks (input C, H, W after the depthwise conv; squeeze Cr; activations),
# one entry per distinct shape, with how many times the network has it.
SE_LAYERS = {
    "efficientnet_b0": [((32, 112, 112), 8, 1), ((96, 56, 56), 4, 1), ((144, 56, 56), 6, 1),
                        ((144, 28, 28), 6, 1), ((240, 28, 28), 10, 1), ((240, 14, 14), 10, 1),
                        ((480, 14, 14), 20, 3), ((672, 14, 14), 28, 2), ((672, 7, 7), 28, 1),
                        ((1152, 7, 7), 48, 4)],
    "mobilenet_v3_large": [((72, 28, 28), 24, 1), ((120, 28, 28), 32, 2), ((480, 14, 14), 120, 1),
                           ((672, 14, 14), 168, 1), ((672, 7, 7), 168, 1), ((960, 7, 7), 240, 2)],
    "regnet_y_400mf": [((48, 56, 56), 8, 1), ((104, 28, 28), 12, 1), ((104, 28, 28), 26, 2),
                       ((208, 14, 14), 26, 1), ((208, 14, 14), 52, 5), ((440, 7, 7), 52, 1),
                       ((440, 7, 7), 110, 5)],
}
SE_ACTS = {"efficientnet_b0": ("silu", "sigmoid"), "mobilenet_v3_large": ("relu", "hardsigmoid"),
           "regnet_y_400mf": ("relu", "sigmoid")}
# Classifier-head global pools (C, H, W).
HEADS = {"efficientnet_b0": (1280, 7, 7), "mobilenet_v3_large": (960, 7, 7),
         "regnet_y_400mf": (440, 7, 7), "resnet50": (2048, 7, 7)}
# LayerNorms: convnext_tiny over channels of (N, C, H, W) channels_last; vit_b_16 over 768 features
# of 197 tokens.
LAYER_NORMS = [("convnext_tiny", (96, 56, 56), 1), ("convnext_tiny", (192, 28, 28), 1),
               ("convnext_tiny", (384, 14, 14), 1), ("convnext_tiny", (768, 7, 7), 1),
               ("vit_b_16", (197, 768), -1)]


@dataclass
class Case:
    """One benchmark row: our call (writing ``out``), PyTorch's, the fp32 reference of ``out``,
    and the bytes a perfect kernel moves."""

    group: str
    label: str
    batch: int
    ours: Callable[[], None]
    theirs: Callable[[], object]
    out: torch.Tensor
    ref: torch.Tensor
    bytes: int
    layer: object = None
    result: dict = field(default_factory=dict)


def _activation(shape, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(DTYPE)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def global_pool_case(label: str, n: int, chw) -> Case:
    x = _activation((n, *chw), 0)
    out = torch.empty(n, chw[0], dtype=DTYPE, device=DEVICE)
    layer = GlobalPool2d("avg")
    return Case("global_avg_pool", label, n, lambda: layer(x, out), lambda: F.adaptive_avg_pool2d(x, 1),
                out, x.float().mean((2, 3)), _nbytes(x, out), layer)


def se_case(label: str, n: int, chw, cr: int, acts) -> Case:
    c = chw[0]
    x = _activation((n, *chw), 1)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    w1 = torch.randn(cr, c, 1, 1, generator=g, device=DEVICE) / c ** 0.5
    w2 = torch.randn(c, cr, 1, 1, generator=g, device=DEVICE) / cr ** 0.5
    b1 = torch.randn(cr, generator=g, device=DEVICE) * 0.1
    b2 = torch.randn(c, generator=g, device=DEVICE) * 0.1
    layer = SqueezeExcitation(w1, b1, acts[0], w2, b2, acts[1], DTYPE)
    gate = torch.empty(n, c, 1, 1, dtype=DTYPE, device=DEVICE)
    h1, h2, hb1, hb2 = (t.to(DTYPE) for t in (w1, w2, b1, b2))

    def torch_se():  # torchvision's SqueezeExcitation without the final multiply
        s = F.adaptive_avg_pool2d(x, 1)
        return apply_activation(F.conv2d(apply_activation(F.conv2d(s, h1, hb1), acts[0]), h2, hb2), acts[1])

    s = x.float().mean((2, 3), keepdim=True)
    ref = apply_activation(F.conv2d(apply_activation(F.conv2d(s, w1, b1), acts[0]), w2, b2), acts[1])
    return Case("se_excitation", label, n, lambda: layer(x, gate), torch_se, gate, ref,
                _nbytes(x, gate, layer.w1, layer.w2t), layer)


def channel_scale_case(label: str, n: int, chw) -> Case:
    x = _activation((n, *chw), 3)
    gate = torch.rand(n, chw[0], 1, 1, device=DEVICE).to(DTYPE)
    out = torch.empty_like(x)
    layer = ChannelScale()
    return Case("se_multiply", label, n, lambda: layer(x, gate, out), lambda: x * gate, out,
                x.float() * gate.float(), _nbytes(x, gate, out), layer)


def layer_norm_case(label: str, n: int, shape, dim: int) -> Case:
    x = _activation((n, *shape), 4)
    c = x.shape[dim]
    g = torch.Generator(device=DEVICE).manual_seed(5)
    w = torch.rand(c, generator=g, device=DEVICE) + 0.5
    b = torch.randn(c, generator=g, device=DEVICE)
    layer = LayerNorm(w, b, 1e-6, dim, DTYPE)
    out = torch.empty_like(x)
    wh, bh = w.to(DTYPE), b.to(DTYPE)
    if dim == 1:  # torchvision's LayerNorm2d: permute to NHWC, normalize, permute back
        def theirs():
            return F.layer_norm(x.permute(0, 2, 3, 1), (c,), wh, bh, 1e-6).permute(0, 3, 1, 2)
        ref = F.layer_norm(x.float().permute(0, 2, 3, 1), (c,), w, b, 1e-6).permute(0, 3, 1, 2)
    else:
        def theirs():
            return F.layer_norm(x, (c,), wh, bh, 1e-6)
        ref = F.layer_norm(x.float(), (c,), w, b, 1e-6)
    return Case("layer_norm", label, n, lambda: layer(x, out), theirs, out, ref, _nbytes(x, out), layer)


# int8 max pools (C, H, W, kernel, stride, padding, ceil_mode, how many the network has).
INT8_MAX_POOLS = {
    "googlenet": [((64, 112, 112), 3, 2, 0, True, 1), ((192, 56, 56), 3, 2, 0, True, 1),
                  ((192, 28, 28), 3, 1, 1, True, 1), ((256, 28, 28), 3, 1, 1, True, 1),
                  ((480, 28, 28), 3, 2, 0, True, 1), ((480, 14, 14), 3, 1, 1, True, 1),
                  ((512, 14, 14), 3, 1, 1, True, 3), ((528, 14, 14), 3, 1, 1, True, 1),
                  ((832, 14, 14), 2, 2, 0, True, 1), ((832, 7, 7), 3, 1, 1, True, 2)],
    "resnet50": [((64, 112, 112), 3, 2, 1, False, 1)],
}


def int8_max_pool_case(label: str, n: int, chw, k: int, s: int, p: int, ceil_mode: bool) -> Case:
    g = torch.Generator(device=DEVICE).manual_seed(6)
    x = torch.randint(-128, 128, (n, *chw), generator=g, device=DEVICE, dtype=torch.int32)
    x = x.to(torch.int8).contiguous(memory_format=torch.channels_last)
    qp = QParams(0.05, -128)
    layer = pool2d.Pool2d("max", k, s, p, ceil_mode=ceil_mode, dtype=torch.int8, quant=LayerQuant(qp, qp))
    ref = F.max_pool2d(x.float(), k, s, p, ceil_mode=ceil_mode)
    out = torch.empty(ref.shape, dtype=torch.int8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    word_vec = pool2d._word_vec

    def one_code_at_a_time():
        pool2d._word_vec = lambda *tensors: 0
        try:
            layer(x, out)
        finally:
            pool2d._word_vec = word_vec
    return Case("int8_max_pool", label, n, lambda: layer(x, out), one_code_at_a_time, out, ref,
                _nbytes(x, out), layer)


def make_cases(batch: int) -> list[Case]:
    cases = []
    for net, layers in SE_LAYERS.items():
        pools: dict[tuple, int] = {}  # one pool per input shape (RegNet's differ only in Cr)
        for chw, _, count in layers:
            pools[chw] = pools.get(chw, 0) + count
        for chw, count in pools.items():
            cases.append(global_pool_case(f"{net} se pool {'x'.join(map(str, chw))} (x{count})", batch, chw))
    for net, chw in HEADS.items():
        cases.append(global_pool_case(f"{net} head {'x'.join(map(str, chw))}", batch, chw))
    for net, layers in SE_LAYERS.items():
        for chw, cr, count in layers:
            cases.append(se_case(f"{net} se {'x'.join(map(str, chw))} r{cr} (x{count})", batch, chw, cr,
                                 SE_ACTS[net]))
    for chw, _, count in SE_LAYERS["efficientnet_b0"]:
        cases.append(channel_scale_case(f"efficientnet_b0 se mul {'x'.join(map(str, chw))} (x{count})",
                                        batch, chw))
    for net, shape, dim in LAYER_NORMS:
        cases.append(layer_norm_case(f"{net} ln {'x'.join(map(str, shape))} dim {dim}", batch, shape, dim))
    for net, pools in INT8_MAX_POOLS.items():
        for chw, k, s, p, ceil_mode, count in pools:
            cases.append(int8_max_pool_case(f"{net} int8 maxpool {k}x{k}/{s} {'x'.join(map(str, chw))} (x{count})",
                                            batch, chw, k, s, p, ceil_mode))
    return cases


def check(case: Case) -> str:
    """'ok', or what went wrong: our output against the fp32 reference, every element written."""
    case.out.fill_(float("nan") if case.out.is_floating_point() else 93)  # int8: a poison code
    case.ours()
    if case.out.is_cuda:
        torch.cuda.synchronize()
    try:
        err = rel_err(case.out, case.ref.reshape(case.out.shape))
    except AssertionError:
        return "UNWRITTEN/NaN"
    case.result["rel_err"] = err
    return "ok" if err < TOL else f"ERR {err:.1e}"


def run_case(case: Case, sweep: bool) -> None:
    case.result["check"] = check(case)
    case.result["ours_us"] = time_in_cuda_graph(case.ours) * 1e3
    case.result["torch_us"] = time_in_cuda_graph(case.theirs) * 1e3
    case.result["floor_us"] = case.bytes / HBM_BYTES_PER_S * 1e6
    configs = getattr(case.layer, "configs", None)
    if sweep and configs and len(configs) > 1:
        default, timed = case.layer.config, []
        for config in configs:
            case.layer.config = config
            bad = check(case)
            timed.append((time_in_cuda_graph(case.ours) * 1e3, config, bad))
        case.layer.config = default
        best_us, best, bad = min(timed, key=lambda t: t[0])
        case.result.update(best_us=best_us, best_config=best, best_check=bad)


def table(cases: list[Case]) -> str:
    head = (f"{'layer':<58} {'batch':>5} {'ours us':>8} {'torch us':>8} {'floor us':>8} "
            f"{'x floor':>7} {'speedup':>7}  check")
    lines = [head, "-" * len(head)]
    for c in cases:
        r = c.result
        if "ours_us" not in r:
            lines.append(f"{c.label:<58} {c.batch:>5}  FAILED: {r.get('error', '?')}")
            continue
        line = (f"{c.label:<58} {c.batch:>5} {r['ours_us']:>8.1f} {r['torch_us']:>8.1f} {r['floor_us']:>8.1f} "
                f"{r['ours_us'] / r['floor_us']:>7.2f} {r['torch_us'] / r['ours_us']:>7.2f}  {r['check']}")
        if "best_us" in r:
            line += f"  best {r['best_us']:.1f} us {r['best_config']}"
        lines.append(line)
    groups = sorted({c.group for c in cases})
    for g in groups:
        done = [c.result for c in cases if c.group == g and "ours_us" in c.result]
        if done:
            ours, theirs, floor = (sum(r[k] for r in done) for k in ("ours_us", "torch_us", "floor_us"))
            lines.append(f"{'total ' + g:<58} {'':>5} {ours:>8.1f} {theirs:>8.1f} {floor:>8.1f} "
                         f"{ours / floor:>7.2f} {theirs / ours:>7.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="32,1", help="comma-separated batch sizes")
    parser.add_argument("--sweep", action="store_true", help="time every SqueezeExcitation config too")
    parser.add_argument("--only", default="", help="run only cases whose label contains this")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_misc.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    cases = []
    for batch in (int(b) for b in args.batches.split(",")):
        for case in make_cases(batch):
            if args.only not in case.label:
                continue
            try:
                run_case(case, args.sweep)
            except Exception as exc:  # one broken case must not hide the others' numbers
                case.result["error"] = f"{type(exc).__name__}: {exc}"[:200]
            cases.append(case)
            print(f"{case.label} b{case.batch}: {case.result}", flush=True)
    text = table(cases)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"when": datetime.datetime.now().isoformat(timespec="seconds"),
                       "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "hbm_bytes_per_s": HBM_BYTES_PER_S,
                       "rows": [{"group": c.group, "layer": c.label, "batch": c.batch, "bytes": c.bytes,
                                 **c.result} for c in cases]}, f, indent=1)
    print()
    print(text)


if __name__ == "__main__":
    main()
