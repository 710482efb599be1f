#!/usr/bin/env python3
"""Regenerate the LoRA training fixture tests/fixtures/lora/ (run after make_fixtures.py).

    python tests/reference/make_lora_fixtures.py
    python tests/reference/make_lora_fixtures.py --silu     (after make_gguf_fixtures.py: lora_silu/)

It trains PEFT + torch AdamW on the tiny `online_tied` BitNet (transformers' real BitNetForCausalLM, float32,
CPU, single-threaded, eager attention), from a saved initial adapter, on fixed batches without shuffling,
and records what bitnode's LoRA trainer must reproduce:

  init_adapter/            PEFT adapter directory the run starts from (A kaiming-uniform as PEFT draws it,
                           B random instead of zero so that every gradient path is exercised from step 1)
  grads_step1.safetensors  d(loss)/d(every lora_A / lora_B) of the first optimizer step, before clipping
  final_adapter/           the adapter after the last step (PEFT's save_pretrained, F32)
  expected.json            the batches (ids, labels with -100 for masked prompt tokens), the optimizer and
                           schedule settings, per-step loss / lr / grad norm, and the NLL of a held-out
                           sequence under the final adapter

Conventions (docs: bitnet-reference.md, "Training conventions"):
  - micro-batch loss = transformers' causal-LM loss (mean over the micro-batch's predicted, unmasked
    positions); with G micro-batches per step each loss is divided by G before backward (as HF Trainer does
    without num_items_in_batch); the reported step loss is the sum of those, i.e. the mean of micro losses;
  - clip_grad_norm_(max_norm) over all LoRA parameters, then AdamW.step(), then the scheduler;
  - schedule: transformers' get_cosine_schedule_with_warmup semantics, lr(k) = base * lambda(k) for
    optimizer step k = 0, 1, ...: k/warmup during warmup (so step 0 uses lr 0), then
    0.5 * (1 + cos(pi * (k - warmup) / (total - warmup))).
"""

import os

os.environ["TORCH_COMPILE_DISABLE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import BitNetForCausalLM  # noqa: E402

from make_fixtures import CORPUS  # noqa: E402

import sys  # noqa: E402

# `--silu`: the same run, shorter, on `online_tied_silu`, into tests/fixtures/lora_silu/: PEFT's gradients and
# AdamW steps for the gated SiLU FFN (the 1bitLLM family). online_tied_silu is online_tied's weights (a
# symlink to its safetensors) under `hidden_act: silu`. Not the GGUF fixtures' twin_silu: its embedding
# values are multiples of 1/32, so some int8 activations sit exactly on a rounding tie, and PEFT's own
# gradients then move by 1e-3 between float32 and float64; online_tied's seed was picked to avoid ties.
SILU = sys.argv[1:] == ["--silu"]

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "fixtures" / ("online_tied_silu" if SILU else "online_tied")
OUT = HERE.parent / "fixtures" / ("lora_silu" if SILU else "lora")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0
SEQ, BATCH, ACCUM, STEPS = 16, 2, 2, (3 if SILU else 6)
LR, WD, BETAS, EPS = 5e-3, 0.01, (0.9, 0.999), 1e-8
WARMUP, MAX_NORM = 2, 1.0
MASK_PROMPT = 4  # odd micro-batches mask their first 4 labels, as a prompt/completion record would


def lr_lambda(k: int) -> float:
    if k < WARMUP:
        return k / max(1, WARMUP)
    progress = (k - WARMUP) / max(1, STEPS - WARMUP)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def load_base():
    model = BitNetForCausalLM.from_pretrained(str(BASE), dtype=torch.float32, attn_implementation="eager")
    return model


def write_silu_base():
    src = HERE.parent / "fixtures" / "online_tied"
    if BASE.exists():
        shutil.rmtree(BASE)
    BASE.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "silu"
    (BASE / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        (BASE / f).write_bytes((src / f).read_bytes())
    (BASE / "model.safetensors").symlink_to("../online_tied/model.safetensors")


def check_bitnode_adapter():
    """Loads the adapter bitnode wrote (lora/bitnode_adapter, made by `bitnode finetune`, see the README) in
    PEFT and records the held-out NLL PEFT computes with it; tests/tests/lora.rs checks that `bitnode score
    --adapter` gives the same number."""
    expected = json.loads((OUT / "expected.json").read_text())
    held_out = expected["held_out_ids"]
    pm = PeftModel.from_pretrained(load_base(), str(OUT / "bitnode_adapter"))
    pm.eval()
    with torch.no_grad():
        nll = pm(input_ids=torch.tensor([held_out]), labels=torch.tensor([held_out])).loss.item()
    out = {"held_out_nll": nll, "peft": __import__("peft").__version__}
    (OUT / "bitnode_adapter_peft.json").write_text(json.dumps(out, indent=1) + "\n")
    print("PEFT NLL with the bitnode adapter", nll)


def main():
    if SILU:
        write_silu_base()
        base_name = "online_tied_silu"
    else:
        base_name = "online_tied"
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tok = Tokenizer.from_file(str(BASE / "tokenizer.json"))
    cfg = json.loads((BASE / "config.json").read_text())
    ids = tok.encode(CORPUS * 2).ids + [cfg["eos_token_id"]]
    chunks = [ids[i : i + SEQ] for i in range(0, len(ids) - SEQ + 1, SEQ)]
    need = STEPS * ACCUM * BATCH + 1
    assert len(chunks) >= need, (len(chunks), need)
    micro = []
    for m in range(STEPS * ACCUM):
        rows = chunks[m * BATCH : (m + 1) * BATCH]
        labels = [list(r) for r in rows]
        if m % 2 == 1:
            for lab in labels:
                lab[:MASK_PROMPT] = [-100] * MASK_PROMPT
        micro.append({"ids": rows, "labels": labels})
    held_out = chunks[STEPS * ACCUM * BATCH]

    # Initial adapter: PEFT's own init for A (kaiming-uniform, a=sqrt(5)), then B drawn at random.
    torch.manual_seed(1234)
    model = load_base()
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(OUT / "init_adapter"))

    # Train from that file, as bitnode's --init-adapter does.
    torch.manual_seed(0)
    pm = PeftModel.from_pretrained(load_base(), str(OUT / "init_adapter"), is_trainable=True)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    losses, lrs, norms = [], [], []
    for step in range(STEPS):
        total = 0.0
        for a in range(ACCUM):
            mb = micro[step * ACCUM + a]
            out = pm(input_ids=torch.tensor(mb["ids"]), labels=torch.tensor(mb["labels"]))
            (out.loss / ACCUM).backward()
            total += out.loss.item() / ACCUM
        if step == 0:
            grads = {n.replace(".default", ""): p.grad.detach().clone().contiguous() for n, p in zip(names, params)}
            save_file(grads, str(OUT / "grads_step1.safetensors"))
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
        norms.append(float(norm))
        print(f"step {step}: loss {total:.6f} lr {lrs[-1]:.6g} grad_norm {norms[-1]:.6f}")
    pm.save_pretrained(str(OUT / "final_adapter"))

    # NLL of a held-out sequence under the final adapter, reloaded from disk the way users load it.
    pm2 = PeftModel.from_pretrained(load_base(), str(OUT / "final_adapter"))
    pm2.eval()
    with torch.no_grad():
        nll = pm2(input_ids=torch.tensor([held_out]), labels=torch.tensor([held_out])).loss.item()
    for d in ("init_adapter", "final_adapter"):
        c = json.loads((OUT / d / "adapter_config.json").read_text())
        c["base_model_name_or_path"] = base_name  # no machine paths in fixtures
        (OUT / d / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    expected = {
        "base": base_name,
        "rank": RANK,
        "alpha": ALPHA,
        "targets": TARGETS,
        "seq_len": SEQ,
        "batch": BATCH,
        "grad_accum": ACCUM,
        "steps": STEPS,
        "lr": LR,
        "weight_decay": WD,
        "betas": list(BETAS),
        "eps": EPS,
        "warmup": WARMUP,
        "schedule": "cosine",
        "max_grad_norm": MAX_NORM,
        "micro_batches": micro,
        "losses": losses,
        "lrs": lrs,
        "grad_norms": norms,
        "held_out_ids": held_out,
        "held_out_nll_final": nll,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": __import__("peft").__version__},
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print("held-out nll", nll)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-bitnode-adapter"]:
        check_bitnode_adapter()
    else:
        main()
