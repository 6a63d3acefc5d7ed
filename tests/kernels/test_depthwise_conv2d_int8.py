"""The int8 path of the direct depthwise conv (``DepthwiseConv2d(..., dtype=torch.int8,
quant=...)``) against the exact integer emulation of ``torch_gie.quantize.arith``: kernel sizes,
strides, zero-point padding (signed and unsigned inputs), channel multipliers, int8 and real
residuals and outputs, channel-slice views and output segments.

Same conventions as ``test_conv2d_int8.py``: random codes, poisoned outputs, int8 outputs within
one code on at most 1% of the elements, real outputs within 1e-3 relative.
"""
import pytest
import torch
from quant_checks import POISON, check_codes
from test_conv2d_int8 import (
    SIGNED,
    UNSIGNED,
        assert_matches,
    codes,
    int8_reference,
    make_out,
    output_qparams,
)

from torch_gie.kernels.depthwise_conv2d import DepthwiseConv2d
from torch_gie.quantize.arith import LayerQuant, QParams

SMALL = {"BLOCK_M": 32, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}


def run(n, c, h, w, k, stride=1, padding=0, dilation=1, mult=1, *, x_qp=SIGNED, out="int8",
        act=None, post=None, res=None, x_slice=False, out_slice=False, config=SMALL, device="cpu"):
    """A depthwise int8 layer on random codes into a poisoned output, checked against the
    reference; out: "int8" (QParams fitted to the result) or "fp16"; res: None, "int8", "fp16"."""
    x = codes((n, c, h, w), x_qp, device, extra=6 if x_slice else 0, offset=3)
    wt = torch.randn(c * mult, 1, k, k, device=device)
    b = torch.randn(c * mult, device=device)
    args = (wt, b, stride, padding, dilation, c)
    y, _ = int8_reference(x, LayerQuant(x_qp, out_dtype=torch.float32), *args, act)
    r, res_qp = None, None
    if res == "int8":
        res_qp = QParams(y.abs().max().item() / 255, -128)
        r = codes(tuple(y.shape), res_qp, device, extra=3, offset=2)
    elif res == "fp16":
        r = (y.abs().mean() * torch.randn(y.shape, device=device)).half()
    quant = LayerQuant(x_qp, None, res_qp)
    y, ref = int8_reference(x, quant, *args, act, post, res=r)
    if out == "int8":
        quant = LayerQuant(x_qp, output_qparams(y), res_qp)
        _, ref = int8_reference(x, quant, *args, act, post, res=r)
    buf, o = make_out(tuple(ref.shape), quant.store_dtype, device, extra=5 if out_slice else 0,
                      offset=3)
    DepthwiseConv2d(wt, b, stride=stride, padding=padding, dilation=dilation, groups=c,
                    activation=act, post_activation=post, dtype=torch.int8, quant=quant,
                    config=config)(x, [o], r)
    assert_matches(o, ref)
    if out_slice:
        rest = torch.cat([buf[:, :3], buf[:, 3 + o.shape[1]:]], dim=1)
        assert (rest == POISON).all() if o.dtype == torch.int8 else rest.isnan().all()


# name: (n, c, h, w, k, stride, padding, dilation, mult), input QParams
CASES = {
    "3x3": ((2, 24, 5, 6, 3, 1, 1, 1, 1), UNSIGNED),
    "3x3_stride2": ((1, 20, 7, 7, 3, 2, 1, 1, 1), SIGNED),
    "5x5_stride2": ((1, 16, 9, 8, 5, 2, 2, 1, 1), UNSIGNED),
    "7x7": ((1, 8, 7, 7, 7, 1, 3, 1, 1), UNSIGNED),
    "asymmetric_pad": ((1, 16, 6, 5, 3, 2, (0, 1, 1, 0), 1, 1), UNSIGNED),
    "dilation2_mult2": ((2, 5, 6, 6, 3, 1, 2, 2, 2), SIGNED),
}


@pytest.mark.parametrize("name", list(CASES))
def test_geometry(name, device):
    geometry, x_qp = CASES[name]
    run(*geometry, x_qp=x_qp, act="relu6", device=device)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("res,out,act,post", [("int8", "int8", None, "relu"), ("fp16", "fp16", "hardswish", None),
                                              (None, "fp16", "silu", None)])
def test_residual_and_real_outputs(res, out, act, post, device):
    run(2, 24, 5, 4, 3, 1, 1, x_qp=UNSIGNED, out=out, act=act, post=post, res=res, out_slice=True,
        device=device)


def test_channel_slice_views(device):
    run(2, 20, 5, 5, 3, 2, 1, x_qp=UNSIGNED, act="relu", x_slice=True, out_slice=True,
        config={"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1}, device=device)


def test_segments(device):
    x = codes((1, 12, 4, 5), UNSIGNED, device)
    wt, b = torch.randn(12, 1, 3, 3, device=device), torch.randn(12, device=device)
    y, _ = int8_reference(x, LayerQuant(UNSIGNED, out_dtype=torch.float32), wt, b, 1, 1, 1, 12, "relu")
    quant = LayerQuant(UNSIGNED, output_qparams(y))
    _, ref = int8_reference(x, quant, wt, b, 1, 1, 1, 12, "relu")
    buf, _ = make_out((1, 15, 4, 5), torch.int8, device)
    outs = [buf[:, 0:5], buf[:, 7:14]]
    DepthwiseConv2d(wt, b, padding=1, groups=12, activation="relu", dtype=torch.int8, quant=quant,
                    config=SMALL)(x, outs)
    check_codes(torch.cat(outs, dim=1), ref)
    assert (buf[:, [5, 6, 14]] == POISON).all()


def test_layer_holds_codes():
    layer = DepthwiseConv2d(torch.randn(16, 1, 3, 3), groups=16, dtype=torch.int8,
                            quant=LayerQuant(SIGNED, SIGNED))
    assert layer.weight.dtype == torch.int8 and layer.scale.dtype == torch.float32
    assert layer.configs and layer.config == layer.configs[0]


# GPU: MobileNet/EfficientNet depthwise layers (C, k, stride, H, batch).
DEPTHWISE_INT8 = [(96, 3, 1, 56, 32), (144, 3, 2, 56, 32), (240, 5, 1, 14, 16), (672, 5, 2, 14, 8),
                  (32, 3, 1, 112, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("c,k,s,h,batch", DEPTHWISE_INT8)
def test_depthwise_layers_int8_gpu(c, k, s, h, batch):
    dev = torch.device("cuda")
    x = codes((batch, c, h, h), UNSIGNED, dev)
    wt, b = torch.randn(c, 1, k, k, device=dev), torch.randn(c, device=dev)
    args = (wt, b, s, k // 2, 1, c)
    y, _ = int8_reference(x, LayerQuant(UNSIGNED, out_dtype=torch.float32), *args, "relu6")
    quant = LayerQuant(UNSIGNED, output_qparams(y, signed=False))
    _, ref = int8_reference(x, quant, *args, "relu6")
    layer = DepthwiseConv2d(wt, b, stride=s, padding=k // 2, groups=c, activation="relu6",
                            dtype=torch.int8, quant=quant)
    for config in layer.configs[:8]:
        layer.config = config
        out = make_out(tuple(ref.shape), torch.int8, dev)[1]
        layer(x, [out])
        torch.cuda.synchronize()
        check_codes(out, ref)
