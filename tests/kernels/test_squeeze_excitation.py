"""Squeeze-and-excitation excitation kernel against the PyTorch block (adaptive_avg_pool2d ->
conv1x1 -> act -> conv1x1 -> act) on fp32 references, gates poisoned first."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
from helpers import assert_rest_poisoned, channel_slice, rel_err

from torch_gie.activations import Act, apply_activation
from torch_gie.kernels.global_pool import spatial_split
from torch_gie.kernels.squeeze_excitation import (
    SqueezeExcitation,
    check_config,
    excite_block_p,
    se_configs,
    squeeze_meta,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def se_weights(c, cr, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(cr, c, 1, 1, generator=g) / c ** 0.5
    w2 = torch.randn(c, cr, 1, 1, generator=g) / cr ** 0.5
    b1 = torch.randn(cr, generator=g) * 0.1 if bias else None
    b2 = torch.randn(c, generator=g) * 0.1 if bias else None
    return [None if t is None else t.to(device) for t in (w1, b1, w2, b2)]


def se_reference(x, w1, b1, act1, w2, b2, act2, slope1=None, slope2=None):
    """The torchvision block in fp32: pool, 1x1 conv, act, 1x1 conv, act -> (N, C, 1, 1)."""
    s = F.adaptive_avg_pool2d(x.float(), 1)
    h = apply_activation(F.conv2d(s, w1.float(), None if b1 is None else b1.float()), act1, slope1)
    return apply_activation(F.conv2d(h, w2.float(), None if b2 is None else b2.float()), act2, slope2)


def run_se(device, dtype, n, c, cr, hw, act1, act2, bias=True, gate_4d=False, config=None):
    torch.manual_seed(1)
    w1, b1, w2, b2 = se_weights(c, cr, device, bias)
    slope1 = torch.rand(cr, device=device) if act1 == "prelu" else None
    slope2 = torch.rand(c, device=device) if act2 == "prelu" else None
    layer = SqueezeExcitation(w1, b1, act1, w2, b2, act2, dtype, act1_slope=slope1,
                              act2_slope=slope2, config=config)
    _, x = channel_slice((n, c, *hw), dtype, device)
    buf, gate = channel_slice((n, c), dtype, device, fill=float("nan"))
    view = gate[:, :, None, None] if gate_4d else gate
    layer(x, view)
    ref = se_reference(x, w1, b1, act1, w2, b2, act2, slope1, slope2)
    assert rel_err(gate, ref[:, :, 0, 0]) < TOL[dtype]
    assert_rest_poisoned(buf, c)
    return layer, x, view, ref.reshape(view.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("c,cr,hw", [
    (24, 6, (5, 7)),  # efficientnet_b0's second block, odd pixels
    (100, 25, (3, 3)),
    (1152, 48, (2, 3)),  # efficientnet_b0's last blocks: many channels, several blocks of each
    (300, 130, (4, 4)),  # several hidden-unit blocks
])
def test_squeeze_excitation(device, dtype, n, c, cr, hw):
    run_se(device, dtype, n, c, cr, hw, "silu", "sigmoid")


@pytest.mark.parametrize("act1,act2", [("relu", "hardsigmoid"), ("hardswish", "sigmoid"),
                                       (None, None), ("prelu", "prelu"),
                                       (Act("leaky_relu", 0.2), Act("clamp", 0.1, 0.8))],
                         ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_activations_and_biases(device, act1, act2, bias):
    run_se(device, torch.float32, 2, 20, 5, (3, 4), act1, act2, bias=bias, gate_4d=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_reduction_and_many_images(device, dtype):
    # 17 images (two image blocks) with enough pixels that stage 1 splits H*W over programs.
    assert spatial_split(17, 24, 30 * 29, torch.device("cpu")).split > 1
    run_se(device, dtype, 17, 24, 8, (30, 29), "relu", "sigmoid")


def test_wide_hidden_layer_in_slices(device):
    # Cr wider than one W1 slice (stage 1 loops over slices) and one W2 slice (stage 2 does).
    layer, x, _, _ = run_se(device, torch.float32, 2, 300, 130, (4, 4), "relu", "sigmoid")
    assert squeeze_meta(x, 130)["BLOCK_R"] < 130 and layer.config["BLOCK_R"] < 130


def test_strided_pixels(device):
    # A spatial crop: rows not back to back in memory, H*W split over programs.
    torch.manual_seed(3)
    w1, b1, w2, b2 = se_weights(12, 4, device)
    x = torch.randn(2, 12, 40, 41, device=device).contiguous(memory_format=torch.channels_last)
    view = x[:, :, 1:, 2:]
    assert squeeze_meta(view, 4)["S"] > 1 and not squeeze_meta(view, 4)["DENSE_HW"]
    gate = torch.full((2, 12), float("nan"), device=device)
    SqueezeExcitation(w1, b1, "relu", w2, b2, "sigmoid", torch.float32)(view, gate)
    assert rel_err(gate, se_reference(view, w1, b1, "relu", w2, b2, "sigmoid")[:, :, 0, 0]) < 1e-5


def test_every_config(device):
    # Every offered tiling, and small ones that loop over hidden units and partials.
    layer, x, gate, ref = run_se(device, torch.float32, 3, 40, 20, (24, 24), "relu", "sigmoid")
    assert len(layer.configs) > 1
    configs = layer.configs + [{"BLOCK_N": 2, "BLOCK_R": 4, "BLOCK_C": 16, "num_warps": 1},
                               {"BLOCK_N": 1, "BLOCK_R": 1, "BLOCK_C": 1, "num_warps": 1},
                               # partials summed one at a time over the split
                               {"BLOCK_N": 64, "BLOCK_R": 32, "BLOCK_C": 2, "num_warps": 1}]
    assert excite_block_p(squeeze_meta(x, 20)["P"], configs[-1]) < squeeze_meta(x, 20)["P"]
    for config in configs:
        layer.config = config
        gate.fill_(float("nan"))
        layer(x, gate)
        assert rel_err(gate, ref) < 1e-5, config


def test_workspace_kept(device):
    # Calls after the first must not allocate: they are captured into CUDA graphs.
    layer, x, gate, _ = run_se(device, torch.float32, 2, 16, 4, (20, 20), "relu", "sigmoid")
    ws = layer._partials
    layer(x, gate)
    layer(x[:1, :, :10], gate[:1])
    assert layer._partials is ws


def test_linear_weights(device):
    # Linear weights [Cr, C] / [C, Cr] (an SE block written with nn.Linear) work the same.
    w1, b1, w2, b2 = se_weights(12, 4, device)
    x = torch.randn(2, 12, 3, 3, device=device)
    gate = torch.full((2, 12), float("nan"), device=device)
    SqueezeExcitation(w1[:, :, 0, 0], b1, "relu", w2[:, :, 0, 0], b2, "sigmoid", torch.float32)(x, gate)
    assert rel_err(gate, se_reference(x, w1, b1, "relu", w2, b2, "sigmoid")[:, :, 0, 0]) < 1e-5


def test_configs_valid():
    for c, cr in [(24, 6), (1152, 48), (8000, 2000), (16, 4), (3, 1)]:
        configs = se_configs(c, cr)
        assert len(configs) > 1
        for config in configs:
            assert check_config(config) == config
            assert config["BLOCK_R"] <= max(1, triton.next_power_of_2(cr))


def test_errors(device):
    w1, b1, w2, b2 = se_weights(8, 2, device)
    with pytest.raises(ValueError, match=r"w2 must be \(8, 2\)"):
        SqueezeExcitation(w1, b1, "relu", w2[:4], b2, "sigmoid")
    with pytest.raises(ValueError, match=r"b1 must have shape \(2,\)"):
        SqueezeExcitation(w1, b2, "relu", w2, b2, "sigmoid")
    with pytest.raises(ValueError, match="prelu needs act2_slope"):
        SqueezeExcitation(w1, b1, "relu", w2, b2, "prelu")
    with pytest.raises(ValueError, match="act1_slope given"):
        SqueezeExcitation(w1, b1, "relu", w2, b2, "sigmoid", act1_slope=torch.ones(2))
    with pytest.raises(ValueError, match="dtype"):
        SqueezeExcitation(w1, b1, "relu", w2, b2, "sigmoid", torch.float64)
    layer = SqueezeExcitation(w1, b1, "relu", w2, b2, "sigmoid", torch.float32)
    x = torch.randn(2, 8, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"x must be \(N, 8, H, W\)"):
        layer(x[:, :4], torch.empty(2, 4, device=device))
    with pytest.raises(ValueError, match="gate must be"):
        layer(x, torch.empty(2, 8, 2, device=device))
    with pytest.raises(ValueError, match="gate must be torch.float32"):
        layer(x, torch.empty(2, 8, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="power of two >= 1"):
        layer.config = {**layer.config, "BLOCK_N": 3}
    with pytest.raises(ValueError, match="per warp"):
        layer.config = {"BLOCK_N": 16, "BLOCK_R": 256, "BLOCK_C": 256, "num_warps": 4}
    with pytest.raises(ValueError, match="keys"):
        layer.config = {"BLOCK_N": 16}


# (N, C, H, W, Cr, act1, act2): efficientnet_b0, mobilenet_v3_large and regnet_y_400mf SE blocks.
REAL = [
    (32, 96, 112, 112, 4, "silu", "sigmoid"),
    (32, 144, 56, 56, 6, "silu", "sigmoid"),
    (32, 1152, 7, 7, 48, "silu", "sigmoid"),
    (32, 72, 28, 28, 24, "relu", "hardsigmoid"),
    (32, 104, 28, 28, 12, "relu", "sigmoid"),
    (32, 672, 14, 14, 168, "relu", "hardsigmoid"),
    (32, 960, 7, 7, 240, "relu", "hardsigmoid"),
    (32, 440, 7, 7, 52, "relu", "sigmoid"),
    (1, 96, 112, 112, 4, "silu", "sigmoid"),
    (1, 1152, 7, 7, 48, "silu", "sigmoid"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL, ids=lambda s: "x".join(map(str, s[:5])))
def test_real_shapes_gpu(shape):
    n, c, h, w, cr, act1, act2 = shape
    torch.manual_seed(2)
    w1, b1, w2, b2 = se_weights(c, cr, "cuda")
    x = torch.randn(n, c, h, w, device="cuda").half().contiguous(memory_format=torch.channels_last)
    layer = SqueezeExcitation(w1, b1, act1, w2, b2, act2, torch.float16)
    ref = se_reference(x, w1, b1, act1, w2, b2, act2)
    gate = torch.empty(n, c, 1, 1, dtype=torch.float16, device="cuda")
    for config in layer.configs:
        layer.config = config
        gate.fill_(float("nan"))
        layer(x, gate)
        torch.cuda.synchronize()
        assert rel_err(gate, ref) < 1e-2, config


# Compiles both kernels for sm_90 (no GPU needed) and prints their shared memory per launch: the
# failing shapes of an earlier kernel (its unrolled partial loads needed 303-925 KB), a wide
# hidden layer, and a huge map. Triton's interpreter (this process) does not compile, so a child
# process without TRITON_INTERPRET does.
_SM90_SHARED = r"""
import inspect, json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch_gie.kernels import squeeze_excitation as se

def shared(kernel, pointers, floats, constexprs, num_warps):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else pointers.get(p, "fp32" if p in floats else "i32")
           for p in names}
    consts = {(i,): constexprs[p] for i, p in enumerate(names) if p in constexprs}
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(ASTSource(kernel, sig, consts), target=target,
                          options={"num_warps": num_warps}).metadata.shared

acts = dict(HAS_B1=True, HAS_B2=True, ACT1=3, ACT1_ALPHA=0.0, ACT1_BETA=0.0, ACT2=8,
            ACT2_ALPHA=0.0, ACT2_BETA=0.0)
excite_ptrs = dict(part_ptr="*fp32", w2t_ptr="*fp16", b1_ptr="*fp32", b2_ptr="*fp32",
                   slope1_ptr="*fp32", slope2_ptr="*fp32", gate_ptr="*fp16")
rows, seen = [], {}
for n, c, h, w, cr in json.loads(sys.argv[1]):
    x = torch.empty(n, c, h, w, dtype=torch.float16, device="meta")
    sq = se.squeeze_meta(x.contiguous(memory_format=torch.channels_last), cr)
    launches = [(se._squeeze_kernel, dict(x_ptr="*fp16", w1_ptr="*fp16", part_ptr="*fp32"),
                 {k: sq[k] for k in ("DENSE_HW", "BLOCK_HW", "BLOCK_C", "BLOCK_R")}, sq["num_warps"])]
    for cfg in se.se_configs(c, cr):
        meta = dict(acts, BLOCK_N=cfg["BLOCK_N"], BLOCK_P=se.excite_block_p(sq["P"], cfg),
                    BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
        launches.append((se._excite_kernel, excite_ptrs, meta, cfg["num_warps"]))
    for kernel, ptrs, meta, warps in launches:
        key = (kernel.fn.__name__, tuple(sorted(meta.items())), warps)
        if key not in seen:
            seen[key] = shared(kernel, ptrs, ("inv_hw",), meta, warps)
        rows.append([n, c, h, w, cr, kernel.fn.__name__, meta, warps, seen[key]])
print(json.dumps(rows))
"""
H100_SHARED_BYTES = 232448  # per block, H100 / H200


def test_every_config_fits_shared_memory_sm90():
    shapes = [[32, 144, 56, 56, 6], [32, 96, 112, 112, 4], [1, 96, 112, 112, 4],
              [32, 960, 7, 7, 240], [1, 16, 1024, 1024, 4]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _SM90_SHARED, json.dumps(shapes)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr:
        pytest.skip(f"no ptxas to compile for sm_90: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert {r[5] for r in rows} == {"_squeeze_kernel", "_excite_kernel"}
    assert len(rows) == sum(1 + len(se_configs(c, cr)) for _, c, _, _, cr in shapes)
    too_big = [r for r in rows if r[-1] > H100_SHARED_BYTES]
    assert not too_big, too_big
    # No tile grows with H*W: a few KB, not a budget we are close to.
    assert max(r[-1] for r in rows) <= 16384
