#!/usr/bin/env python3
"""Write the GGUF reader's fixtures under tests/fixtures/gguf/.

Run from anywhere:   python tests/reference/make_gguf_fixtures.py
(needs only `pip install gguf numpy`; see tests/reference/README.md).

Writes, deterministically (fixed seed):
  tq2_0.gguf, tq1_0.gguf   arch "bitnet" files written by the `gguf` package's GGUFWriter, their ternary
                           projections quantized by its own numpy TQ2_0/TQ1_0 quantizers (bit-exact with
                           ggml's, per upstream's gguf-py tests), plus the float and k-quant types llama.cpp
                           puts next to them;
  i2_s.gguf                arch "bitnet-b1.58", general.file_type 40: bitnet.cpp's I2_S, which the `gguf`
                           package cannot write (type 36 is something else upstream), so this script writes the
                           container itself and packs I2_S by the layout in the GGUF notes (inferred from
                           bitnet.cpp's source, not checked against microsoft's published file);
  <name>.json              per file, the metadata checked and, per tensor, its type, ne, and either the ternary
                           values the script started from ("codes": one character per element, '0','1','2'
                           for -1, 0, +1, row-major) with the scale the file holds ("scale", fp16 for TQ
                           types, or "block_scales_hex" where blocks differ), or the f32 values the `gguf`
                           package dequantizes ("f32_hex": little-endian float32 bytes in hex).

Every hidden size is a multiple of 256, as the TQ types require. All files stay far below 200 KB.

It also writes a whole tiny model under tests/fixtures/gguf_model/ (its own seed, so the files above do not
change), the same weights in four forms:
  twin/                    a Hugging Face directory, offline AutoBitLinear (packed uint8 + weight_scale),
                           with the tokenizer.json of tests/fixtures/offline_auto_tied: the "offline twin" of
                           what the GGUF files store, so that bitnode's safetensors path is the reference;
  tq2_0.gguf, tq1_0.gguf   arch "bitnet", projections TQ2_0 / TQ1_0 (the `gguf` package's quantizers),
                           embedding Q4_K / F16, tokenizer "gpt2" with pre "llama-bpe" (so ReLU² by the
                           activation rule), tq1_0 also with `bitnet.hidden_activation` and the rope scaling
                           keys llama.cpp's converter writes;
  i2_s.gguf                arch "bitnet-b1.58", general.file_type 40, projections I2_S, embedding Q8_0, no
                           tokenizer.ggml.pre (as in microsoft's file).
  twin_silu/, tq2_0_silu.gguf
                           the same weights as a gated SiLU model (hidden_act silu; bitnet.hidden_activation
                           silu, Q4_K embedding).
tests/reference/make_gguf_expected.py then adds what transformers computes for each twin (expected.json).
Hidden and FFN width 256, 4 heads of 64, 1 KV head, one layer, the 400-token vocabulary: the embedding values
are (8q - 60)/256 for 4-bit q, which Q4_K, Q8_0 and F16 all hold exactly, and each projection is ternary
times one fp16-exact scale, so every form decodes to the same numbers bit for bit. Each file < 300 KB.
"""

import importlib.metadata
import json
import struct
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "fixtures" / "gguf"

rng = np.random.default_rng(16)


def ternary(rows, cols):
    return rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)


def codes(t):
    return (t.astype(np.int16) + 1 + ord("0")).astype(np.uint8).tobytes().decode("ascii")


def floats(a):
    # Exact and compact: the float32 values' little-endian bytes, as hex (8 characters per value).
    return np.asarray(a, dtype="<f4").ravel().tobytes().hex()


def kquant_bytes(qtype, rows, cols):
    """Random k-quant blocks with finite fp16 scales (random bytes there could be inf/NaN)."""
    size = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    b = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    d = (rng.uniform(0.001, 0.05, size=(rows, cols // 256, 2))).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        b[..., 0:4] = d
    else:
        b[..., 208:210] = d[..., 0:2]
    return b.reshape(rows, -1)


def tq_file(qtype, name, embd_type):
    """A small arch-"bitnet" file; returns its expected.json entry."""
    path = OUT / name
    w = gguf.GGUFWriter(str(path), "bitnet")
    w.add_name("bitnode gguf fixture")
    w.add_file_type({Q.TQ1_0: 36, Q.TQ2_0: 37}[qtype])  # LLAMA_FTYPE_MOSTLY_TQ1_0 / TQ2_0
    w.add_embedding_length(256)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁the"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.5])
    tensors = {}

    def ternary_tensor(tname, t, block_scales):
        # The converter stores W = T * s (values already ternary times the scale); the TQ quantizer then
        # writes d = max|x| per 256-element block, rounded to fp16.
        rows, cols = t.shape
        s = np.repeat(np.asarray(block_scales, dtype=np.float32).reshape(rows, cols // 256), 256, axis=1)
        x = t.astype(np.float32) * s
        q = gguf.quants.quantize(x, qtype)
        back = gguf.quants.dequantize(q, qtype)
        bs = np.asarray(block_scales, dtype=np.float32).reshape(rows, -1)
        d16 = np.where((t != 0).reshape(rows, -1, 256).any(-1), bs, np.float32(0))
        d16 = d16.astype(np.float16).astype(np.float32)
        assert np.array_equal(back, t * np.repeat(d16, 256, axis=1)), tname
        w.add_tensor(tname, q, raw_dtype=qtype)
        entry = {"type": qtype.name, "ne": [cols, rows], "codes": codes(t)}
        if np.all(d16[d16 != 0] == d16[d16 != 0].flat[0]):
            entry["scale"] = float(d16[d16 != 0].flat[0])
        else:
            entry["block_scales_hex"] = floats(d16)
        tensors[tname] = entry

    # One scale for the whole tensor: the common case.
    ternary_tensor("blk.0.attn_q.weight", ternary(64, 256), np.full(64, 0.0478))
    # Blocks with different scales, and one all-zero block (d = 0).
    t = ternary(16, 512)
    t[3, 256:] = 0
    ternary_tensor("blk.0.ffn_down.weight", t, [0.02 * (1 + b % 3) for b in range(32)])
    # A projection left in F16 (llama.cpp falls back to it when ne[0] is not a multiple of 256; here 256 is,
    # but the values are what that fallback writes: ternary times one scale, exact in fp16).
    t = ternary(32, 256)
    w.add_tensor("blk.0.attn_k.weight", (t.astype(np.float32) * np.float32(0.0612)).astype(np.float16))
    tensors["blk.0.attn_k.weight"] = {
        "type": "F16",
        "ne": [256, 32],
        "codes": codes(t),
        "scale": float(np.float16(0.0612)),
    }
    norm = rng.uniform(0.5, 1.5, size=256).astype(np.float32)
    w.add_tensor("blk.0.attn_norm.weight", norm)
    tensors["blk.0.attn_norm.weight"] = {"type": "F32", "ne": [256], "f32_hex": floats(norm)}
    # The embedding and output in the k-quant types llama-quantize writes for them.
    if embd_type == Q.Q8_0:
        q = gguf.quants.quantize(rng.normal(0, 0.5, size=(8, 256)).astype(np.float32), Q.Q8_0)
    else:
        q = kquant_bytes(embd_type, 8, 256)
    w.add_tensor("token_embd.weight", q, raw_dtype=embd_type)
    tensors["token_embd.weight"] = {
        "type": embd_type.name,
        "ne": [256, 8],
        "f32_hex": floats(gguf.quants.dequantize(q, embd_type)),
    }
    q = kquant_bytes(Q.Q6_K, 4, 256)
    w.add_tensor("output.weight", q, raw_dtype=Q.Q6_K)
    tensors["output.weight"] = {"type": "Q6_K", "ne": [256, 4], "f32_hex": floats(gguf.quants.dequantize(q, Q.Q6_K))}

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Read back with the package's own reader: the types and shapes are what expected.json says.
    r = gguf.GGUFReader(str(path))
    for t in r.tensors:
        e = tensors[t.name]
        assert t.tensor_type.name == e["type"] and [int(x) for x in t.shape] == e["ne"], t.name
    return {
        "architecture": "bitnet",
        "file_type": {Q.TQ1_0: 36, Q.TQ2_0: 37}[qtype],
        "tokens": ["<unk>", "<s>", "</s>", "▁the"],
        "tensors": tensors,
    }


# ------------------------------------------------------------------ I2_S (bitnet.cpp), own writer

GGUF_STRING, GGUF_U32 = 8, 4


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def pack_i2s(t, scale):
    """bitnet.cpp's I2_S: flatten row-major, code = value + 1; for 128-element block b and j in 0..32,
    byte 32b+j = c[128b+j]<<6 | c[128b+32+j]<<4 | c[128b+64+j]<<2 | c[128b+96+j]; then the f32 scale and
    28 zero bytes (size n/4 + 32)."""
    c = (t.ravel().astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]
    return packed.astype(np.uint8).tobytes() + struct.pack("<f", scale) + bytes(28)


def unpack_i2s(data, n):
    """Independent check of pack_i2s: element e of block b sits in byte 32b + e%32 at bits 6 - 2*(e//32)."""
    b = np.frombuffer(data[: n // 4], dtype=np.uint8).reshape(-1, 32)
    groups = [(b >> (6 - 2 * g)) & 3 for g in range(4)]
    return (np.stack(groups, axis=1).reshape(-1).astype(np.int8) - 1), struct.unpack("<f", data[n // 4 : n // 4 + 4])[0]


def i2s_file(name):
    kvs = [
        ("general.architecture", GGUF_STRING, gstr("bitnet-b1.58")),
        ("general.name", GGUF_STRING, gstr("bitnode gguf fixture")),
        ("general.file_type", GGUF_U32, struct.pack("<I", 40)),  # LLAMA_FTYPE_MOSTLY_I2_S
        ("bitnet-b1.58.embedding_length", GGUF_U32, struct.pack("<I", 256)),
    ]
    tensors = {}
    blobs = []  # (name, ne, ggml type, bytes)
    for tname, rows, cols, scale in [("blk.0.attn_q.weight", 64, 256, 0.7931), ("blk.0.ffn_down.weight", 16, 512, 1.25)]:
        t = ternary(rows, cols)
        data = pack_i2s(t, scale)
        assert len(data) == rows * cols // 4 + 32
        back, s = unpack_i2s(data, rows * cols)
        assert np.array_equal(back, t.ravel()) and s == np.float32(scale)
        blobs.append((tname, [cols, rows], 36, data))
        tensors[tname] = {"type": "I2_S", "ne": [cols, rows], "codes": codes(t), "scale": float(np.float32(scale))}
    embd = rng.normal(0, 0.5, size=(8, 256)).astype(np.float16)
    blobs.append(("token_embd.weight", [256, 8], 1, embd.tobytes()))
    tensors["token_embd.weight"] = {"type": "F16", "ne": [256, 8], "f32_hex": floats(embd.astype(np.float32))}

    align = 32
    pad = lambda n: (n + align - 1) // align * align  # noqa: E731
    head = b"GGUF" + struct.pack("<IqQ", 3, len(blobs), len(kvs))
    for k, ty, v in kvs:
        head += gstr(k) + struct.pack("<I", ty) + v
    offset = 0
    for tname, ne, ty, data in blobs:
        head += gstr(tname) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne)
        head += struct.pack("<IQ", ty, offset)
        offset = pad(offset + len(data))
    out = head + bytes(pad(len(head)) - len(head))
    for _, _, _, data in blobs:
        out += data + bytes(pad(len(data)) - len(data))
    (OUT / name).write_bytes(out)
    return {"architecture": "bitnet-b1.58", "file_type": 40, "tensors": tensors}


# ------------------------------------------------------------------ a whole tiny model, four forms

MODEL_OUT = HERE.parent / "fixtures" / "gguf_model"
TOK_SRC = HERE.parent / "fixtures" / "offline_auto_tied"
C, F, NH, NKV, HD, L, CTX = 256, 256, 4, 1, 64, 1, 64
HF_PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GG_PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def model_weights():
    mrng = np.random.default_rng(1616)
    tok = json.loads((TOK_SRC / "tokenizer.json").read_text())
    vocab = max(max(tok["model"]["vocab"].values()), max(a["id"] for a in tok["added_tokens"])) + 1
    qd, kvd = NH * HD, NKV * HD
    shapes = [(qd, C), (kvd, C), (kvd, C), (C, qd), (F, C), (F, C), (C, F)]
    layers = []
    for _ in range(L):
        proj = []
        for out, inp in shapes:
            t = mrng.integers(-1, 2, size=(out, inp)).astype(np.int8)
            s = float(np.float16(mrng.uniform(0.02, 0.08)))
            proj.append((t, s))
        # fp16-exact, so that the twin can store them in F16 (keeping it under 300 KB) and the GGUF files
        # in F32 as llama.cpp does, with the same values.
        norms = [mrng.uniform(0.5, 1.5, size=n).astype(np.float16).astype(np.float32) for n in (C, C, qd, F)]
        layers.append((proj, norms))
    q = mrng.integers(0, 16, size=(vocab, C)).astype(np.uint8)
    embd = ((8 * q.astype(np.float32) - 60) / 256).astype(np.float32)
    final = mrng.uniform(0.5, 1.5, size=C).astype(np.float16).astype(np.float32)
    return tok, vocab, layers, q, embd, final


def embd_q4_k(q):
    """Q4_K blocks for y = d*sc*q - dmin*m with d = dmin = 1/256 and every sub-block's sc = 8, m = 60."""
    rows, cols = q.shape
    b = np.zeros((rows, cols // 256, 144), dtype=np.uint8)
    b[..., 0:2] = np.frombuffer(np.float16(1 / 256).tobytes(), dtype=np.uint8)
    b[..., 2:4] = np.frombuffer(np.float16(1 / 256).tobytes(), dtype=np.uint8)
    # get_scale_min_k4: sub-blocks 0..3 in the low 6 bits of bytes 0..3 (scale) and 4..7 (min); 4..7 in the
    # nibbles of bytes 8..11, with their top 2 bits in the top 2 bits of bytes 0..3 (scale: 8 >> 4 = 0) and
    # 4..7 (min: 60 >> 4 = 3).
    b[..., 4:8] = 8
    b[..., 8:12] = 60 | ((60 >> 4) << 6)
    b[..., 12:16] = (8 & 0xF) | ((60 & 0xF) << 4)
    qq = q.reshape(rows, cols // 256, 4, 2, 32)  # chunk c of 64: low nibbles sub-block 2c, high 2c+1
    b[..., 16:] = (qq[..., 0, :] | (qq[..., 1, :] << 4)).reshape(rows, cols // 256, 128)
    return b.reshape(rows, -1)


def embd_q8_0(q):
    rows, cols = q.shape
    b = np.zeros((rows, cols // 32, 34), dtype=np.uint8)
    b[..., 0:2] = np.frombuffer(np.float16(1 / 256).tobytes(), dtype=np.uint8)
    b[..., 2:] = (8 * q.astype(np.int16) - 60).astype(np.int8).view(np.uint8).reshape(rows, cols // 32, 32)
    return b.reshape(rows, -1)


def write_twin(tok, vocab, layers, embd, final, name="twin", act="relu2"):
    from safetensors.numpy import save_file

    d = MODEL_OUT / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((TOK_SRC / "config.json").read_text())
    cfg.update(
        hidden_size=C, intermediate_size=F, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
        num_hidden_layers=L, max_position_embeddings=CTX, vocab_size=vocab, rope_theta=10000.0, hidden_act=act,
    )
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        (d / f).write_bytes((TOK_SRC / f).read_bytes())
    ts = {"model.embed_tokens.weight": embd.astype(np.float16), "model.norm.weight": final.astype(np.float16)}
    for l, (proj, norms) in enumerate(layers):
        p = f"model.layers.{l}"
        for name, (t, s) in zip(HF_PROJ, proj):
            # HF offline packing: packed row r, bits 2i..2i+1 hold output row i*out/4 + r (code = value + 1).
            c = (t.astype(np.int16) + 1).astype(np.uint8)
            g = c.reshape(4, -1, c.shape[1])
            ts[f"{p}.{name}.weight"] = (g[0] | (g[1] << 2) | (g[2] << 4) | (g[3] << 6)).astype(np.uint8)
            ts[f"{p}.{name}.weight_scale"] = np.array([s], dtype=np.float32)
        for name, n in zip(["input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm"], norms):
            ts[f"{p}.{name}.weight"] = n.astype(np.float16)
    save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})


def gguf_model(name, arch, qtype, embd_kind, q, tok, vocab, layers, final, pre, extra_keys):
    path = MODEL_OUT / name
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("bitnode gguf model fixture")
    w.add_file_type({"TQ1_0": 36, "TQ2_0": 37, "I2_S": 40}[qtype])
    w.add_vocab_size(vocab)
    w.add_context_length(CTX)
    w.add_embedding_length(C)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_rope_dimension_count(HD)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for f in extra_keys:
        f(w)
    # The vocabulary as llama.cpp's `_set_vocab_gpt2` writes it: tokens by id, added specials as CONTROL.
    tokens = [None] * vocab
    for t, i in tok["model"]["vocab"].items():
        tokens[i] = t
    types = [1] * vocab
    for a in tok["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3
    assert all(t is not None for t in tokens)
    w.add_tokenizer_model("gpt2")
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    cfg = json.loads((TOK_SRC / "config.json").read_text())
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(True)
    tcfg = json.loads((TOK_SRC / "tokenizer_config.json").read_text())
    w.add_chat_template(tcfg["chat_template"])

    i2s = []  # (name, cols, rows): tensors written as I8 placeholders, patched to I2_S below
    if embd_kind == "Q4_K":
        w.add_tensor("token_embd.weight", embd_q4_k(q), raw_dtype=Q.Q4_K)
    elif embd_kind == "Q8_0":
        w.add_tensor("token_embd.weight", embd_q8_0(q), raw_dtype=Q.Q8_0)
    else:
        w.add_tensor("token_embd.weight", ((8 * q.astype(np.float32) - 60) / 256).astype(np.float16))
    for l, (proj, norms) in enumerate(layers):
        for gname, n in zip(["attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm"], norms):
            w.add_tensor(f"blk.{l}.{gname}.weight", n)
        for gname, (t, s) in zip(GG_PROJ, proj):
            tname = f"blk.{l}.{gname}.weight"
            if qtype == "I2_S":
                data = pack_i2s(t, s)
                back, s2 = unpack_i2s(data, t.size)
                assert np.array_equal(back, t.ravel()) and s2 == np.float32(s)
                w.add_tensor(tname, np.frombuffer(data, dtype=np.int8).reshape(1, -1))
                i2s.append((tname, t.shape[1], t.shape[0]))
            else:
                qt = {"TQ1_0": Q.TQ1_0, "TQ2_0": Q.TQ2_0}[qtype]
                x = t.astype(np.float32) * np.float32(s)
                qb = gguf.quants.quantize(x, qt)
                assert np.array_equal(gguf.quants.dequantize(qb, qt), x), tname
                w.add_tensor(tname, qb, raw_dtype=qt)
    w.add_tensor("output_norm.weight", final)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if i2s:
        # gguf-py cannot write type 36 (upstream uses the id for something else): each I2_S tensor went in
        # as I8 with ne = [n/4 + 32, 1], the same data size and header length; set its real ne and type.
        b = bytearray(path.read_bytes())
        for tname, cols, rows in i2s:
            at = b.index(gstr(tname)) + len(gstr(tname))
            assert struct.unpack_from("<I", b, at)[0] == 2
            struct.pack_into("<qqI", b, at + 4, cols, rows, 36)
        path.write_bytes(bytes(b))
    else:
        r = gguf.GGUFReader(str(path))
        assert len(r.tensors) == 2 + 11 * L


def model_fixtures():
    tok, vocab, layers, q, embd, final = model_weights()
    assert np.array_equal(embd.astype(np.float16).astype(np.float32), embd)
    write_twin(tok, vocab, layers, embd, final)
    gguf_model("tq2_0.gguf", "bitnet", "TQ2_0", "Q4_K", q, tok, vocab, layers, final, "llama-bpe", [])
    gguf_model(
        "tq1_0.gguf", "bitnet", "TQ1_0", "F16", q, tok, vocab, layers, final, "llama-bpe",
        [
            lambda w: w.add_string("bitnet.hidden_activation", "relu2"),
            lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
            lambda w: w.add_rope_scaling_factor(1.0),
        ],
    )
    gguf_model("i2_s.gguf", "bitnet-b1.58", "I2_S", "Q8_0", q, tok, vocab, layers, final, None, [])
    # The same weights as a gated SiLU model (the 1bitLLM family's FFN, what QVAC's published files hold):
    # its twin says `hidden_act: silu`, its GGUF form `bitnet.hidden_activation = silu` (the vocabulary is
    # gpt2, which alone would pick ReLU²).
    write_twin(tok, vocab, layers, embd, final, name="twin_silu", act="silu")
    gguf_model(
        "tq2_0_silu.gguf", "bitnet", "TQ2_0", "Q4_K", q, tok, vocab, layers, final, "llama-bpe",
        [lambda w: w.add_string("bitnet.hidden_activation", "silu")],
    )
    # The k-quant and Q8_0 embeddings dequantize (by the gguf package) to exactly the twin's values.
    assert np.array_equal(gguf.quants.dequantize(embd_q4_k(q), Q.Q4_K), embd)
    assert np.array_equal(gguf.quants.dequantize(embd_q8_0(q), Q.Q8_0), embd)
    for p in sorted(MODEL_OUT.rglob("*")):
        if p.is_file():
            size = p.stat().st_size
            assert size < 300_000, p
            print(f"{p.relative_to(MODEL_OUT)}: {size} bytes")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    versions = {"gguf_version": importlib.metadata.version("gguf"), "numpy_version": np.__version__}
    for name, make in [
        ("tq2_0", lambda n: tq_file(Q.TQ2_0, n, Q.Q4_K)),
        ("tq1_0", lambda n: tq_file(Q.TQ1_0, n, Q.Q8_0)),
        ("i2_s", i2s_file),
    ]:
        expected = {**versions, **make(name + ".gguf")}
        (OUT / (name + ".json")).write_text(json.dumps(expected, indent=1) + "\n")
    for p in sorted(OUT.iterdir()):
        size = p.stat().st_size
        assert size < 200_000, p
        print(f"{p.name}: {size} bytes")
    model_fixtures()


if __name__ == "__main__":
    main()
