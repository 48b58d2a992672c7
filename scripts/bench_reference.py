#!/usr/bin/env python3
"""One measurement of the paper's reference code, for `scripts/bench-vs-reference.sh` (CPU)
and `scripts/gpu-bench.sh` (GPU).

The workload matches `giststream bench --shape S`: a random model of that shape (`paper`:
hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 688, vocab 4096; `llama-3.2-1b`:
hidden 2048, 16 layers, 32 / 8 heads, intermediate 8192, vocab 128256, tied embeddings,
llama3 RoPE scaling), N_g = 4; a document of T regular tokens in sentences of 20, 23, 27,
31, 34 tokens in turn, each followed by the 4 gist ids. Throughput counts regular tokens
per second of wall time (on a GPU, after synchronizing). Peak memory: this process's
maximum RSS, and on a GPU the allocator's peak (torch.cuda.max_memory_allocated). Prints
one JSON object. The reference runs one document at a time (its prefill asserts batch 1).

  mode causal:  transformers LlamaForCausalLM (sdpa, causal) on the T tokens, no gists
  mode scrooge: the reference's sentence-by-sentence prefill (scrooge_prefill)
  mode dense:   the reference's SentenceLlamaForCausalLM forward with its dense T x T mask
  mode train:   one training step of transformers' LlamaForCausalLM (sdpa, causal, no
                gists) on the T tokens: forward with the loss on every token, backward,
                AdamW (lr 1e-4), after one warm-up step on 256 tokens (what
                `giststream bench --paths train-blockwise` is set against). With
                --steps N, N full-length steps back to back, timed one by one; the
                result is their median (the same as `giststream bench --train-steps N`)

Shapes also include `smollm2-135m` (hidden 576, 30 layers, 9 / 3 heads, intermediate 1536,
vocab 49152, tied embeddings, RoPE theta 100000), SmolLM2-135M-Instruct's, f32.

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


SHAPES = {
    "paper": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0),
}


def config(shape, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[shape], max_position_embeddings=1 << 20, rms_norm_eps=1e-5, bos_token_id=BOS,
        eos_token_id=2, **extra)


def gist_ids(shape):
    v = SHAPES[shape]["vocab_size"]
    return list(range(v - NG, v))


def document(tokens, gists, gen, shape):
    ids, left, i = [], tokens, 0
    while left > 0:
        n = min(LENGTHS[i % len(LENGTHS)], left)
        sent = torch.randint(3, 256, (n,), generator=gen).tolist()
        if i == 0:
            sent[0] = BOS
        ids += sent + (gist_ids(shape) if gists else [])
        left -= n
        i += 1
    return torch.tensor([ids])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["causal", "scrooge", "dense", "train"], required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", choices=sorted(SHAPES), default="paper")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--steps", type=int, default=1, help="train mode: full-length steps timed, median reported")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if a.mode == "train":
        from transformers import LlamaForCausalLM

        with dev:
            model = LlamaForCausalLM(config(a.shape, attn_implementation="sdpa"))
        model = model.to(dtype).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = document(a.tokens, False, gen, a.shape).to(dev)

        def step(x):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(ids[:, :256])  # warm-up (allocates the optimizer's state)
        base, gpu_base = rss_bytes(), gpu_allocated(cuda)
        step_seconds = []
        for _ in range(max(1, a.steps)):
            sync()
            t = time.time()
            step(ids)
            sync()
            step_seconds.append(time.time() - t)
        ordered = sorted(step_seconds)
        mid = len(ordered) // 2
        seconds = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    sys.path.insert(0, os.path.join(os.environ.get("REFERENCE_DIR", "."), "src"))
    quiet = contextlib.redirect_stdout(io.StringIO())  # the reference prints on every forward
    with torch.no_grad():
        if a.mode == "train":
            pass
        elif a.mode == "causal":
            from transformers import LlamaForCausalLM

            with dev:  # weights initialised where they run
                model = LlamaForCausalLM(config(a.shape, attn_implementation="sdpa"))
            model = model.to(dtype).eval()
            ids = document(a.tokens, False, gen, a.shape).to(dev)
            model(input_ids=ids[:, :256], logits_to_keep=1)  # warm-up
            base, gpu_base = rss_bytes(), gpu_allocated(cuda)
            sync()
            t = time.time()
            model(input_ids=ids, logits_to_keep=1)
            sync()
            seconds = time.time() - t
        else:
            from sentence_attention.models.sentence_llama.modeling_sentence_llama import (
                SentenceLlamaForCausalLM, special_token_mask_to_clothest_token_idx_slow)
            from sentence_attention.models.sentence_llama.scrooge_prefill import scrooge_prefill

            gists = gist_ids(a.shape)
            with quiet, dev:
                model = SentenceLlamaForCausalLM(
                    config(a.shape, end_of_sentence_token_ids=gists, ft_with_bos_token=False))
            model = model.to(dtype).eval()
            ids = document(a.tokens, True, gen, a.shape)
            special = torch.zeros_like(ids)
            for g in gists:
                special[ids == g] = 1
            clothest = special_token_mask_to_clothest_token_idx_slow(special, num_special_tokens=NG)
            ids, special, clothest = ids.to(dev), special.to(dev), clothest.to(dev)
            ones = torch.ones_like(ids)
            with quiet:
                if a.mode == "scrooge":
                    w = 31 * 8  # warm-up on the first sentences
                    scrooge_prefill(model, ids[:, :w], ones[:, :w], special[:, :w], clothest[:, :w])
                    base, gpu_base = rss_bytes(), gpu_allocated(cuda)
                    sync()
                    t = time.time()
                    scrooge_prefill(model, ids, ones, special, clothest)
                else:
                    model(input_ids=ids[:, :256], attention_mask=ones[:, :256],
                          special_embeddings_mask=special[:, :256],
                          clothest_end_of_sentence_token_idx=clothest[:, :256], logits_to_keep=1)
                    base, gpu_base = rss_bytes(), gpu_allocated(cuda)
                    sync()
                    t = time.time()
                    model(input_ids=ids, attention_mask=ones, special_embeddings_mask=special,
                          clothest_end_of_sentence_token_idx=clothest, logits_to_keep=1)
                sync()
                seconds = time.time() - t
    out = {
        "path": "torch-train" if a.mode == "train" else f"reference-{a.mode}", "tokens": a.tokens, "documents": 1, "seconds": seconds,
        "tokens_per_second": a.tokens / seconds, "peak_rss": rss_bytes(), "base_rss": base,
        "threads": a.threads, "shape": a.shape, "device": a.device, "dtype": a.dtype,
        "torch": torch.__version__}
    if a.mode == "train":
        out["step_seconds"] = step_seconds
    if cuda:
        out["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
        out["gpu_base_allocated"] = gpu_base
        out["gpu_name"] = torch.cuda.get_device_name()
    print(json.dumps(out))


def gpu_allocated(cuda):
    """Bytes the allocator holds now; resets its peak so the measured work's is its own."""
    if not cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


if __name__ == "__main__":
    main()
