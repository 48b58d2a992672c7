#!/usr/bin/env python3
"""llama.cpp's side of scripts/bench-smollm2.sh: on the same GGUF and text, with 2
threads and batch 512, the plain causal prefill of the first N tokens (tokens/s), the
decode that follows (tokens/s), and the time to the first answer token of a question
asked after re-reading the text. One JSON object per length on stdout.

    venv/bin/python scripts/bench_llamacpp.py GGUF TEXT 2048 8192
"""
import json
import sys
import time

import llama_cpp

QUESTION = "<|im_start|>user\nWhere did it happen, and who was there?<|im_end|>\n<|im_start|>assistant\n"


def main():
    gguf, text_path, *lengths = sys.argv[1:]
    text = open(text_path, encoding="utf-8").read()
    for n in map(int, lengths):
        llm = llama_cpp.Llama(model_path=gguf, n_ctx=n + 256, n_batch=512, n_threads=2,
                              n_threads_batch=2, verbose=False)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:n]
        assert len(ids) == n, f"the text has {len(ids)} tokens, fewer than {n}"
        start = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - start
        decode_tokens = 32
        start = time.perf_counter()
        for _ in range(decode_tokens):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        decode = time.perf_counter() - start
        # A question about the text, with the text re-read first (no state to resume).
        llm.reset()
        q = llm.tokenize(QUESTION.encode("utf-8"), add_bos=False, special=True)
        start = time.perf_counter()
        llm.eval(ids + q)
        llm.sample(temp=0.0)
        ttft = time.perf_counter() - start
        print(json.dumps({
            "tokens": n,
            "prefill_tokens_per_second": n / prefill,
            "decode_tokens_per_second": decode_tokens / decode,
            "time_to_first_token_seconds": ttft,
            "threads": 2,
            "n_batch": 512,
        }), flush=True)


if __name__ == "__main__":
    main()
