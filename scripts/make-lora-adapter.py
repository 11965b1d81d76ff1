#!/usr/bin/env python3
"""Write a seeded random LoRA adapter as a PEFT folder, for tests and benchmarks.

The folder is what `peft.PeftModel.save_pretrained` writes for a Llama-architecture model:
`adapter_config.json` (r, lora_alpha, target_modules, peft_type LORA, bias none) and
`adapter_model.safetensors` with, per layer and target,
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]), F32.

PEFT initializes B to zero (a fresh adapter changes nothing); here both A and B are
random, so the adapter changes the model's output. A's entries have standard deviation
1/sqrt(in) and B's scale/sqrt(r), so the update's outputs are about `scale` times the
input's RMS (times lora_alpha / r, which the server applies): large enough to change
greedy text, small enough to leave it readable at the default.

Only the standard library (struct, json, random): no numpy, no torch.

Defaults are SmolLM2-135M's shapes (the engine's default model): 30 layers, hidden 576,
9 heads, 3 KV heads, head_dim 64, ffn 1536.

    python3 scripts/make-lora-adapter.py --out /tmp/sql-lora --seed 1 --rank 8 \\
        --targets q_proj,v_proj --scale 0.1

`--gguf FILE` also writes the same adapter as llama.cpp's LoRA GGUF, what its
`convert_lora_to_gguf.py` writes from the folder (default `--outtype f32`), for
`llama-server --lora FILE`: GGUF v3, `general.architecture = llama`, `general.type =
adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per layer and target
`blk.{i}.{attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down}.weight.lora_a`
(numpy shape [r, in], so GGUF dims [in, r]) and `.lora_b` ([out, r], dims [r, out]), F32.
As the converter does for the base model's weights (LlamaModel.permute, applied to the
LoRA pair's B through LoraTorchTensor), the rows of q_proj's and k_proj's B are permuted
from Hugging Face's rotary order to the GGUF's: within each head of d rows (k: each KV
head), row `two*(d/2) + i` moves to `2*i + two`.
"""

import argparse
import json
import os
import random
import struct
import sys

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def shapes(args):
    """(in, out) of each target module."""
    q = args.heads * args.head_dim
    kv = args.kv_heads * args.head_dim
    h, f = args.hidden, args.ffn
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, f),
        "up_proj": (h, f),
        "down_proj": (f, h),
    }


def write_safetensors(path, tensors):
    """tensors: list of (name, shape, flat list of floats), written as F32."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, values in tensors:
        n = len(values) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, values in tensors:
            f.write(struct.pack("<%df" % len(values), *values))
    os.replace(tmp, path)


def permute_rows(b, heads, r):
    """llama.cpp's LlamaModel.permute of a [out, r] matrix (flat, row-major): per head,
    reshape(2, d/2) -> swapaxes -> (d/2, 2), so row two*(d/2) + i goes to 2*i + two."""
    rows = len(b) // r
    d = rows // heads
    half = d // 2
    out = [0.0] * len(b)
    for h in range(heads):
        for two in range(2):
            for i in range(half):
                src = (h * d + two * half + i) * r
                dst = (h * d + 2 * i + two) * r
                out[dst:dst + r] = b[src:src + r]
    return out


GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def write_gguf(path, alpha, name, tensors):
    """tensors: list of (name, numpy-order shape, flat list of floats), written as F32 in
    a GGUF v3 file (32-byte alignment, dims reversed as ggml's ne)."""

    def string(v):
        raw = v.encode()
        return struct.pack("<Q", len(raw)) + raw

    kv = [
        ("general.architecture", 8, string("llama")),
        ("general.type", 8, string("adapter")),
        ("general.name", 8, string(name)),
        ("general.quantization_version", 4, struct.pack("<I", 2)),
        ("adapter.type", 8, string("lora")),
        ("adapter.lora.alpha", 6, struct.pack("<f", alpha)),
    ]
    align = 32
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, ty, val in kv:
        head += string(key) + struct.pack("<I", ty) + val
    offset = 0
    for tname, shape, values in tensors:
        head += string(tname) + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        head += struct.pack("<IQ", 0, offset)  # GGML_TYPE_F32
        offset += -(-len(values) * 4 // align) * align
    head += b"\0" * (-len(head) % align)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        for _, _, values in tensors:
            raw = struct.pack("<%df" % len(values), *values)
            f.write(raw + b"\0" * (-len(raw) % align))
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank, scaling 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated modules, or 'all'")
    p.add_argument("--scale", type=float, default=0.1, help="size of the update relative to its input")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--gguf", help="also write the adapter as llama.cpp's LoRA GGUF here")
    args = p.parse_args(argv)

    targets = list(ATTN + MLP) if args.targets == "all" else [t for t in args.targets.split(",") if t]
    bad = [t for t in targets if t not in ATTN + MLP]
    if bad or not targets:
        p.error("unknown target module(s) %s; choose from %s" % (bad, ", ".join(ATTN + MLP)))
    if args.rank < 1:
        p.error("--rank must be at least 1")
    alpha = float(args.rank) if args.alpha is None else args.alpha

    rng = random.Random(args.seed)
    dims = shapes(args)
    r = args.rank
    tensors = []
    gguf_tensors = []
    for layer in range(args.layers):
        for t in targets:
            inp, out = dims[t]
            group = "self_attn" if t in ATTN else "mlp"
            prefix = "base_model.model.model.layers.%d.%s.%s" % (layer, group, t)
            sa = 1.0 / inp ** 0.5
            sb = args.scale / r ** 0.5
            a = [rng.gauss(0.0, sa) for _ in range(r * inp)]
            b = [rng.gauss(0.0, sb) for _ in range(out * r)]
            tensors.append((prefix + ".lora_A.weight", (r, inp), a))
            tensors.append((prefix + ".lora_B.weight", (out, r), b))
            if args.gguf:
                if t == "q_proj":
                    b = permute_rows(b, args.heads, r)
                elif t == "k_proj":
                    b = permute_rows(b, args.kv_heads, r)
                base = "blk.%d.%s.weight" % (layer, GGUF_NAMES[t])
                gguf_tensors.append((base + ".lora_a", (r, inp), a))
                gguf_tensors.append((base + ".lora_b", (out, r), b))

    os.makedirs(args.out, exist_ok=True)
    config = {
        "base_model_name_or_path": args.base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(args.out, "adapter_model.safetensors"), tensors)
    if args.gguf:
        write_gguf(args.gguf, alpha, "random-lora-seed%d" % args.seed, gguf_tensors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
