"""The SMoE transformer language model: one decoder-only model in one file.

Legend: B batch, T tokens in this call, S keys attended (cache length), D hidden, V vocabulary,
nh query heads, nkv key/value heads, hs head size.

    x = embed(idx)                                   # (B, T, D)
    for each block:
        x = x + attn(attn_norm(x))                   # causal self-attention, RoPE, GQA
        x = x + ffn(ffn_norm(x))                     # MoELayer or DenseMLP
    logits = lm_head(norm(x))                        # (B, T, V)

The numerics follow transformers' Llama-family models (Mixtral, Qwen3-MoE) so that an export
gives the same logits: RMSNorm in float32 then cast back before the weight, RoPE in the
"rotate_half" layout (the two halves of a head, not interleaved pairs) with cos/sin computed in
float32 and cast to the activations' dtype, attention scale 1/sqrt(hs), separate q/k/v/o
projections without biases, q/k RMSNorm per head before RoPE (Qwen3). Parameter names are our
own; the Hugging Face names live in the interop adapter.

Build on the meta device and load with ``assign=True`` to avoid a first random init::

    with torch.device("meta"):
        model = SMoETransformer(config)
    model.load_state_dict(state_dict, assign=True)

Non-persistent buffers (the MoE layers' load counters) are recreated on the weights' device by a
load hook; RoPE tables are computed in each forward, so nothing is left on meta.

Positions and caches: ``model(idx_BT, positions_BT=..., cache=...)``. Each row has its own
positions (RoPE phases; a negative position marks a padding token). With a cache (any object
with the protocol of :mod:`smoe.inference.cache`: ``update(layer, positions_BT, k, v) ->
(keys, values, mask)`` and ``next_positions``), the cache stores the keys and decides the
attention mask; positions default to continuing each row of the cache. Without a cache,
attention is causal by index, padding keys excluded, positions default to ``arange(T)``.
The MoE losses are summed only when ``ModelOutput.aux_loss`` / ``z_loss`` are read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import ModelConfig
from smoe.nn.experts import DenseMLP, Experts
from smoe.nn.moe import MoEInfo, MoELayer
from smoe.nn.router import Router

__all__ = ["SMoETransformer", "ModelOutput", "RMSNorm", "Attention", "DecoderBlock",
           "rope_cos_sin", "apply_rope", "padded_causal_mask"]


@dataclass
class ModelOutput:
    """What one forward returns.

    logits: (B, T, V) in the model's dtype.
    loss: mean cross-entropy over targets != -100 (float32), None without targets.
    moe_infos: one :class:`~smoe.nn.moe.MoEInfo` per MoE layer, in layer order.
    aux_loss, z_loss: the MoE layers' weighted balance and z-losses, summed over layers (0-d
        float32; zeros for a dense model), computed on first read (decoding never reads them,
        so it never pays for them). ``total_loss`` adds them to ``loss``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    moe_infos: list[MoEInfo] = field(default_factory=list)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def _sum(self, name: str) -> torch.Tensor:
        if name not in self._sums:
            zero = self.logits.new_zeros((), dtype=torch.float32)
            self._sums[name] = sum((getattr(i, name) for i in self.moe_infos), zero)
        return self._sums[name]

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._sum("aux_loss")

    @property
    def z_loss(self) -> torch.Tensor:
        return self._sum("z_loss")

    def release(self) -> ModelOutput:
        """Drop every MoE layer's [T, E] router tensors (see :meth:`MoEInfo.release`) once
        the losses that are needed have been read; for code that keeps outputs. Returns self."""
        for info in self.moe_infos:
            info.release()
        return self

    @property
    def total_loss(self) -> torch.Tensor:
        """loss + aux_loss + z_loss: the training objective."""
        if self.loss is None:
            raise ValueError("total_loss needs targets: call the model with targets_BT")
        return self.loss + self.aux_loss + self.z_loss


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight (as transformers does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions_T: torch.Tensor, head_size: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, hs) of rotary embedding at ``positions_T``, computed in float32."""
    dev = positions_T.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float, device=dev)
                                / head_size))                       # (hs/2,)
    freqs = positions_T.float()[:, None] * inv_freq[None, :]        # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)                         # (T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hs) in the "rotate_half" layout: pairs (i, i + hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_TH + torch.cat((-x2, x1), dim=-1) * sin_TH


def padded_causal_mask(positions_BT: torch.Tensor) -> torch.Tensor:
    """mask_BTT without a cache: query i sees key j iff j <= i and key j is not padding
    (position < 0); padding queries see every key (their output is discarded, not NaN)."""
    T = positions_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=positions_BT.device).tril()
    mask_BTT = causal_TT & (positions_BT >= 0).unsqueeze(1)
    return mask_BTT | (positions_BT < 0).unsqueeze(-1)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions; no biases."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        D, hs = config.hidden_size, config.head_size
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_size = hs
        self.dropout = config.dropout
        self.q_proj = nn.Linear(D, config.num_heads * hs, bias=False)
        self.k_proj = nn.Linear(D, config.num_kv_heads * hs, bias=False)
        self.v_proj = nn.Linear(D, config.num_kv_heads * hs, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hs, D, bias=False)
        self.q_norm = RMSNorm(hs, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hs, config.norm_eps) if config.qk_norm else None

    def forward(self, x_BTD: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor,
                cache: Any = None, positions_BT: torch.Tensor | None = None,
                mask_BTT: torch.Tensor | None = None) -> torch.Tensor:
        """cos/sin: (T, hs) or (B, 1, T, hs). With ``cache`` the cache stores k/v at
        ``positions_BT`` and returns the mask; without, ``mask_BTT`` (None: causal)."""
        B, T, _ = x_BTD.shape
        hs = self.head_size
        q = self.q_proj(x_BTD).view(B, T, self.num_heads, hs)       # (B, T, nh, hs)
        k = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, hs)    # (B, T, nkv, hs)
        v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hs)
        q, k = apply_rope(q, cos_TH, sin_TH), apply_rope(k, cos_TH, sin_TH)

        mask = mask_BTT
        if cache is not None:
            k, v, mask = cache.update(self.layer_index, positions_BT, k, v)  # (B, nkv, S, hs)
            causal = False  # the cache decided: its mask, or None = every key is visible
        else:
            causal = mask is None
        if mask is not None:
            mask = mask.unsqueeze(1)  # (B, 1, T, S): the same for every head
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=hs ** -0.5,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * hs))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, layer_index)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if config.is_moe_layer(layer_index):
            self.ffn: MoELayer | DenseMLP = MoELayer(config.moe)
        else:
            self.ffn = DenseMLP(config.hidden_size, config.ffn_size, config.ffn_activation)

    def forward(self, x_BTD: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor,
                cache: Any = None, positions_BT: torch.Tensor | None = None,
                mask_BTT: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEInfo | None]:
        h = self.attn(self.attn_norm(x_BTD), cos_TH, sin_TH, cache, positions_BT, mask_BTT)
        x_BTD = x_BTD + F.dropout(h, self.dropout, self.training)
        info = None
        if isinstance(self.ffn, MoELayer):
            # Token-choice routers are causal; expert_choice is not (generate refuses it), so
            # the layer is told to be causal only when decoding with a cache.
            h, info = self.ffn(self.ffn_norm(x_BTD), causal=cache is not None)
        else:
            h = self.ffn(self.ffn_norm(x_BTD))
        return x_BTD + F.dropout(h, self.dropout, self.training), info


class SMoETransformer(nn.Module):
    """Decoder-only sparse mixture-of-experts language model.

    ``out = model(idx_BT, targets_BT)`` returns a :class:`ModelOutput`. Layers listed by
    ``config.moe_layer_indices()`` use an :class:`~smoe.nn.moe.MoELayer`, the others a SwiGLU
    :class:`~smoe.nn.experts.DenseMLP`.

    The model is causal for every token-choice router (dropless; with a capacity factor, which
    tokens an expert drops depends on the whole batch). ``router="expert_choice"`` is allowed
    in training as a research setting, but each expert picks its tokens from the whole batch,
    so a position's output depends on later tokens: its training loss leaks the future, and
    :func:`smoe.inference.generate` refuses such a model.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = (None if config.tie_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.reset_parameters()
        self.register_load_state_dict_post_hook(_materialize_meta_buffers)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) weights, residual out-projections init_std / sqrt(2 L) (GPT-2),
        norms one, biases and the noisy router's noise weights zero."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, std=std)
                for p in (m.bias, m.noise_weight):
                    if p is not None:
                        nn.init.zeros_(p)
            elif isinstance(m, Experts):
                nn.init.normal_(m.in_proj, std=std)
                nn.init.normal_(m.down_proj, std=out_std)
                for p in (m.in_proj_bias, m.down_proj_bias):
                    if p is not None:
                        nn.init.zeros_(p)
        for block in self.layers:
            nn.init.normal_(block.attn.o_proj.weight, std=out_std)
            ffn = block.ffn
            dense = ffn.shared_experts if isinstance(ffn, MoELayer) else ffn
            if dense is not None:
                nn.init.normal_(dense.down_proj.weight, std=out_std)

    # -- forward ------------------------------------------------------------------------
    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                positions_BT: torch.Tensor | None = None, cache: Any = None,
                kv_cache: Any = None, start_pos: int | None = None) -> ModelOutput:
        """Logits (and the loss with ``targets_BT``) of ``idx_BT``.

        positions_BT: each token's position (LongTensor (B, T); negative = padding). Defaults
            to continuing ``cache`` per row, or ``arange(T)`` without a cache.
        cache: a cache (see :mod:`smoe.inference.cache`) that stores keys and decides the mask.
        kv_cache, start_pos: the old spelling (``cache=``, ``positions = start_pos +
            arange(T)``), kept working.
        """
        B, T = idx_BT.shape
        if kv_cache is not None:
            if cache is not None:
                raise ValueError("give cache= or its old name kv_cache=, not both")
            cache = kv_cache
        if start_pos is not None:
            if positions_BT is not None:
                raise ValueError("give positions_BT= or start_pos=, not both")
            if start_pos < 0:
                raise ValueError(f"start_pos={start_pos} must be >= 0")
            positions_BT = torch.arange(start_pos, start_pos + T,
                                        device=idx_BT.device).expand(B, T)
        limit = cache.max_seq_len if cache is not None else self.config.max_seq_len
        if positions_BT is None and cache is None and T > limit:
            raise ValueError(f"{T} tokens do not fit in max_seq_len={limit}")
        if start_pos is not None and start_pos + T > limit:
            raise ValueError(f"positions [{start_pos}, {start_pos + T}) do not fit in "
                             f"max_seq_len={limit}")
        if positions_BT is None and cache is not None:
            positions_BT = cache.next_positions(B, T, idx_BT.device)
        mask_BTT = None
        if positions_BT is not None:
            if positions_BT.shape != (B, T):
                raise ValueError(f"positions_BT has shape {tuple(positions_BT.shape)}, expected "
                                 f"{(B, T)}")
            if cache is None:
                mask_BTT = padded_causal_mask(positions_BT)
                if T and int(positions_BT.max()) >= limit:
                    raise ValueError(f"positions up to {int(positions_BT.max())} do not fit in "
                                     f"max_seq_len={limit}")

        x = self.embed(idx_BT)                                          # (B, T, D)
        if positions_BT is None or start_pos is not None:  # the same positions in every row
            first = start_pos or 0
            cos, sin = rope_cos_sin(torch.arange(first, first + T, device=idx_BT.device),
                                    self.config.head_size, self.config.rope_theta, x.dtype)
        else:  # (B, 1, T, hs): per row, broadcast over heads
            cos, sin = rope_cos_sin(positions_BT.clamp(min=0).reshape(-1),
                                    self.config.head_size, self.config.rope_theta, x.dtype)
            cos, sin = (t.view(B, 1, T, -1) for t in (cos, sin))
        x = F.dropout(x, self.config.dropout, self.training)
        infos: list[MoEInfo] = []
        for block in self.layers:
            x, info = block(x, cos, sin, cache, positions_BT, mask_BTT)
            if info is not None:
                infos.append(info)
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)                                    # (B, T, V)

        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets_BT.reshape(B * T),
                                   ignore_index=-100)
        return ModelOutput(logits, loss, infos)

    # -- MoE access -----------------------------------------------------------------------
    def moe_layers(self) -> Iterator[tuple[int, MoELayer]]:
        """(layer index, MoELayer) for every MoE layer, in order."""
        for i, block in enumerate(self.layers):
            if isinstance(block.ffn, MoELayer):
                yield i, block.ffn

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """One auxiliary-loss-free balancing step on every ``sigmoid_bias`` MoE layer (a no-op
        for other routers); the trainer calls it after each optimizer step."""
        for _, layer in self.moe_layers():
            if layer.config.router == "sigmoid_bias":
                layer.update_bias()

    # -- counts ---------------------------------------------------------------------------
    def num_params(self) -> int:
        """Total parameters of the built model (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self, include_embedding: bool = True) -> int:
        """Parameters one token uses: all but the N - K routed experts it skips in each MoE
        layer (see :meth:`smoe.config.ModelConfig.num_active_params`)."""
        n = self.num_params()
        for _, layer in self.moe_layers():
            c = layer.config
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            n -= expert_params * (c.num_experts - c.top_k) // c.num_experts
        if not include_embedding and self.lm_head is not None:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token; formula in :meth:`smoe.config.ModelConfig.flops_per_token`."""
        return self.config.flops_per_token(seq_len)


def _materialize_meta_buffers(module: nn.Module, incompatible_keys) -> None:
    """After ``load_state_dict(assign=True)`` into a meta-built model, recreate non-persistent
    buffers (not in any state dict; all of ours are counters that start at zero) on the device
    of the loaded weights."""
    device = next((p.device for p in module.parameters() if not p.is_meta), None)
    if device is None:
        return
    for m in module.modules():
        for name in m._non_persistent_buffers_set:
            buf = m._buffers.get(name)
            if buf is not None and buf.is_meta:
                m._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


def __getattr__(name: str):
    """``smoe.model.KVCache``: the old name of :class:`smoe.inference.cache.StaticCache`,
    resolved on first use so that this module imports nothing from ``inference``."""
    if name == "KVCache":
        from smoe.inference.cache import StaticCache
        return StaticCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
