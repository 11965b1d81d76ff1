#!/usr/bin/env python3
"""Records tests/fixtures/tokenizer/gemma3.json: llama.cpp's token ids for tricky strings
(hand-picked, then seeded random mixes of troublesome pieces) on Gemma 3 270M's
SentencePiece vocabulary, and llama.cpp's rendering of Gemma chats.

References, all from llama.cpp built by scripts/setup-llama-cpp.sh (llama-cpp-python
0.3.36's vendored sources):
- `llama-tokenize -m MODEL -f TEXT --no-escape --ids --no-bos --log-disable` for each
  text (special tokens parsed, as llama-tokenize does by default); a few texts also with
  the BOS the model adds (`with_bos`);
- `llama-server -m MODEL --no-jinja --chat-template gemma`, POST /apply-template: llama.cpp's
  own Gemma formatter (the file, a base model, carries no template), and /tokenize of that
  prompt with the BOS.

Usage (stdlib only; the model comes from the cache, `--model gemma3-270m` puts it there):
    python3 scripts/record-tokenizer-fixture.py [MODEL.gguf] [OUT.json]
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("SWITCHYARD_CACHE", os.path.expanduser("~/.cache/switchyard"))
DEFAULT_MODEL = os.path.join(CACHE, "models", "gemma-3-270m-q4_k_m.gguf")
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "gemma3.json")

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "tabs\tand\nnewlines\n\n\nthen   spaces\n \n",
    "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\nmany newlines",
    "   \n  \t ",
    "\r\n windows\r\nline ends\r",
    "digits 1234567890 and 3.14159, 2024-11-26",
    "a long number 98765432109876543210123456789 and 1,000,000.00",
    "mixed123abc456def",
    "unicode: héllo wörld, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "CJK 我爱自然语言处理。中文分词测试,漢字と仮名",
    "emoji 🚀🔥👍🏽 and 👨‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵",
    "combining marks: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ",
    "rare scripts: ᚠᛇᚻ ꦱꦮ 𓀀𓁐 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\u0000\u0001\u001f\u007f control bytes",
    "a\u00a0b\u2003c\u200bd (no-break, em and zero-width spaces)",
    "special inside text: <start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>starts with bos and ends with eos<eos>",
    "fake specials: <start_of_turn <end_of_turn> > <<bos>> </s> <s> [multimodal]",
    "html: <table><tr><td>x</td></tr></table> <div class=\"a\">b</div>",
    "contractions: it's they're we've I'm you'll he'd IT'S",
    'code: fn main() { println!("{}", x + 1); } // done',
    "def f(x):\n    return x ** 2\n\n\nprint(f(3))\n",
    "!!!???... ---- ____ ==== ~~~ ```",
    "ÀÉÎÕÜ àéîõü ß ÿ ĳ ŉ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "URL https://example.com/path?q=1&r=two#frag and email a.b@c.io",
    "▁ a literal U+2581 ▁▁ and <0x41> as text",
    "",
]

# Random mixes of the troublesome pieces (seeded: the same texts every run).
PIECES = [
    " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "a", "the", " the", "Hello", "world", "123",
    "4567890", "3.14", "日本語", "中文", "한국어", "🚀", "👍🏽", "é", "e\u0301", "ß",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "</s>", "<s>", "<table>", "</div>",
    "[multimodal]", "<unused5>", "<0x41>", "▁", "\u0000", "\u007f", "\u200b", "ĳ", "Ωμέγα",
    "привет", ",", ".", "!?", "--", "```", "def ", "return", "x**2", "http://a.b/c?d=e",
    "\U0001F9EC", "\U00010400", "ǅ", "ﬁ",
]
RANDOM_N = 60


def random_texts():
    import random

    rng = random.Random(17)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))) for _ in range(RANDOM_N)]


# Texts also recorded with the BOS the model adds (encode_prompt).
WITH_BOS = ["Hello world", "<bos>already has one", ""]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And 3+3?  "},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ],
]


def tool(bin_dir, name):
    path = os.path.join(bin_dir, name)
    if not os.access(path, os.X_OK):
        sys.exit(f"no {path}; run scripts/setup-llama-cpp.sh")
    return path


def tokenize(tok_bin, model, text, bos):
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(text.encode("utf-8"))
        name = f.name
    try:
        cmd = [tok_bin, "-m", model, "-f", name, "--no-escape", "--ids", "--log-disable"]
        if not bos:
            cmd.append("--no-bos")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(name)
    line = [l for l in out.splitlines() if l.startswith("[")][-1]
    return json.loads(line)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def chats(server_bin, model):
    port = free_port()
    cmd = [server_bin, "-m", model, "-nr", "--no-jinja", "--chat-template", "gemma", "--host", "127.0.0.1",
           "--port", str(port), "-t", "1", "-c", "512", "-np", "1", "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if proc.poll() is not None:
                sys.exit(f"llama-server exited: {' '.join(cmd)}")
            time.sleep(0.5)
        out = []
        for messages in CHATS:
            prompt = post(port, "/apply-template", {"messages": messages})["prompt"]
            ids = post(port, "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
            out.append({"messages": messages, "llama_cpp_prompt": prompt, "llama_cpp_ids_with_bos": ids})
        shown = ["llama-server"] + ["MODEL" if c == model else "PORT" if c == str(port) else c for c in cmd[1:]]
        return out, " ".join(shown)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
    out_path = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT
    if not os.path.isfile(model):
        sys.exit(f"no model at {model}: `cargo run -p switchyard-engine --example fetch_model -- gemma3-270m` fetches it")
    bin_dir = os.environ.get("LLAMA_CPP_BIN")
    if not bin_dir:
        setup = subprocess.run([os.path.join(ROOT, "scripts", "setup-llama-cpp.sh")], check=True,
                               capture_output=True, text=True).stdout
        bin_dir = [l.split("=", 1)[1] for l in setup.splitlines() if l.startswith("LLAMA_CPP_BIN=")][0]
    tok_bin = tool(bin_dir, "llama-tokenize")
    with open(model, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    version = open(os.path.join(bin_dir, "VERSION")).read().strip() if os.path.exists(os.path.join(bin_dir, "VERSION")) else "?"
    texts = [{"text": t, "llama_cpp": tokenize(tok_bin, model, t, False)} for t in TEXTS + random_texts()]
    with_bos = [{"text": t, "llama_cpp": tokenize(tok_bin, model, t, True)} for t in WITH_BOS]
    chat_cases, server_cmd = chats(tool(bin_dir, "llama-server"), model)
    out = {
        "model": os.path.basename(model),
        "model_sha256": digest,
        "llama_cpp": f"llama.cpp from llama-cpp-python {version}'s sdist (scripts/setup-llama-cpp.sh)",
        "command": "python3 scripts/record-tokenizer-fixture.py  # per text: llama-tokenize -m MODEL -f TEXT "
                   "--no-escape --ids --log-disable --no-bos (with_bos: without --no-bos); chats: "
                   + server_cmd + ", POST /apply-template then /tokenize (add_special, parse_special)",
        "texts": texts,
        "with_bos": with_bos,
        "chats": chat_cases,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out_path}: {len(texts)} texts, {len(with_bos)} with BOS, {len(chat_cases)} chats")


if __name__ == "__main__":
    main()
