"""Building blocks shared by architectures: attention over a KV window, the pre-norm decoder block (with
optional q/k/v biases, per-head q/k norms, llama3 RoPE factors), gated FFNs, and their tensor lists, so an
architecture file is its tensor list and its wiring."""
from __future__ import annotations

import math

from ..errors import GGUFError
from ..gguf.config import INT_ARRAY, UINT32
from ..graph.ir import GraphBuilder, Tensor
from ..memory.kv_cache import KVAttention, KVCache, cells_for
from ..memory.recurrent import RecurrentState


def attention(g: GraphBuilder, attn: KVAttention, il: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
              flash: bool, softcap: float | None = None) -> Tensor:
    """Store this ubatch's K/V for layer il, attend over the KV window; q [n, H, d], k/v [n, Hkv, d].
    Returns [n, H * dv]. flash=True: one fused op over a row-major V cache; flash=False: ggml's non-flash
    path (KQ matmul, masked softmax, KQV matmul against a transposed V cache). softcap: scores become
    softcap * tanh(scores / softcap) before the mask (Gemma 2); the non-flash path only."""
    n, n_head, d = q.shape
    n_head_kv = k.shape[1]
    group = n_head // n_head_kv
    k_win, v_win = attn.store(il, k, v)
    if flash:
        if softcap:
            raise ValueError("attention: soft-capping needs the non-flash path (a transposed V cache)")
        out = g.flash_attn(q, k_win, v_win, attn.mask, scale, attn.pages.tensor)
        return g.reshape(out, (n, n_head * out.shape[2]))
    n_kv = attn.n_kv
    dv = v_win.shape[1]
    # Heads h = kvh * group + j share kv head kvh: group the query heads so one batched matmul per kv head.
    qh = g.reshape(g.cont(g.permute(q, (1, 0, 2))), (n_head_kv, group * n, d))
    kq = g.matmul(qh, g.permute(k_win, (1, 0, 2)))                      # [Hkv, group*n, n_kv]
    if softcap:
        kq, scale = g.softcap(g.scale(kq, scale), softcap), 1.0
    kq = g.softmax(g.reshape(kq, (n_head_kv, group, n, n_kv)), attn.mask, scale)
    kqv = g.matmul(g.reshape(kq, (n_head_kv, group * n, n_kv)), v_win)  # v_win [Hkv, dv, n_kv]
    out = g.cont(g.permute(g.reshape(kqv, (n_head, n, dv)), (1, 0, 2)))
    return g.reshape(out, (n, n_head * dv))


def split_heads(g: GraphBuilder, x: Tensor, n_head: int) -> Tensor:
    n, width = x.shape
    return g.reshape(x, (n, n_head, width // n_head))


# ---- the transformer decoder block most architectures share --------------------------------------------------
def attention_tensors(c, i: int, bias: bool = False, qk_norm: bool = False,
                      gated: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensors of layer i's attention: norm, q/k/v/output projections, optional q/k/v biases (Qwen2) and
    per-head q/k RMSNorm weights (Qwen3, Gemma 3); gated: attn_q holds each head's query and output gate."""
    q, kv, v = c.n_head * c.head_dim_k, c.n_head_kv * c.head_dim_k, c.n_head_kv * c.head_dim_v
    shapes = {f"blk.{i}.attn_norm.weight": (c.n_embd,), f"blk.{i}.attn_q.weight": (2 * q if gated else q, c.n_embd),
              f"blk.{i}.attn_k.weight": (kv, c.n_embd), f"blk.{i}.attn_v.weight": (v, c.n_embd),
              f"blk.{i}.attn_output.weight": (c.n_embd, c.n_head * c.head_dim_v)}
    if bias:
        shapes |= {f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (kv,), f"blk.{i}.attn_v.bias": (v,)}
    if qk_norm:
        shapes |= {f"blk.{i}.attn_q_norm.weight": (c.head_dim_k,), f"blk.{i}.attn_k_norm.weight": (c.head_dim_k,)}
    return shapes


def ffn_tensors(c, i: int, norm: str = "ffn_norm.weight") -> dict[str, tuple[int, ...]]:
    """Tensors of layer i's gated FFN: norm (blk.i.<norm>), gate, up, down."""
    return {f"blk.{i}.{norm}": (c.n_embd,), f"blk.{i}.ffn_gate.weight": (c.n_ff, c.n_embd),
            f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd), f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff)}


def output_tensors(c) -> dict[str, tuple[int, ...]]:
    return {"token_embd.weight": (c.n_vocab, c.n_embd), "output_norm.weight": (c.n_embd,),
            "output.weight": (c.n_vocab, c.n_embd)}


def decoder_tensors(c, ffn=ffn_tensors, **attention) -> dict[str, tuple[int, ...]]:
    """Every tensor of a plain decoder stack: embedding and output, and per layer attention (with the
    `attention_tensors` options given) and `ffn(c, i)` (default the gated FFN)."""
    shapes = output_tensors(c)
    for i in range(c.n_layer):
        shapes |= attention_tensors(c, i, **attention) | ffn(c, i)
    return shapes


def hybrid_tensors(c, base: dict, recurrent, ffn=ffn_tensors, **attention) -> dict[str, tuple[int, ...]]:
    """Every tensor of a hybrid stack: base (embedding, output), and per layer either attention (the layers
    in extra["attention_layers"]) or the norm and recurrent block `recurrent(i)`, then `ffn(c, i)`."""
    shapes = dict(base)
    for i in range(c.n_layer):
        if i in c.extra["attention_layers"]:
            shapes |= attention_tensors(c, i, **attention)
        else:
            shapes |= {f"blk.{i}.attn_norm.weight": (c.n_embd,)} | recurrent(i)
        shapes |= ffn(c, i)
    return shapes


def rms_norm(g: GraphBuilder, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return g.mul(g.rms_norm(x, eps), weight)


def self_attention(g: GraphBuilder, w, io, c, i: int, h: Tensor, *, neox: bool, bias: bool = False,
                   qk_norm: bool = False, freq_factors=None, memory: str = "kv", rope_base: float | None = None,
                   scale: float | None = None, softcap: float | None = None, rope: bool = True,
                   gated: bool = False) -> Tensor:
    """Layer i's attention of the normed input h [n, n_embd] over a KV memory ("kv", or a sliding-window
    one): projections (+ biases), per-head q/k norm, RoPE (rope_base: the layer's own base), attention
    (scale: default 1/sqrt(head_dim); softcap: Gemma 2's score capping, on the non-flash path); returns
    [n, n_head * head_dim_v], before the output projection. gated (Qwen3-Next): each head's q projection
    is followed by a gate, and the head's output is multiplied by sigmoid(gate)."""
    def proj(name: str, n_head: int) -> Tensor:
        y = g.matmul(h, w(f"blk.{i}.attn_{name}.weight"))
        if bias:
            y = g.add(y, w(f"blk.{i}.attn_{name}.bias"))
        return split_heads(g, y, n_head)
    q, k, v = proj("q", c.n_head), proj("k", c.n_head_kv), proj("v", c.n_head_kv)
    if gated:
        d = c.head_dim_k
        # contiguous: the norm's kernel must not depend on the token count (a one-token slice is contiguous)
        q, gate = g.cont(g.slice_rows(q, 0, d, axis=2)), g.sigmoid(g.slice_rows(q, d, d, axis=2))
    if qk_norm:
        q = rms_norm(g, q, w(f"blk.{i}.attn_q_norm.weight"), c.rms_eps)
        k = rms_norm(g, k, w(f"blk.{i}.attn_k_norm.weight"), c.rms_eps)
    if rope:    # rope=False: no positional encoding in this layer (NoPE: Jamba, Granite hybrid)
        base = c.rope_base if rope_base is None else rope_base
        q, k = (g.rope(t, io.pos, c.rope_dims, base, neox=neox, freq_scale=c.rope_freq_scale,
                       freq_factors=freq_factors) for t in (q, k))
    out = attention(g, io.memory(memory), i, q, k, v, scale or 1.0 / math.sqrt(c.head_dim_k),
                    io.key.flash_attn and not softcap, softcap)
    return g.mul(out, g.reshape(gate, out.shape)) if gated else out


def gated_ffn(g: GraphBuilder, w, i: int, h: Tensor, act: str = "swiglu", suffix: str = "") -> Tensor:
    """down(act(gate(h)) * up(h)), act swiglu (SiLU) or geglu (GELU-tanh); suffix: of the tensors' names
    (ffn_gate{suffix}.weight...: "_shexp" for a shared expert)."""
    ff = g.matmul_glu(h, w(f"blk.{i}.ffn_gate{suffix}.weight"), w(f"blk.{i}.ffn_up{suffix}.weight"), act)
    return g.matmul(ff, w(f"blk.{i}.ffn_down{suffix}.weight"))


def decoder(g: GraphBuilder, w, io, c, mixer, ffn=None, project: bool = True,
            output_norm: str = "output_norm.weight", ffn_norm: str = "ffn_norm.weight") -> None:
    """The pre-norm decoder stack: x += mixer(i, norm(x)); x += ffn(i, norm(x)); then the output norm and
    projection as 'logits'. mixer(i, h) is layer i's token mixer: the architecture's attention
    (self_attention with its options), or for hybrid models a recurrent block on the other layers; with
    project its result goes through blk.i.attn_output. ffn(i, h): default the gated FFN. After the last
    mixer only the output rows go on. ffn_norm: the name of the layers' FFN norm (blk.i.<ffn_norm>)."""
    x = g.get_rows(w("token_embd.weight"), io.tokens)
    for i in range(c.n_layer):
        y = mixer(i, rms_norm(g, x, w(f"blk.{i}.attn_norm.weight"), c.rms_eps))
        if i == c.n_layer - 1:
            y, x = io.select_outputs(y), io.select_outputs(x)
        x = g.add(x, g.matmul(y, w(f"blk.{i}.attn_output.weight")) if project else y)
        h = rms_norm(g, x, w(f"blk.{i}.{ffn_norm}"), c.rms_eps)
        x = g.add(x, ffn(i, h) if ffn is not None else gated_ffn(g, w, i, h))
    g.output("logits", g.matmul(rms_norm(g, x, w(output_norm), c.rms_eps), w("output.weight")))


def attention_layers(m) -> tuple[int, ...]:
    """A hybrid file's layers with attention: those whose attention.head_count_kv entry (per layer) is not 0."""
    kv = m.int_list("attention.head_count_kv") or [m.int("attention.head_count_kv", 1)] * m.int("block_count")
    return tuple(i for i, n in enumerate(kv) if n)


def attention_layers_of_flags(m, default_interval: int = 4) -> tuple[int, ...]:
    """A hybrid file's layers with attention, as llama.cpp reads Qwen3-Next's: those that
    attention.recurrent_layers (per-layer flags) marks false, or without it every full_attention_interval-th
    layer (il % interval == interval - 1)."""
    n_layer = m.int("block_count", required=True)
    flags = m.any_of("attention.recurrent_layers", None, ("array of bool",))
    if flags is None:
        interval = m.int("full_attention_interval", default_interval)
        return tuple(i for i in range(n_layer) if (i + 1) % interval == 0)
    if len(flags) != n_layer or not all(isinstance(f, bool) for f in flags):
        raise GGUFError(f"{m.source}: attention.recurrent_layers {flags!r} does not hold one flag per layer "
                        f"({n_layer}); the file is inconsistent.")
    return tuple(i for i, recurrent in enumerate(flags) if not recurrent)


def text_imrope_factors(m, n_rot: int, head_dim: int) -> tuple[float, ...] | None:
    """Qwen3.5's interleaved MRoPE (rope.dimension_sections [t, h, w, e], in rotary pairs) for text, as
    llama.cpp runs it: a token's t, h and w positions are its position and its e position 0, and pair i
    (its sector i % sum(sections)) takes h where sector % 3 == 1 and sector < 3 h, w where sector % 3 == 2 and
    sector < 3 w, t where sector % 3 == 0 and sector < 3 t, else e. So a pair of t, h or w rotates as NEOX rope
    does and a pair of e not at all: frequency factors (divisors) of inf for those, None where there are none
    (every real file: the sections cover the pairs)."""
    sections = m.int_list("rope.dimension_sections")
    if sections is None or len(sections) != 4 or min(sections) < 0 or not 0 < sum(sections[:3]) <= head_dim \
            or sum(sections) > head_dim:
        raise GGUFError(f"{m.source}: rope.dimension_sections {sections} is not four pair counts [t, h, w, e] "
                        f"with t + h + w > 0 and at most the head size {head_dim}; the file is inconsistent.")
    t, h, w = sections[:3]
    sectors = [i % sum(sections) for i in range(n_rot // 2)]
    rotated = [s % 3 == 1 and s < 3 * h or s % 3 == 2 and s < 3 * w or s % 3 == 0 and s < 3 * t for s in sectors]
    return None if all(rotated) else tuple(1.0 if r else math.inf for r in rotated)


def hybrid_memories(c, state, n_ctx: int, alloc, flash_attn: bool, n_seq_max: int, *state_args) -> dict:
    """A hybrid model's memories: `state` (mamba_state, shortconv_state, ...) for the layers without
    attention, a KV cache for extra["attention_layers"]."""
    attn = c.extra["attention_layers"]
    mems = {"rs": state(c, [i for i in range(c.n_layer) if i not in attn], alloc, n_seq_max, *state_args)}
    return mems | (kv_memory(c, n_ctx, alloc, flash_attn, attn) if attn else {})


def hybrid_derived(c, tensors) -> dict:
    """The derived tensors (`tensors(c, i)[1]`) of every layer without attention."""
    return {k: v for i in range(c.n_layer) if i not in c.extra["attention_layers"] for k, v in tensors(c, i)[1].items()}


def kv_memory(c, n_ctx: int, alloc, flash_attn: bool, layers=None) -> dict:
    """One KV cache for every layer (or for the given attention layers)."""
    return {"kv": KVCache("kv", range(c.n_layer) if layers is None else layers, n_ctx, c.n_head_kv, c.head_dim_k,
                          c.head_dim_v, v_trans=not flash_attn, alloc=alloc)}


def swa_pattern(m, default: int) -> tuple[bool, ...]:
    """Which layers use the sliding window (True), from attention.sliding_window_pattern: per-layer flags,
    or a period p (every p-th layer global: layer il is local when il % p < p - 1), default `default`."""
    n_layer = m.int("block_count", required=True)
    pattern = m.any_of("attention.sliding_window_pattern", default, UINT32 + INT_ARRAY + ("array of bool",))
    if isinstance(pattern, list):          # per-layer flags: true = sliding window
        if len(pattern) != n_layer:
            raise GGUFError(f"{m.source}: sliding_window_pattern has {len(pattern)} entries for {n_layer} layers.")
        return tuple(bool(p) for p in pattern)
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
        return tuple(il % pattern < pattern - 1 for il in range(n_layer))
    raise GGUFError(f"{m.source}: bad attention.sliding_window_pattern {pattern!r}.")


def swa_memories(c, swa_layers, window: int, n_ctx: int, n_ubatch: int, alloc, flash_attn: bool,
                 n_seq_max: int = 1) -> dict:
    """Interleaved sliding-window attention: the global layers' full KV cache ("kv") and the local layers'
    window-sized one ("kv_swa"), both ordinary KV memories with their own write indices and masks. The
    window cache holds the pages of a window plus a ubatch per sequence that may be alive at once (capped by
    n_ctx cells)."""
    local = [i for i in range(c.n_layer) if swa_layers[i]]
    full = [i for i in range(c.n_layer) if not swa_layers[i]]
    mems = {}
    if full:
        mems["kv"] = KVCache("kv", full, n_ctx, c.n_head_kv, c.head_dim_k, c.head_dim_v, v_trans=not flash_attn,
                             alloc=alloc)
    if local:
        # A sequence's ubatch needs the window's previous tokens plus its own, window + n_ubatch - 1 positions:
        # that many cells' pages, plus one where they start mid-page.
        cells = min(n_ctx, n_seq_max * cells_for(window + n_ubatch - 1, 2))
        mems["kv_swa"] = KVCache("kv_swa", local, cells, c.n_head_kv, c.head_dim_k, c.head_dim_v,
                                 v_trans=not flash_attn, alloc=alloc, sliding_window=window)
    return mems


# ---- Mamba (selective state space) ----------------------------------------------------------------------------


def mamba_sizes(m) -> dict[str, int]:
    """The ssm.* hyper-parameters of a Mamba-family file (Mamba-2: time_step_rank is the head count)."""
    return {"d_conv": m.int("ssm.conv_kernel", required=True), "d_inner": m.int("ssm.inner_size", required=True),
            "d_state": m.int("ssm.state_size", required=True), "dt_rank": m.int("ssm.time_step_rank", required=True),
            "n_group": m.int("ssm.group_count", 1)}


def mamba_tensors(c, i: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, int, int]]]:
    """(shapes, derived parts) of layer i's Mamba mixer: in_proj holds x and z, x_proj holds dt, B and C
    (row ranges of the file's fused tensors)."""
    e = c.extra
    d, s, k, r = e["d_inner"], e["d_state"], e["d_conv"], e["dt_rank"]
    p = f"blk.{i}."
    shapes = {p + "ssm_in.x": (d, c.n_embd), p + "ssm_in.z": (d, c.n_embd), p + "ssm_conv1d.weight": (d, k),
              p + "ssm_conv1d.bias": (d,), p + "ssm_x.dt": (r, d), p + "ssm_x.b": (s, d), p + "ssm_x.c": (s, d),
              p + "ssm_dt.weight": (d, r), p + "ssm_dt.bias": (d,), p + "ssm_a": (d, s), p + "ssm_d": (d,),
              p + "ssm_out.weight": (c.n_embd, d)}
    derived = {p + "ssm_in.x": (p + "ssm_in.weight", 0, d), p + "ssm_in.z": (p + "ssm_in.weight", d, d),
               p + "ssm_x.dt": (p + "ssm_x.weight", 0, r), p + "ssm_x.b": (p + "ssm_x.weight", r, s),
               p + "ssm_x.c": (p + "ssm_x.weight", r + s, s)}
    return shapes, derived


def mamba_state(c, layers, alloc, n_slots: int, conv_channels: int | None = None) -> RecurrentState:
    """One state row per sequence and layer: [conv window ((d_conv - 1) x conv channels) | ssm state
    (d_state x d_inner)], written through state slot inputs like the KV cache's cells. conv_channels:
    d_inner (Mamba-1) or d_inner + 2 n_group d_state (Mamba-2 convolves x, B and C)."""
    e = c.extra
    row = (e["d_conv"] - 1) * (conv_channels or e["d_inner"]) + e["d_state"] * e["d_inner"]
    return RecurrentState("rs", layers, n_slots, row, alloc)


def mamba_mixer(g: GraphBuilder, w, io, c, i: int, h: Tensor, dt_b_c_rms: bool = False,
                dt_b_c_norms: bool = False) -> Tensor:
    """Layer i's Mamba-1 mixer of the normed input h [n, n_embd] (the ubatch's S sequences, t tokens each,
    grouped): in_proj, causal depthwise conv (+ bias, SiLU) over each sequence's carried window, dt/B/C from
    x_proj (RMS-normed: without weights for Falcon-Mamba, with ssm_{dt,b,c}_norm weights for Jamba),
    selective scan from each carried state, + D x, gated by SiLU(z), out_proj. Both states are written
    back."""
    e = c.extra
    d, s, k = e["d_inner"], e["d_state"], e["d_conv"]
    rs = io.memory("rs")
    n, n_seqs = h.shape[0], io.key.n_seqs
    t = n // n_seqs
    seqs = lambda x, width: g.reshape(x, (n_seqs, t, width))  # noqa: E731  [n, w] -> [S, t, w]
    ssm_state = g.reshape(rs.read(i, (k - 1) * d, s * d), (n_seqs, s, d))   # read on its own: see RecurrentView.read
    conv = causal_conv(g, rs, i, seqs(g.matmul(h, w(f"blk.{i}.ssm_in.x")), d), w(f"blk.{i}.ssm_conv1d.weight"))
    xc = g.silu(g.add(conv, w(f"blk.{i}.ssm_conv1d.bias")))
    xc_rows = g.reshape(xc, (n, d))
    dt, b, cc = (g.matmul(xc_rows, w(f"blk.{i}.ssm_x.{part}")) for part in ("dt", "b", "c"))
    if dt_b_c_norms:
        dt, b, cc = (rms_norm(g, x, w(f"blk.{i}.ssm_{part}_norm.weight"), c.rms_eps)
                     for x, part in ((dt, "dt"), (b, "b"), (cc, "c")))
    elif dt_b_c_rms:
        dt, b, cc = (g.rms_norm(x, c.rms_eps) for x in (dt, b, cc))
    dt = g.add(g.matmul(dt, w(f"blk.{i}.ssm_dt.weight")), w(f"blk.{i}.ssm_dt.bias"))
    scan = g.ssm_scan(ssm_state, xc, seqs(dt, d), w(f"blk.{i}.ssm_a"), seqs(b, s), seqs(cc, s))
    rs.write(i, g.slice_rows(scan, t, s, axis=1), col=(k - 1) * d)             # the next ssm state
    y = g.reshape(g.cont(g.slice_rows(scan, 0, t, axis=1)), (n, d))
    y = g.add(y, g.mul(xc_rows, w(f"blk.{i}.ssm_d")))
    y = g.mul(y, g.silu(g.matmul(h, w(f"blk.{i}.ssm_in.z"))))
    return g.matmul(y, w(f"blk.{i}.ssm_out.weight"))


def causal_conv(g: GraphBuilder, rs, i: int, x: Tensor, weight: Tensor) -> Tensor:
    """The causal depthwise convolution of x [S, t, channels] (S sequences of t new inputs) over each
    sequence's carried window (columns [0, (k - 1) channels) of its layer-i state row), which it writes back;
    no bias, no activation. -> [S, t, channels]."""
    n_seqs, t, channels = x.shape
    k = weight.shape[1]
    window = g.reshape(rs.read(i, 0, (k - 1) * channels), (n_seqs, k - 1, channels))
    conv_x = g.concat_rows(window, x, axis=1)
    rs.write(i, g.slice_rows(conv_x, t, k - 1, axis=1), col=0)                 # the next window
    return g.ssm_conv(conv_x, weight)


# ---- Mamba-2 ----------------------------------------------------------------------------------------------------
def mamba2_channels(c) -> int:
    e = c.extra
    return e["d_inner"] + 2 * e["n_group"] * e["d_state"]


def mamba2_tensors(c, i: int, gated_norm: bool = True) -> tuple[dict[str, tuple[int, ...]],
                                                                  dict[str, tuple[str, int, int]]]:
    """(shapes, derived parts) of layer i's Mamba-2 mixer: in_proj holds z, xBC and dt (one per head);
    gated_norm: the grouped RMSNorm's weight (ssm_norm; Falcon-H1 has none)."""
    e = c.extra
    d, k, n_head, ng = e["d_inner"], e["d_conv"], e["dt_rank"], e["n_group"]
    dc = mamba2_channels(c)
    p = f"blk.{i}."
    shapes = {p + "ssm_in.z": (d, c.n_embd), p + "ssm_in.xbc": (dc, c.n_embd), p + "ssm_in.dt": (n_head, c.n_embd),
              p + "ssm_conv1d.weight": (dc, k), p + "ssm_conv1d.bias": (dc,), p + "ssm_dt.bias": (n_head,),
              p + "ssm_a": (n_head, 1), p + "ssm_d": (n_head, 1), p + "ssm_out.weight": (c.n_embd, d)}
    if gated_norm:
        shapes[p + "ssm_norm.weight"] = (ng, d // ng)
    src = p + "ssm_in.weight"
    derived = {p + "ssm_in.z": (src, 0, d), p + "ssm_in.xbc": (src, d, dc), p + "ssm_in.dt": (src, d + dc, n_head)}
    return shapes, derived


def mamba2_mixer(g: GraphBuilder, w, io, c, i: int, h: Tensor, gated_norm: bool = True) -> Tensor:
    """Layer i's Mamba-2 mixer of the normed input h [n, n_embd] (S sequences of t tokens, grouped): z, xBC
    and dt from in_proj; causal conv (+ bias, SiLU) over xBC with each sequence's carried window; the
    multi-head selective scan (a scalar decay per head, B and C per group) from each carried state; + D x;
    gated by SiLU(z); RMSNorm per group (gated_norm); out_proj."""
    e = c.extra
    d, s, k, n_head, ng = e["d_inner"], e["d_state"], e["d_conv"], e["dt_rank"], e["n_group"]
    dc = mamba2_channels(c)
    rs = io.memory("rs")
    n, n_seqs = h.shape[0], io.key.n_seqs
    t = n // n_seqs
    seqs = lambda x, width: g.reshape(x, (n_seqs, t, width))  # noqa: E731
    ssm_state = g.reshape(rs.read(i, (k - 1) * dc, s * d), (n_seqs, s, d))
    conv = causal_conv(g, rs, i, seqs(g.matmul(h, w(f"blk.{i}.ssm_in.xbc")), dc), w(f"blk.{i}.ssm_conv1d.weight"))
    xbc = g.silu(g.add(conv, w(f"blk.{i}.ssm_conv1d.bias")))
    x = g.slice_rows(xbc, 0, d, axis=2)
    b, cc = g.slice_rows(xbc, d, ng * s, axis=2), g.slice_rows(xbc, d + ng * s, ng * s, axis=2)
    dt = g.add(g.matmul(h, w(f"blk.{i}.ssm_in.dt")), w(f"blk.{i}.ssm_dt.bias"))
    scan = g.ssm_scan2(ssm_state, x, seqs(dt, n_head), g.reshape(w(f"blk.{i}.ssm_a"), (n_head,)), b, cc)
    rs.write(i, g.slice_rows(scan, t, s, axis=1), col=(k - 1) * dc)
    heads = (n, n_head, d // n_head)
    y = g.add(g.reshape(g.cont(g.slice_rows(scan, 0, t, axis=1)), heads),
              g.mul(g.reshape(g.cont(x), heads), w(f"blk.{i}.ssm_d")))
    y = g.swiglu(g.matmul(h, w(f"blk.{i}.ssm_in.z")), g.reshape(y, (n, d)))       # silu(z) * y
    if gated_norm:
        y = g.reshape(rms_norm(g, g.reshape(y, (n, ng, d // ng)), w(f"blk.{i}.ssm_norm.weight"), c.rms_eps), (n, d))
    return g.matmul(y, w(f"blk.{i}.ssm_out.weight"))


# ---- mixture of experts -------------------------------------------------------------------------------------------
def moe_tensors(c, i: int, n_ff: int | None = None, norm: str = "ffn_norm.weight") -> dict[str, tuple[int, ...]]:
    """Layer i's expert FFN: its norm (blk.i.<norm>), router (ffn_gate_inp) and the experts' stacked
    gate/up/down, each expert n_ff wide (default the file's feed_forward_length)."""
    n_exp, p, f = c.extra["n_expert"], f"blk.{i}.", n_ff or c.n_ff
    return {p + norm: (c.n_embd,), p + "ffn_gate_inp.weight": (n_exp, c.n_embd),
            p + "ffn_gate_exps.weight": (n_exp, f, c.n_embd), p + "ffn_up_exps.weight": (n_exp, f, c.n_embd),
            p + "ffn_down_exps.weight": (n_exp, c.n_embd, f)}


def shared_expert_tensors(c, i: int, n_ff: int, gated: bool = True) -> dict[str, tuple[int, ...]]:
    """Layer i's shared expert (a gated FFN n_ff wide) and, gated, its gate (one output)."""
    p = f"blk.{i}."
    shapes = {p + "ffn_gate_shexp.weight": (n_ff, c.n_embd), p + "ffn_up_shexp.weight": (n_ff, c.n_embd),
              p + "ffn_down_shexp.weight": (c.n_embd, n_ff)}
    return shapes | ({p + "ffn_gate_inp_shexp.weight": (1, c.n_embd)} if gated else {})


def moe_shared_ffn(g: GraphBuilder, w, c, i: int, h: Tensor, norm_weights: bool, gated: bool = True) -> Tensor:
    """The routed experts plus the shared expert; gated, the latter scaled per token by
    sigmoid(gate_inp_shexp h) (Qwen2-MoE, Qwen3-Next), else added as it is (Granite 4.0's MoE hybrids)."""
    shared = gated_ffn(g, w, i, h, suffix="_shexp")
    if gated:
        shared = g.mul(shared, g.sigmoid(g.matmul(h, w(f"blk.{i}.ffn_gate_inp_shexp.weight"))))   # [n, 1] gate
    return g.add(moe_ffn(g, w, c, i, h, norm_weights), shared)


def moe_ffn(g: GraphBuilder, w, c, i: int, h: Tensor, norm_weights: bool) -> Tensor:
    p = f"blk.{i}."
    return g.moe_ffn(h, w(p + "ffn_gate_inp.weight"), w(p + "ffn_up_exps.weight"), w(p + "ffn_gate_exps.weight"),
                     w(p + "ffn_down_exps.weight"), c.extra["n_expert_used"], norm_weights)


def moe_sizes(m) -> dict[str, int]:
    """Experts, experts per token, and the shared expert's width (0: none)."""
    return {"n_expert": m.int("expert_count", 0, minimum=0), "n_expert_used": m.int("expert_used_count", 0, minimum=0),
            "n_ff_shexp": m.int("expert_shared_feed_forward_length", 0, minimum=0)}


def moe_layout(cfg, tensor_names) -> dict[str, tuple[int, ...]]:
    """Which layers are mixtures of experts: those whose file holds a router (ffn_gate_inp), as llama.cpp
    reads it (Model.read_layout)."""
    return {"moe_layers": tuple(i for i in range(cfg.n_layer) if f"blk.{i}.ffn_gate_inp.weight" in tensor_names)}


def ffn_or_moe_tensors(c, i: int) -> dict[str, tuple[int, ...]]:
    if i not in c.extra["moe_layers"]:
        return ffn_tensors(c, i)
    n_ff_shexp = c.extra.get("n_ff_shexp", 0)
    return moe_tensors(c, i) | (shared_expert_tensors(c, i, n_ff_shexp, gated=False) if n_ff_shexp else {})


def ffn_or_moe(g: GraphBuilder, w, c, i: int, h: Tensor, norm_weights: bool) -> Tensor:
    """Layer i's FFN: the experts where moe_layout found a router (plus an ungated shared expert where the
    file has one: expert_shared_feed_forward_length), else the gated FFN."""
    if i not in c.extra["moe_layers"]:
        return gated_ffn(g, w, i, h)
    if c.extra.get("n_ff_shexp"):
        return moe_shared_ffn(g, w, c, i, h, norm_weights, gated=False)
    return moe_ffn(g, w, c, i, h, norm_weights)


# ---- LFM2's gated short convolution -------------------------------------------------------------------------------
def shortconv_tensors(c, i: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, int, int]]]:
    """(shapes, derived parts) of layer i's short-conv block: in_proj holds B, C and x."""
    e, p, k = c.n_embd, f"blk.{i}.shortconv.", c.extra["conv_cache"]
    shapes = {p + "in_b": (e, e), p + "in_c": (e, e), p + "in_x": (e, e), p + "conv.weight": (e, k),
              p + "out_proj.weight": (e, e)}
    src = p + "in_proj.weight"
    return shapes, {p + "in_b": (src, 0, e), p + "in_c": (src, e, e), p + "in_x": (src, 2 * e, e)}


def shortconv_state(c, layers, alloc, n_slots: int) -> RecurrentState:
    """One row per sequence and layer: the last conv_cache - 1 inputs of the convolution."""
    return RecurrentState("rs", layers, n_slots, (c.extra["conv_cache"] - 1) * c.n_embd, alloc)


def shortconv_block(g: GraphBuilder, w, io, c, i: int, h: Tensor) -> Tensor:
    """Layer i's gated short convolution of the normed input h [n, n_embd] (S sequences of t tokens,
    grouped): B, C, x from in_proj; a causal depthwise conv (no bias, no activation) of B * x over each
    sequence's carried window; C * conv; out_proj."""
    e, p = c.n_embd, f"blk.{i}.shortconv."
    rs = io.memory("rs")
    n, n_seqs = h.shape[0], io.key.n_seqs
    t = n // n_seqs
    bx = g.mul(g.matmul(h, w(p + "in_b")), g.matmul(h, w(p + "in_x")))
    conv = causal_conv(g, rs, i, g.reshape(bx, (n_seqs, t, e)), w(p + "conv.weight"))
    y = g.mul(g.matmul(h, w(p + "in_c")), g.reshape(conv, (n, e)))
    return g.matmul(y, w(p + "out_proj.weight"))


# ---- Gated DeltaNet (Qwen3-Next's linear attention) ----------------------------------------------------------------
def delta_net_sizes(m) -> dict[str, int]:
    """The ssm.* hyper-parameters as Qwen3-Next's files hold them: state_size the key (and value) head size,
    group_count the key heads, time_step_rank the value heads, inner_size all value heads' width. Shapes that
    do not fit one another are refused here, with the numbers."""
    e = mamba_sizes(m)
    dk, n_k, n_v, d = e["d_state"], e["n_group"], e["dt_rank"], e["d_inner"]
    if n_v % n_k or d != n_v * dk or e["d_conv"] < 2:
        raise GGUFError(f"{m.source}: inconsistent gated delta-net sizes: {n_k} key heads and {n_v} value heads "
                        f"(a multiple of them) of {dk} (ssm.state_size), ssm.inner_size {d} (must be {n_v} x {dk}), "
                        f"conv kernel {e['d_conv']} (at least 2).")
    return e


def delta_net_channels(c) -> int:
    """The convolved channels: q and k (every key head), v (every value head)."""
    e = c.extra
    return 2 * e["n_group"] * e["d_state"] + e["d_inner"]


def delta_net_tensors(c, i: int, split_ba: bool = False) -> dict[str, tuple[int, ...]]:
    """Layer i's gated delta-net: q/k/v projection (attn_qkv) and output gate z (attn_gate) -- or, in files
    of older converters (extra["ssm_in"]), both in one ssm_in --, beta and alpha (ssm_ba: per key head, its
    value heads' betas then their alphas; split_ba (Qwen3.5): ssm_beta and ssm_alpha, one row per value
    head), conv, dt bias, A (-exp(A_log), as the converter writes it), the gated norm (one head's width) and
    the output projection."""
    e, p = c.extra, f"blk.{i}."
    d, n_v = e["d_inner"], e["dt_rank"]
    if e.get("ssm_in"):
        shapes = {p + "ssm_in.weight": (delta_net_channels(c) + d, c.n_embd)}
    else:
        shapes = {p + "attn_qkv.weight": (delta_net_channels(c), c.n_embd), p + "attn_gate.weight": (d, c.n_embd)}
    if split_ba:
        shapes |= {p + "ssm_beta.weight": (n_v, c.n_embd), p + "ssm_alpha.weight": (n_v, c.n_embd)}
    else:
        shapes[p + "ssm_ba.weight"] = (2 * n_v, c.n_embd)
    return shapes | {p + "ssm_conv1d.weight": (delta_net_channels(c), e["d_conv"]),
                     p + "ssm_dt.bias": (n_v,), p + "ssm_a": (n_v,), p + "ssm_norm.weight": (d // n_v,),
                     p + "ssm_out.weight": (c.n_embd, d)}


def delta_net_qkvz(g: GraphBuilder, w, c, i: int, h: Tensor) -> tuple[Tensor, Tensor]:
    """Layer i's q|k|v [n, channels] (every q head, every k head, every v head) and z [n, d_inner]: from
    attn_qkv and attn_gate, or from an older file's ssm_in, whose rows go per key head: its q, its k, its value
    heads' v, their z (llama.cpp's legacy path)."""
    e, p = c.extra, f"blk.{i}."
    if not e.get("ssm_in"):
        return g.matmul(h, w(p + "attn_qkv.weight")), g.matmul(h, w(p + "attn_gate.weight"))
    n, dk, n_k = h.shape[0], e["d_state"], e["n_group"]
    dv_k = e["d_inner"] // n_k                               # the value heads' width per key head
    mixed = g.reshape(g.matmul(h, w(p + "ssm_in.weight")), (n, n_k, 2 * dk + 2 * dv_k))

    def part(start: int, width: int) -> Tensor:
        return g.reshape(g.cont(g.slice_rows(mixed, start, width, axis=2)), (n, n_k * width))
    qk = g.concat_rows(part(0, dk), part(dk, dk), axis=1)
    return g.concat_rows(qk, part(2 * dk, dv_k), axis=1), part(2 * dk + dv_k, dv_k)


def delta_net_mixer(g: GraphBuilder, w, io, c, i: int, h: Tensor, split_ba: bool = False,
                    v_tiled: bool = False) -> Tensor:
    """Layer i's gated delta-net of the normed input h [n, n_embd] (S sequences of t tokens, grouped): q, k, v
    from attn_qkv through the causal conv (SiLU) over each sequence's carried window; q and k L2-normalised
    per head (q also by 1/sqrt(head size)); beta = sigmoid(b), decay g = A softplus(alpha + dt_bias); the delta
    rule from each carried state; per value head RMSNorm (ssm_norm) gated by SiLU(z); ssm_out.
    split_ba: beta and alpha from ssm_beta / ssm_alpha (delta_net_tensors). v_tiled (Qwen3.5): the file's
    value heads are tiled over the key heads (value head j reads key head j % key heads, as the converter
    reorders them for ggml's broadcast) rather than grouped (j // (value heads / key heads))."""
    e, p = c.extra, f"blk.{i}."
    dk, d, k, n_v, n_k = e["d_state"], e["d_inner"], e["d_conv"], e["dt_rank"], e["n_group"]
    dc, r, dv = delta_net_channels(c), n_v // n_k, d // n_v
    rs = io.memory("rs")
    n, n_seqs = h.shape[0], io.key.n_seqs
    t = n // n_seqs
    state = g.reshape(rs.read(i, (k - 1) * dc, dk * d), (n_seqs, dk, d))
    qkv, z = delta_net_qkvz(g, w, c, i, h)
    xc = g.silu(causal_conv(g, rs, i, g.reshape(qkv, (n_seqs, t, dc)), w(p + "ssm_conv1d.weight")))

    # q and k: x / sqrt(sum x^2 + eps) = rms_norm(x, eps / dk) / sqrt(dk) per head, on a contiguous copy (the
    # norm's kernel must not depend on the token count: a one-token slice is contiguous)
    qk = g.reshape(g.cont(g.slice_rows(xc, 0, 2 * n_k * dk, axis=2)), (n_seqs, t, 2 * n_k, dk))
    qk = g.rms_norm(qk, c.rms_eps / dk)
    q, kk = (g.reshape(g.scale(g.slice_rows(qk, start, n_k, axis=2), scale), (n_seqs, t, n_k * dk))
             for start, scale in ((0, 1.0 / dk), (n_k, 1.0 / math.sqrt(dk))))
    if v_tiled and r > 1:
        # the op pairs value head j with key head j // (its value heads / key heads): r copies of every key
        # head one after the other make that j % n_k (llama.cpp's ggml_repeat of q and k)
        def tiled(x: Tensor) -> Tensor:
            y = x
            for _ in range(r - 1):
                y = g.concat_rows(y, x, axis=2)
            return y
        q, kk = tiled(q), tiled(kk)
    v = g.slice_rows(xc, 2 * n_k * dk, d, axis=2)
    if split_ba:
        beta = g.reshape(g.sigmoid(g.matmul(h, w(p + "ssm_beta.weight"))), (n_seqs, t, n_v))
        alpha = g.matmul(h, w(p + "ssm_alpha.weight"))
    else:
        ba = g.reshape(g.matmul(h, w(p + "ssm_ba.weight")), (n, n_k, 2 * r))   # per key head: r betas, r alphas
        beta = g.reshape(g.sigmoid(g.slice_rows(ba, 0, r, axis=2)), (n_seqs, t, n_v))
        alpha = g.reshape(g.cont(g.slice_rows(ba, r, r, axis=2)), (n, n_v))
    decay = g.mul(g.softplus(g.add(alpha, w(p + "ssm_dt.bias"))), w(p + "ssm_a"))
    out = g.gated_delta_net(state, q, kk, v, g.reshape(decay, (n_seqs, t, n_v)), beta)
    rs.write(i, g.slice_rows(out, t, dk, axis=1), col=(k - 1) * dc)            # the next state
    y = g.reshape(g.cont(g.slice_rows(out, 0, t, axis=1)), (n, n_v, dv))
    y = g.swiglu(g.reshape(z, (n, n_v, dv)), rms_norm(g, y, w(p + "ssm_norm.weight"), c.rms_eps))   # silu(z) norm(y)
    return g.matmul(g.reshape(y, (n, d)), w(p + "ssm_out.weight"))
