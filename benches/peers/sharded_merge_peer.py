#!/usr/bin/env python3
"""The peer of `emloc merge` on a real sharded bf16 checkpoint (issue 14, goal 4).

`make OUT`: SmolLM2-135M-Instruct's GGUF (~/.cache/emloc, scripts/fetch_smollm2.sh) dequantised by
transformers and saved as bf16 in three ~100 MB shards with `model.safetensors.index.json`
(OUT/bf16); a PEFT LoRA adapter (r 8, alpha 16, all seven projections, random A and B, seed 0) in
OUT/adapter; and PEFT's own `merge_and_unload()` of it, saved the same way (OUT/peft-merged).

`compare MERGED PEER`: every tensor has the same file, dtype and shape in both, each index names
the shard that holds each key, and merged values agree within one bf16 unit in the last place
(PEFT rounds the delta to bf16 before adding it, emloc rounds the f64 sum once).

    python3 benches/peers/sharded_merge_peer.py make /tmp/smol
    emloc merge --model /tmp/smol/bf16 --adapter /tmp/smol/adapter --out /tmp/smol/emloc-merged
    python3 benches/peers/sharded_merge_peer.py compare /tmp/smol/emloc-merged /tmp/smol/peft-merged

Needs torch, transformers, peft and gguf.
"""

import glob
import json
import os
import sys


def make(out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    source = os.path.expanduser("~/.cache/emloc")
    gguf = AutoModelForCausalLM.from_pretrained(
        source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.bfloat16
    )
    # A GGUF-loaded model is not serialisable: copy its weights into a plain one.
    config = gguf.config
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(os.path.join(out, "bf16"), max_shard_size="100MB")
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if "lora_" in name:
                tensor.mul_(0.5)
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    peft_model.merge_and_unload().save_pretrained(
        os.path.join(out, "peft-merged"), max_shard_size="100MB"
    )


def compare(merged_dir, peer_dir):
    import torch
    from safetensors.torch import load_file

    def load(directory):
        tensors = {}
        for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            for key, value in load_file(path).items():
                tensors[key] = (os.path.basename(path), value)
        return tensors

    ours, peer = load(merged_dir), load(peer_dir)
    assert ours.keys() == peer.keys(), sorted(set(ours) ^ set(peer))
    worst, differing, dtypes = 0.0, 0, set()
    for key, (file, a) in ours.items():
        peer_file, b = peer[key]
        assert file == peer_file and a.dtype == b.dtype and a.shape == b.shape, key
        dtypes.add(str(a.dtype))
        if not torch.equal(a, b):
            differing += 1
            x, y = a.double(), b.double()
            ulp = torch.clamp(x.abs(), min=1e-30) * 2.0**-7
            worst = max(worst, float(((x - y).abs() / ulp).max()))
    with open(os.path.join(merged_dir, "model.safetensors.index.json")) as f:
        for key, file in json.load(f)["weight_map"].items():
            assert ours[key][0] == file, (key, file)
    result = {
        "tensors": len(ours),
        "differing_tensors": differing,
        "worst_in_bf16_ulps": worst,
        "dtypes": sorted(dtypes),
    }
    print(json.dumps(result))
    assert worst <= 1.0, "more than one bf16 ulp apart"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
