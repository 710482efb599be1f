#!/usr/bin/env python3
"""Regenerate the BitNet b1.58 parity fixtures under tests/fixtures/.

Run from anywhere:   python tests/reference/make_fixtures.py
(see tests/reference/README.md for the virtual environment it needs).

What it does, deterministically (fixed seeds, CPU, float32):
  1. trains a tiny byte-level BPE tokenizer (Llama-3 tokenizer.json layout) on CORPUS below;
  2. writes six tiny BitNet checkpoints, one per checkpoint form x tied/untied:
       online_tied / online_untied               autobitlinear + online  (latent weights)
       offline_auto_tied / offline_auto_untied   autobitlinear + offline (packed uint8 + weight_scale, multiply)
       bitlinear_tied / bitlinear_untied         bitlinear     + offline (packed uint8 + weight_scale, divide)
  3. loads every checkpoint back with transformers' real BitNetForCausalLM.from_pretrained (the bitnet
     quantizer replaces the linears), and records logits / greedy ids / windowed NLL in expected.json;
  4. recomputes the same numbers with an independent numpy implementation of docs/bitnet-reference.md that
     reads the safetensors bytes itself (float64, and a float32 variant), and keeps a seed only if they
     agree and no quantized activation sits near a rounding tie (otherwise the next seed is tried);
  5. writes tokenizer_cases.json (ids + decode round-trips for a handful of strings, chat-template cases).

Scoring convention (the Rust side implements exactly this):
  score_ids = encode(score_text, add_special_tokens=True).ids   (BOS first, no EOS)
  cut score_ids into consecutive non-overlapping windows of score_window tokens (the last one may be
  shorter; a window of length 1 predicts nothing); run each window independently from an empty KV cache
  (positions restart at 0); inside a window, position i predicts token i+1.
  score_tokens = number of such predictions, score_nll = (sum of -log_softmax(logits)[next]) / score_tokens,
  log-softmax computed in float64 over the float32 logits.
"""

import os

# torch.compile wraps several functions of transformers/integrations/bitnet.py (unpack_weights,
# activation_quant, WeightQuant/ActQuant.forward). We run them eagerly: same math, no C++ toolchain needed,
# and no CPU-ISA-dependent code generation (see README). Must be set before torch is imported.
os.environ["TORCH_COMPILE_DISABLE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, BitNetForCausalLM  # noqa: E402
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
torch.set_num_threads(1)  # single-threaded CPU kernels: identical reductions on every run
torch.use_deterministic_algorithms(True)

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

# The pre-tokenizer regex of Meta's Llama-3 tokenizer.json.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
SPECIALS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BPE_VOCAB_SIZE = 395  # 256 byte symbols + 139 merges; the 5 specials come after -> 400 ids

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CORPUS = """\
The river runs past the old mill at the edge of the town. In the morning the water is cold and clear, and
the children walk along the bank on their way to school. They count the boats, they watch the birds, and
they argue about whether the heron by the bridge is the same one they saw yesterday. It usually is.

A small model does not know very much, but it can still learn the shape of a language. It learns that the
word "the" is common, that sentences end with a full stop, and that a question often starts with "what",
"where" or "how". It learns that numbers like 12, 365 and 2048 are written with digits, and that people
write dates such as 3 March 2025 in many different ways. None of this is deep, yet all of it is useful.

When you build a tokenizer, you start from bytes. Every piece of text, in any language, is a sequence of
bytes, so nothing is ever unknown. Then you merge the pairs that occur most often: "t" and "h" become "th",
"th" and "e" become "the", and so on, until the vocabulary is as large as you want it to be. The result
is a list of merges and a table of tokens, and that is all the model ever sees.

We're testing a program that runs a language model on a phone. It's written in Rust, it doesn't need a
network, and it should give the same answers as the reference code, down to the last few digits. If the
numbers disagree, something is wrong: a scale is applied twice, a norm is missing, or the rotation of the
keys uses the wrong pairs of dimensions. Careful tests find these mistakes early, while they are cheap.

Ternary weights are either minus one, zero or plus one. Four of them fit in a single byte, which makes the
model small enough to carry around in a pocket. The activations are rounded to eight bits for each token,
and a single scale per matrix brings the result back to the right size. It is a simple idea that works
surprisingly well in practice, and it is the reason this whole project exists.
"""

PROMPT = "The heron waits by the bridge."

# About 150 tokens: two full 64-token scoring windows and a shorter third one.
SCORE_TEXT = (
    "On most mornings the heron stands by the bridge and waits for a fish. The children on their way to "
    "school stop to watch it, and they count the boats on the water. A small model learns that sentences "
    "end with a full stop and that numbers such as 12 and 365 are written with digits. When the numbers "
    "disagree, a scale is applied twice or a norm is missing."
)

TOKENIZER_CASE_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "   leading spaces and trailing   ",
    "tabs\tand\nnew\n\nlines\r\n  indented",
    "digits 1234567 3.14159 2025-03-03 and 007",
    "We're sure it's fine, they'LL see I'M right.",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \u0645\u0631\u062d\u0628\u0627",
    "emoji \U0001f44b\U0001f30d \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f!",
    "specials in text: <|end_of_text|> and <|eot_id|> stay special",
    "punctuation!!! ??? ... --- (brackets) [x] {y} \"quotes\"",
]


CHAT_CASES = [
    ([{"role": "user", "content": "Where does the heron wait?"}], True),
    (
        [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "  How many boats are on the river?\n"},
            {"role": "assistant", "content": "There are 12 boats."},
        ],
        False,
    ),
]


def build_tokenizer_json() -> str:
    """Train the tokenizer and return its tokenizer.json text (what is written to every case dir)."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    paragraphs = [p.strip() for p in CORPUS.split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer=trainer)
    assert tok.get_vocab_size() == BPE_VOCAB_SIZE, tok.get_vocab_size()
    # Specials after the BPE vocabulary, as in Llama-3 (ids 128000.. there).
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    # Training may drop model options; pin the Llama-3 BPE options in the serialized form.
    data = json.loads(tok.to_str())
    data["model"]["ignore_merges"] = True
    data["model"]["fuse_unk"] = False
    data["model"]["byte_fallback"] = False
    # Llama-3's tokenizer.json spells merges as "a b" strings (tokenizers >= 0.20 writes [a, b] pairs; both
    # load). Byte-level symbols never contain a plain space, so the string form is unambiguous.
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {}
    for s in SPECIALS:
        added[str(tok.token_to_id(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 64,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --------------------------------------------------------------------------------------------------
# Model cases
# --------------------------------------------------------------------------------------------------

HIDDEN = 64
INTER = 160
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
MAX_POS = 64
ROPE_THETA = 10000.0
EPS = 1e-5
GREEDY_STEPS = 16
# Weight scales. With 0.02-std latent linears (and so effective weights ~0.016) the residual stream is
# dominated by the embedding, and a tied model just predicts its input token again (greedy repeats one
# id). 0.5 everywhere makes the layers matter and keeps logits at a sane scale (std ~4, NLL ~10 nats).
EMBED_STD = 0.5
HEAD_STD = 0.5
LINEAR_STD = 0.5
MIN_MARGIN = 0.05  # stricter than the 1e-3 the tests need, so greedy ids are robust to float noise
# Robustness to float noise (README, "Robustness"): every scaled activation x*s_x that feeds a rounding
# (prompt+greedy sequence and every scoring window) must be at least this far from a tie k+0.5, relative
# to max(|x*s_x|, 1). About 1 seed in 100-700 passes; the numpy tie check is cheap, so this takes ~30 s.
TIE_TOL_SEQ = 1e-6
TIE_TOL_SCORE = 1e-6
MAX_ATTEMPTS = 3000
VERBOSE = bool(os.environ.get("VERBOSE"))

CASES = [
    # name, linear_class, quantization_mode, tied, storage dtype of latent/float tensors, weight_scale dtype,
    # sharded, base seed
    dict(name="online_tied", linear_class="autobitlinear", mode="online", tied=True,
         float_dtype=torch.bfloat16, scale_dtype=None, sharded=False, seed=1000),
    dict(name="online_untied", linear_class="autobitlinear", mode="online", tied=False,
         float_dtype=torch.float32, scale_dtype=None, sharded=True, seed=2000),
    dict(name="offline_auto_tied", linear_class="autobitlinear", mode="offline", tied=True,
         float_dtype=torch.float32, scale_dtype=torch.bfloat16, sharded=False, seed=3000),
    dict(name="offline_auto_untied", linear_class="autobitlinear", mode="offline", tied=False,
         float_dtype=torch.float32, scale_dtype=torch.float32, sharded=False, seed=4000),
    dict(name="bitlinear_tied", linear_class="bitlinear", mode="offline", tied=True,
         float_dtype=torch.float32, scale_dtype=torch.bfloat16, sharded=False, seed=5000),
    dict(name="bitlinear_untied", linear_class="bitlinear", mode="offline", tied=False,
         float_dtype=torch.float32, scale_dtype=torch.float32, sharded=False, seed=6000),
]

LINEAR_SHAPES = {  # name -> (out, in)
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
NORMS = {  # name -> size
    "input_layernorm": HIDDEN,
    "post_attention_layernorm": HIDDEN,
    "self_attn.attn_sub_norm": HIDDEN,
    "mlp.ffn_sub_norm": INTER,
}


def form_of(case) -> str:
    if case["mode"] == "online":
        return "online"
    return "offline_autobitlinear" if case["linear_class"] == "autobitlinear" else "offline_bitlinear"


def ternarize(w: torch.Tensor):
    """What a real conversion does (same arithmetic as transformers' WeightQuant): absmean scale."""
    w = w.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    t = (w * scale).round().clamp(-1, 1)
    return t, scale  # effective weight = t / scale = t * mean|w|


def make_state_dict(case, vocab_size: int, seed: int) -> dict:
    rng = np.random.RandomState(seed)

    def normal(shape, std):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * np.float32(std))

    def uniform(n):
        return torch.from_numpy(rng.uniform(0.5, 1.5, size=n).astype(np.float32))

    fd = case["float_dtype"]
    sd = {"model.embed_tokens.weight": normal((vocab_size, HIDDEN), EMBED_STD).to(fd)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        for name, size in NORMS.items():
            sd[p + name + ".weight"] = uniform(size).to(fd)
        for name, shape in LINEAR_SHAPES.items():
            latent = normal(shape, LINEAR_STD)
            if case["mode"] == "online":
                sd[p + name + ".weight"] = latent.to(fd)
            else:
                t, scale = ternarize(latent)
                sd[p + name + ".weight"] = pack_weights(t.to(torch.int8).clone())  # uint8 [out/4, in]
                if case["linear_class"] == "autobitlinear":
                    ws = 1.0 / scale  # multiply: effective weight T * mean|W|
                else:
                    ws = scale  # divide: effective weight T / weight_scale = T * mean|W|
                sd[p + name + ".weight_scale"] = ws.reshape(1).to(case["scale_dtype"])
    sd["model.norm.weight"] = uniform(HIDDEN).to(fd)
    if not case["tied"]:
        sd["lm_head.weight"] = normal((vocab_size, HIDDEN), HEAD_STD).to(fd)
    return sd


def model_config(case, tok: Tokenizer) -> dict:
    cfg = {
        "architectures": ["BitNetForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "head_dim": HEAD_DIM,
        "hidden_act": "relu2",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": MAX_POS,
        "model_type": "bitnet",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "quantization_config": {
            "linear_class": case["linear_class"],
            "quant_method": "bitnet",
            "quantization_mode": case["mode"],
        },
        "rms_norm_eps": EPS,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": case["tied"],
        "torch_dtype": "bfloat16" if case["float_dtype"] == torch.bfloat16 else "float32",
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "vocab_size": tok.get_vocab_size(),
    }
    if case["name"] == "bitlinear_untied":
        # transformers >= 5 writes RoPE settings in this nested form; real older checkpoints use the
        # top-level rope_theta above. Cover both spellings.
        del cfg["rope_theta"], cfg["rope_scaling"]
        cfg["rope_parameters"] = {"rope_theta": ROPE_THETA, "rope_type": "default"}
    return cfg


def write_checkpoint(case_dir: Path, case, sd: dict):
    meta = {"format": "pt"}
    if not case["sharded"]:
        save_file(sd, str(case_dir / "model.safetensors"), metadata=meta)
        return
    # Sharded like save_pretrained(max_shard_size=...): embeddings + layer 0 | layer 1 | final norm + head.
    groups = [
        lambda k: k.startswith("model.embed_tokens.") or k.startswith("model.layers.0."),
        lambda k: k.startswith("model.layers.1."),
        lambda k: k in ("model.norm.weight", "lm_head.weight"),
    ]
    n = len(groups)
    weight_map = {}
    total = 0
    for i, pred in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: v for k, v in sd.items() if pred(k)}
        assert part
        save_file(part, str(case_dir / fname), metadata=meta)
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    assert set(weight_map) == set(sd)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (case_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_model(case_dir: Path, case):
    model, info = BitNetForCausalLM.from_pretrained(
        str(case_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (case["name"], key, info.get(key))
    assert type(model.lm_head) is torch.nn.Linear, type(model.lm_head)
    assert model.config.rope_parameters["rope_theta"] == ROPE_THETA, model.config.rope_parameters
    if case["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for layer in model.model.layers:
        for name in LINEAR_SHAPES:
            mod = layer.get_submodule(name)
            if case["linear_class"] == "autobitlinear":
                assert type(mod) is AutoBitLinear, type(mod)
                assert mod.online_quant == (case["mode"] == "online")
            else:
                assert type(mod) is BitLinear, type(mod)
            assert mod.rms_norm is None  # use_rms_norm defaults to False
    return model


def check_loaded_tensors(model, case, sd):
    """The loaded module state must be exactly what we wrote (packed bytes / weight_scale not dropped)."""
    for layer in range(LAYERS):
        for name in LINEAR_SHAPES:
            key = f"model.layers.{layer}.{name}"
            mod = model.get_submodule(key)
            if case["mode"] == "online":
                assert mod.weight.dtype == torch.float32
                assert torch.equal(mod.weight, sd[key + ".weight"].float())
            elif case["linear_class"] == "autobitlinear":
                # BitNetDeserialize unpacks to a float [out, in] ternary matrix at load time.
                assert mod.weight.dtype == torch.float32 and tuple(mod.weight.shape) == LINEAR_SHAPES[name]
                assert torch.equal(mod.weight, torch.from_numpy(np_unpack(sd[key + ".weight"].numpy())).float())
                assert mod.weight_scale.dtype == torch.float32
                assert torch.equal(mod.weight_scale, sd[key + ".weight_scale"].float())
            else:
                # BitLinear keeps the packed uint8 buffer and unpacks in every forward.
                assert mod.weight.dtype == torch.uint8
                assert torch.equal(mod.weight, sd[key + ".weight"])
                assert mod.weight_scale.dtype == torch.float32
                assert torch.equal(mod.weight_scale, sd[key + ".weight_scale"].float())


# --------------------------------------------------------------------------------------------------
# Expected values from transformers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def full_logits(model, ids) -> np.ndarray:
    out = model(torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def top2_margin(row: np.ndarray):
    order = np.argsort(-row.astype(np.float64), kind="stable")
    return int(order[0]), float(row[order[0]]) - float(row[order[1]])


@torch.no_grad()
def greedy(model, prompt_ids):
    """16 argmax steps with the KV cache (as a runtime decodes); cross-checked by full recomputation."""
    out = model(torch.tensor([prompt_ids], dtype=torch.long), use_cache=True)
    past = out.past_key_values
    row = out.logits[0, -1].float().numpy()
    ids, margins = [], []
    for step in range(GREEDY_STEPS):
        nxt, margin = top2_margin(row)
        ids.append(nxt)
        margins.append(margin)
        if step + 1 < GREEDY_STEPS:
            out = model(torch.tensor([[nxt]], dtype=torch.long), past_key_values=past, use_cache=True)
            past = out.past_key_values
            row = out.logits[0, -1].float().numpy()
    seq = list(prompt_ids) + ids
    full = full_logits(model, seq)
    consistent = all(int(np.argmax(full[len(prompt_ids) - 1 + i])) == ids[i] for i in range(GREEDY_STEPS))
    return ids, margins, full, consistent


def score(logits_fn, score_ids, window):
    """Windowed mean NLL; see the module docstring for the convention."""
    total, count = 0.0, 0
    for start in range(0, len(score_ids), window):
        w = score_ids[start:start + window]
        if len(w) < 2:
            continue
        lg = logits_fn(w).astype(np.float64)
        mx = lg.max(axis=-1, keepdims=True)
        logp = lg - (mx + np.log(np.exp(lg - mx).sum(axis=-1, keepdims=True)))
        for i in range(len(w) - 1):
            total -= logp[i, w[i + 1]]
            count += 1
    return count, total / count


# --------------------------------------------------------------------------------------------------
# Independent numpy reference (float64), reading the safetensors bytes directly
# --------------------------------------------------------------------------------------------------


def np_read_safetensors(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a:base + b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float64)
        elif dt == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        elif dt == "U8":
            arr = np.frombuffer(buf, dtype=np.uint8).copy()
        else:
            raise ValueError(dt)
        out[name] = arr.reshape(info["shape"])
    return out


def np_read_checkpoint(case_dir: Path) -> dict:
    index = case_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(np_read_safetensors(case_dir / f))
    return tensors


def np_unpack(packed: np.ndarray) -> np.ndarray:
    """Byte packed[r, c] holds T[r + i*R, c] in bits 2i..2i+1 (low bits first), code = T + 1."""
    r = packed.shape[0]
    t = np.zeros((4 * r,) + packed.shape[1:], dtype=np.int8)
    for i in range(4):
        t[i * r:(i + 1) * r] = ((packed >> (2 * i)) & 3).astype(np.int8) - 1
    return t


class NumpyBitNet:
    """The math of docs/bitnet-reference.md, written from the doc, not from transformers.

    dtype=np.float64 is the independent reference. dtype=np.float32 mimics what a float32 runtime does with
    the documented operation order: y = (T . x_q) * m / s_x (multiply forms), y = (T . x_q) / (ws * s_x)
    (bitlinear); it is used only to measure how robust the fixture is to float32 reordering noise.
    """

    def __init__(self, case_dir: Path, form: str, dtype=np.float64):
        cfg = json.loads((case_dir / "config.json").read_text())
        self.dt = dt = dtype
        self.t = {k: (v.astype(dt) if v.dtype != np.uint8 else v) for k, v in np_read_checkpoint(case_dir).items()}
        self.form = form
        self.eps = dt(cfg["rms_norm_eps"])
        theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
        self.inv_freq = (1.0 / (theta ** (np.arange(0, HEAD_DIM, 2, dtype=dt) / dt(HEAD_DIM)))).astype(dt)
        self.embed = self.t["model.embed_tokens.weight"]
        self.head = self.t.get("lm_head.weight", self.embed)
        assert ("lm_head.weight" in self.t) == (not cfg["tie_word_embeddings"])
        self.lin = {}
        for layer in range(LAYERS):
            for name in LINEAR_SHAPES:
                key = f"model.layers.{layer}.{name}"
                w = self.t[key + ".weight"]
                if form == "online":
                    m = max(np.abs(w).mean(dtype=dt), dt(1e-5))
                    tern = np.clip(np.round(w / m), -1, 1).astype(dt)
                    self.lin[key] = (tern, lambda y, sx, m=m: y * m / sx)
                else:
                    tern = np_unpack(w).astype(dt)
                    ws = self.t[key + ".weight_scale"].reshape(())
                    if form == "offline_autobitlinear":
                        self.lin[key] = (tern, lambda y, sx, ws=ws: y * ws / sx)
                    else:
                        self.lin[key] = (tern, lambda y, sx, ws=ws: y / (ws * sx))
                assert tern.shape == LINEAR_SHAPES[name]

    def rms(self, x, key):
        return self.t[key] * (x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps))

    def linear(self, x, key):
        tern, post = self.lin[key]
        sx = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
        v = x * sx
        xq = np.clip(np.round(v), -128, 127)  # np.round: half to even, like torch.round
        # Relative distance of every scaled activation to a rounding tie (k + 0.5): tiny values mean
        # float noise of that relative size in x could move x_q by one step.
        tie = np.abs(v - np.floor(v) - 0.5) / np.maximum(np.abs(v), 1.0)
        self.min_tie = min(self.min_tie, float(tie.min()))
        return post(xq @ tern.T, sx)

    def rope(self, x, pos):  # x [heads, T, hd], rotate-half convention
        ang = pos[:, None] * self.inv_freq[None, :]
        cos = np.cos(np.concatenate([ang, ang], -1))
        sin = np.sin(np.concatenate([ang, ang], -1))
        h = HEAD_DIM // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    min_tie = np.inf  # smallest relative tie distance seen since the last reset

    def __call__(self, ids) -> np.ndarray:
        n = len(ids)
        pos = np.arange(n, dtype=self.dt)
        x = self.embed[np.asarray(ids)]
        mask = np.triu(np.full((n, n), -np.inf, dtype=self.dt), 1)
        for layer in range(LAYERS):
            p = f"model.layers.{layer}."
            h = self.rms(x, p + "input_layernorm.weight")
            q = self.linear(h, p + "self_attn.q_proj").reshape(n, HEADS, HEAD_DIM).transpose(1, 0, 2)
            k = self.linear(h, p + "self_attn.k_proj").reshape(n, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
            v = self.linear(h, p + "self_attn.v_proj").reshape(n, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            rep = HEADS // KV_HEADS  # query head j uses kv head j // rep
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
            s = q @ k.transpose(0, 2, 1) * self.dt(HEAD_DIM ** -0.5) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(1, 0, 2).reshape(n, HEADS * HEAD_DIM)
            a = self.rms(a, p + "self_attn.attn_sub_norm.weight")
            x = x + self.linear(a, p + "self_attn.o_proj")
            z = self.rms(x, p + "post_attention_layernorm.weight")
            g = np.maximum(self.linear(z, p + "mlp.gate_proj"), 0.0) ** 2
            u = self.linear(z, p + "mlp.up_proj")
            f = self.rms(g * u, p + "mlp.ffn_sub_norm.weight")
            x = x + self.linear(f, p + "mlp.down_proj")
        x = self.rms(x, "model.norm.weight")
        out = x @ self.head.T
        assert out.dtype == self.dt
        return out


# --------------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------------


def f32(v) -> float:
    """Shortest decimal that round-trips the float32 value (parse as f64, cast to f32 -> exact)."""
    return float(str(np.float32(v)))


def sig7(v) -> float:
    return float(f"{v:.7g}")


def dump_json(path: Path, obj: dict):
    """One top-level key per line, nested values compact: small, stable, diff-friendly."""
    lines = []
    items = list(obj.items())
    for i, (k, v) in enumerate(items):
        if k == "logits":
            rows = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in v)
            val = "[\n  " + rows + "\n ]"
        else:
            val = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        lines.append(f" {json.dumps(k)}: {val}" + ("," if i + 1 < len(items) else ""))
    path.write_text("{\n" + "\n".join(lines) + "\n}\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def write_tokenizer_files(case_dir: Path, tok_json: str, tok_cfg: dict):
    (case_dir / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (case_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def make_case(case, tok_json: str, tok_cfg: dict, tok: Tokenizer):
    case_dir = FIXTURES / case["name"]
    form = form_of(case)
    prompt_ids = tok.encode(PROMPT, add_special_tokens=True).ids
    score_ids = tok.encode(SCORE_TEXT, add_special_tokens=True).ids
    assert len(prompt_ids) + GREEDY_STEPS <= MAX_POS

    for attempt in range(MAX_ATTEMPTS):
        seed = case["seed"] + attempt
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir(parents=True)
        sd = make_state_dict(case, tok.get_vocab_size(), seed)
        write_checkpoint(case_dir, case, sd)
        (case_dir / "config.json").write_text(json.dumps(model_config(case, tok), indent=2) + "\n")
        write_tokenizer_files(case_dir, tok_json, tok_cfg)

        # Keep a seed only if its numbers are robust to float noise (README, "Robustness"). Cheapest test
        # first: no scaled activation of the scoring pass may sit near a rounding tie.
        ref = NumpyBitNet(case_dir, form)  # independent numpy float64 implementation
        ref_tokens, ref_nll = score(ref, score_ids, MAX_POS)
        score_tie = ref.min_tie
        if score_tie <= TIE_TOL_SCORE:
            continue

        model = load_model(case_dir, case)
        check_loaded_tensors(model, case, sd)
        logits = full_logits(model, prompt_ids)
        greedy_ids, margins, seq_logits, consistent = greedy(model, prompt_ids)
        assert np.abs(logits - seq_logits[: len(prompt_ids)]).max() < 1e-5
        if not consistent or min(margins) <= MIN_MARGIN:
            continue
        score_tokens, score_nll = score(lambda w: full_logits(model, w), score_ids, MAX_POS)
        assert ref_tokens == score_tokens

        ref.min_tie = np.inf
        seq = list(prompt_ids) + greedy_ids
        seq_diff = float(np.abs(ref(seq) - seq_logits).max())
        seq_tie = ref.min_tie
        win_diff = 0.0
        for start in range(0, len(score_ids), MAX_POS):
            w = score_ids[start:start + MAX_POS]
            win_diff = max(win_diff, float(np.abs(ref(w) - full_logits(model, w)).max()))
        nll_diff = abs(ref_nll - score_nll)
        # A float32 implementation with the documented operation order (what a runtime does).
        ref32 = NumpyBitNet(case_dir, form, np.float32)
        f32_diff = float(np.abs(ref32(seq) - seq_logits).max())
        f32_nll_diff = abs(score(ref32, score_ids, MAX_POS)[1] - score_nll)
        stats = (
            f"min greedy margin {min(margins):.3g}; numpy-f64-vs-torch max |dlogit| {seq_diff:.1e} (prompt+greedy) "
            f"{win_diff:.1e} (score windows), |dnll| {nll_diff:.1e}; numpy-f32-vs-torch max |dlogit| "
            f"{f32_diff:.1e}, |dnll| {f32_nll_diff:.1e}; min rel tie distance {seq_tie:.1e} (prompt+greedy) "
            f"{score_tie:.1e} (score)"
        )
        if VERBOSE:
            print(f"  {case['name']} seed {seed}: {stats}")
        ok = (
            seq_diff < 1e-4
            and win_diff < 1e-4
            and nll_diff < 1e-6
            and f32_diff < 1e-4
            and f32_nll_diff < 1e-6
            and seq_tie > TIE_TOL_SEQ
        )
        if ok:
            break
    else:
        raise RuntimeError(f"{case['name']}: no seed in {MAX_ATTEMPTS} attempts passed")

    expected = {
        "case": case["name"],
        "form": form,
        "tied": case["tied"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "logits": [[f32(v) for v in row] for row in logits],
        "greedy_ids": greedy_ids,
        "greedy_margins": [sig7(m) for m in margins],
        "score_text": SCORE_TEXT,
        "score_ids": score_ids,
        "score_window": MAX_POS,
        "score_tokens": score_tokens,
        "score_nll": score_nll,
    }
    dump_json(case_dir / "expected.json", expected)
    print(
        f"  {case['name']}: seed {seed} (attempt {attempt + 1}), form {form}, tied {case['tied']}, "
        f"prompt {len(prompt_ids)} tokens, score {score_tokens} predictions, nll {score_nll:.4f}; {stats}"
    )


def make_tokenizer_cases(tok: Tokenizer, hf_dir: Path):
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    cases = []
    for s in TOKENIZER_CASE_STRINGS:
        enc = tok.encode(s, add_special_tokens=True)
        ids = enc.ids
        assert hf_tok(s, add_special_tokens=True)["input_ids"] == ids, s
        dec = tok.decode(ids, skip_special_tokens=False)
        dec_skip = tok.decode(ids, skip_special_tokens=True)
        assert dec_skip == s or "<|" in s, (s, dec_skip)
        assert dec == BOS + s, (s, dec)
        cases.append({"text": s, "ids": ids, "tokens": enc.tokens, "decoded": dec, "decoded_skip_special": dec_skip})
    chat_cases = []
    for messages, gen in CHAT_CASES:
        rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        manual = BOS + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
        ) + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")
        assert rendered == manual, (rendered, manual)
        ids = tok.encode(rendered, add_special_tokens=False).ids  # the template already holds BOS
        hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
        assert list(hf_ids) == ids, (hf_ids, ids)
        chat_cases.append({"messages": messages, "add_generation_prompt": gen, "rendered": rendered, "ids": ids})
    out = {
        "comment": "cases: ids = encode(text, add_special_tokens=True); decoded = decode(ids, skip_special_tokens=false); "
        "decoded_skip_special = decode(ids, skip_special_tokens=true). chat_cases: rendered = the chat_template of "
        "tokenizer_config.json (as transformers' apply_chat_template renders it), ids = encode(rendered, "
        "add_special_tokens=False). Tokenizer: any case dir's tokenizer.json.",
        "bos_id": tok.token_to_id(BOS),
        "eos_id": tok.token_to_id(EOS),
        "vocab_size": tok.get_vocab_size(),
        "chat_cases": chat_cases,
        "cases": cases,
    }
    head = json.dumps({k: v for k, v in out.items() if k not in ("chat_cases", "cases")}, indent=1, ensure_ascii=False)
    parts = [head[:-2] + ","]
    for key in ("chat_cases", "cases"):
        rows = ",\n  ".join(json.dumps(c, ensure_ascii=False, separators=(", ", ": ")) for c in out[key])
        parts.append(f' "{key}": [\n  {rows}\n ]' + ("," if key == "chat_cases" else ""))
    text = "\n".join(parts) + "\n}"
    assert json.loads(text) == out
    (FIXTURES / "tokenizer_cases.json").write_text(text + "\n", encoding="utf-8")


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, tokenizers {tokenizers.__version__}")
    torch.manual_seed(0)
    tok_json = build_tokenizer_json()
    tok = Tokenizer.from_str(tok_json)  # everything below uses exactly what is written to disk
    tok_cfg = tokenizer_config(tok)
    print(f"tokenizer: {tok.get_vocab_size()} ids, bos {tok.token_to_id(BOS)}, eos {tok.token_to_id(EOS)}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        make_case(case, tok_json, tok_cfg, tok)
    make_tokenizer_cases(tok, FIXTURES / CASES[0]["name"])
    print("done")


if __name__ == "__main__":
    main()
