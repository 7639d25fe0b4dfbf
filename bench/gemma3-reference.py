#!/usr/bin/env python3
"""Gemma 3's perplexity from a plain numpy forward pass (float32, the GGUF's weights dequantized),
measured as llama-perplexity measures it with -c 128: chunks of 128 tokens, the first set to BOS,
the second half of each scored. The unrounded model's figure, next to which moss's and llama.cpp's
are compared (tests/real_model.rs).

    python3 -m pip install gguf numpy
    target/release/moss tokenize --model GEMMA.gguf "$(cat tests/data/perplexity.txt)" > ids.json
    bench/gemma3-reference.py GEMMA.gguf ids.json [--kv16] [--gelu16] [--q16p16] [--actq] [--all]

Variants: --kv16 keys and values rounded to f16 (llama.cpp's KV cache), --gelu16 GELU's input and
output rounded to f16, --q16p16 queries and attention weights in f16, --actq every matrix
product's input rounded to 8 bits as llama.cpp's CPU backend does (q8_0 / q8_K); --all runs f32,
kv16, kv16 + gelu16; --llamacpu all of the roundings together. Not part of the test suite.
"""
import sys, json, time, math
import numpy as np
import gguf
from gguf.quants import dequantize

if len(sys.argv) < 3:
    sys.exit(__doc__)
MODEL = sys.argv[1]
IDS = sys.argv[2]
t0 = time.time()
r = gguf.GGUFReader(MODEL)
meta = {k: f.contents() for k, f in r.fields.items()
        if not (k.startswith('tokenizer.ggml.') and k.split('.')[-1] in ('tokens', 'scores', 'token_type', 'merges'))}
for k, v in meta.items():
    if k.startswith('gemma3.') or 'softcap' in k or 'bos' in k:
        print('meta', k, v)
softcap = [k for k in meta if 'softcap' in k]
print('softcap keys:', softcap)
pat_keys = [k for k in meta if 'pattern' in k]
print('pattern keys:', pat_keys)

H = int(meta['gemma3.embedding_length'])
L = int(meta['gemma3.block_count'])
NH = int(meta['gemma3.attention.head_count'])
NKV = int(meta['gemma3.attention.head_count_kv'])
HD = int(meta['gemma3.attention.key_length'])
EPS = float(meta['gemma3.attention.layer_norm_rms_epsilon'])
BASE_G = float(meta['gemma3.rope.freq_base'])
BASE_L = 10000.0
SW = int(meta['gemma3.attention.sliding_window'])
PAT = int(meta[pat_keys[0]]) if pat_keys else 6
BOS = int(meta['tokenizer.ggml.bos_token_id'])
final_cap = float(meta['gemma3.final_logit_softcapping']) if 'gemma3.final_logit_softcapping' in meta else None

W = {}
WT = {}
for t in r.tensors:
    WT[t.name] = t.tensor_type.name
    a = dequantize(t.data, t.tensor_type).astype(np.float32)
    shp = tuple(int(x) for x in reversed(t.shape))
    W[t.name] = a.reshape(shp)
print('dequantized %d tensors in %.1fs; token_embd %s' % (len(W), time.time() - t0, W['token_embd.weight'].shape))
E = W.get('output.weight', W['token_embd.weight'])
print('output tied:', 'output.weight' not in W)

def rmsnorm(x, w):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + EPS)).astype(np.float32) * w

def f16(a):
    return a.astype(np.float16).astype(np.float32)

def rope(x, pos, base):  # x: (T, nh, HD), NeoX halves
    half = HD // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / HD)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    c = np.cos(ang).astype(np.float32)[:, None, :]
    s = np.sin(ang).astype(np.float32)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x * x * x)))

def q8_0(x):  # ggml quantize_row_q8_0: blocks of 32, d=amax/127 stored as f16
    sh = x.shape; b = x.reshape(-1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    idv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.round(b * idv)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(sh).astype(np.float32)

def q8_K(x):  # ggml quantize_row_q8_K: blocks of 256, iscale=-127/signed_max, d=1/iscale (f32)
    sh = x.shape; b = x.reshape(-1, 256)
    idx = np.abs(b).argmax(-1)
    mx = np.take_along_axis(b, idx[:, None], -1)
    isc = np.where(mx != 0, np.float32(-127) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
    q = np.minimum(np.round(b * isc), 127)
    d = np.where(isc != 0, 1 / np.where(isc != 0, isc, 1), 0).astype(np.float32)
    return (q * d).reshape(sh).astype(np.float32)

ACTQ = False
def mm(h, name):  # h @ W^T, optionally simulating ggml CPU activation quantization (vec_dot_type)
    if ACTQ:
        tt = WT[name]
        if tt.endswith('_K'): h = q8_K(h)
        elif tt in ('Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0'): h = q8_0(h)
        elif tt == 'F16': h = f16(h)
    return h @ W[name].T

def forward(ids, kv16=False, gelu16=False, q16p16=False):
    T = len(ids)
    pos = np.arange(T)
    x = W['token_embd.weight'][ids] * np.float32(math.sqrt(H))
    i_ = pos[:, None]; j_ = pos[None, :]
    for l in range(L):
        p = 'blk.%d.' % l
        is_global = (l + 1) % PAT == 0
        h = rmsnorm(x, W[p + 'attn_norm.weight'])
        q = mm(h, p + 'attn_q.weight').reshape(T, NH, HD)
        k = mm(h, p + 'attn_k.weight').reshape(T, NKV, HD)
        v = mm(h, p + 'attn_v.weight').reshape(T, NKV, HD)
        q = rmsnorm(q, W[p + 'attn_q_norm.weight'])
        k = rmsnorm(k, W[p + 'attn_k_norm.weight'])
        base = BASE_G if is_global else BASE_L
        q = rope(q, pos, base); k = rope(k, pos, base)
        if kv16:
            k = f16(k); v = f16(v)
        mask = j_ <= i_
        if not is_global:
            mask = mask & (i_ - j_ < SW)
        out = np.empty((T, NH, HD), np.float32)
        g = NH // NKV
        for hh in range(NH):
            kh = hh // g
            qh = f16(q[:, hh, :]) if q16p16 else q[:, hh, :]
            s = (qh @ k[:, kh, :].T) * np.float32(1.0 / math.sqrt(HD))
            s = np.where(mask, s, -np.inf)
            s = s - s.max(-1, keepdims=True)
            e = np.exp(s); e /= e.sum(-1, keepdims=True)
            if q16p16: e = f16(e)
            out[:, hh, :] = e @ v[:, kh, :]
        o = mm(out.reshape(T, NH * HD), p + 'attn_output.weight')
        o = rmsnorm(o, W[p + 'post_attention_norm.weight'])
        x = x + o
        h = rmsnorm(x, W[p + 'ffn_norm.weight'])
        gt = mm(h, p + 'ffn_gate.weight')
        up = mm(h, p + 'ffn_up.weight')
        if gelu16:
            a = f16(gelu_tanh(f16(gt)))
        else:
            a = gelu_tanh(gt)
        m = mm(a * up, p + 'ffn_down.weight')
        m = rmsnorm(m, W[p + 'post_ffw_norm.weight'])
        x = x + m
    x = rmsnorm(x, W['output_norm.weight'])
    logits = mm(x, 'token_embd.weight') if 'output.weight' not in W else mm(x, 'output.weight')
    if final_cap is not None:
        logits = np.tanh(logits / final_cap) * final_cap
    return logits

def evaluate(kv16, gelu16, q16p16=False, n_ctx=128, n_chunks=4):
    ids = json.load(open(IDS))
    ids_all = [BOS] + ids
    nll_all = []
    res = []
    for c in range(n_chunks):
        chunk = list(ids_all[c * n_ctx:(c + 1) * n_ctx]); chunk[0] = BOS
        logits = forward(np.array(chunk), kv16, gelu16, q16p16).astype(np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            lg = logits[j]; mx = lg.max()
            lse = mx + np.log(np.exp(lg - mx).sum())
            nll_all.append(lse - lg[chunk[j + 1]])
        res.append(math.exp(np.mean(nll_all)))
        print('  chunk %d: running ppl %.4f' % (c, res[-1]), flush=True)
    return res

if __name__ == '__main__':
    args = sys.argv[3:]
    ACTQ = '--actq' in args
    if '--llamacpu' in args:  # kv16 + gelu16 + q/probs f16 in attention + activation quantization
        ACTQ = True
        variants = [(True, True, True)]
    elif '--all' in args:
        variants = [(False, False, False), (True, False, False), (True, True, False)]
    else:
        variants = [('--kv16' in args or '--gelu16' in args or '--q16p16' in args, '--gelu16' in args, '--q16p16' in args)]
    for kv16, gelu16, q16p16 in variants:
        t1 = time.time()
        print('variant kv16=%s gelu16=%s q16p16=%s actq=%s' % (kv16, gelu16, q16p16, ACTQ), flush=True)
        res = evaluate(kv16, gelu16, q16p16)
        print('RESULT kv16=%s gelu16=%s q16p16=%s actq=%s: %s  (%.1fs)' % (kv16, gelu16, q16p16, ACTQ, ', '.join('%.4f' % v for v in res), time.time() - t1), flush=True)
    print('total wall %.1fs' % (time.time() - t0))
