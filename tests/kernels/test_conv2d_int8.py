"""The int8 path of the implicit-GEMM conv (``Conv2d(..., dtype=torch.int8, quant=...)``) against
the exact integer emulation of ``torch_gie.quantize.arith``: every K-loop form (unrolled, flat,
gathered, kw folded), split-K, super-groups, the input gate, int8 and real residuals and
outputs, zero-point padding, channel-slice views and output segments.

Inputs are random codes (never zeros), outputs are poisoned first. Agreement: int8 outputs
within one code on at most 1% of the elements (the kernel may contract acc * s + b into an FMA),
real outputs within 1e-3 relative. Shapes are tiny: on CPU the kernels run in the interpreter.
"""
import ast
import inspect
import json

import pytest
import torch
from quant_checks import POISON, check_codes, check_real, compile_sm90
from test_conv2d import slope_for

from torch_gie.activations import apply_activation
from torch_gie.kernels import conv2d as conv2d_module
from torch_gie.kernels import conv_epilogue
from torch_gie.kernels.conv2d import Conv2d
from torch_gie.kernels.conv2d_configs import INT8_MIN_BLOCK_K, conv2d_configs, default_conv2d_config
from torch_gie.kernels.layer_args import four_sided
from torch_gie.quantize import arith
from torch_gie.quantize.arith import LayerQuant, QParams
from torch_gie.tune import SHIPPED_DB

SMALL = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
FLAT = {**SMALL, "FLAT_K": True}
GATHER = {**SMALL, "GATHER_K": True}
FOLD = {**SMALL, "FOLD_KW": True}
SPLIT = {**FLAT, "SPLIT_K": 4}
SIGNED, UNSIGNED = QParams(0.04, 0), QParams(0.03, arith.QMIN)


def codes(shape, qp=SIGNED, device="cpu", channels_last=True, extra=0, offset=0):
    """Random int8 codes over the QParams' whole range; with ``extra``, channels [offset,
    offset + C) of a buffer ``extra`` channels wider (a channel-slice view)."""
    n, c, *hw = shape
    lo = -128 if qp.unsigned else -127
    t = torch.randint(lo, 128, (n, c + extra, *hw), dtype=torch.int8, device=device)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t[:, offset:offset + c] if extra else t


def gated_codes(x, x_qp, gate):
    """The int8 gate contract: clamp(rint((code - z) * gate) + z) at x's own scale."""
    g = gate.reshape(gate.shape[0], gate.shape[1], 1, 1).float()
    q = torch.round((x.float() - x_qp.zero_point) * g) + x_qp.zero_point
    return q.clamp(-128, 127).to(torch.int8)


def int8_reference(x, quant, wt, b, stride=1, padding=0, dilation=1, groups=1, act=None,
                   post=None, slope=None, res=None, gate=None, out_qp=None):
    """The fp32 result of the layer's epilogue on ``arith.conv2d_int8`` (before the store),
    and that result stored as the layer stores it (codes under out_qp, else quant.out_dtype)."""
    if gate is not None:
        x = gated_codes(x, quant.input, gate)
    w_codes, w_scale = arith.quantize_weight(wt)
    combined, folded = arith.fold_zero_point(b, w_codes, w_scale, quant.input)
    pads = four_sided((padding, padding) if isinstance(padding, int) else tuple(padding))
    dil = (dilation, dilation) if isinstance(dilation, int) else dilation
    y = arith.conv2d_int8(x, quant.input, w_codes, combined, folded, stride, pads, dil, groups)
    y = apply_activation(y, act, slope)
    if res is not None:
        y = y + (arith.dequantize(res, quant.residual) if quant.residual else res.float())
    y = apply_activation(y, post, slope)
    out_qp = out_qp or quant.output
    return y, (arith.requantize(y, out_qp) if out_qp else y.to(quant.out_dtype))


def output_qparams(y, signed=None):
    """QParams covering 90% of y's range (the ends clamp, so saturation is exercised too)."""
    lo, hi = 0.9 * y.min().item(), 0.9 * y.max().item()
    return arith.qparams_for_range(lo, hi, non_negative=None if signed is None else not signed)


def assert_matches(out, ref):
    """Codes within one, on at most 1% of the elements; real outputs as stored from fp32."""
    if ref.dtype == torch.int8:
        check_codes(out, ref)
    else:
        check_real(out, ref)


def make_out(shape, dtype, device, extra=0, offset=0):
    """A poisoned channels_last output (int8: code POISON, rarely right by chance; else NaN),
    optionally channels [offset, offset + C) of a wider buffer; returns (buffer, view)."""
    n, c, oh, ow = shape
    fill = POISON if dtype == torch.int8 else float("nan")
    buf = torch.full((n, c + extra, oh, ow), fill, dtype=dtype, device=device)
    buf = buf.contiguous(memory_format=torch.channels_last)
    return buf, (buf[:, offset:offset + c] if extra else buf)


def run(n, c_in, c_out, h, w, k, stride=1, padding=0, dilation=1, groups=1, *, config=SMALL,
        x_qp=SIGNED, out="int8", act=None, post=None, res=None, gate=None, x_slice=False,
        out_slice=False, device="cpu"):
    """Build random codes and a float weight, run the int8 layer into a poisoned output, check
    it against the integer reference. out: "int8" (output QParams fitted to the result),
    "fp16" or "fp32"; res: None, "int8" or "fp16"; gate: None or the gate's dtype."""
    kh, kw = (k, k) if isinstance(k, int) else k
    x = codes((n, c_in, h, w), x_qp, device, extra=5 if x_slice else 0, offset=2)
    wt = torch.randn(c_out, c_in // groups, kh, kw, device=device)
    b = torch.randn(c_out, device=device)
    slope = slope_for(c_out, device, act, post)
    g = None if gate is None else torch.sigmoid(2 * torch.randn(n, c_in, device=device)).to(gate)
    quant = LayerQuant(x_qp, out_dtype=torch.float32 if out == "fp32" else torch.float16)
    y, _ = int8_reference(x, quant, wt, b, stride, padding, dilation, groups, act, None, slope, gate=g)
    r, res_qp = None, None
    if res == "int8":
        res_qp = QParams(y.abs().max().item() / 127, 0)
        r = codes(tuple(y.shape), res_qp, device, extra=3, offset=1)
    elif res == "fp16":
        r = (y.abs().mean() * torch.randn(y.shape, device=device)).half()
    quant = LayerQuant(x_qp, None, res_qp, quant.out_dtype)
    y, ref = int8_reference(x, quant, wt, b, stride, padding, dilation, groups, act, post, slope,
                            r, g)
    if out == "int8":
        quant = LayerQuant(x_qp, output_qparams(y), res_qp)
        _, ref = int8_reference(x, quant, wt, b, stride, padding, dilation, groups, act, post,
                                slope, r, g)
    buf, o = make_out(tuple(ref.shape), quant.store_dtype, device, extra=4 if out_slice else 0,
                      offset=3)
    layer = Conv2d(wt, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                   activation=act, post_activation=post, act_slope=slope, dtype=torch.int8,
                   quant=quant, config=config)
    layer(x, [o], residual=r, gate=g)
    assert_matches(o, ref)
    if out_slice:
        rest = torch.cat([buf[:, :3], buf[:, 3 + o.shape[1]:]], dim=1)
        assert (rest == POISON).all() if o.dtype == torch.int8 else rest.isnan().all()
    return layer


# name: (n, c_in, c_out, h, w, k, stride, padding, dilation, groups), config, input QParams
CASES = {
    "1x1": ((2, 32, 16, 4, 5, 1, 1, 0, 1, 1), SMALL, UNSIGNED),
    "1x1_stride2_ragged_k": ((1, 40, 24, 7, 6, 1, 2, 0, 1, 1), SMALL, SIGNED),
    "3x3_pad1_unrolled": ((1, 16, 16, 5, 6, 3, 1, 1, 1, 1), SMALL, UNSIGNED),
    "3x3_stride2_flat": ((2, 8, 20, 7, 7, 3, 2, 1, 1, 1), FLAT, SIGNED),
    "asymmetric_pad": ((1, 8, 16, 6, 5, 3, 1, (2, 0, 1, 2), 1, 1), FLAT, UNSIGNED),
    "dilation2_odd": ((3, 5, 10, 5, 7, 3, 1, 2, 2, 1), FLAT, UNSIGNED),
    "stem7x7_gather": ((2, 3, 16, 9, 11, 7, 2, 3, 1, 1), GATHER, UNSIGNED),
    "stem7x7_fold": ((1, 3, 16, 9, 9, 7, 2, 3, 1, 1), FOLD, SIGNED),
    "stem4_fold": ((1, 4, 16, 8, 9, 7, 2, 3, 1, 1), FOLD, UNSIGNED),
}


@pytest.mark.parametrize("name", list(CASES))
def test_geometry_int8_out(name, device):
    geometry, config, x_qp = CASES[name]
    run(*geometry, config=config, x_qp=x_qp, act="relu", device=device)


@pytest.mark.parametrize("split", [1, 2])
def test_fold_reads_channel_padded_input(split, device):
    """RGB codes stored as 4 channels (the compiler's padded input buffer): the fold path loads
    whole 4-byte pixels; the padding lane's codes must not reach the sum."""
    x = codes((2, 4, 9, 7), UNSIGNED, device)[:, :3]
    wt, b = torch.randn(16, 3, 7, 7, device=device), torch.randn(16, device=device)
    y, _ = int8_reference(x, LayerQuant(UNSIGNED, out_dtype=torch.float32), wt, b, 2, 3, act="relu")
    quant = LayerQuant(UNSIGNED, output_qparams(y))
    _, ref = int8_reference(x, quant, wt, b, 2, 3, act="relu")
    out = make_out(tuple(ref.shape), torch.int8, device)[1]
    layer = Conv2d(wt, b, stride=2, padding=3, activation="relu", dtype=torch.int8, quant=quant,
                   config={**FOLD, "SPLIT_K": split} if split > 1 else FOLD)
    layer(x, [out])
    check_codes(out, ref)
    assert 4 in layer._fold_weights  # the padded packing was used


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("out", ["fp16", "fp32"])
def test_real_outputs(out, device):
    """No output QParams: the real result stored in quant.out_dtype (an fp16 consumer)."""
    run(2, 12, 20, 5, 6, 3, padding=1, config=FLAT, x_qp=UNSIGNED, out=out, act="silu", device=device)


@pytest.mark.parametrize("config", [SMALL, SPLIT], ids=["direct", "split_k"])
@pytest.mark.parametrize("res,out,act,post", [
    ("int8", "int8", None, "relu"), ("fp16", "int8", "prelu", "relu6"),
    ("int8", "fp16", "hardswish", None), ("fp16", "int8", "prelu", "relu"),
    ("int8", "int8", "leaky_relu", None),
])
def test_residual(res, out, act, post, config, device):
    """+ residual (int8 codes at another scale, a channel slice; or real fp16), both sides of
    the post-activation, also after a split-K reduction."""
    run(2, 16, 24, 5, 5, 3, 1, 1, config=config, x_qp=UNSIGNED, out=out, act=act, post=post,
        res=res, out_slice=True, device=device)


@pytest.mark.parametrize("prefetch", [True, False], ids=["before_loop", "after_loop"])
@pytest.mark.parametrize("res", ["int8", "fp16"])
def test_residual_loaded_before_or_after_a_short_k_loop(prefetch, res, device):
    """A 1x1 conv over one K step: the residual tile loads before the loop (the default) or,
    with PREFETCH_RES False, after it; the same result either way."""
    layer = run(2, 32, 24, 5, 5, 1, config={**SMALL, "PREFETCH_RES": prefetch}, x_qp=UNSIGNED,
                post="relu", res=res, out_slice=True, device=device)
    assert layer._short_k(layer.config)


@pytest.mark.parametrize("act,post,out,prescaled", [
    (None, "relu", "int8", True), ("prelu", None, "int8", True), ("leaky_relu", "relu", "int8", True),
    ("relu6", None, "int8", False), ("relu", "silu", "int8", False), ("relu", None, "fp16", False),
])
def test_output_scale_folded_only_where_activations_commute(act, post, out, prescaled):
    """The output's 1 / scale moves into the layer's scale and bias (one multiply less per
    element) only when every activation commutes with a positive scale and the output is int8;
    the results agree with the reference either way (run checks them)."""
    layer = run(1, 16, 24, 4, 5, 1, config=SMALL, x_qp=UNSIGNED, out=out, act=act, post=post,
                res="int8", device="cpu")
    assert layer.out_prescaled == prescaled


@pytest.mark.parametrize("config", [SMALL, FLAT, GATHER, {**GATHER, "SPLIT_K": 2}],
                         ids=["unrolled", "flat", "gather", "gather_split"])
def test_split_k_every_loop(config, device):
    """int32 partial sums in the workspace: the reduction is exact at any split."""
    cfg = {**config, "SPLIT_K": config.get("SPLIT_K", 4)}
    layer = run(1, 40, 16, 5, 4, 3, 1, 1, config=cfg, x_qp=UNSIGNED, device=device)
    assert layer._workspace.dtype == torch.int32


@pytest.mark.parametrize("groups,gpt,c_in,c_out", [(4, 1, 32, 32), (4, 2, 16, 24), (3, 2, 24, 12)],
                         ids=["plain", "super_groups", "partial_super_group"])
def test_grouped(groups, gpt, c_in, c_out, device):
    cfg = {**FLAT, "GROUPS_PER_TILE": gpt} if gpt > 1 else FLAT
    run(2, c_in, c_out, 5, 4, 3, 2, 1, 1, groups, config=cfg, x_qp=UNSIGNED, act="relu", device=device)


@pytest.mark.parametrize("config,geometry", [
    (SMALL, (2, 32, 16, 4, 5, 1, 1, 0)),  # EVEN_K: the gate with an unmasked channel block
    (FLAT, (2, 20, 16, 5, 4, 3, 1, 1)),
    (FOLD, (2, 3, 16, 7, 7, 3, 2, 1)),  # gated fold configs gather
    ({**FLAT, "SPLIT_K": 2, "GROUPS_PER_TILE": 2}, (2, 24, 24, 4, 4, 3, 1, 1, 1, 3)),
], ids=["even_k", "flat", "fold_gathers", "split_super_groups"])
@pytest.mark.parametrize("gate", [torch.float16, torch.float32])
def test_gate(config, geometry, gate, device):
    """conv(x * gate) on codes: each loaded code is gated at x's scale, padding stays padding."""
    run(*geometry, config=config, x_qp=UNSIGNED, gate=gate, act="relu", device=device)


def test_channel_slice_views(device):
    """x, residual and output as channel slices at unaligned offsets of wider buffers."""
    run(2, 24, 20, 4, 5, 1, config=SMALL, x_qp=UNSIGNED, res="int8", post="relu", x_slice=True,
        out_slice=True, device=device)


@pytest.mark.parametrize("config", [SMALL, SPLIT], ids=["direct", "split_k"])
def test_segments(config, device):
    """Three int8 output views of one buffer (a removed concat) share one output QParams."""
    x = codes((2, 8, 5, 4), UNSIGNED, device)
    wt, b = torch.randn(20, 8, 3, 3, device=device), torch.randn(20, device=device)
    quant = LayerQuant(UNSIGNED, out_dtype=torch.float32)
    y, _ = int8_reference(x, quant, wt, b, padding=1, act="relu")
    quant = LayerQuant(UNSIGNED, output_qparams(y))
    _, ref = int8_reference(x, quant, wt, b, padding=1, act="relu")
    buf, _ = make_out((2, 26, 5, 4), torch.int8, device)
    outs = [buf[:, 1:6], buf[:, 8:19], buf[:, 21:25]]
    Conv2d(wt, b, padding=1, activation="relu", dtype=torch.int8, quant=quant, config=config)(x, outs)
    check_codes(torch.cat(outs, dim=1), ref)
    assert (buf[:, [0, 6, 7, 19, 20, 25]] == POISON).all()


def test_configs_offer_int8_tiles():
    """Every int8 candidate has BLOCK_K >= 32 (the GPU's int8 dot minimum), and the config
    setter rejects smaller ones."""
    for args in ((64, 64, 9, 32 * 56 * 56, 1), (512, 512, 9, 49, 1), (64, 3, 49, 8 * 112 * 112, 1),
                 (4, 4, 9, 8 * 56 * 56, 32), (128, 2048, 1, 49, 1), (16, 16, 1, 4096, 1)):
        c_out_g, c_in_g, taps, m, groups = args
        cands = conv2d_configs(c_out_g, c_in_g, torch.int8, taps, m, groups)
        assert cands and all(c["BLOCK_K"] >= INT8_MIN_BLOCK_K for c in cands), args
        assert len(cands) == len({str(c) for c in cands})
        assert all(min(c["BLOCK_M"], c["BLOCK_N"]) >= 16 for c in cands)
        assert default_conv2d_config(c_out_g, c_in_g, torch.int8, taps, m, groups) == cands[0]
    layer = Conv2d(torch.randn(16, 64, 3, 3), dtype=torch.int8, quant=LayerQuant(SIGNED),
                   input_hw=(7, 7), batch=1)
    assert layer.config == layer.configs[0] and layer.config["BLOCK_K"] >= INT8_MIN_BLOCK_K
    for config in layer.configs:
        layer.config = config  # the tuner sets each in turn
    with pytest.raises(ValueError, match="BLOCK_K must be >= 32"):
        layer.config = {**SMALL, "BLOCK_K": 16}


def test_int8_candidates_put_four_warp_tiles_first():
    """int8 tilings are fp16's with BLOCK_K doubled where K allows, each once; the 4-warp ones
    lead (in fp16's order), 8-warp ones follow."""
    for args in ((64, 64, 9, 8 * 56 * 56), (256, 64, 1, 128 * 56 * 56), (512, 512, 9, 49), (2048, 1024, 1, 128 * 49),
                 (64, 3, 49, 128 * 112 * 112)):
        int8 = conv2d_configs(*args[:2], torch.int8, *args[2:])
        fp16 = conv2d_configs(*args[:2], torch.float16, *args[2:])
        eight = [c["num_warps"] > 4 for c in int8]
        assert eight == sorted(eight), args  # no 4-warp tile after an 8-warp one
        assert len(int8) <= len(fp16) and len(int8) == len({str(c) for c in int8}), args
        shapes = lambda cs: {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]) for c in cs}  # noqa: E731
        assert shapes(int8) == shapes(fp16), args  # the same tiles, nothing invented
        four = [c for c in fp16 if c["num_warps"] <= 4]
        assert int8[0]["BLOCK_M"] == four[0]["BLOCK_M"] and int8[0]["BLOCK_N"] == four[0]["BLOCK_N"], args
    capped = conv2d_configs(64, 64, torch.int8, 9, 8 * 56 * 56)  # 64 channels: BLOCK_K stays 64
    assert max(c["BLOCK_K"] for c in capped) == 64
    doubled = conv2d_configs(256, 256, torch.int8, 9, 128 * 14 * 14)
    assert max(c["BLOCK_K"] for c in doubled) == 128


def test_int8_layer_is_distinct_for_the_tuner():
    """The timing cache keys layers by their scalar attributes and their tensors' dtypes: an
    int8 layer adds no scalar attribute to fp16 layers (their shipped keys stay valid), and
    its int8 input and output make its key differ."""
    fp16 = Conv2d(torch.randn(16, 8, 3, 3), padding=1)
    int8 = Conv2d(torch.randn(16, 8, 3, 3), padding=1, dtype=torch.int8, quant=LayerQuant(SIGNED, SIGNED))

    def scalars(layer):
        return {k for k, v in vars(layer).items()
                if isinstance(v, (int, float, str, tuple, bool)) and not k.startswith("_config")}

    assert scalars(int8) == scalars(fp16) == scalars(Conv2d(torch.randn(16, 8, 3, 3), padding=1, dtype=torch.float32))
    assert "quant" not in scalars(int8) and int8.weight.dtype == torch.int8
    # ... and the shipped cache's Conv2d keys name exactly these attributes (with an int8 output
    # scale folded in, too: a flag stored as an attribute once missed every shipped config)
    prescaled = Conv2d(torch.randn(16, 8, 3, 3), padding=1, activation="relu", dtype=torch.int8,
                       quant=LayerQuant(UNSIGNED, UNSIGNED))
    assert prescaled.out_prescaled
    with open(SHIPPED_DB) as f:
        shipped = {tuple(name for name, _ in ast.literal_eval(key.split("|")[3]))
                   for key in json.load(f) if key.split("|")[2] == "Conv2d"}
    assert tuple(sorted(scalars(prescaled))) in shipped


def test_bad_int8_arguments(device):
    wt = torch.randn(8, 4, 3, 3, device=device)
    with pytest.raises(ValueError, match="needs quant"):
        Conv2d(wt, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs quant"):
        Conv2d(wt, quant=LayerQuant(SIGNED))
    with pytest.raises(ValueError, match="out_dtype"):
        Conv2d(wt, dtype=torch.int8, quant=LayerQuant(SIGNED, out_dtype=torch.bfloat16))
    layer = Conv2d(wt, padding=1, dtype=torch.int8, quant=LayerQuant(SIGNED, SIGNED), config=SMALL)
    x = codes((2, 4, 5, 5), device=device)
    out = torch.empty(2, 8, 5, 5, dtype=torch.int8, device=device)
    cases = [
        ((x.half(), [out]), "expected torch.int8, got torch.float16"),
        ((x, [out.half()]), "outs: expected torch.int8"),
        ((x, [out], out), "residual: expected one of"),  # no residual QParams: real values
        ((x, [out], out[:, :, :4]), "residual"),
        ((x, [out[:, :, :4]]), "outs\\[0\\] has shape"),
        ((x, [out], None, torch.rand(2, 4, dtype=torch.bfloat16, device=device)), "gate"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            layer(*args)


class _RecordLaunches:
    """Stands in for a @triton.jit kernel: records each launch as a ``compile_sm90`` spec (the
    launcher's real pointer dtypes, float scalars and constexprs) instead of running it."""

    def __init__(self, module, name: str, specs: list):
        self.module, self.name, self.specs = module, name, specs
        self.params = list(inspect.signature(getattr(module, name).fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages=3, **meta):
            named = list(zip(self.params, args))
            ptrs = {p: "*" + {torch.int8: "i8", torch.int32: "i32", torch.float16: "fp16",
                              torch.float32: "fp32"}[a.dtype]
                    for p, a in named if isinstance(a, torch.Tensor)}
            floats = [p for p, a in named if isinstance(a, float)]
            meta.update({p: None for p, a in named if a is None})  # absent pointers: constexpr None
            self.specs.append([self.module.__name__, self.name, ptrs, floats, meta, num_warps, num_stages])
        return launch


def test_int8_kernels_compile_for_sm90(monkeypatch):
    """What the launchers pass compiles for Hopper (the interpreter checks neither the int8 dot's
    shape limits nor its types): a ResNet 3x3 layer's default tile (tensor cores) with a gate and
    int8 residual and output, and the int32 split-K reduction."""
    specs = []
    for module, name in ((conv2d_module, "_conv2d_kernel"), (conv_epilogue, "_split_k_reduce_kernel")):
        monkeypatch.setattr(module, name, _RecordLaunches(module, name, specs))
    quant = LayerQuant(UNSIGNED, UNSIGNED, SIGNED)
    layer = Conv2d(torch.randn(64, 64, 3, 3), torch.randn(64), padding=1, activation="relu",
                   post_activation="relu", dtype=torch.int8, quant=quant, input_hw=(56, 56), batch=8)
    x = torch.zeros(8, 64, 56, 56, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    out = torch.zeros_like(x)
    layer(x, [out], out, torch.rand(8, 64).half())
    layer.config = {**layer.config, "BLOCK_M": 64, "SPLIT_K": 2}
    layer(x, [out], out)
    specs = [specs[0], specs[2]]  # the unsplit tile, the reduction
    rows = compile_sm90(specs)
    assert rows[0]["mma"] and rows[0]["shared"] <= 232448


# GPU: real layer shapes (C_in, C_out, k, stride, pad, H, groups, batch) against the reference,
# the default config and every candidate the tuner would time.
RESNET_INT8 = [
    (3, 64, 7, 2, 3, 224, 1, 8), (64, 64, 1, 1, 0, 56, 1, 32), (64, 64, 3, 1, 1, 56, 1, 8),
    (64, 256, 1, 1, 0, 56, 1, 8), (128, 128, 3, 2, 1, 56, 1, 8), (256, 512, 1, 2, 0, 56, 1, 16),
    (256, 256, 3, 1, 1, 14, 1, 32), (1024, 2048, 1, 2, 0, 14, 1, 8), (512, 512, 3, 1, 1, 7, 1, 8),
    (2048, 512, 1, 1, 0, 7, 1, 32), (128, 128, 3, 1, 1, 56, 32, 8), (512, 512, 3, 1, 1, 7, 1, 1),
]


def _gpu_int8_case(c_in, c_out, k, s, p, h, g, batch, res=None):
    dev = torch.device("cuda")
    x_qp = UNSIGNED if c_in > 3 else SIGNED
    x = codes((batch, c_in, h, h), x_qp, dev)
    wt = torch.randn(c_out, c_in // g, k, k, device=dev) / (c_in // g * k * k) ** 0.5
    b = torch.randn(c_out, device=dev)
    y, _ = int8_reference(x, LayerQuant(x_qp, out_dtype=torch.float32), wt, b, s, p, 1, g, "relu")
    quant = LayerQuant(x_qp, output_qparams(y, signed=False))
    r = None
    if res is not None:
        quant = LayerQuant(x_qp, quant.output, UNSIGNED)
        r = codes(tuple(y.shape), UNSIGNED, dev)
    _, ref = int8_reference(x, quant, wt, b, s, p, 1, g, "relu", "relu" if r is not None else None,
                            res=r)
    layer = Conv2d(wt, b, stride=s, padding=p, groups=g, activation="relu",
                   post_activation="relu" if r is not None else None, dtype=torch.int8,
                   quant=quant, input_hw=(h, h), batch=batch, residual=r is not None)
    return x, r, ref, layer


def _check_gpu(x, r, ref, layer):
    out = make_out(tuple(ref.shape), torch.int8, x.device)[1]
    layer(x, [out], r)
    torch.cuda.synchronize()
    check_codes(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,k,s,p,h,g,batch", RESNET_INT8)
def test_resnet50_layers_int8_gpu(c_in, c_out, k, s, p, h, g, batch):
    x, r, ref, layer = _gpu_int8_case(c_in, c_out, k, s, p, h, g, batch)
    for config in layer.configs[:8]:  # the default first, then what the tuner times
        layer.config = config
        _check_gpu(x, r, ref, layer)


@pytest.mark.gpu
def test_bottleneck_residual_and_gate_int8_gpu():
    """conv3 of a bottleneck (+ int8 identity, relu) and a gated projection at batch 32."""
    x, r, ref, layer = _gpu_int8_case(64, 256, 1, 1, 0, 56, 1, 32, res="int8")
    assert any(c.get("PREFETCH_RES") is False for c in layer.configs[:8])
    for config in layer.configs[:8]:  # what the tuner times, the residual's twins among them
        layer.config = config
        _check_gpu(x, r, ref, layer)
    dev = torch.device("cuda")
    x = codes((32, 480, 14, 14), UNSIGNED, dev)
    wt, b = torch.randn(112, 480, 1, 1, device=dev) / 22, torch.randn(112, device=dev)
    gate = torch.sigmoid(torch.randn(32, 480, device=dev)).half()
    quant = LayerQuant(UNSIGNED, out_dtype=torch.float16)
    _, ref = int8_reference(x, quant, wt, b, gate=gate)
    layer = Conv2d(wt, b, dtype=torch.int8, quant=quant, input_hw=(14, 14), batch=32)
    for config in layer.configs[:8]:
        layer.config = config
        out = make_out(tuple(ref.shape), torch.float16, dev)[1]
        layer(x, [out], gate=gate)
        torch.cuda.synchronize()
        assert_matches(out, ref)
