#!/usr/bin/env python3
"""Where a chat model looks for a document: the passkey probe through llama.cpp (the peer),
with the document inside the user turn, before the chat turns (where a stored document
sits), and as plain text. Usage: python3 scripts/passkey-llamacpp.py GGUF (needs
llama-cpp-python; the README quotes one run of it)."""
import sys
from llama_cpp import Llama
import random
m = Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=1, verbose=False)
F="The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
random.seed(1)
for reps in [3, 20]:
  for fmt in ["inside","before","plain"]:
    ok=0
    for t in range(3):
        key=str(random.randint(10000,99999)); at=random.randint(0,reps)
        doc="There is an important piece of information hidden inside a lot of irrelevant text. Find it and remember it. I will ask you about it. "+"".join((f"The pass key is {key}. Remember it. {key} is the pass key. " if i==at else "")+F for i in range(reps))
        if fmt=="inside": p=f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{doc}\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is"
        elif fmt=="before": p=f"{doc}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is"
        else: p=f"{doc}\n\nWhat is the pass key? The pass key is"
        out=m(p, max_tokens=10, temperature=0)["choices"][0]["text"]
        ok+= key in out
        print(reps, fmt, key in out, repr(out))
    print("==", reps, fmt, ok)
