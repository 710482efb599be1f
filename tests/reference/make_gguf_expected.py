#!/usr/bin/env python3
"""What transformers computes for the GGUF fixtures' offline twins (run after make_gguf_fixtures.py).

    python tests/reference/make_gguf_expected.py

(needs the torch + transformers environment of README.md.) For each Hugging Face twin under
tests/fixtures/gguf_model/ (`twin`, ReLU²; `twin_silu`, gated SiLU), the directory that holds what the GGUF
files of the same weights store (packed ternary times the stored fp16 scale, the embedding as stored), it
loads the twin with transformers' real BitNetForCausalLM (float32, CPU, eager attention) and writes
<twin>/expected.json:

  prompt_ids, logits      the prompt "The quick brown fox" (BOS first) and its logits;
  greedy_ids, margins     12 argmax steps with the KV cache, and each step's top-2 logit margin;
  score_ids, score_nll    the text of tests/fixtures/tokenizer_cases.json (its case texts, each followed by
                          a newline) scored in 64-token windows, with make_fixtures.py's convention.

tests/tests/gguf.rs checks every GGUF form against these numbers, on the CPU reference and on the GPU.
"""

import os

os.environ["TORCH_COMPILE_DISABLE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from make_fixtures import dump_json, f32, full_logits, score, sig7, top2_margin  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "fixtures"
PROMPT = "The quick brown fox"
STEPS = 12


@torch.no_grad()
def greedy(model, prompt_ids):
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past, row = out.past_key_values, out.logits[0, -1].float().numpy()
    ids, margins = [], []
    for step in range(STEPS):
        nxt, margin = top2_margin(row)
        ids.append(nxt)
        margins.append(margin)
        if step + 1 < STEPS:
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, row = out.past_key_values, out.logits[0, -1].float().numpy()
    full = full_logits(model, list(prompt_ids) + ids)
    assert all(int(np.argmax(full[len(prompt_ids) - 1 + i])) == ids[i] for i in range(STEPS))
    return ids, margins


def main():
    cases = json.loads((FIX / "tokenizer_cases.json").read_text())["cases"]
    text = "".join(c["text"] + "\n" for c in cases)
    for name in ["twin", "twin_silu"]:
        d = FIX / "gguf_model" / name
        cfg = json.loads((d / "config.json").read_text())
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        model, info = transformers.BitNetForCausalLM.from_pretrained(
            str(d), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        # The twin stores its embedding and norms as F16 (fp16-exact values; see make_gguf_fixtures.py), and
        # transformers keeps the checkpoint's dtype for some tensors: widen all to f32 (exact).
        with torch.no_grad():
            for prm in list(model.parameters()) + list(model.buffers()):
                if prm.dtype == torch.float16:
                    prm.data = prm.data.float()
        model.eval()
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(key), (name, key, info.get(key))
        assert model.config.hidden_act == cfg["hidden_act"]
        prompt_ids = tok.encode(PROMPT, add_special_tokens=True).ids
        score_ids = tok.encode(text, add_special_tokens=True).ids
        window = cfg["max_position_embeddings"]
        assert len(score_ids) > window
        logits = full_logits(model, prompt_ids)
        ids, margins = greedy(model, prompt_ids)
        n, nll = score(lambda w: full_logits(model, w), score_ids, window)
        expected = {
            "twin": name,
            "hidden_act": cfg["hidden_act"],
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "prompt": PROMPT,
            "prompt_ids": prompt_ids,
            "logits": [[f32(v) for v in row] for row in logits],
            "greedy_ids": ids,
            "greedy_margins": [sig7(m) for m in margins],
            "score_ids": score_ids,
            "score_window": window,
            "score_tokens": n,
            "score_nll": nll,
        }
        dump_json(d / "expected.json", expected)
        print(f"{name}: nll {nll:.6f} over {n} predictions, greedy {ids}, min margin {min(margins):.3g}")


if __name__ == "__main__":
    main()
