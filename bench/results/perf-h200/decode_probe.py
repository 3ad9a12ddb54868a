"""The probe behind ``decode_probe.json``: what one fast-engine decode step spends, by variant.

Run from the repository root on a GPU (writes ``$OUT/probe.json``; ``PROBE_TINY=1`` runs it on the CPU):

    OUT=. python bench/results/perf-h200/decode_probe.py

For batch sizes 512, 256, 64 and 1 it times the decode step eagerly and as a CUDA graph with three attention
variants: PyTorch's SDPA with the length mask (what ``serve.fastpath`` uses), the same attention written as
two matrix products, and no attention at all (the floor of everything else); and, apart, 24 FFN blocks and
48 key/value writes. It calls the engine's internals on purpose: it is a measurement, not an interface.
"""

from __future__ import annotations

import json
import os
import time

import serve.fastpath as fastpath
import torch
import torch.nn.functional as F
from serve.config import EngineConfig
from serve.model import load_model
from serve.tiny import write_tiny

SDPA = F.scaled_dot_product_attention


def matmul_attention(q, k, v, attn_mask=None, is_causal=False):
    if is_causal:
        return SDPA(q, k, v, is_causal=True)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def no_attention(q, k, v, attn_mask=None, is_causal=False):
    return SDPA(q, k, v, is_causal=True) if is_causal else q


def main() -> None:
    tiny = os.environ.get("PROBE_TINY") == "1"
    folder = write_tiny("/tmp/k2probe", real_size=not tiny)
    loaded = load_model(str(folder), dtype="auto" if tiny else "float16", load_format="auto" if tiny else "dummy")
    device, results = loaded.device, {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timeit(name, work, repeats=20):
        for _ in range(3):
            work()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        sync()
        results[name] = (time.perf_counter() - start) / repeats * 1e3
        print(f"{name}: {results[name]:.3f} ms", flush=True)

    sizes = [(4, 96)] if tiny else [(512, 128), (256, 128), (64, 128), (1, 96)]
    ffn = loaded.model.text_model.model.layers[0].ffn
    with torch.inference_mode():
        for batch, span in sizes:
            engine = fastpath.FastEngine(loaded, EngineConfig(max_batch_size=batch, max_seq_len=128))
            engine.input_tokens.random_(0, loaded.model.config.text_config.vocab_size - 1)
            engine.input_index.fill_(90)
            for label, attention in [("sdpa", SDPA), ("manual", matmul_attention), ("no_attention", no_attention)]:
                fastpath.F.scaled_dot_product_attention = attention
                timeit(f"B{batch} eager {label}", lambda e=engine, b=batch, s=span: e._decode_forward(b, s), 10)
                if device.type == "cuda":
                    engine.graphs.clear()
                    engine.graph_pool = None
                    timeit(f"B{batch} graph {label}", lambda e=engine, b=batch, s=span: e._run_step(b, s))
            fastpath.F.scaled_dot_product_attention = SDPA
            hidden = torch.randn(batch, loaded.model.config.text_config.embed_dim, device=device, dtype=loaded.dtype)
            timeit(f"B{batch} 24x ffn only", lambda h=hidden: [ffn(h) for _ in range(24)])
            kv = torch.randn(batch, engine.heads, engine.head_dim, device=device, dtype=loaded.dtype)
            index = (engine.slot_index[:batch], slice(None), engine.input_index[:batch])
            timeit(
                f"B{batch} 48x kv write",
                lambda e=engine, i=index, k=kv: [e.keys[0].__setitem__(i, k) for _ in range(48)],
            )
            del engine
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
