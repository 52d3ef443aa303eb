"""Parameter counts and weight memory of a Hugging Face MoE model from its ``config.json`` alone.

Pure arithmetic on the JSON (read with :mod:`json`; transformers is not needed). Each supported
``model_type`` is described by a :class:`Family` row in :data:`FAMILIES` -- which config keys hold
which sizes, and which optional parts (biases, QK-norm, MLA, attention sinks, shared experts, dense
layers) the transformers modeling code builds -- and every count is checked in the tests against
``sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())``.

Families: every ``model_type`` :mod:`smoe.hf` patches (:func:`hf_families`, the one family list
of the library). Counted exactly (own rows, held equal to transformers by the tests): mixtral,
qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss, phimoe, granitemoe, dbrx (nested
``attn_config``/``ffn_config``), llama4 / llama4_text (the text model in ``text_config``), jamba
(Mamba + attention hybrid), switch_transformers (encoder-decoder, :mod:`smoe.plan.t5`), and the
dense llama / mistral / qwen3 for comparison. The other families smoe.hf patches go through a
generic row (an estimate; its measured error is in :mod:`smoe.plan.families`). Also read: Grok-1
(no transformers class), native smoe run folders, and configs without ``model_type`` (by
``architectures`` or by their keys; :mod:`smoe.plan.resolve`). Catalog names
(:func:`catalog_names`) plan shipped published configs. Any config with a nested
``text_config`` dict is planned from that dict.

Beyond counting: :mod:`smoe.plan.kv` (KV cache per attention type), :mod:`smoe.plan.gpus`
(accelerators, links, the measured CPU), :mod:`smoe.plan.roofline` (fit, offload split, decode
and prefill rooflines, CPU-vs-transfer for offloaded experts), :mod:`smoe.plan.comm` (the
expert-parallel all-to-all model). Sizes (hidden size, layers, heads, vocab, FFN widths, experts, top-k,
MLA ranks) are required; optional switches (biases, ``head_dim``, ``num_key_value_heads``,
``decoder_sparse_step``, ``first_k_dense_replace``, ...) take transformers' defaults when absent.

Conventions
-----------
* ``total_params``: every parameter of the ``*ForCausalLM`` model, tied embeddings counted once.
  Persistent buffers are not parameters (DeepSeek-V3's per-expert ``e_score_correction_bias`` is
  mentioned in ``notes``). DeepSeek's multi-token-prediction layers (``num_nextn_predict_layers``)
  are *not* in the total; they are reported as ``mtp_params`` (as stored in the checkpoint,
  including that module's own copies of the embedding and head). For configs with a nested
  ``text_config`` (Llama 4) only the text model is counted.
* ``expert_params``: the routed experts only (their weights and biases). Shared experts, routers
  and everything else are ``non_expert_params`` (their split is in ``breakdown``).
* ``active_params``: parameters used for one token: all non-expert parameters, *including* the
  whole input-embedding table and the lm_head, plus ``top_k`` routed experts per MoE layer.
  ``active_params_no_embedding`` drops the input-embedding table (with tied embeddings the shared
  matrix stays, since it is still the lm_head). Vendors differ, and each convention reproduces
  some published figures (counts from this module):

  - with the input embedding (``active_params``): Mixtral-8x7B 12.88B ("12.9B"), Qwen3-30B-A3B
    3.35B ("3.3B", Qwen truncates: 30.53B total is "30.5B"), OLMoE-1B-7B 1.28B ("1.3B");
  - without it (``active_params_no_embedding``): DeepSeek-V3 36.63B ("37B"; 37.55B with it),
    DeepSeek-V2 20.85B ("21B"), DeepSeek-V2-Lite 2.45B ("2.4B"), gpt-oss-120b 5.13B ("5.1B"),
    gpt-oss-20b 3.61B ("3.6B").

  Qwen's "non-embedding" totals (e.g. 29.9B) drop both the embedding and the lm_head:
  ``total_params - embedding_params - lm_head_params``.
* ``weight_bytes``: fp32 and bf16 store every parameter at 4 and 2 bytes. fp8, int8 and int4
  quantize only the linear weights of attention (incl. MLA and Mamba projections), dense MLPs,
  shared and routed experts; embeddings, lm_head, routers, norms, biases, sinks and SSM state
  parameters stay in bf16. fp8/int8: 1 byte per weight plus one fp32 scale per output channel.
  int4: symmetric, one bf16 scale per group of 128 input elements (no zero point), i.e.
  4 + 16/128 = 4.125 bits per weight. See :data:`QUANT_FORMATS`.
* Sliding windows, RoPE variants and attention chunking do not change parameter counts.
"""

from __future__ import annotations

from smoe.plan.families import FAMILIES, QUANT_FORMATS, SUPPORTED_MODEL_TYPES, Family, QuantFormat
from smoe.plan.gpus import GPUS, LINKS, Hardware, gpu, measure_cpu
from smoe.plan.kv import KVGroup, kv_bytes, kv_bytes_per_token
from smoe.plan.models import catalog_names, load_named
from smoe.plan.resolve import hf_families, known_model_types
from smoe.plan.result import PlanResult, format_plan, plan_from_config, plan_from_path
from smoe.plan.roofline import Schemes, hardware_plan

__all__ = [
    "FAMILIES",
    "GPUS",
    "LINKS",
    "QUANT_FORMATS",
    "SUPPORTED_MODEL_TYPES",
    "Family",
    "Hardware",
    "KVGroup",
    "PlanResult",
    "QuantFormat",
    "Schemes",
    "catalog_names",
    "format_plan",
    "gpu",
    "hardware_plan",
    "hf_families",
    "known_model_types",
    "kv_bytes",
    "kv_bytes_per_token",
    "load_named",
    "measure_cpu",
    "plan_from_config",
    "plan_from_path",
]
