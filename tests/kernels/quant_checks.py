"""Shared checks of the int8 kernel tests: random codes, poisoned int8 buffers, and the
tolerance of ``quantize.arith`` (codes at most one apart on at most 1% of the elements, where a
kernel contracts ``acc * s + b`` into an FMA; real outputs as the fp32 reference)."""
import json
import os
import subprocess
import sys

import torch

from torch_gie.quantize.arith import QParams, qparams_for_range, requantize
from torch_gie.testing import rel_err

SIGNED = QParams(0.05, 0)
UNSIGNED = QParams(0.03, -128)
POISON = 93  # an int8 poison: unwritten elements fail the comparison unless the reference is 93


def random_codes(shape, qp: QParams, device, generator=None) -> torch.Tensor:
    """Codes over the whole range of ``qp`` (signed: [-127, 127]; unsigned: all 256)."""
    lo = -128 if qp.unsigned else -127
    return torch.randint(lo, 128, shape, generator=generator).to(torch.int8).to(device)


def int8_slice(shape, device, extra=5, fill=POISON):
    """A poisoned int8 buffer wider along dim 1 (channels_last when 4D) and channels [2, 2 + C)
    of it, as a removed concat leaves them: returns (buffer, view)."""
    n, c, *rest = shape
    buf = torch.full((n, c + extra, *rest), fill, dtype=torch.int8, device=device)
    if buf.dim() == 4:
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf, buf[:, 2:2 + c]


def codes_slice(shape, qp: QParams, device) -> torch.Tensor:
    """Random codes in a channel-slice view of a wider poisoned buffer (``int8_slice``)."""
    _, view = int8_slice(shape, device)
    view.copy_(random_codes(view.shape, qp, device))
    return view


def assert_rest_untouched(buf, c, fill=POISON):
    assert (buf[:, :2] == fill).all() and (buf[:, 2 + c:] == fill).all()


def output_qparams(ref: torch.Tensor, unsigned: bool) -> QParams:
    """QParams clipping the top 10% of |ref|, so both rounding and saturation are exercised."""
    amax = ref.abs().amax().item() * 0.9
    return qparams_for_range(0.0 if unsigned else -amax, amax, non_negative=unsigned)


def check_codes(out: torch.Tensor, ref_codes: torch.Tensor, frac: float = 0.01) -> None:
    """int8 codes: at most one apart, on at most ``frac`` of the elements (at least one)."""
    assert out.dtype == torch.int8 and ref_codes.dtype == torch.int8
    diff = (out.to(torch.int32) - ref_codes.to(torch.int32)).abs()
    assert diff.max().item() <= 1, f"codes {diff.max().item()} apart"
    off = int((diff != 0).sum())
    assert off <= max(1, int(frac * diff.numel())), f"{off} of {diff.numel()} codes off by one"


def check_real(out: torch.Tensor, ref: torch.Tensor) -> None:
    """A real (fp16/fp32) store of the fp32 reference: written everywhere, rounded once."""
    assert torch.isfinite(out).all(), "unwritten (poisoned) output elements"
    tol = 1e-6 if out.dtype == torch.float32 else 1e-3
    assert rel_err(out, ref) < tol


def check_output(out: torch.Tensor, ref: torch.Tensor, qp: QParams | None) -> None:
    """``ref`` (fp32 real values) requantized to qp when out holds codes, else stored as is."""
    if qp is None:
        check_real(out, ref)
    else:
        check_codes(out, requantize(ref, qp))


# Compiles kernels for sm_90 without a GPU, in a child process: the interpreter (this process)
# does not compile, and constructs it accepts (a plain global, an int8 dot with K < 32) can still
# fail there. Each spec: [module, kernel, pointer types, float args, constexprs, warps, stages].
_SM90_COMPILE = r"""
import importlib, inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

rows = []
for module, name, pointers, floats, constexprs, warps, stages in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(module), name)
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else pointers.get(p, "fp32" if p in floats else "i32")
           for p in names}
    consts = {(i,): constexprs[p] for i, p in enumerate(names) if p in constexprs}
    k = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    rows.append({"shared": k.metadata.shared, "mma": "mma" in k.asm["ptx"]})
print(json.dumps(rows))
"""


def compile_sm90(specs: list) -> list[dict]:
    """Compile each spec for sm_90; returns [{"shared": bytes, "mma": uses tensor cores}]."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _SM90_COMPILE, json.dumps(specs)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
