"""Training on packed sequences: documents of different lengths back to back, no padding.

    python examples/packed_training.py [--steps 40] [--backend cpu]

A causal fused Transformer (pre-LN, RMSNorm, SwiGLU, grouped-query heads) learns to copy its input
one token late on random "documents" of 5 to 200 tokens. Every step packs a batch of documents
into one (total_tokens, d_model) tensor and hands the model their cumulative lengths, so that
attention stays inside each document and no compute goes to padding. The first batch is checked
against running each document alone (under the oracle of fused_attn.testing; the script fails
if it does not hold): packing changes the cost, never the answer. Then it trains
and prints the loss, and the time of a packed step against the same documents padded to the
longest with a key-padding mask.
"""
import argparse
import time

import torch
import torch.nn as nn

import fused_attn
from fused_attn.testing import compare

VOCAB, D_MODEL, HEADS = 64, 128, 4


class Model(nn.Module):
    def __init__(self, backend=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.body = fused_attn.Transformer(D_MODEL, HEADS, 2, norm_first=True, norm="rmsnorm", activation="swiglu",
                                           num_kv_heads=2, causal=True, backend=backend)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens, **kwargs):
        return self.head(self.body(self.embed(tokens), **kwargs))


def make_batch(gen, n_docs):
    """n_docs random documents: (packed token ids, cumulative lengths, the documents)."""
    lengths = torch.randint(5, 201, (n_docs,), generator=gen).tolist()
    docs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return torch.cat(docs), cu, docs


def copy_loss(logits, tokens, cu):
    """Predict token t-1 at position t, inside each document (its first position predicts nothing)."""
    first = torch.zeros(tokens.shape[0], dtype=torch.bool)
    first[cu[:-1].long()] = True
    target = torch.roll(tokens, 1).masked_fill(first, -100)
    return nn.functional.cross_entropy(logits, target, ignore_index=-100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--docs", type=int, default=8, help="documents per packed batch")
    parser.add_argument("--backend", default=None, help="force a fused_attn backend (default: auto)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = Model(args.backend)

    # packing changes the cost, never the answer: checked under the project's oracle
    # (fused_attn.testing.compare), against the documents run alone through the same weights in
    # float64 on the reference backend, with the fused model's own error on the documents alone
    # as the yardstick; attention leaking across documents fails here
    tokens, cu, docs = make_batch(gen, args.docs)
    ref64 = Model("reference").double()
    ref64.load_state_dict(model.state_dict())
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)
        alone = torch.cat([model(doc[None])[0] for doc in docs])
        alone64 = torch.cat([ref64(doc[None])[0] for doc in docs])
    print(f"packed vs one document at a time: max |difference| = {(packed - alone).abs().max().item():.2e}")
    print(compare("packed logits", packed, alone64, alone))  # raises AssertionError when it fails

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        tokens, cu, docs = make_batch(gen, args.docs)
        loss = copy_loss(model(tokens, cu_seqlens=cu), tokens, cu)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}  ({len(docs)} documents, {tokens.shape[0]} tokens)")

    # one training step, packed against padded to the longest document
    tokens, cu, docs = make_batch(gen, args.docs)
    longest = max(len(d) for d in docs)
    padded = torch.stack([nn.functional.pad(d, (0, longest - len(d))) for d in docs])
    padding = torch.arange(longest)[None, :] >= torch.tensor([len(d) for d in docs])[:, None]

    def packed_step():
        model(tokens, cu_seqlens=cu).square().mean().backward()

    def padded_step():
        model(padded, key_padding_mask=padding).square().mean().backward()

    for name, fn in (("packed", packed_step), ("padded", padded_step)):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            fn()
        print(f"{name:6s} step: {(time.perf_counter() - start) / 3 * 1e3:7.1f} ms "
              f"({tokens.shape[0]} real tokens{'' if name == 'packed' else f', {padded.numel()} with padding'})")


if __name__ == "__main__":
    main()
