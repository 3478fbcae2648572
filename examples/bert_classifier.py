"""A text classifier built from a BERT config, with fused_attn swapped in.

    python examples/bert_classifier.py            # needs transformers; no download (random weights)

Steps: build BertForSequenceClassification from a config, keep an untouched copy, swap the fused
attention, residual-add + LayerNorm and FFN into the model in place, check the logits and the
gradients against the original (in float64 and float32, with fused_attn's oracle), time both,
then restore the model.
"""
import argparse
import copy
import time
import warnings

import torch
from transformers import BertConfig, BertForSequenceClassification

import fused_attn
from fused_attn.testing import check_module_against_reference


def median_time(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--backend", default=None, help="force a fused_attn backend (default: auto)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="fused_attn.*falls back")

    config = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    original = copy.deepcopy(model)

    # 1. Swap, in place. The report says what was replaced and what was left, and why.
    report = fused_attn.swap_modules(model, backend=args.backend)
    print(report)

    # 2. A padded batch of token ids.
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    attention_mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    attention_mask[1::2, args.seq // 2:] = 0  # every other sequence is half padding
    labels = torch.randint(0, 2, (args.batch,), generator=gen)

    # 3. Check: logits and every parameter's gradient against the original model, run in float64
    #    and in float32 (err <= 2 * err_float32 for outputs, 5 * for gradients).
    def loss_and_logits(m):
        out = m(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return out.logits

    results = check_module_against_reference(model, original, [], run=loss_and_logits)
    worst = max(results, key=lambda r: r.err / r.bound)
    print(f"oracle: {len(results)} tensors checked (logits + {len(results) - 1} gradients); "
          f"tightest: {worst}")

    # 4. Time a forward (inference) and a training step, original vs swapped.
    model.zero_grad(set_to_none=True)
    original.zero_grad(set_to_none=True)

    def infer(m):
        with torch.no_grad():
            m(input_ids=input_ids, attention_mask=attention_mask)

    def train_step(m):
        m(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()

    backends = {name: info["available"] for name, info in fused_attn.available_backends().items()}
    print(f"backends available: {', '.join(n for n, ok in backends.items() if ok)}")
    for label, step in (("inference", infer), ("training step", train_step)):
        t_orig = median_time(lambda: step(original), args.iters)
        t_fused = median_time(lambda: step(model), args.iters)
        print(f"{label:14s} original {t_orig * 1e3:8.1f} ms   fused {t_fused * 1e3:8.1f} ms   "
              f"speed-up {t_orig / t_fused:5.2f}x")

    # 5. Undo.
    fused_attn.restore_modules(model)
    print("restored:", type(model.bert.encoder.layer[0]).__name__, model.config._attn_implementation)


if __name__ == "__main__":
    main()
