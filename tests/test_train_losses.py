"""Losses against naive per-anchor loops on small seeded tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from vclr.config import LossConfig
from vclr.train.loss import CombinedLoss, FeatureQueue, InfoNCELoss, TripletLoss


def _features(batch=7, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1))


def naive_infonce(img, txt, scale):
    n = len(img)
    total = 0.0
    for i in range(n):  # image i against every caption
        logits = [scale * float(img[i] @ txt[j]) for j in range(n)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    for j in range(n):  # caption j against every image
        logits = [scale * float(txt[j] @ img[i]) for i in range(n)]
        total += -logits[j] + math.log(sum(math.exp(v) for v in logits))
    return total / (2 * n)


def naive_triplet(img, txt, margin, hardest):
    n = len(img)
    s = [[float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    i2t = t2i = 0.0
    for i in range(n):
        v = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i]
        i2t += max(v) if hardest else sum(v)
    for j in range(n):
        v = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(n) if i != j]
        t2i += max(v) if hardest else sum(v)
    return i2t / n + t2i / n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_infonce_matches_naive(seed, scale):
    img, txt = _features(seed=seed)
    got = InfoNCELoss()(img, txt, torch.tensor(scale, dtype=torch.float64))["infonce_loss"]
    assert float(got) == pytest.approx(naive_infonce(img, txt, scale), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("negatives", ["hardest", "all"])
@pytest.mark.parametrize("margin", [0.0, 0.2, 0.9])
def test_triplet_matches_naive(seed, negatives, margin):
    img, txt = _features(seed=seed)
    got = TripletLoss(margin, negatives)(img, txt)["triplet_loss"]
    assert float(got) == pytest.approx(naive_triplet(img, txt, margin, negatives == "hardest"), rel=1e-10, abs=1e-12)


def test_triplet_zero_when_positives_dominate():
    eye = torch.eye(4, dtype=torch.float64)
    assert float(TripletLoss(0.5, "hardest")(eye, eye)["triplet_loss"]) == 0.0  # s(pos)=1, s(neg)=0 > margin 0.5
    assert float(TripletLoss(1.5, "hardest")(eye, eye)["triplet_loss"]) == pytest.approx(2 * 0.5)


def test_infonce_gradient_matches_naive_autograd():
    img, txt = _features(seed=3)
    img.requires_grad_(True)
    InfoNCELoss()(img, txt, torch.tensor(10.0, dtype=torch.float64))["infonce_loss"].backward()
    fast = img.grad.clone()
    img.grad = None
    logits = 10.0 * img @ txt.T
    labels = torch.arange(len(img))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    torch.testing.assert_close(fast, img.grad)


def test_combined_weights_and_triplet_warmup():
    img, txt = _features(seed=4)
    scale = torch.tensor(5.0, dtype=torch.float64)
    cfg = LossConfig(infonce_weight=0.7, triplet_weight=2.0, triplet_margin=0.3, triplet_warmup_steps=10)
    loss = CombinedLoss(cfg)
    infonce = naive_infonce(img, txt, 5.0)
    triplet = naive_triplet(img, txt, 0.3, True)
    assert float(loss(img, txt, scale, step=0)["loss"]) == pytest.approx(0.7 * infonce)
    assert float(loss(img, txt, scale, step=5)["loss"]) == pytest.approx(0.7 * infonce + 0.5 * 2.0 * triplet)
    assert float(loss(img, txt, scale, step=50)["loss"]) == pytest.approx(0.7 * infonce + 2.0 * triplet)


def naive_infonce_with_bank(img, txt, bank_img, bank_txt, scale):
    """Each image scored against every caption and every banked caption; each caption likewise against images."""
    n = len(img)
    total = 0.0
    for i in range(n):
        logits = [scale * float(img[i] @ t) for t in list(txt) + list(bank_txt)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    for j in range(n):
        logits = [scale * float(txt[j] @ v) for v in list(img) + list(bank_img)]
        total += -logits[j] + math.log(sum(math.exp(v) for v in logits))
    return total / (2 * n)


def naive_hardest_triplet_with_bank(img, txt, bank_img, bank_txt, margin):
    n = len(img)
    i2t = sum(max(max(0.0, margin + float(img[i] @ t) - float(img[i] @ txt[i]))
                  for j, t in enumerate(list(txt) + list(bank_txt)) if j != i) for i in range(n))
    t2i = sum(max(max(0.0, margin + float(txt[j] @ v) - float(txt[j] @ img[j]))
                  for i, v in enumerate(list(img) + list(bank_img)) if i != j) for j in range(n))
    return i2t / n + t2i / n


def test_memory_bank_negatives_match_naive():
    cfg = LossConfig(infonce_weight=1.0, triplet_weight=1.0, triplet_margin=0.4, memory_bank_size=10)
    loss = CombinedLoss(cfg, embed_dim=5).double()
    first_img, first_txt = _features(seed=5)
    second_img, second_txt = _features(seed=6)
    scale = torch.tensor(7.0, dtype=torch.float64)
    # empty bank: plain in-batch loss
    got = loss(first_img, first_txt, scale)
    assert float(got["infonce_loss"]) == pytest.approx(naive_infonce(first_img, first_txt, 7.0), rel=1e-10)
    # the first batch (7 pairs) is now in the bank: extra negatives for the second
    got = loss(second_img, second_txt, scale)
    assert float(got["infonce_loss"]) == pytest.approx(
        naive_infonce_with_bank(second_img, second_txt, first_img, first_txt, 7.0), rel=1e-10)
    assert float(got["triplet_loss"]) == pytest.approx(
        naive_hardest_triplet_with_bank(second_img, second_txt, first_img, first_txt, 0.4), rel=1e-10)
    assert float(got["infonce_loss"]) > naive_infonce(second_img, second_txt, 7.0)  # more negatives, harder task


def test_feature_queue_keeps_the_newest_entries_fifo():
    queue = FeatureQueue(size=5, dim=1)
    queue.push(torch.arange(3.0)[:, None], -torch.arange(3.0)[:, None])
    images, texts = queue.negatives()
    assert images.flatten().tolist() == [0, 1, 2] and texts.flatten().tolist() == [0, -1, -2]
    queue.push(torch.arange(3.0, 7.0)[:, None], -torch.arange(3.0, 7.0)[:, None])  # wraps: 5, 6 overwrite 0, 1
    images, _ = queue.negatives()
    assert sorted(images.flatten().tolist()) == [2, 3, 4, 5, 6]
    state = queue.state_dict()  # checkpointed with the run
    restored = FeatureQueue(size=5, dim=1)
    restored.load_state_dict(state)
    assert torch.equal(restored.negatives()[0], images) and int(restored.next_slot) == 2
    queue.push(torch.arange(10.0, 18.0)[:, None], torch.zeros(8, 1))  # more than the queue holds: the newest 5
    assert sorted(queue.negatives()[0].flatten().tolist()) == [13, 14, 15, 16, 17]


def test_bank_is_not_updated_without_grad():
    loss = CombinedLoss(LossConfig(memory_bank_size=4), embed_dim=5).double()
    img, txt = _features(batch=3, seed=7)
    with torch.no_grad():
        loss(img, txt, torch.tensor(2.0, dtype=torch.float64))
    assert int(loss.bank.filled) == 0


# ------------------------------------------------------------------------------------------------ SigLIP (sigmoid)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [3, 4096])  # columns scored 3 at a time under checkpointing, or all at once
def test_siglip_matches_open_clip_loss_and_gradients(seed, chunk):
    from open_clip.loss import SigLipLoss as OpenClipSigLip

    from vclr.train.loss import SigLipLoss

    img, txt = (t.float().requires_grad_() for t in _features(batch=8, dim=6, seed=seed))
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0 + seed, requires_grad=True)
    ours = SigLipLoss(chunk=chunk)(img, txt, scale, bias)
    assert set(ours) == {"siglip_loss"}
    grads = torch.autograd.grad(ours["siglip_loss"], [img, txt, scale, bias])
    reference = OpenClipSigLip()(img, txt, scale, bias)
    expected = torch.autograd.grad(reference, [img, txt, scale, bias])
    torch.testing.assert_close(ours["siglip_loss"], reference)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_siglip_is_a_combined_loss_term_with_its_own_weight():
    img, txt = (t.float() for t in _features(batch=6, seed=3))
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    from vclr.train.loss import SigLipLoss

    both = CombinedLoss(LossConfig(infonce_weight=1.0, siglip_weight=0.5))(img, txt, scale, logit_bias=bias)
    expected = InfoNCELoss()(img, txt, scale)["infonce_loss"] + 0.5 * SigLipLoss()(img, txt, scale, bias)["siglip_loss"]
    torch.testing.assert_close(both["loss"], expected)
    with pytest.raises(ValueError, match="logit_bias"):
        CombinedLoss(LossConfig(infonce_weight=0.0, siglip_weight=1.0))(img, txt, scale)


# ------------------------------------------------------------------------------------------------ false negatives


def _batch_with_duplicates(seed=4):
    """Rows 0 and 3 show one image (two of its captions); rows 1 and 5 carry the same caption text."""
    img, noise = (t.float() for t in _features(batch=6, seed=seed))
    img = img.clone()
    img[3] = img[0]
    txt = F.normalize(img + 0.3 * noise, dim=-1)  # captions near their images: the duplicates score high
    txt[5] = txt[1]
    image_ids = torch.tensor([10, 11, 12, 10, 14, 15])
    caption_ids = torch.tensor([20, 21, 22, 23, 24, 21])
    return img, txt, image_ids, caption_ids


def _dropping(img, txt, scale, bias, term, pairs):
    """Reference: each row's loss computed with the false-negative columns removed from its candidates."""
    n = len(img)
    if term == "infonce":
        total = 0.0
        for i in range(n):
            keep = [j for j in range(n) if (i, j) not in pairs]
            at = keep.index(i)
            total += F.cross_entropy(scale * img[i] @ txt[keep].T, torch.tensor(at))
            total += F.cross_entropy(scale * txt[i] @ img[keep].T, torch.tensor(at))
        return total / (2 * n)
    if term == "siglip":
        total = 0.0
        for i in range(n):
            for j in range(n):
                if (i, j) not in pairs:
                    total += -F.logsigmoid((1.0 if i == j else -1.0) * (scale * img[i] @ txt[j] + bias))
        return total / n
    margin, total = 0.2, 0.0  # triplet, hardest negatives
    s = img @ txt.T
    for i in range(n):
        negatives = [j for j in range(n) if j != i and (i, j) not in pairs]
        total += max(max(0.0, margin + s[i, j] - s[i, i]) for j in negatives) / n
        total += max(max(0.0, margin + s[j, i] - s[i, i]) for j in negatives) / n
    return total


@pytest.mark.parametrize("term", ["infonce", "triplet", "siglip"])
def test_duplicates_in_a_batch_are_not_each_others_negatives(term):
    img, txt, image_ids, caption_ids = _batch_with_duplicates()
    scale, bias = torch.tensor(12.0), torch.tensor(-5.0)
    pairs = {(0, 3), (3, 0), (1, 5), (5, 1)}
    cfg = LossConfig(infonce_weight=float(term == "infonce"), triplet_weight=float(term == "triplet"),
                     siglip_weight=float(term == "siglip"))
    masked = CombinedLoss(cfg)(img, txt, scale, logit_bias=bias, image_ids=image_ids, caption_ids=caption_ids)
    expected = _dropping(img, txt, scale, bias, term, pairs)
    torch.testing.assert_close(masked[f"{term}_loss"], torch.as_tensor(expected, dtype=torch.float32))
    unmasked = CombinedLoss(cfg)(img, txt, scale, logit_bias=bias)  # without ids: every other row is a negative
    assert not torch.allclose(unmasked[f"{term}_loss"], masked[f"{term}_loss"], rtol=1e-2)
    off = CombinedLoss(LossConfig(**{**cfg.__dict__, "mask_false_negatives": False}))
    torch.testing.assert_close(off(img, txt, scale, logit_bias=bias, image_ids=image_ids,
                                   caption_ids=caption_ids)["loss"], unmasked["loss"])


def test_caption_ids_are_equal_for_equal_token_rows_only():
    from vclr.train.loss import text_ids

    tokens = torch.tensor([[49406, 320, 1929, 49407, 0], [49406, 320, 1929, 49407, 0], [49406, 320, 1930, 49407, 0]])
    ids = text_ids(tokens)
    assert ids[0] == ids[1] and ids[0] != ids[2]
