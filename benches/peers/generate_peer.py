#!/usr/bin/env python3
"""The peer of `emloc bench-generate`: greedy decoding with HF transformers on the same model
file (a GGUF through `gguf_file=`, dequantized to float32 as emloc does, or an HF directory),
the same prompt ids and the same number of new tokens, with a KV cache, timed the same way:
prefill = the prompt's forward pass plus the first token, then the mean time of each later token.

Input: a JSON file `{"model": path, "prompt_ids": [...], "new_tokens", "runs", "threads"}` written
by `emloc bench-generate`. Output: one JSON object on stdout: `{"runs": [{"prefill_seconds",
"per_token_seconds", "ids"}, ...], "versions": {...}}`.

    python3 benches/peers/generate_peer.py spec.json
"""

import json
import os
import sys
import time

import torch


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    import transformers
    from transformers import AutoModelForCausalLM

    path = spec["model"]
    if os.path.isfile(path):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.eval()
    prompt = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    runs = []
    with torch.inference_mode():
        for _ in range(spec["runs"]):
            started = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            past = out.past_key_values
            ids = [int(token)]
            prefill = time.perf_counter() - started
            for _ in range(spec["new_tokens"] - 1):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                past = out.past_key_values
                ids.append(int(token))
            total = time.perf_counter() - started
            runs.append(
                {
                    "prefill_seconds": prefill,
                    "per_token_seconds": (total - prefill) / (spec["new_tokens"] - 1),
                    "ids": ids,
                }
            )
            print(f"transformers run: prefill {prefill:.3f} s", file=sys.stderr)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads()}
    print(json.dumps({"runs": runs, "versions": versions}))


if __name__ == "__main__":
    main(sys.argv[1])
