"""transformers interop.

Run a loaded Hugging Face MoE model's sparse blocks on smoe layers::

    import smoe.hf
    smoe.hf.patch(model)     # in place; the layers use the model's own parameters
    smoe.hf.unpatch(model)

Move models between smoe and the Hugging Face format (``smoe export`` / ``smoe import``)::

    smoe.hf.export_hf("runs/demo", "out/hf")     # loads with AutoModelForCausalLM
    smoe.hf.import_hf("out/hf", "runs/imported")

Importing this package does not import transformers; :func:`patch` needs it
(``pip install smoe[hf]``). :data:`SUPPORTED_FAMILIES` lists the ``model_type`` of every family
that can be patched; :mod:`smoe.hf.families` describes each of them.

Why export/import cover fewer families (:data:`EXPORT_FAMILIES`, :data:`IMPORT_FAMILIES`: llama,
qwen3, mixtral, qwen3_moe, qwen2_moe, glm4_moe, gpt_oss) than :func:`patch`: patching replaces
only the sparse MoE block and keeps running transformers' own implementation of everything else
(MLA, attention sinks, sliding windows, LayerNorm with biases, partial RoPE, ...), so any family
whose MoE block smoe's layers compute can be patched. Export and import move the *whole* model
onto smoe's own :class:`~smoe.model.SMoETransformer` (RMSNorm, GQA attention with full-head
RoPE and optional q/k norm, SwiGLU MLPs, no attention biases), so a family is covered only where
every part of it maps onto that model exactly, and what does not is refused by name: DeepSeek-V3
(and every config with ``kv_lora_rank``) for its multi-head latent attention (its MoE exports as
``glm4_moe``, the same block on standard attention), released gpt-oss checkpoints for their
learned attention sinks, sliding-window layers and YaRN RoPE (gpt-oss layout without those is
converted both ways). :mod:`smoe.hf.formats` has the table.
"""

from smoe.hf.convert import export_hf, hf_format_for, import_hf
from smoe.hf.formats import EXPORT_FAMILIES, IMPORT_FAMILIES
from smoe.hf.families import SUPPORTED_FAMILIES
from smoe.hf.patch import is_patched, patch, patched_layers, unpatch

__all__ = ["patch", "unpatch", "is_patched", "patched_layers", "SUPPORTED_FAMILIES",
           "export_hf", "import_hf", "hf_format_for", "EXPORT_FAMILIES", "IMPORT_FAMILIES"]
