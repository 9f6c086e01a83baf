#!/usr/bin/env python3
"""The peer of `emloc bench-step`: one LoRA training step of all-MiniLM-L6-v2 for sentence
classification in HF PEFT on PyTorch, the same task, batches, targets and hyper-parameters as
emloc's `finetune` (classification), so the two step times compare like for like.

The step, as in emloc (models/src/classification.rs):
- embed the batch's sentences and the label descriptions through the adapted encoder (mean pooling
  over the attention mask, L2-normalised: sentence-transformers' all-MiniLM-L6-v2 head);
- scores = scale * sentences @ descriptions.T, cross-entropy against the labels;
- backward, AdamW step (weight decay 0, the learning rate given), zero the gradients.
LoRA r / alpha on query, key, value, attention.output.dense, output.dense and intermediate.dense
(emloc's `output.dense` pattern matches both output projections), dropout 0 in LoRA, the model's
own dropout (0.1) active as in training.

Input: a JSON file `{"model": dir, "descriptions": [...], "batches": [{"texts": [...],
"labels": [...]}, ...], "rank", "alpha", "lr", "scale", "max_length", "threads"}` written by
`emloc bench-step`. Output: one JSON object on stdout: per-step seconds, peak RSS, versions.

    python3 benches/peers/peft_step.py spec.json
"""

import json
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
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModel.from_pretrained(spec["model"], dtype=torch.float32)
    config = LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=["query", "key", "value", "output.dense", "intermediate.dense"],
    )
    model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=0.0)

    def embed(texts):
        enc = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=spec["max_length"],
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    seconds, losses = [], []
    for batch in spec["batches"]:
        start = time.perf_counter()
        sentences = embed(batch["texts"])
        descriptions = embed(spec["descriptions"])
        scores = spec["scale"] * sentences @ descriptions.T
        loss = torch.nn.functional.cross_entropy(scores, torch.tensor(batch["labels"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
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
        sys.exit("usage: peft_step.py SPEC.json")
    main(sys.argv[1])
