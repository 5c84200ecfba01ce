"""Causal-LM loss without the full logits: the LM head and cross-entropy only where a label exists, in chunks.

The plain computation (transformers' `ForCausalLMLoss`) builds logits (batch, seq, vocab), upcasts them to
fp32, and takes the cross-entropy of position t against label t+1 (`-100` = no loss). With a 49,152-token
vocab that tensor, its log-softmax and its gradient are the largest things a LoRA step allocates, and for
prompt-masked data most of their rows are thrown away.

`causal_lm_loss` computes the same number: it gathers the hidden states of labelled positions (N of them),
and for each chunk of rows computes logits (chunk, vocab) in fp32, the loss, and — in the same pass — the
gradient with respect to the hidden states (and the head weight, when it trains). The loss is a scalar, so
its backward only multiplies the stored gradients by the incoming scalar: the head costs two matmuls over N
rows (as the plain backward does over all rows), and at most one chunk of logits exists at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk: 32 Mi fp32 = 128 MiB (682 rows of a 49,152 vocab)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets of next-token prediction: labels (batch, seq) -> (batch, seq), row t holding label t+1,
    the last position `IGNORE_INDEX` (transformers pads then shifts the same way)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), gradients computed in forward.

    forward(hidden (N, H), weight (V, H), bias (V,) or None, targets (N,), chunk_rows int) -> scalar (fp32).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):  # noqa: ANN001, ANN205
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            raw = F.linear(h, weight, bias)  # autocast-aware, like the plain lm_head
            lowp = raw.dtype
            logp = torch.log_softmax(raw.float(), dim=-1)  # (chunk, V) fp32, as cross_entropy computes it
            del raw
            total -= logp.gather(1, t[:, None]).sum()
            if not (want_h or want_w or want_b):
                continue
            probs = logp.exp_()  # softmax, in place: d(sum CE)/d(logits) = p - onehot
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = probs.to(lowp)
            if want_h:
                grad_h[start : start + chunk_rows] = (g @ weight.to(g.dtype)).to(hidden.dtype)
            if want_w:
                grad_w.addmm_(probs.T, h.float())
            if want_b:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        gb = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return gh, gw, gb, None, None


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `lm_head(hidden)` against `labels`, equal to transformers' `ForCausalLMLoss`.

    Args:
        hidden: the decoder's last hidden states, (batch, seq, H).
        weight: the LM head weight, (V, H); bias: (V,) or None.
        labels: (batch, seq) token ids, `-100` where no loss is taken; shifted inside (t predicts t+1).
        num_items_in_batch: if given (Trainer, gradient accumulation), the loss is the sum over labelled
            tokens divided by it; otherwise the mean over labelled tokens (NaN if there are none, as in torch).
        chunk_rows: rows of logits per chunk; default keeps a chunk at `CHUNK_ELEMENTS`.
    Returns:
        scalar fp32 loss. Backward is supported once (gradients are computed in forward).
    """
    targets = shift_labels(labels.to(hidden.device)).reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    total = _LinearCrossEntropy.apply(rows, weight, bias, targets.index_select(0, keep), chunk)
    if num_items_in_batch is None:
        return total / keep.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
