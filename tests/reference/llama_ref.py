#!/usr/bin/env python3
"""Independent reference forward for llama-family GGUF models: float64 NumPy over the dequantized weights.

Written separately from the Rust engine (gguf-py does the parsing and dequantization) so the engine's
logits can be checked against it. Usage: llama_ref.py MODEL.gguf '[[ids...], [ids...]]'
Prints {"logits": [[...last-position logits of each prompt...]]} as JSON.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def main():
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    r = GGUFReader(path)
    arch = field(r, "general.architecture")
    if arch not in ("llama", "mistral"):
        sys.exit(f"reference supports llama/mistral, not {arch}")
    n_layers = field(r, f"{arch}.block_count")
    n_head = field(r, f"{arch}.attention.head_count")
    n_kv = field(r, f"{arch}.attention.head_count_kv", n_head)
    base = field(r, f"{arch}.rope.freq_base", 10000.0)
    eps = field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    tensors = {t.name: t for t in r.tensors}

    def W(name):
        t = tensors[name]
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        ne = [int(x) for x in t.shape]  # innermost first
        return a.reshape(list(reversed(ne))) if len(ne) > 1 else a.reshape(ne[0])

    emb = W("token_embd.weight")
    d = emb.shape[1]
    hd = d // n_head
    group = n_head // n_kv
    out_w = W("output.weight") if "output.weight" in tensors else emb
    layers = []
    for i in range(n_layers):
        g = lambda s: W(f"blk.{i}.{s}")
        layers.append({k: g(k + ".weight") for k in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]})
    out_norm = W("output_norm.weight")

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(x):  # x: (T, heads, hd); llama GGUF pairs adjacent dimensions
        T = x.shape[0]
        inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = x0 * c - x1 * s
        y[..., 1::2] = x0 * s + x1 * c
        return y

    results = []
    for ids in prompts:
        x = emb[np.array(ids)]
        T = x.shape[0]
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        for L in layers:
            h = rms(x, L["attn_norm"])
            q = rope((h @ L["attn_q"].T).reshape(T, n_head, hd))
            k = rope((h @ L["attn_k"].T).reshape(T, n_kv, hd))
            v = (h @ L["attn_v"].T).reshape(T, n_kv, hd)
            att = np.empty((T, n_head, hd))
            for head in range(n_head):
                kv = head // group
                sc = q[:, head, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
                sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
                sc /= sc.sum(axis=-1, keepdims=True)
                att[:, head, :] = sc @ v[:, kv, :]
            x = x + att.reshape(T, d) @ L["attn_output"].T
            h = rms(x, L["ffn_norm"])
            gate = h @ L["ffn_gate"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ L["ffn_up"].T)) @ L["ffn_down"].T
        logits = out_w @ rms(x[-1], out_norm)
        results.append([float(v) for v in logits])
    json.dump({"logits": results}, sys.stdout)


if __name__ == "__main__":
    main()
