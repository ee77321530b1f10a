"""Self-attention exported as onnxruntime's fused `Attention` (vclr.export.attention): the stand-in block equals
`nn.MultiheadAttention`, only calls it reproduces are replaced, and the exports carry the fused node."""

import onnx
import pytest
import torch
from torch import nn

from vclr.export.attention import _FusedSelfAttention, fused_attention, self_attention
from vclr.export.onnx import export_onnx
from vclr.model.source import model_source


def _causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


@pytest.mark.parametrize("causal", [False, True])
def test_the_fused_block_equals_multihead_attention(causal):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 7, 64)  # (B, L, E)
    mask = _causal(7) if causal else None
    expected = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    got = _FusedSelfAttention(attn, causal)(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the op itself, against attention written out by hand
    weight, bias = attn.in_proj_weight.t(), attn.in_proj_bias
    q, k, v = (x @ weight + bias).chunk(3, dim=-1)  # (B, L, E) each

    def heads(t):
        return t.view(3, 7, 4, 16).transpose(1, 2)  # (B, H, L, E/H)

    scores = heads(q) @ heads(k).transpose(-1, -2) / 4.0 + (mask if causal else 0)  # (B, H, L, L)
    naive = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(3, 7, 64)
    torch.testing.assert_close(self_attention(x, weight, bias, 4, causal), naive, atol=1e-5, rtol=1e-5)


class _Blocks(nn.Module):
    """Four attention blocks called four ways: plain, causal, another mask, cross-attention."""

    def __init__(self):
        super().__init__()
        self.plain, self.causal, self.masked, self.cross = (nn.MultiheadAttention(32, 2, batch_first=True)
                                                            for _ in range(4))

    def forward(self, x):  # (B, L, 32)
        length = x.shape[1]
        x = x + self.plain(x, x, x, need_weights=False)[0]
        x = x + self.causal(x, x, x, need_weights=False, attn_mask=_causal(length))[0]
        x = x + self.masked(x, x, x, need_weights=False, attn_mask=torch.eye(length) * -1e4)[0]
        return x + self.cross(x, x.flip(1), x.flip(1), need_weights=False)[0]


def test_only_the_calls_the_fused_node_reproduces_are_replaced():
    torch.manual_seed(0)
    blocks = _Blocks().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = blocks(x)
        with fused_attention(blocks, x) as fused:
            kinds = {name: type(m).__name__ for name, m in fused.named_children()}
            assert kinds == {"plain": "_FusedSelfAttention", "causal": "_FusedSelfAttention",
                             "masked": "MultiheadAttention", "cross": "MultiheadAttention"}
            assert (fused.plain.causal, fused.causal.causal) == (False, True)
            torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    assert all(isinstance(m, nn.MultiheadAttention) for m in blocks.children())  # the tower itself is untouched


def test_the_blocks_are_put_back_when_the_export_fails():
    blocks = _Blocks().eval()
    plain = blocks.plain
    with pytest.raises(RuntimeError), torch.no_grad(), fused_attention(blocks, torch.randn(1, 4, 32)) as fused:
        assert fused is blocks and isinstance(blocks.plain, _FusedSelfAttention)  # swapped in place, not copied
        raise RuntimeError("the exporter failed")
    assert blocks.plain is plain and all(isinstance(m, nn.MultiheadAttention) for m in blocks.children())


def test_a_tower_without_attention_is_not_run():
    class Counting(nn.Module):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return x

    tower = Counting()
    with fused_attention(tower, torch.randn(1, 4)) as fused:
        assert fused is tower
    assert Counting.calls == 0


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.slow
def test_a_vit_exports_with_fused_attention_in_fp32_and_int8(tmp_path):
    """vclr-tiny-vit (a ViT image tower, a causal text transformer): both towers' attention is one `Attention` node
    (`QAttention` in int8), the export's own check against PyTorch passes, and int8 leaves convolutions in fp32."""
    source = model_source(model="vclr-tiny-vit")
    torch.manual_seed(0)
    fp32 = export_onnx(source, tmp_path / "fp32")
    assert fp32["min_cosine"] >= 0.9999
    for name in ("text.onnx", "image.onnx"):
        ops = _ops(tmp_path / "fp32" / name)
        assert "Attention" in ops and "Softmax" not in ops
    torch.manual_seed(0)
    assert export_onnx(source, tmp_path / "int8", int8=True)["int8_recipe"] == 3
    image_ops = _ops(tmp_path / "int8" / "image.onnx")
    assert "QAttention" in image_ops and "Conv" in image_ops and "ConvInteger" not in image_ops
    assert "QAttention" in _ops(tmp_path / "int8" / "text.onnx")
