"""Self-attention exported as one onnxruntime `Attention` node (com.microsoft), for the ONNX export (vclr.export.onnx).

    with fused_attention(tower, example) as fused:   # `tower`, its attention blocks swapped until the end
        torch.onnx.export(fused, (example,), ..., custom_translation_table=TRANSLATIONS)

torch.onnx's dynamo exporter spells `nn.MultiheadAttention` as some forty nodes: batch-first transposes around it,
the input projection, a split into heads and more transposes, two matrix products and a softmax; onnxruntime's
transformer optimiser does not recognise that pattern in the exporter's graphs. onnxruntime's CPU kernel for its own
`Attention` op does the same work in one node, and its dynamic quantiser turns it into `QAttention` (an int8 input
projection). Measured on ViT-B-32's image tower at batch 32, 2 cores, AVX-512 VNNI (scripts/bench_onnx.py): the
transposes alone took 16% of the int8 tower's time, and fusing took it from 46.8 to 54.6 images/s (same session).

Only blocks whose output the fused node reproduces are replaced: an `nn.MultiheadAttention` called as self-attention
(the same tensor as query, key and value, batch first, one projection for the three, biases) with no mask or with the
causal mask (open_clip's text transformer), as seen on one eager pass over the example input. Every other block
exports as before. The export's own check against PyTorch (vclr.export.onnx) stands behind this.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("vclr::self_attention", mutates_args=())
def self_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int,
                   causal: bool) -> torch.Tensor:
    """(B, L, E) inputs, weight (E, 3E) of the query/key/value projection, bias (3E,) -> (B, L, E) the heads'
    outputs concatenated (before the output projection): onnxruntime's `Attention` in PyTorch."""
    batch, length, width = x.shape
    qkv = (x @ weight + bias).view(batch, length, 3, num_heads, width // num_heads)  # (B, L, 3, H, E/H)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, E/H)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, E/H)
    return out.transpose(1, 2).reshape(batch, length, width)


@self_attention.register_fake
def _(x, weight, bias, num_heads, causal):
    return torch.empty_like(x)


def _attention_onnx(x, weight, bias, num_heads: int, causal: bool):
    from onnxscript.values import Op, Opset

    return Op(Opset("com.microsoft", 1), "Attention", _attention_schema())(
        x, weight, bias, num_heads=num_heads, unidirectional=int(causal))


@functools.cache
def _attention_schema():
    """onnxruntime's contrib `Attention` as far as the export uses it (onnx ships no schema for contrib ops, and the
    exporter needs one to tell inputs from attributes)."""
    from onnx.defs import OpSchema

    tensor = "T"
    inputs = [OpSchema.FormalParameter(name, tensor) for name in ("input", "weights", "bias")]
    attributes = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
                  OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "1: causal")]
    outputs = [OpSchema.FormalParameter("output", tensor)]
    return OpSchema("Attention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=[(tensor, ["tensor(float)"], "float")], attributes=attributes)


TRANSLATIONS = {torch.ops.vclr.self_attention.default: _attention_onnx}


class _FusedSelfAttention(nn.Module):
    """Stands in for an `nn.MultiheadAttention` that is called as self-attention: same call, same result."""

    def __init__(self, attn: nn.MultiheadAttention, causal: bool):
        super().__init__()
        self.num_heads, self.causal = attn.num_heads, causal
        # buffers, not transposed at run time: the quantiser needs the weight as an initializer of the graph
        self.register_buffer("qkv_weight", attn.in_proj_weight.detach().t().contiguous())  # (E, 3E)
        self.register_buffer("qkv_bias", attn.in_proj_bias.detach().clone())  # (3E,)
        self.out_proj = attn.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        out = torch.ops.vclr.self_attention(query, self.qkv_weight, self.qkv_bias, self.num_heads, self.causal)
        return self.out_proj(out), None


@contextlib.contextmanager
def fused_attention(tower: nn.Module, example: torch.Tensor):
    """`tower` with its fusable attention blocks (module docstring) running as `vclr::self_attention` inside the
    block, and put back as they were when it exits. Swapped in place, not on a copy: a copy would hold one more
    model in memory for the whole export. A tower with no `nn.MultiheadAttention` is yielded as it is, without the
    eager pass."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        if any(isinstance(m, nn.MultiheadAttention) for m in tower.modules()):
            for name, causal in _attention_calls(tower, example).items():
                parent, _, child = name.rpartition(".")
                owner = tower.get_submodule(parent) if parent else tower
                original = getattr(owner, child)
                setattr(owner, child, _FusedSelfAttention(original, causal))
                swapped.append((owner, child, original))
        yield tower
    finally:
        for owner, child, original in reversed(swapped):
            setattr(owner, child, original)


def _attention_calls(tower: nn.Module, example: torch.Tensor) -> dict[str, bool]:
    """name -> causal, for each `nn.MultiheadAttention` of `tower` that one eager pass over `example` calls in a
    fusable way (every call of it: a block called twice differently is left alone)."""
    seen: dict[str, set] = {}
    hooks = []
    for name, module in tower.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            def hook(module, args, kwargs, name=name):
                seen.setdefault(name, set()).add(_fusable(module, args, kwargs))
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            tower(example)
    finally:
        for h in hooks:
            h.remove()
    return {name: kinds.pop() for name, kinds in seen.items() if len(kinds) == 1 and None not in kinds}


def _fusable(attn: nn.MultiheadAttention, args: tuple, kwargs: dict) -> bool | None:
    """causal (True/False) when this call is one the fused node reproduces, else None."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    call = {**dict(zip(names, args)), **kwargs}
    query = call.get("query")
    if (not attn.batch_first or not attn._qkv_same_embed_dim or attn.in_proj_bias is None
            or attn.bias_k is not None or attn.add_zero_attn or call.get("key_padding_mask") is not None
            or call.get("is_causal") or query is None or query.dim() != 3
            or any(call.get(k) is not None and call.get(k) is not query for k in ("key", "value"))):
        return None
    mask = call.get("attn_mask")
    if mask is None:
        return False
    length = query.shape[1]
    causal = torch.full((length, length), float("-inf"), dtype=query.dtype, device=query.device).triu(1)
    if mask.shape == (length, length) and mask.dtype == query.dtype and torch.equal(mask, causal):
        return True
    return None
