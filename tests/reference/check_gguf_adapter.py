#!/usr/bin/env python3
"""Check a LoRA GGUF written by `bitnode adapter export` with the `gguf` package (llama.cpp's gguf-py).

    python tests/reference/check_gguf_adapter.py ADAPTER.gguf PEFT_DIR [ARCH]

needs only `pip install gguf numpy`; the PEFT directory's adapter_model.safetensors is parsed by hand.

Checks what llama.cpp's `llama_adapter_lora_init` reads (gguf.md section 6):
  - general.type = "adapter", adapter.type = "lora", adapter.lora.alpha an f32 equal to the PEFT config's
    lora_alpha, general.architecture equal to ARCH (default "bitnet");
  - one GGUF tensor pair blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a/_b
    per PEFT pair, and no other tensor;
  - PEFT orientation: lora_a ne = [in, r] (numpy shape [r, in], PEFT's lora_A), lora_b ne = [r, out]
    (numpy [out, r], PEFT's lora_B), llama.cpp's checks a.ne[1] == b.ne[0] included;
  - F32 data equal, bit for bit, to the safetensors values (converted to f32 from F32, F16 or BF16).
Prints one line per failure and exits 1 on any; prints a summary and exits 0 otherwise.
"""
import importlib.metadata
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

PROJ = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def read_safetensors(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        buf = data[b:e]
        if t["dtype"] == "F32":
            a = np.frombuffer(buf, dtype="<f4")
        elif t["dtype"] == "F16":
            a = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        elif t["dtype"] == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{name}: dtype {t['dtype']} is not a LoRA dtype")
        out[name] = a.reshape(t["shape"])
    return out


def field_value(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None, None
    t = f.types[0]
    if t == GGUFValueType.STRING:
        return t, bytes(f.parts[f.data[0]]).decode()
    return t, f.parts[f.data[0]][0]


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__)
        return 2
    gpath, peft = Path(sys.argv[1]), Path(sys.argv[2])
    arch = sys.argv[3] if len(sys.argv) == 4 else "bitnet"
    cfg = json.loads((peft / "adapter_config.json").read_text())
    st = read_safetensors(peft / "adapter_model.safetensors")
    reader = GGUFReader(gpath)
    bad = []

    want_kv = {
        "general.architecture": (GGUFValueType.STRING, arch),
        "general.type": (GGUFValueType.STRING, "adapter"),
        "adapter.type": (GGUFValueType.STRING, "lora"),
        "adapter.lora.alpha": (GGUFValueType.FLOAT32, np.float32(cfg["lora_alpha"])),
    }
    for key, (ty, val) in want_kv.items():
        got_ty, got = field_value(reader, key)
        if got_ty != ty or got != val:
            bad.append(f"{key}: {got!r} ({got_ty}), expected {val!r} ({ty})")

    tensors = {t.name: t for t in reader.tensors}
    seen = set()
    r = cfg["r"]
    for name, a in sorted(st.items()):
        m = PEFT_KEY.match(name)
        if not m:
            bad.append(f"{name}: not a PEFT LoRA key")
            continue
        layer, proj, ab = m.groups()
        gname = f"blk.{layer}.{PROJ[proj]}.weight.lora_{ab.lower()}"
        seen.add(gname)
        t = tensors.get(gname)
        if t is None:
            bad.append(f"{gname} missing (for {name})")
            continue
        if t.tensor_type != GGMLQuantizationType.F32:
            bad.append(f"{gname}: type {t.tensor_type.name}, expected F32")
        ne = [int(x) for x in t.shape]
        want_ne = list(reversed(a.shape))  # GGUF ne is the numpy shape reversed: no transpose.
        if ne != want_ne:
            bad.append(f"{gname}: ne {ne}, expected {want_ne}")
        if (ab == "A" and ne[1] != r) or (ab == "B" and ne[0] != r):
            bad.append(f"{gname}: rank axis is not r = {r} (ne {ne})")
        data = np.asarray(t.data).reshape(a.shape)
        if data.dtype != np.float32 or not np.array_equal(data.view(np.uint32), a.astype(np.float32).view(np.uint32)):
            bad.append(f"{gname}: values differ from {name} (max |diff| {np.abs(data - a).max()})")
    for gname in sorted(set(tensors) - seen):
        bad.append(f"{gname}: extra tensor with no PEFT counterpart")
    # llama.cpp pairs lora_a with lora_b: a.ne[1] == b.ne[0].
    for gname, t in tensors.items():
        if gname.endswith(".lora_a"):
            b = tensors.get(gname[:-1] + "b")
            if b is None or int(t.shape[1]) != int(b.shape[0]):
                bad.append(f"{gname}: no lora_b of rank {int(t.shape[1])}")

    for line in bad:
        print("FAIL", line)
    if bad:
        return 1
    print(
        f"ok: {gpath.name}: {len(tensors)} tensors, arch {arch}, r {r}, alpha {cfg['lora_alpha']}, "
        f"keys, names, ne (PEFT orientation) and F32 values equal to {peft.name}/adapter_model.safetensors "
        f"(gguf {importlib.metadata.version('gguf')}, numpy {np.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
