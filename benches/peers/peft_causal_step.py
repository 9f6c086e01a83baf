#!/usr/bin/env python3
"""The decoder peer of `emloc bench-step`: one supervised fine-tuning step of a Llama-family
decoder (a GGUF file through transformers' `gguf_file=`, dequantized to float32 as emloc does,
or an HF directory) with HF PEFT's LoRA on PyTorch, on the exact token batches emloc trains on.

The step, as in emloc (models/src/causal_lm/task.rs, `token_nll`):
- the decoder's hidden states of the right-padded batch (no attention mask: causal attention
  alone, so padding after a row's end changes nothing before it);
- the LM head on the completion positions only (emloc's batch lists them), log-softmax,
  the mean negative log-likelihood of the completion targets;
- backward, AdamW step (weight decay 0, constant learning rate), zero the gradients.
LoRA r / alpha on q, k, v, o, gate, up and down projections, dropout 0 (emloc's default).

Input: a JSON file `{"model": path, "batches": [{"inputs": [[ids...], ...], "positions": [...],
"targets": [...]}, ...], "rank", "alpha", "lr", "threads"}` written by `emloc bench-step`.
Output: one JSON object on stdout: per-step seconds and losses, peak RSS, versions.

    python3 benches/peers/peft_causal_step.py spec.json
"""

import json
import os
import resource
import sys
import time

import torch


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = spec["model"]
    if os.path.isfile(path):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, config)
    model.train()
    causal_lm = model.get_base_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=0.0)

    seconds, losses = [], []
    for batch in spec["batches"]:
        inputs = torch.tensor(batch["inputs"], dtype=torch.long)
        positions = torch.tensor(batch["positions"], dtype=torch.long)
        targets = torch.tensor(batch["targets"], dtype=torch.long)
        start = time.perf_counter()
        hidden = causal_lm.model(input_ids=inputs, use_cache=False).last_hidden_state
        scored = hidden.reshape(-1, hidden.shape[-1])[positions]
        logits = causal_lm.lm_head(scored).float()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"peer step {len(seconds)}: {seconds[-1]:.3f} s, loss {losses[-1]:.4f}", file=sys.stderr)
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump(
        {
            "seconds": seconds,
            "losses": losses,
            "peak_rss_bytes": peak_rss_kib * 1024,
            "trainable_params": sum(p.numel() for p in trainable),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "threads": torch.get_num_threads(),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: peft_causal_step.py SPEC.json")
    main(sys.argv[1])
