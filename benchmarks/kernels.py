"""Per-layer micro-benchmark of the conv kernels against cuDNN at real network shapes (fp16,
channels_last, H100-class GPU): depthwise 3x3/5x5 (MnasNet, EfficientNet-B0, MobileNetV3),
narrow pointwise 1x1 (8..64 channels), grouped 3x3 (ResNeXt-50 32x4d, RegNetY-400MF) and a few
ResNet-50 layers as a regression check, at batch 32 and 1. ``--dtype int8`` runs the same
layers as int8 convs (unsigned input codes with zero point -128, as after a ReLU; unsigned output
codes; ``resnet50_res`` adds bottleneck 1x1s with their int8 residual) and checks them against
the integer emulation of ``torch_gie.quantize.arith`` (codes at most one apart on at most 1%);
the fp16 time of the same layer's default-tuned best is in the row too, so int8's gain shows.
Kind ``compute`` holds compute-bound layers of other families (GoogLeNet, Wide ResNet, VGG,
Inception-v3, ConvNeXt), ``stem`` the 3-channel image stems on an input stored with a pixel
stride of 4 as the compiler stores it (int8: signed codes, as a network's input). ``--sweep``
also times tilings the candidates lack (compiled in parallel first), to find what they miss.

Every candidate config (the first --max-configs, as the tuner would) is first checked against
an fp32 F.conv2d reference on a NaN-poisoned output, then timed as the compiled forward runs it
(``time_in_cuda_graph``); cuDNN (F.conv2d with bias, fp16 channels_last) is timed the same way.
The table gives the best config, its time, cuDNN's, the memory floor (input + output + weight
bytes at 3.0 TB/s) and the achieved fraction of it, TFLOP/s and how many configs were timed;
JSON holds every config's time. --budget-s is shared out over the layers: each layer times
configs in order until its share (plus what earlier layers left unused) is spent, at least its
default, so the last layers are not cut to their default when the first ones compile slowly.

    python benchmarks/kernels.py --out $OUT/kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from torch_gie.kernels import conv2d  # noqa: E402
from torch_gie.kernels.conv2d import Conv2d  # noqa: E402
from torch_gie.kernels.conv2d_configs import GATHER_BELOW  # noqa: E402
from torch_gie.kernels.depthwise_conv2d import DepthwiseConv2d  # noqa: E402
from torch_gie.quantize import arith  # noqa: E402
from torch_gie.quantize.arith import LayerQuant  # noqa: E402
from torch_gie.testing import rel_err  # noqa: E402
from torch_gie.timing import time_in_cuda_graph  # noqa: E402

DEVICE = "cuda"  # make_case builds here (a CPU smoke run of the harness sets "cpu")
MEMORY_BW = 3.0e12  # bytes/s: the floor's assumed HBM bandwidth (H100 SXM reaches ~3.0-3.3)

# kind -> [(name, C_in, C_out, k, stride, H, groups)]; padding is k // 2, square images.
LAYERS: dict[str, list[tuple]] = {
    "depthwise": [
        ("mnas.dw3_32_s1_112", 32, 32, 3, 1, 112, 32), ("mnas.dw3_48_s2_112", 48, 48, 3, 2, 112, 48),
        ("mnas.dw3_72_s1_56", 72, 72, 3, 1, 56, 72), ("mnas.dw5_72_s2_56", 72, 72, 5, 2, 56, 72),
        ("mnas.dw5_120_s1_28", 120, 120, 5, 1, 28, 120), ("mnas.dw5_240_s2_28", 240, 240, 5, 2, 28, 240),
        ("mnas.dw5_480_s1_14", 480, 480, 5, 1, 14, 480), ("mnas.dw5_1152_s1_7", 1152, 1152, 5, 1, 7, 1152),
        ("effb0.dw3_96_s2_112", 96, 96, 3, 2, 112, 96), ("effb0.dw5_144_s2_56", 144, 144, 5, 2, 56, 144),
        ("effb0.dw5_672_s2_14", 672, 672, 5, 2, 14, 672), ("mbv3.dw3_16_s1_112", 16, 16, 3, 1, 112, 16),
        ("mbv3.dw3_64_s2_112", 64, 64, 3, 2, 112, 64), ("mbv3.dw3_184_s1_14", 184, 184, 3, 1, 14, 184),
    ],
    "pointwise": [
        ("mnas.pw_32_16_112", 32, 16, 1, 1, 112, 1), ("mnas.pw_16_48_112", 16, 48, 1, 1, 112, 1),
        ("mnas.pw_48_24_56", 48, 24, 1, 1, 56, 1), ("mbv3.pw_16_16_112", 16, 16, 1, 1, 112, 1),
        ("mbv3.pw_16_64_112", 16, 64, 1, 1, 112, 1), ("mbv3.pw_64_24_56", 64, 24, 1, 1, 56, 1),
        ("regnet.pw_32_48_s2_112", 32, 48, 1, 2, 112, 1), ("regnet.pw_48_48_56", 48, 48, 1, 1, 56, 1),
    ],
    "grouped": [
        ("resnext.g3_128_56", 128, 128, 3, 1, 56, 32), ("resnext.g3_256_s2_56", 256, 256, 3, 2, 56, 32),
        ("resnext.g3_256_28", 256, 256, 3, 1, 28, 32), ("resnext.g3_512_s2_28", 512, 512, 3, 2, 28, 32),
        ("resnext.g3_512_14", 512, 512, 3, 1, 14, 32), ("resnext.g3_1024_7", 1024, 1024, 3, 1, 7, 32),
        ("regnet.g3_48_s2_112", 48, 48, 3, 2, 112, 6), ("regnet.g3_104_28", 104, 104, 3, 1, 28, 13),
        ("regnet.g3_208_14", 208, 208, 3, 1, 14, 26), ("regnet.g3_440_7", 440, 440, 3, 1, 7, 55),
    ],
    "resnet50_res": [  # bottleneck conv3 1x1s with their identity (a residual add in the epilogue)
        ("r50.c1_64_256_56_res", 64, 256, 1, 1, 56, 1), ("r50.c1_128_512_28_res", 128, 512, 1, 1, 28, 1),
        ("r50.c1_256_1024_14_res", 256, 1024, 1, 1, 14, 1),
    ],
    "resnet50": [
        ("r50.c1_64_64_56", 64, 64, 1, 1, 56, 1), ("r50.c3_64_64_56", 64, 64, 3, 1, 56, 1),
        ("r50.c1_256_128_56", 256, 128, 1, 1, 56, 1), ("r50.c3_128_128_s2_56", 128, 128, 3, 2, 56, 1),
        ("r50.c3_512_512_7", 512, 512, 3, 1, 7, 1), ("r50.c1_1024_2048_s2_14", 1024, 2048, 1, 2, 14, 1),
    ],
    "compute": [  # compute-bound layers of other families (GoogLeNet, Wide ResNet, VGG, ConvNeXt's MLP)
        ("gl.c3_64_192_56", 64, 192, 3, 1, 56, 1), ("wrn.c3_128_128_56", 128, 128, 3, 1, 56, 1),
        ("wrn.c3_256_256_28", 256, 256, 3, 1, 28, 1), ("vgg.c3_256_256_56", 256, 256, 3, 1, 56, 1),
        ("vgg.c3_512_512_28", 512, 512, 3, 1, 28, 1), ("incv3.c3_64_96_35", 64, 96, 3, 1, 35, 1),
        ("cnx.pw_96_384_56", 96, 384, 1, 1, 56, 1), ("cnx.pw_384_96_56", 384, 96, 1, 1, 56, 1),
    ],
    "stem": [  # 3-channel image stems; the input stored with a pixel stride of 4, as the plan does
        ("r50.stem_7x7_s2_224", 3, 64, 7, 2, 224, 1), ("incv3.stem_3x3_s2_299", 3, 32, 3, 2, 299, 1),
        ("vgg.stem_3x3_224", 3, 64, 3, 1, 224, 1),
    ],
}
# --sweep: tilings timed beyond the candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), each
# with every BLOCK_K the dtype allows, to find what the candidate lists miss.
SWEEP_TILES = ((128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (128, 256, 8, 3), (256, 128, 8, 3),
               (128, 64, 4, 3), (128, 64, 4, 5), (64, 128, 4, 3), (256, 64, 8, 3), (64, 256, 8, 3),
               (128, 64, 8, 4), (64, 64, 4, 5))


def padded_pixels(t: torch.Tensor) -> torch.Tensor:
    """``t`` channels_last; an image of fewer than 4 channels as a view of a 4-channel buffer
    (zero padding lanes), the layout the plan gives a network input that only convs read."""
    if t.shape[1] >= 4:
        return t.contiguous(memory_format=torch.channels_last)
    buf = torch.zeros(t.shape[0], 4, *t.shape[2:], dtype=t.dtype, device=t.device)
    view = buf.contiguous(memory_format=torch.channels_last)[:, :t.shape[1]]
    view.copy_(t)
    return view


# --sweep, 3-channel stems: kw-folding tilings (narrow outputs: BLOCK_N up to 64)
STEM_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 2), (128, 64, 4, 3),
              (128, 64, 8, 3), (256, 64, 8, 2), (256, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3),
              (256, 32, 8, 3), (32, 64, 4, 3))


def make_case(c_in: int, c_out: int, k: int, s: int, h: int, g: int, batch: int, residual: bool = False,
              dtype: torch.dtype = torch.float16) -> dict:
    """Inputs, bound layer, reference and the layer's byte/flop counts: fp16 against fp32
    F.conv2d, int8 against the integer emulation (``make_int8_case``)."""
    dev = torch.device(DEVICE)
    x = padded_pixels(torch.randn(batch, c_in, h, h, device=dev).half())
    w = (torch.randn(c_out, c_in // g, k, k, device=dev) / (c_in // g * k * k) ** 0.5).half()
    b = torch.randn(c_out, device=dev) * 0.1
    cls = DepthwiseConv2d if g == c_in and g > 1 else Conv2d
    ref = F.conv2d(x.float(), w.float(), b, s, k // 2, 1, g)
    res = torch.randn(ref.shape, device=dev).to(torch.float16, memory_format=torch.channels_last) if residual else None
    if dtype == torch.int8:
        return make_int8_case(cls, x, w, b, ref, res, s, k // 2, g, (h, h), batch)
    layer = cls(w, b, stride=s, padding=k // 2, groups=g, dtype=torch.float16, input_hw=(h, h), batch=batch,
                residual=residual)
    layer.pad_lanes_finite = c_in < 4  # as the compiler sets it for its padded input (zero lanes)
    if res is not None:
        ref = ref + res.float()
    out = torch.empty(ref.shape, dtype=torch.float16, device=dev).contiguous(memory_format=torch.channels_last)
    bytes_moved = (x.numel() + out.numel() * (2 if residual else 1) + w.numel()) * 2
    flops = 2 * out.numel() * (c_in // g) * k * k
    return {"x": x, "w": w, "b": b.half(), "layer": layer, "ref": ref, "out": out, "res": res,
            "bytes": bytes_moved, "flops": flops, "stride": s, "pad": k // 2, "groups": g}


def make_int8_case(cls, x, w, b, ref, res, stride, pad, groups, hw, batch) -> dict:
    """The layer in int8 as a compiled ReLU network runs it: unsigned input codes (zero point
    -128) and unsigned output codes; conv + bias -> ReLU, or with a residual (a bottleneck's
    conv3) conv + bias + int8 identity -> ReLU. The reference is the integer emulation
    (``arith.conv2d_int8``) with the same epilogue, requantized."""
    cl = torch.channels_last
    if x.shape[1] < 4:  # an image stem: signed codes of the normalized image, as a network's input
        x_qp = arith.qparams_for_range(-float(x.abs().amax()), float(x.abs().amax()))
        codes = padded_pixels(arith.quantize(x.float(), x_qp))
    else:
        x_qp = arith.qparams_for_range(0.0, float(x.float().relu().amax()), non_negative=True)
        codes = arith.quantize(x.float().relu(), x_qp).contiguous(memory_format=cl)
    res_qp = res_codes = None
    if res is not None:
        res_qp = arith.qparams_for_range(-float(res.abs().amax()), float(res.abs().amax()))
        res_codes = arith.quantize(res.float(), res_qp).contiguous(memory_format=cl)
    w_codes, w_scale = arith.quantize_weight(w.float())
    combined, folded = arith.fold_zero_point(b, w_codes, w_scale, x_qp)
    y = arith.conv2d_int8(codes, x_qp, w_codes, combined, folded, (stride, stride), (pad,) * 4, (1, 1), groups)
    y = F.relu(y if res_codes is None else y + arith.dequantize(res_codes, res_qp))
    out_qp = arith.qparams_for_range(0.0, 0.9 * float(y.amax()), non_negative=True)
    act = {"activation": "relu"} if res is None else {"post_activation": "relu"}
    layer = cls(w.float(), b, stride=stride, padding=pad, groups=groups, dtype=torch.int8,
                quant=LayerQuant(x_qp, out_qp, res_qp), input_hw=hw, batch=batch, residual=res is not None, **act)
    out = torch.empty(ref.shape, dtype=torch.int8, device=x.device).contiguous(memory_format=cl)
    bytes_moved = codes.numel() + out.numel() * (2 if res is not None else 1) + w.numel()
    return {"x": codes, "w": w, "b": b.half(), "layer": layer, "ref": arith.requantize(y, out_qp), "out": out,
            "res": res_codes, "bytes": bytes_moved, "flops": 2 * out.numel() * w[0].numel(), "stride": stride,
            "pad": pad, "groups": groups}


def check_and_time(case: dict, config: dict) -> dict:
    """One config: correctness on a poisoned output, then CUDA-graph replay time."""
    layer, x, out, res = case["layer"], case["x"], case["out"], case["res"]
    layer.config = config
    if out.dtype == torch.int8:
        out.fill_(93)  # a poison the reference codes rarely hold in bulk
        layer(x, [out], res)
        torch.cuda.synchronize()
        diff = (out.int() - case["ref"].int()).abs()
        if diff.max().item() > 1 or (diff != 0).float().mean().item() > 0.01:
            return {"config": config, "error": f"codes up to {diff.max().item()} apart on "
                                                f"{(diff != 0).float().mean().item():.2%} of elements"}
        err = (diff != 0).float().mean().item()
    else:
        out.fill_(float("nan"))
        layer(x, [out], res)
        torch.cuda.synchronize()
        err = rel_err(out, case["ref"]) if torch.isfinite(out).all() else float("inf")
        if not err < 1e-2:
            return {"config": config, "error": f"rel_err {err:.3g}"}
    return {"config": config, "us": 1e3 * time_in_cuda_graph(lambda: layer(x, [out], res)), "rel_err": err}


def time_cudnn(case: dict) -> float:
    w, b = case["w"], case["b"]
    x = case["x"] if case["x"].dtype == torch.float16 else case["x"].half()  # cuDNN in fp16 for int8 rows
    return 1e3 * time_in_cuda_graph(lambda: F.conv2d(x, w, b, case["stride"], case["pad"], 1, case["groups"]))


def sweep_configs(case: dict, c_in: int, k: int) -> list[dict]:
    """SWEEP_TILES with BLOCK_K 32..64 (fp16) or 32..128 (int8) up to the channels, plus, for
    multi-tap int8 convs of at most 64 channels, K gathered across taps at BLOCK_K 128 (two
    taps per step)."""
    int8 = case["out"].dtype == torch.int8
    bks = [bk for bk in ((32, 64, 128) if int8 else (32, 64)) if bk <= max(32, c_in)]
    out = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st,
            "FLAT_K": k > 1, "GATHER_K": False} for bm, bn, w, st in SWEEP_TILES for bk in bks]
    if c_in < GATHER_BELOW:  # stems: kw folded into K (one run of KW pixels per kernel row)
        out = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st,
                "FLAT_K": False, "GATHER_K": True, "FOLD_KW": True}
               for bm, bn, w, st in STEM_TILES for bk in (32, 64)]
    elif int8 and k > 1 and c_in <= 64:
        out += [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "num_warps": w, "num_stages": st,
                 "FLAT_K": False, "GATHER_K": True} for bm, bn, w, st in SWEEP_TILES[:6]]
    return [c for c in out if c not in case["layer"].configs]


def precompile(case: dict, configs: list[dict], threads: int = 16) -> None:
    """Compile every config's kernel in parallel threads (Triton's compiler releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from torch_gie.kernels.launch import compile_only

    def one(config):
        try:
            with compile_only(config):
                case["layer"](case["x"], [case["out"]], case["res"])
        except Exception:  # reported when the config is timed
            pass
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, configs))


def time_configs(case: dict, max_configs: int, deadline: float,
                 configs: list[dict] | None = None) -> tuple[list[dict], int, dict | None]:
    """(results, candidates, best) for the first max_configs candidates (or ``configs``), timed
    in order while time.time() < deadline (at least one)."""
    configs = case["layer"].configs[:max_configs] if configs is None else configs
    results = []
    for config in configs:
        if results and time.time() >= deadline:
            break
        try:
            results.append(check_and_time(case, config))
        except Exception as exc:  # a config may not compile or fit this GPU: report, go on
            results.append({"config": config, "error": f"{type(exc).__name__}: {exc}"[:300]})
    timed = [r for r in results if "us" in r]
    return results, len(configs), (min(timed, key=lambda r: r["us"]) if timed else None)


def bench_layer(kind: str, spec: tuple, batch: int, max_configs: int, deadline: float,
                dtype: torch.dtype = torch.float16, sweep: bool = False) -> dict:
    """Every candidate (up to max_configs) in order while time.time() < deadline, at least one.
    int8 rows also time the fp16 layer's candidates (its best is ``fp16_us``). ``sweep``: then
    the SWEEP_TILES configs the candidates lack (``sweep_us``, ``sweep_config``: their best)."""
    name, c_in, c_out, k, s, h, g = spec
    residual = name.endswith("_res")
    case = make_case(c_in, c_out, k, s, h, g, batch, residual, dtype)
    if sweep:
        precompile(case, case["layer"].configs[:max_configs])
    results, n_configs, best = time_configs(case, max_configs, deadline)
    sweep_row = {}
    if sweep and g == 1:
        extra = sweep_configs(case, c_in, k)
        precompile(case, extra)
        swept = time_configs(case, len(extra), float("inf"), extra)
        sweep_row = {"sweep": swept[0]}
        if swept[2] is not None:
            sweep_row.update(sweep_us=swept[2]["us"], sweep_config=swept[2]["config"])
    cudnn = time_cudnn(case)
    floor = 1e6 * case["bytes"] / MEMORY_BW
    row = {"kind": kind, "layer": name, "batch": batch, "c_in": c_in, "c_out": c_out, "k": k, "stride": s,
           "h": h, "groups": g, "bytes": case["bytes"], "flops": case["flops"], "floor_us": floor,
           "cudnn_us": cudnn, "configs": results, "all_configs_timed": len(results) == n_configs,
           "dtype": str(dtype)[6:], **sweep_row}
    if dtype == torch.int8:
        fp16 = time_configs(make_case(c_in, c_out, k, s, h, g, batch, residual), max_configs,
                            time.time() + 2 * (deadline - time.time()))[2]
        row["fp16_us"] = None if fp16 is None else fp16["us"]
    if best is not None:
        row.update(best_us=best["us"], best_config=best["config"], default_us=results[0].get("us"),
                   floor_fraction=floor / best["us"], tflops=case["flops"] / best["us"] / 1e6)
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'layer':28} {'batch':>5} {'ours us':>9} {'dflt us':>9} {'cuDNN us':>9} {'floor us':>9} "
            f"{'floor/ours':>10} {'TFLOP/s':>8} {'fp16 us':>8} {'cfgs':>4} {'sweep us':>8}  best config")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "best_us" not in r:
            lines.append(f"{r['layer']:28} {r['batch']:>5} {'FAILED':>9} {'':>9} {r['cudnn_us']:>9.1f}")
            continue
        cfg = {k: v for k, v in r["best_config"].items() if v not in (False, None)}
        dflt = f"{r['default_us']:9.1f}" if r["default_us"] else f"{'-':>9}"
        fp16 = f"{r['fp16_us']:8.1f}" if r.get("fp16_us") else f"{'-':>8}"
        sweep = f"{r['sweep_us']:8.1f}" if r.get("sweep_us") else f"{'-':>8}"
        lines.append(f"{r['layer']:28} {r['batch']:>5} {r['best_us']:9.1f} {dflt} {r['cudnn_us']:9.1f} "
                     f"{r['floor_us']:9.1f} {r['floor_fraction']:10.2f} {r['tflops']:8.1f} {fp16} "
                     f"{len(r['configs']):>4} {sweep}  {cfg}")
        if r.get("sweep_us") and r["sweep_us"] < r["best_us"]:
            swept = {k: v for k, v in r["sweep_config"].items() if v not in (False, None)}
            lines.append(f"{'':28} {'':>5} sweep's best {r['sweep_us']:.1f} us: {swept}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--kinds", default=",".join(LAYERS), help=f"comma list of {list(LAYERS)}")
    p.add_argument("--batches", default="32,1")
    p.add_argument("--dtype", default="float16", choices=["float16", "int8"])
    p.add_argument("--prefetch-res-steps", type=int, default=None,
                   help="override conv2d.PREFETCH_RESIDUAL_MAX_STEPS (0: the residual always loads after the K loop)")
    p.add_argument("--max-configs", type=int, default=8, help="candidates timed per layer (the tuner's 8)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="seconds of config timing shared out over the layers (Triton compiles "
                        "dominate a first run); each layer times at least its default")
    p.add_argument("--sweep", action="store_true",
                   help="also time SWEEP_TILES configs the candidates lack (ungrouped convs), "
                        "compiled in parallel first")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference stays fp32
    torch.manual_seed(0)
    if args.prefetch_res_steps is not None:
        conv2d.PREFETCH_RESIDUAL_MAX_STEPS = args.prefetch_res_steps
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "max_configs": args.max_configs,
           "prefetch_res_steps": conv2d.PREFETCH_RESIDUAL_MAX_STEPS}
    rows, start = [], time.time()
    todo = [(kind, batch, spec) for kind in args.kinds.split(",")
            for batch in (int(b) for b in args.batches.split(",")) for spec in LAYERS[kind]]
    for i, (kind, batch, spec) in enumerate(todo):
        # This layer's share of the budget, and whatever earlier layers left unused.
        deadline = start + args.budget_s * (i + 1) / len(todo)
        try:
            row = bench_layer(kind, spec, batch, args.max_configs, deadline, getattr(torch, args.dtype),
                              args.sweep)
        except Exception:
            row = {"kind": kind, "layer": spec[0], "batch": batch, "cudnn_us": float("nan"),
                   "error": traceback.format_exc()[-2000:]}
        rows.append(row)
        print(f"[{time.time() - start:6.1f}s] {kind} {spec[0]} b{batch}: "
              f"ours {row.get('best_us', float('nan')):.1f} us, cuDNN {row['cudnn_us']:.1f} us",
              flush=True)
        with open(args.out, "w") as f:  # after every layer, so a cut-short run keeps its rows
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    print(format_table(rows))


if __name__ == "__main__":
    main()
