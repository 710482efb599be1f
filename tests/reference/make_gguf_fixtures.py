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


if __name__ == "__main__":
    main()
