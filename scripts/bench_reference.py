#!/usr/bin/env python3
"""One measurement of the paper's reference code, for `scripts/bench-vs-reference.sh`.

The workload matches `giststream bench`: a random model of hidden 256, 4 layers, 4 heads /
2 KV heads, intermediate 688, vocab 4096, N_g = 4; a document of T regular tokens in
sentences of 20, 23, 27, 31, 34 tokens in turn, each followed by the 4 gist ids.
Throughput counts regular tokens per second of wall time; peak memory is this process's
maximum RSS. Prints one JSON object.

  mode causal:  transformers LlamaForCausalLM (sdpa, causal) on the T tokens, no gists
  mode scrooge: the reference's sentence-by-sentence prefill (scrooge_prefill)
  mode dense:   the reference's SentenceLlamaForCausalLM forward with its dense T x T mask

Needs REFERENCE_DIR (a checkout of github.com/mrsndmn/sentence_attention), torch 2.5.1,
transformers 4.53.0. Nothing of the reference is committed.
"""
import argparse
import io
import contextlib
import json
import os
import resource
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

LENGTHS = [20, 23, 27, 31, 34]
NG = 4
BOS = 1


def rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def config(vocab, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
        rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=2, **extra)


def document(tokens, gists, gen):
    ids, left, i = [], tokens, 0
    gist_ids = list(range(4096 - NG, 4096))
    while left > 0:
        n = min(LENGTHS[i % len(LENGTHS)], left)
        sent = torch.randint(3, 256, (n,), generator=gen).tolist()
        if i == 0:
            sent[0] = BOS
        ids += sent + (gist_ids if gists else [])
        left -= n
        i += 1
    return torch.tensor([ids])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["causal", "scrooge", "dense"], required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    sys.path.insert(0, os.path.join(os.environ["REFERENCE_DIR"], "src"))
    quiet = contextlib.redirect_stdout(io.StringIO())  # the reference prints on every forward
    with torch.no_grad():
        if a.mode == "causal":
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(config(4096, attn_implementation="sdpa")).eval()
            ids = document(a.tokens, False, gen)
            base = rss_bytes()
            model(input_ids=ids[:, :256], logits_to_keep=1)  # warm-up
            t = time.time()
            model(input_ids=ids, logits_to_keep=1)
            seconds = time.time() - t
        else:
            from sentence_attention.models.sentence_llama.modeling_sentence_llama import (
                SentenceLlamaForCausalLM, special_token_mask_to_clothest_token_idx_slow)
            from sentence_attention.models.sentence_llama.scrooge_prefill import scrooge_prefill

            gist_ids = list(range(4096 - NG, 4096))
            with quiet:
                model = SentenceLlamaForCausalLM(
                    config(4096, end_of_sentence_token_ids=gist_ids, ft_with_bos_token=False)).eval()
            ids = document(a.tokens, True, gen)
            special = torch.zeros_like(ids)
            for g in gist_ids:
                special[ids == g] = 1
            clothest = special_token_mask_to_clothest_token_idx_slow(special, num_special_tokens=NG)
            ones = torch.ones_like(ids)
            base = rss_bytes()
            with quiet:
                if a.mode == "scrooge":
                    w = 31 * 8  # warm-up on the first sentences
                    scrooge_prefill(model, ids[:, :w], ones[:, :w], special[:, :w], clothest[:, :w])
                    t = time.time()
                    scrooge_prefill(model, ids, ones, special, clothest)
                else:
                    model(input_ids=ids[:, :256], attention_mask=ones[:, :256],
                          special_embeddings_mask=special[:, :256],
                          clothest_end_of_sentence_token_idx=clothest[:, :256], logits_to_keep=1)
                    t = time.time()
                    model(input_ids=ids, attention_mask=ones, special_embeddings_mask=special,
                          clothest_end_of_sentence_token_idx=clothest, logits_to_keep=1)
                seconds = time.time() - t
    print(json.dumps({
        "path": f"reference-{a.mode}", "tokens": a.tokens, "documents": 1, "seconds": seconds,
        "tokens_per_second": a.tokens / seconds, "peak_rss": rss_bytes(), "base_rss": base,
        "threads": a.threads}))


if __name__ == "__main__":
    main()
