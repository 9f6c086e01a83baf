"""Zero-shot MultiEmo accuracy of MiniLM for a few label-description templates (PyTorch reference).

Usage: python3 scripts/zero_shot_templates.py MODEL_DIR TRAIN.jsonl  (needs torch and transformers)
Scores 600 sentences (random.Random(1)) by cosine with each label description, as emloc does.
"""
import json, random, torch
from transformers import AutoTokenizer, AutoModel

import sys; d, data = sys.argv[1], sys.argv[2]
tok=AutoTokenizer.from_pretrained(d); m=AutoModel.from_pretrained(d).eval()
rows=[json.loads(l) for l in open(data)]
random.Random(1).shuffle(rows); rows=rows[:600]
def emb(texts):
    out=[]
    for i in range(0,len(texts),64):
        b=tok(texts[i:i+64],padding=True,truncation=True,max_length=48,return_tensors="pt")
        with torch.no_grad(): h=m(**b).last_hidden_state
        mask=b["attention_mask"].unsqueeze(-1).float(); e=(h*mask).sum(1)/mask.sum(1)
        out.append(torch.nn.functional.normalize(e,dim=-1))
    return torch.cat(out)
X=emb([r["input"] for r in rows])
labels=["ambivalent","negative","neutral","positive"]
y=torch.tensor([labels.index(r["label"]) for r in rows])
lens=[len(tok(r["input"])["input_ids"]) for r in rows]; lens.sort(); print("token len median/90/99",lens[300],lens[540],lens[594])
cands={"name":lambda l:l,
 "name: the review is":lambda l:f"{l}: the review is {l}",
 "a X review":lambda l:f"a {l} review",
 "This review is X.":lambda l:f"This review is {l}.",
 "desc":lambda l:{"negative":"a negative opinion, criticism or complaint","positive":"a positive opinion, praise or recommendation","neutral":"a neutral statement of facts without opinion","ambivalent":"a mixed opinion with both positive and negative points"}[l],
 "name: desc":lambda l:f"{l}: "+{"negative":"the review is negative","positive":"the review is positive","neutral":"the review is neutral, stating facts","ambivalent":"the review is mixed, both positive and negative"}[l],
}
def f1(p):
    fs=[]
    for c in range(4):
        tp=((p==c)&(y==c)).sum().item(); fp=((p==c)&(y!=c)).sum().item(); fn=((p!=c)&(y==c)).sum().item()
        fs.append(0 if tp==0 else 2*tp/(2*tp+fp+fn))
    return sum(fs)/4
for k,f in cands.items():
    L=emb([f(l) for l in labels]); s=20*X@L.T
    p=s.argmax(1); ce=torch.nn.functional.cross_entropy(s,y).item()
    print(f"{k:25s} acc {(p==y).float().mean():.3f} f1 {f1(p):.3f} ce {ce:.3f} pred counts {torch.bincount(p,minlength=4).tolist()}")
