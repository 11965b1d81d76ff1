#!/usr/bin/env python3
"""Convert a GGUF checkpoint (SmolLM2-135M-Instruct) to a plain Hugging Face folder vLLM can serve.

Usage: vllm-convert-model.py MODEL.gguf OUT_DIR

Run with the vLLM venv's python (it needs torch, transformers, gguf, accelerate) and
HF_HUB_OFFLINE=1: nothing is fetched from a hub. Called by scripts/setup-vllm.sh.

Recipe (shared/vllm-reference/README.md): load the GGUF dequantized in bfloat16, drop
config.quantization_config, copy the weights into a fresh LlamaForCausalLM(config), and
save_pretrained it and the tokenizer.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaForCausalLM,
)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    gguf_path = os.path.abspath(sys.argv[1])
    out_dir = os.path.abspath(sys.argv[2])
    if not os.path.isfile(gguf_path):
        print(f"vllm-convert-model: no such file: {gguf_path}", file=sys.stderr)
        return 1
    src_dir = os.path.dirname(gguf_path)

    quant = GgufConfig(gguf_file=gguf_path, dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_path, quantization_config=quant, dtype=torch.bfloat16
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16

    # A fresh model without any quantizer hooks, holding the dequantized weights.
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may show up as a missing lm_head; anything else is a real problem.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        print(f"vllm-convert-model: weight mismatch: missing={missing} unexpected={unexpected}", file=sys.stderr)
        return 1
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_path)

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Quick sanity check: the saved folder loads as a plain (unquantized) model and the
    # chat template survived (vLLM's /v1/chat/completions needs it).
    if getattr(tokenizer, "chat_template", None) is None:
        print("vllm-convert-model: warning: tokenizer has no chat_template", file=sys.stderr)
    n = sum(p.numel() for p in model.parameters())
    print(f"vllm-convert-model: wrote {out_dir} ({n / 1e6:.1f}M parameters, bfloat16)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
