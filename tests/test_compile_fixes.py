"""optim.compile's workaround for inductor's wrong nearest-upsampling gradients (latentsd/training/compile_fixes.py):
the traced graph has no scatter for whole factors and keeps torch's own for others, and a UNet compiled by inductor
gets eager's gradients in every weight (without the fix: zero below the upsamplers)."""

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from latentsd.config import OptimConfig
from latentsd.models import build_components
from latentsd.training.compile_fixes import exact_nearest_upsampling
from latentsd.training.setup import speed_up


def _traced(fn, *inputs):
    """Outputs, input gradients and the ops of the forward and backward graphs AOTAutograd traced for ``fn``."""
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))(*inputs)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin())
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    return out, [x.grad for x in inputs], ops


@pytest.mark.parametrize("call", [
    lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"),  # diffusers' Upsample2D
    lambda x: F.interpolate(x, scale_factor=(3, 2), mode="nearest"),
    lambda x: F.interpolate(x, size=(10, 14), mode="nearest"),  # a size given as a whole multiple
    lambda x: F.interpolate(x, size=(7, 9), mode="nearest"),  # not a whole factor: torch's decomposition
])
def test_traced_nearest_upsampling_equals_eager_and_scatters_only_for_fractional_sizes(call):
    exact_nearest_upsampling()
    x = torch.randn(2, 3, 5, 7)
    eager_in = x.clone().requires_grad_()
    eager = call(eager_in)
    eager.backward(torch.arange(eager.numel(), dtype=eager.dtype).reshape(eager.shape).sin())
    out, (grad,), ops = _traced(call, x)
    assert torch.equal(out, eager)  # the same function, bit for bit
    torch.testing.assert_close(grad, eager_in.grad, rtol=1e-6, atol=1e-6)
    whole = all(o % i == 0 for o, i in zip(eager.shape[-2:], x.shape[-2:]))
    assert any("index_put" in op for op in ops) is not whole, ops


def test_a_unet_compiled_by_inductor_gets_eagers_gradients(tmp_path, monkeypatch):
    # ≈ 1 min of inductor code generation on a CPU, kept in CI: it guards optim.compile's default backend; the fresh
    # cache makes it compile, not reuse an old graph
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    grads = []
    for compiled in (False, True):
        unet = build_components("tiny", seed=0).unet.train()
        if compiled:
            speed_up(unet, OptimConfig(compile=True))
        g = torch.Generator().manual_seed(0)
        c = unet.config
        x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        text = torch.randn(2, 8, c.cross_attention_dim, generator=g)
        unet(x, t, encoder_hidden_states=text, return_dict=False)[0].square().mean().backward()
        grads.append({n: p.grad for n, p in unet.named_parameters()})
    eager, compiled = grads
    # within 1e-4 of each tensor's largest gradient (measured: 7e-8 absolute at most; without the fix 126 of 208 wrong)
    wrong = [n for n in eager if (compiled[n] - eager[n]).abs().max() > 1e-4 * eager[n].abs().max()]
    assert not wrong, f"{len(wrong)} of {len(eager)} gradients differ, e.g. {wrong[:3]}"
