"""A ReLU applied just before requantizing to unsigned codes (zero point -128) is implied by the
lower saturation and dropped from the kernel's constexprs; nothing else is."""
import torch

from torch_gie.activations import act_constexprs, activation_code
from torch_gie.kernels.conv_epilogue import saturation_implied
from torch_gie.quantize.arith import LayerQuant, qparams_for_range

UNSIGNED = qparams_for_range(0.0, 6.0, non_negative=True)
SIGNED = qparams_for_range(-3.0, 3.0)
RELU, NONE = activation_code("relu"), activation_code(None)


def _acts(act, post):
    return {**act_constexprs(act, "ACT"), **act_constexprs(post, "POST_ACT")}


def test_the_last_relu_before_unsigned_codes_is_dropped():
    assert UNSIGNED.zero_point == -128
    quant = LayerQuant(SIGNED, UNSIGNED)
    assert saturation_implied(_acts("relu", None), quant, False)["ACT"] == NONE
    with_res = saturation_implied(_acts("relu", "relu"), quant, True)
    assert with_res["ACT"] == RELU and with_res["POST_ACT"] == NONE  # the one before the add stays
    assert saturation_implied(_acts("relu", None), quant, True)["ACT"] == RELU  # the add comes after it


def test_everything_else_is_kept():
    for quant in (None, LayerQuant(SIGNED, SIGNED), LayerQuant(SIGNED, None, out_dtype=torch.float16)):
        acts = _acts("relu", "relu")
        assert saturation_implied(acts, quant, True) == acts
    acts = _acts("relu6", None)
    assert saturation_implied(acts, LayerQuant(SIGNED, UNSIGNED), False) == acts
